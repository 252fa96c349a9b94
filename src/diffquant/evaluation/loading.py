"""Resolve a model argument (zoo name, diffusers folder, diffquant-saved folder) and its sampling defaults."""

from __future__ import annotations

from ..models.adapters import get_denoiser
from ..registry import MODELS
from ..sampling import SamplingSettings


def load_model(spec: str, device: str = "cpu", backend: str = "torch"):
    """A pipeline for ``spec`` on ``device``, its denoiser on engine ``backend`` (see
    :func:`diffquant.pipelines.load_pipeline`); errors are ValueErrors."""
    from ..pipelines import load_pipeline

    try:
        pipe = load_pipeline(spec, device=device, backend=backend)
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


def check_same_architecture(reference, model, names: tuple[str, str] = ("--reference", "--model")) -> None:
    """Refuse a pair whose denoisers differ in class or config before any image is generated."""
    ref, other = get_denoiser(reference), get_denoiser(model)
    # A denoiser deployed on an engine (OVDenoiser) names the diffusers class it runs as ``class_name``.
    kinds = [getattr(d, "class_name", None) or type(d).__name__ for d in (ref, other)]
    if kinds[0] != kinds[1]:
        raise ValueError(f"{names[0]} is a {kinds[0]} but {names[1]} a {kinds[1]}; "
                         "evaluate a model against the float model it was quantized from")
    a, b = dict(ref.config), dict(other.config)
    # quantization_config names how a model was quantized (diffusers' loading hook), not its architecture.
    for key in sorted(k for k in set(a) | set(b) if not k.startswith("_") and k != "quantization_config"):
        if a.get(key) != b.get(key):
            raise ValueError(f"{names[0]} and {names[1]} differ in denoiser {key} ({a.get(key)} vs {b.get(key)}); "
                             "evaluate a model against the float model it was quantized from")
