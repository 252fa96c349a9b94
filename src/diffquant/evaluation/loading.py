"""Resolve a model argument (zoo name, diffusers folder, diffquant-saved folder) and its sampling defaults."""

from __future__ import annotations

from ..registry import MODELS
from ..sampling import SamplingSettings


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
    """Explicit options win, then the bundled model's defaults when ``spec`` names one, then the defaults policy of
    ``diffquant.sampling`` (those registered for ``pipe``, else the pipeline's own)."""
    registered = dict(MODELS[spec].sampling) if spec in MODELS else None
    return SamplingSettings(steps, guidance, height, width).resolve(pipe, registered)
