"""Progressive calibration (PCR, seed 002): step t is calibrated on the quantized trajectory.

One sampling run of the pipeline over all calibration prompts drives the calibration. At step i a
forward pre-hook on the denoiser first runs the denoiser once more with every activation quantizer
observing (weights already quantized, activations float), fits *only* the timestep group of step i
from those statistics, and then lets the real call run fully quantized. The latents reaching step
i+1 therefore carry the error of the quantized steps 0..i, which is exactly what step i+1 will see
at inference. Earlier groups keep their parameters; later groups are fitted when their step comes.

All calibration prompts go through the pipeline as one batch: every group must be fitted on all
prompts before the next step runs, which a sequence of batches cannot do without re-running the
earlier steps. Memory therefore grows with the number of calibration prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import QuantState, quantized_layers, set_state
from ..quant import ActivationQuantizer
from ..wrap import quant_record


@dataclass(frozen=True)
class SamplingRun:
    """One deterministic sampling call of a pipeline: prompts, schedule, guidance, size and seed."""

    prompts: tuple[str, ...]
    num_inference_steps: int
    guidance_scale: float
    height: int | None = None
    width: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no calibration prompts given; pass a prompt list or a non-empty prompt file")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")

    @torch.no_grad()
    def __call__(self, pipe, output_type: str = "latent") -> torch.Tensor:
        """Sample all prompts as one batch; returns latents (or images with ``output_type='pt'``)."""
        size = {k: v for k, v in (("height", self.height), ("width", self.width)) if v}
        out = pipe(
            list(self.prompts), num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            generator=torch.Generator().manual_seed(self.seed), output_type=output_type, **size,
        )
        return out.images.float()


@contextmanager
def per_step_hook(denoiser: nn.Module, fn: Callable[[int, tuple, dict], None]) -> Iterator[None]:
    """Call ``fn(step_index, args, kwargs)`` before each denoiser call (one call per sampling step).

    The step counter restarts whenever the context is entered; use one context per sampling run.
    Registered after ``wrap_denoiser``'s timestep hook, so the timestep context is already set.
    """
    step = [0]

    def hook(module, args, kwargs):
        fn(step[0], args, kwargs)
        step[0] += 1

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def activation_quantizers(denoiser: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer of the denoiser's quantized layers and attention processors."""
    return [q for m in quantized_layers(denoiser).values() for q in m.activation_quantizers()]


@torch.no_grad()
def fit_group_from_call(denoiser: nn.Module, group: int, args: tuple, kwargs: dict, seed: int = 0) -> None:
    """Fit timestep group ``group`` of every activation quantizer on one denoiser call, leaving the other
    groups' parameters untouched, then switch the quantizers back to quantizing.

    The call runs through ``denoiser.forward`` (no hooks) with quantized weights and observing
    activation quantizers. ``finish_observing`` fits the observed group and lets unobserved groups
    borrow it; the borrowed rows are put back, so only ``group`` changes.
    """
    quantizers = activation_quantizers(denoiser)
    for i, q in enumerate(quantizers):
        q.start_observing(seed=seed + i)
    denoiser.forward(*args, **kwargs)
    for q in quantizers:
        others = torch.ones(q.num_groups, dtype=torch.bool)
        others[group] = False
        scale, zero_point = q.scale.detach().clone(), q.zero_point.clone()
        q.finish_observing()
        q.scale[others] = scale[others].to(q.scale.device)
        q.zero_point[others] = zero_point[others].to(q.zero_point.device)


def progressive_calibrate(
    pipe,
    run: SamplingRun,
    *,
    start_step: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fit each step's activation group on the trajectory of the already-quantized earlier steps.

    The denoiser must be wrapped with one timestep group per step of ``run`` (``TimestepGroups.per_step``).
    Steps before ``start_step`` run quantized with their existing parameters (re-calibrating only
    from the first step whose bit width changed). Returns the timestep of every step, in order.
    Ends with every quantized module frozen.
    """
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    record = quant_record(denoiser)
    if len(record.groups) != run.num_inference_steps:
        raise ValueError(
            f"progressive calibration needs one timestep group per step ({run.num_inference_steps}), "
            f"the denoiser has {len(record.groups)}; wrap it with TimestepGroups.per_step(timesteps)"
        )
    set_state(denoiser, QuantState.FROZEN)
    timesteps: list[float] = []
    bar = tqdm(total=run.num_inference_steps, desc="pcr: progressive calibration", disable=not progress)

    def calibrate_step(step: int, args: tuple, kwargs: dict) -> None:
        context = record.context
        timesteps.append(float(context.timestep.flatten()[0]))
        group = int(context.group)
        if step >= start_step:
            fit_group_from_call(denoiser, group, args, kwargs, seed=seed + 7919 * step)
        bar.update(1)

    try:
        with per_step_hook(denoiser, calibrate_step):
            run(pipe)
    finally:
        bar.close()
    return timesteps
