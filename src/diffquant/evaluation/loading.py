"""Resolve a model argument (zoo name, diffusers folder, diffquant-saved folder) and its sampling defaults."""

from __future__ import annotations

from ..wrap import get_denoiser
from .paired import GenSettings


def _zoo():
    try:
        from diffquant import zoo

        return zoo
    except ImportError:
        return None


def zoo_names() -> list[str]:
    zoo = _zoo()
    return list(getattr(zoo, "MODEL_NAMES", [])) if zoo else []


def load_model(spec: str, device: str = "cpu"):
    """A pipeline for ``spec`` on ``device`` (see :func:`diffquant.pipelines.load_pipeline`); errors are ValueErrors."""
    from ..pipelines import load_pipeline

    try:
        pipe = load_pipeline(spec, device=device)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_settings(pipe, spec: str, steps: int | None, guidance: float | None, height: int | None, width: int | None) -> GenSettings:
    """Explicit options win, then the mini zoo's defaults for ``spec``, then SD-like defaults from the pipeline's config."""
    defaults: dict = {}
    if spec in zoo_names():
        defaults = dict(_zoo().DEFAULTS[spec])
    denoiser = get_denoiser(pipe)
    native = int(denoiser.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    return GenSettings(
        steps=steps or defaults.get("num_inference_steps", 25),
        guidance=guidance if guidance is not None else defaults.get("guidance_scale", 7.5),
        height=height or defaults.get("height", native),
        width=width or defaults.get("width", native),
    )
