"""Resolve a model argument (zoo name, diffusers folder, diffquant-saved folder) and its sampling defaults."""

from __future__ import annotations

from pathlib import Path

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
    """A pipeline for ``spec`` on ``device``: a mini-zoo name, a folder written by ``diffquant.save``, or a diffusers pipeline folder."""
    if spec in zoo_names():
        pipe = _zoo().load_pipeline(spec)
    else:
        path = Path(spec)
        if not path.is_dir():
            names = ", ".join(zoo_names()) or "none available"
            raise ValueError(f"model {spec!r} not found: pass a diffusers pipeline folder, a folder written by "
                             f"`diffquant quantize`, or a mini-zoo name ({names})")
        import diffquant

        if is_diffquant_folder(path):
            pipe = diffquant.load(str(path))
        elif (path / "model_index.json").is_file():
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(str(path))
        else:
            raise ValueError(f"{spec!r} is neither a diffusers pipeline folder (no model_index.json) nor a diffquant-saved model")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_diffquant_folder(path: Path) -> bool:
    from diffquant.serialization import MANIFEST

    return (path / MANIFEST).is_file()


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
