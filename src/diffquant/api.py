"""The one entry point: ``diffquant.quantize(pipeline_or_denoiser, config, calibration=...)``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationSet
from .config import QuantConfig
from .guard import nonfinite_guard
from .methods import QuantJob
from .prompts import prompt_list, warn_truncated
from .registry import method as registered_method, model_for, sampling_defaults
from .sampling import is_unconditional, unconditional_prompts
from .wrap import get_denoiser


def quantize(
    pipe_or_denoiser: Any,
    config: QuantConfig | None = None,
    calibration: CalibrationSet | list[str] | str | Path | int | None = None,
    *,
    workdir: str | Path | None = None,
    progress: bool = True,
    torch_dtype: torch.dtype | None = None,
) -> Any:
    """Quantize the denoiser of a diffusers pipeline (or a bare denoiser) in place and return it.

    ``calibration`` is a list of prompts or a prompt file (sampled with the float pipeline's own
    scheduler and guidance), or a recorded ``CalibrationSet`` (required for a bare denoiser when
    activations are quantized). An unconditional pipeline (DDPM, DDIM, LDM) calibrates from seeds alone:
    ``calibration`` is then a number of samples (default ``config.calibration.num_prompts``).
    ``workdir`` holds resumable intermediate state for long methods.
    ``torch_dtype`` (as in diffusers: float32, bfloat16 or float16) casts the pipeline (or denoiser) in place
    before calibrating, so recording and the forward passes run in it; observers, learned rounding and step
    sizes stay float32 (the quantizers compute in float32 and cast back).
    """
    config = config or QuantConfig()
    if torch_dtype is not None:
        pipe_or_denoiser.to(dtype=check_dtype(torch_dtype))
    denoiser = get_denoiser(pipe_or_denoiser)
    pipeline = None if isinstance(pipe_or_denoiser, nn.Module) else pipe_or_denoiser
    prompts: list[str] | None = None
    calib_set: CalibrationSet | None = None
    if isinstance(calibration, CalibrationSet):
        calib_set = calibration
    elif pipeline is not None and is_unconditional(pipeline):
        if calibration is not None and (isinstance(calibration, bool) or not isinstance(calibration, int)):
            raise ValueError(f"{type(pipeline).__name__} is unconditional: calibrate it from seeds "
                             "(calibration=None or a number of samples), not prompts")
        prompts = unconditional_prompts(calibration if calibration is not None else config.calibration.num_prompts)
        if config.calibration.seeds is not None and len(prompts) != len(config.calibration.seeds):
            raise ValueError(f"{len(prompts)} calibration samples but {len(config.calibration.seeds)} calibration seeds; "
                             "pass calibration=None to sample one per seed")
    elif isinstance(calibration, (str, Path)):
        prompts = prompt_list(calibration)
    elif calibration is not None:
        prompts = [str(p) for p in calibration]
        if not prompts or not all(p.strip() for p in prompts):
            raise ValueError("calibration prompts must be non-empty strings")
    elif pipeline is not None:
        prompts = _default_prompts(pipeline)
    if pipeline is not None and prompts and not is_unconditional(pipeline):
        warn_truncated(pipeline, prompts)
    job = QuantJob(
        denoiser=denoiser, config=config, pipeline=pipeline, prompts=prompts, calibration=calib_set,
        sampling_defaults=sampling_defaults(pipeline), workdir=Path(workdir) if workdir else None, progress=progress,
    )
    start = time.perf_counter()
    with nonfinite_guard(denoiser, "calibration", quantized=False):
        registered_method(config.method).run(job)
    record = denoiser.diffquant
    record.report.setdefault("calibration_seconds", time.perf_counter() - start)
    record.report.setdefault("sampling_defaults", job.sampling_defaults)
    if job.calibration is not None:
        record.report.setdefault("calibration_calls", len(job.calibration))
        record.report.setdefault("calibration_samples", job.calibration.num_samples())
    return pipe_or_denoiser


CALIBRATION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` (a torch dtype or its name) if calibration can run in it; a one-line error otherwise."""
    resolved = CALIBRATION_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in CALIBRATION_DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype!r} for calibration; pass --dtype (torch_dtype=) float32, bfloat16 or float16")
    return resolved


def _default_prompts(pipeline: Any) -> list[str] | None:
    """A bundled model's own calibration prompts; for any other pipeline the caller must pass some."""
    model = model_for(pipeline)
    return model.calibration_prompts() if model else None
