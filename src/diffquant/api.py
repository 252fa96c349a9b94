"""The one entry point: ``diffquant.quantize(pipeline_or_denoiser, config, calibration=...)``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from .calibration import CalibrationSet
from .config import QuantConfig
from .methods import METHODS, QuantJob
from .prompts import prompt_list
from .wrap import get_denoiser


def sampling_defaults(pipe: Any) -> dict:
    """Default steps/guidance/size for a pipeline: the mini zoo's settings for its models, else {}."""
    if pipe is None:
        return {}
    origin = str(getattr(pipe.config, "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
    try:
        from . import zoo
    except ImportError:
        return {}
    for name in getattr(zoo, "MODEL_NAMES", ()):
        try:
            if origin and Path(origin).resolve() == Path(zoo.model_path(name)).resolve():
                return dict(zoo.DEFAULTS[name])
        except (FileNotFoundError, OSError):
            continue
    return {}


def quantize(
    pipe_or_denoiser: Any,
    config: QuantConfig | None = None,
    calibration: CalibrationSet | list[str] | str | Path | None = None,
    *,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> Any:
    """Quantize the denoiser of a diffusers pipeline (or a bare denoiser) in place and return it.

    ``calibration`` is a list of prompts or a prompt file (sampled with the float pipeline's own
    scheduler and guidance), or a recorded ``CalibrationSet`` (required for a bare denoiser when
    activations are quantized). ``workdir`` holds resumable intermediate state for long methods.
    """
    config = config or QuantConfig()
    denoiser = get_denoiser(pipe_or_denoiser)
    pipeline = None if isinstance(pipe_or_denoiser, nn.Module) else pipe_or_denoiser
    prompts: list[str] | None = None
    calib_set: CalibrationSet | None = None
    if isinstance(calibration, CalibrationSet):
        calib_set = calibration
    elif isinstance(calibration, (str, Path)):
        prompts = prompt_list(calibration)
    elif calibration is not None:
        prompts = [str(p) for p in calibration]
        if not prompts or not all(p.strip() for p in prompts):
            raise ValueError("calibration prompts must be non-empty strings")
    elif pipeline is not None:
        prompts = _default_prompts(pipeline)
    job = QuantJob(
        denoiser=denoiser, config=config, pipeline=pipeline, prompts=prompts, calibration=calib_set,
        sampling_defaults=sampling_defaults(pipeline), workdir=Path(workdir) if workdir else None, progress=progress,
    )
    start = time.perf_counter()
    METHODS[config.method].run(job)
    record = denoiser.diffquant
    record.report.setdefault("calibration_seconds", time.perf_counter() - start)
    record.report.setdefault("sampling_defaults", job.sampling_defaults)
    if job.calibration is not None:
        record.report.setdefault("calibration_calls", len(job.calibration))
        record.report.setdefault("calibration_samples", job.calibration.num_samples())
    return pipe_or_denoiser


def _default_prompts(pipeline: Any) -> list[str] | None:
    """The mini zoo's calibration prompts for its own models; otherwise the caller must pass some."""
    if not sampling_defaults(pipeline):
        return None
    from . import zoo

    return zoo.calibration_prompts()
