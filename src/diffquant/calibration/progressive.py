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

Resume (``diffquant.checkpoint``): with ``checkpoint_dir`` every fitted step writes its group's
activation parameters (``step-NNNN.safetensors``) and then its done marker. A rerun with the same
model state, run and settings restores the finished steps' parameters, replays those steps
quantized (one denoiser call each, nothing re-fitted) to rebuild the trajectory, and fits from
the first unfinished step on, ending bit-identical to an uninterrupted run. A folder written for
another model, run or config is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, fingerprint
from ..io import atomic_save_tensors
from ..nn import QuantState, quantized_layers, set_state
from ..quant import ActivationQuantizer
from ..sampling import DenoiserStep, SamplingSettings, denoiser_calls, sample
from ..wrap import get_denoiser, quant_record


def activation_quantizers(denoiser: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer of the denoiser's quantized layers and attention processors."""
    return [q for m in quantized_layers(denoiser).values() for q in m.activation_quantizers()]


@torch.no_grad()
def fit_group_from_call(denoiser: nn.Module, group: int, args: tuple, kwargs: dict, seed: int = 0) -> None:
    """Fit timestep group ``group`` of every activation quantizer on one denoiser call, leaving the other
    groups' parameters untouched, then switch the quantizers back to quantizing.

    The call runs through ``denoiser.forward`` (no hooks) with quantized weights and observing
    activation quantizers; ``ActivationQuantizer.refit_group`` changes only ``group``.
    """
    quantizers = activation_quantizers(denoiser)
    for i, q in enumerate(quantizers):
        q.start_observing(seed=seed + i)
    denoiser.forward(*args, **kwargs)
    for q in quantizers:
        q.refit_group(group)


@dataclass
class RangePrior:
    """PCR's robust per-step ranges (``step_ranges="pooled_shrink"``): after step t's group is fitted on its n
    calibration samples, its range moves toward ``pooled`` (one ``(lo, hi)`` per activation quantizer, per channel
    segment: the range over every step) by ``w = prior_samples / (prior_samples + n)``: the pooled range counts as
    ``prior_samples`` samples of evidence, so more calibration prompts keep a step closer to its own range. A range
    only widens (``lo' = lo + w·min(0, L − lo)``, ``hi' = hi + w·max(0, H − hi)``): the failure it corrects is a
    held-out prompt leaving a range fitted on few samples, never one too wide."""

    pooled: list[tuple[torch.Tensor, torch.Tensor]]
    prior_samples: float

    @torch.no_grad()
    def apply(self, quantizers: list[ActivationQuantizer], group: int, samples: int) -> None:
        w = self.prior_samples / (self.prior_samples + samples)
        for q, (pooled_lo, pooled_hi) in zip(quantizers, self.pooled, strict=True):
            if q.dynamic:
                continue
            lo, hi = q.group_range(group)
            lo_gap, hi_gap = (pooled_lo - lo).clamp(max=0), (pooled_hi - hi).clamp(min=0)
            if bool((lo_gap < 0).any() or (hi_gap > 0).any()):
                q.set_group_range(group, lo + w * lo_gap, hi + w * hi_gap)


def pooled_ranges(denoiser: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each activation quantizer's range over all its timestep groups as now fitted (``RangePrior.pooled``)."""
    out = []
    for q in activation_quantizers(denoiser):
        ranges = [q.group_range(g) for g in range(q.num_groups)]
        out.append((torch.stack([lo for lo, _ in ranges]).amin(dim=0), torch.stack([hi for _, hi in ranges]).amax(dim=0)))
    return out


def _batch(call: DenoiserStep) -> int:
    return next(v for v in (*call.args, *call.kwargs.values()) if torch.is_tensor(v) and v.dim() > 0).shape[0]


def state_checkpoint(folder: Path, denoiser: nn.Module, settings: dict, what: str) -> Checkpoint:
    """The checkpoint in ``folder`` of work on ``denoiser``'s current tensors (weights, quantizer parameters and
    bit widths) under JSON ``settings``."""
    return Checkpoint(folder, fingerprint(settings, denoiser.state_dict()), what).open()


def _step_file(step: int) -> str:
    return f"step-{step:04d}.safetensors"


@torch.no_grad()
def _restore_steps(checkpoint: Checkpoint, steps: list[dict], quantizers: list[ActivationQuantizer]) -> None:
    """Put the saved group parameters of every fitted step back into ``quantizers``."""
    for entry in steps:
        if not entry["fitted"]:
            continue
        tensors = checkpoint.load_tensors(_step_file(entry["step"]))
        for k, q in enumerate(quantizers):
            q.set_group_params(entry["group"], tensors[f"{k}/scale"], tensors[f"{k}/zero_point"])


def progressive_calibrate(
    pipe,
    prompts: list[str],
    settings: SamplingSettings,
    *,
    start_step: int = 0,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    depends_on: dict | None = None,
    freeze: bool = True,
    seeds: list[int] | None = None,
    prior: RangePrior | None = None,
) -> list[float]:
    """Fit each step's activation group on the trajectory of the already-quantized earlier steps.

    All ``prompts`` are sampled as one batch with the resolved ``settings`` (``settings.resolve(pipe, ...)``).
    The denoiser must be wrapped with one timestep group per sampling step (``TimestepGroups.per_step``).
    Steps before ``start_step`` run quantized with their existing parameters (re-calibrating only
    from the first step whose bit width changed). Returns the timestep of every step, in order.
    Steps run in ``learning`` (weights fake-quantized from the kept float weight); with ``freeze`` the pass
    ends with every quantized module frozen, without it the float weights stay for a float reference run
    (PCR's per-step sensitivity switches quantization off, which a frozen weight cannot undo).
    ``checkpoint_dir`` makes the pass resumable (module docstring); ``depends_on`` (JSON) names what else the result depends on, e.g. the observers.
    ``seeds``: one per prompt, each sample's own noise (``sample``); None: one generator from ``settings.seed``.
    ``prior`` widens each fitted step's ranges toward the pooled ones before the step runs (``RangePrior``).
    """
    if not prompts:
        raise ValueError("no calibration prompts given; pass a prompt list or a non-empty prompt file")
    denoiser = get_denoiser(pipe)
    record = quant_record(denoiser)
    steps = settings.steps
    if len(record.groups) != steps:
        raise ValueError(
            f"progressive calibration needs one timestep group per step ({steps}), "
            f"the denoiser has {len(record.groups)}; wrap it with TimestepGroups.per_step(timesteps)"
        )
    checkpoint = None if checkpoint_dir is None else state_checkpoint(
        Path(checkpoint_dir), denoiser, {"prompts": list(prompts), "sampling": settings.to_dict(), "start_step": start_step,
                                         "seed": seed, "settings": depends_on or {}, **({"seeds": seeds} if seeds else {})}, "a progressive calibration")
    done: list[dict] = list(checkpoint.done().values()) if checkpoint is not None else []
    # Quantized weights now; each step's activation group is fitted below before that step runs quantized.
    set_state(denoiser, QuantState.LEARNING, fit_activations_later=True)
    quantizers = activation_quantizers(denoiser)
    if done:
        checkpoint.reused(len(done), "step")
        _restore_steps(checkpoint, done, quantizers)
    if len(done) == steps:
        if freeze:
            set_state(denoiser, QuantState.FROZEN)
        return [entry["timestep"] for entry in done]
    timesteps: list[float] = []
    bar = tqdm(total=steps, desc="pcr: progressive calibration", disable=not progress)

    def calibrate_step(call: DenoiserStep) -> None:
        step, args, kwargs, context = call.step, call.args, call.kwargs, record.context
        timesteps.append(float(context.timestep.flatten()[0]))
        group = int(context.group)
        if step >= len(done):
            fitted = step >= start_step
            if fitted:
                fit_group_from_call(denoiser, group, args, kwargs, seed=seed + 7919 * step)
                if prior is not None:
                    prior.apply(quantizers, group, _batch(call))
            if checkpoint is not None:
                if fitted:
                    atomic_save_tensors({f"{k}/{name}": value for k, q in enumerate(quantizers)
                                         for name, value in q.group_params(group).items()}, checkpoint.path(_step_file(step)))
                checkpoint.mark_done(f"step-{step:04d}", {"step": step, "group": group, "timestep": timesteps[-1], "fitted": fitted})
        bar.update(1)

    try:
        with denoiser_calls(denoiser, before=calibrate_step):
            sample(pipe, prompts, settings, seeds=seeds)
    finally:
        bar.close()
    if freeze:
        set_state(denoiser, QuantState.FROZEN)
    return timesteps
