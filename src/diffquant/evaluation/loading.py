"""Resolve a model argument (zoo name, diffusers folder, diffquant-saved folder) and its sampling defaults."""

from __future__ import annotations

from ..api import sampling_defaults
from ..sampling import SamplingSettings


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


def resolve_settings(pipe, spec: str, steps: int | None, guidance: float | None, height: int | None,
                     width: int | None) -> SamplingSettings:
    """Explicit options win, then the mini zoo's defaults for ``spec`` (or those registered for ``pipe``), then the
    pipeline's own (``diffquant.sampling``)."""
    registered = dict(_zoo().DEFAULTS[spec]) if spec in zoo_names() else sampling_defaults(pipe)
    return SamplingSettings(steps, guidance, height, width).resolve(pipe, registered)
