"""PCR (seed 002): progressive calibration and activation relaxing, one activation group per step.

Recipe (our reading of the paper, choices marked):

1. One timestep group per calibration step (``TimestepGroups.per_step``); weights min/max per channel,
   optionally refined by Q-Diffusion's block reconstruction (``reconstruct_weights``).
2. Progressive calibration (``calibration.progressive``): step t is fitted on latents produced by
   the already-quantized steps T…t+1 (all calibration prompts in one batch, every step).
3. Per-step sensitivity (``calibration.sensitivity``): error of the final image and of the step's
   own output when only that step is quantized, on ``sensitivity_prompts`` prompts.
4. Activation relaxing: the ``relax_fraction`` most sensitive steps (by ``sensitivity_metric``), or
   the explicit ``relax_steps``, quantize every activation at ``relax_bits`` (never lowering a width
   that is already higher, e.g. 16-bit softmax). Those steps and all later ones are then calibrated
   progressively again, since their inputs changed; earlier steps keep their parameters.
   Choice: sensitivity is measured on the progressively calibrated base-bit model, before relaxing.
5. Inference with another step count: each timestep uses the group of the nearest calibrated
   timestep (``TimestepGroups.index``), so its step's parameters and bit width.
6. Robust per-step ranges (``step_ranges``; our addition, docs/pcr.md). ``literal`` is the paper's: a step's
   range is the min/max of its calibration batch (2 x prompts samples with guidance), which held-out prompts
   leave (mini-sd: the held-out range exceeds 81 % of the (quantizer, step) ranges of 32 calibration prompts;
   the clipped error compounds into diverged trajectories); it stays the default until the robust form is measured
   on held-out images (docs/pcr.md). ``pooled_shrink`` widens each fitted
   step's range toward the range pooled over all steps of the float calibration trajectories by
   ``prior_samples / (prior_samples + n)`` (``calibration.progressive.RangePrior``), before the step runs, so
   progressive calibration still sees the inference trajectory. Candidates not taken: a percentile or MSE
   criterion per step narrows ranges, the opposite of what a held-out prompt needs; pooling the previous steps
   (all the progressive order has) reduces the range excess about as much per unit of widening but reaches less
   far. Reading (``benchmarks/pcr_ranges.py``, mini-sd float trajectories, 32 calibration vs 64 held-out
   prompts): w = 0.5 (the default ``prior_samples=64`` at 32 prompts) halves the mean excess (3.3 % -> 1.3 % of
   the range) at 13 % more width. The default rests on that diagnostic: the held-out fidelity run (docs/pcr.md)
   did not finish on the loaded machine.

Resume (with a workdir): each progressive pass checkpoints per step (``workdir/pcr/pass-N``, see
``calibration.progressive``) and the sensitivity analysis is kept in ``workdir/pcr/sensitivity``;
a rerun with the same config continues where the killed run stopped and ends bit-identical.

Needs a pipeline (it samples the quantized trajectory) whose scheduler calls the denoiser once per
step (DDIM, Euler, flow-matching Euler, DPM-Solver multistep). ``calibration.every_k`` and
``samples_per_step`` do not apply: every step is calibrated on every prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import replay
from ..calibration.progressive import (
    RangePrior,
    activation_quantizers,
    pooled_ranges,
    progressive_calibrate,
    state_checkpoint,
)
from ..calibration.sensitivity import SENSITIVITY_METRICS, most_sensitive_steps, step_sensitivity
from ..nn import QuantState, set_state
from ..quant import TimestepGroups
from ..sampling import SamplingSettings, denoiser_calls, sample
from ..bits import average_bits
from ..wrap import wrap_denoiser
from .base import Method, QuantJob


STEP_RANGES = ("literal", "pooled_shrink")


@dataclass
class PCROptions:
    """PCR knobs. ``relax_steps`` (sampling-step indices, 0 = first/noisiest) overrides ``relax_fraction``;
    ``sensitivity_prompts=0`` skips the sensitivity analysis (allowed only with explicit ``relax_steps``
    or ``relax_fraction=0``)."""

    relax_fraction: float = 0.2
    relax_steps: list[int] | None = None
    relax_bits: int = 10
    sensitivity_metric: str = "final"
    sensitivity_prompts: int = 2
    reconstruct_weights: bool = False
    reconstruction_iterations: int = 200
    step_ranges: str = "literal"
    prior_samples: float = 64.0

    def __post_init__(self) -> None:
        if self.step_ranges not in STEP_RANGES:
            raise ValueError(f"pcr step_ranges must be one of {', '.join(STEP_RANGES)}, got {self.step_ranges!r}")
        if not float(self.prior_samples) > 0:
            raise ValueError(f"pcr prior_samples must be > 0, got {self.prior_samples}; e.g. 64")
        if not 0.0 <= float(self.relax_fraction) <= 1.0:
            raise ValueError(f"pcr relax_fraction must be within [0, 1], got {self.relax_fraction}; the paper uses 0.2")
        if not isinstance(self.relax_bits, int) or not 2 <= self.relax_bits <= 16:
            raise ValueError(f"pcr relax_bits must be an integer from 2 to 16, got {self.relax_bits!r}; the paper uses 10")
        if self.sensitivity_metric not in SENSITIVITY_METRICS:
            raise ValueError(f"pcr sensitivity_metric must be one of {', '.join(SENSITIVITY_METRICS)}, got {self.sensitivity_metric!r}")
        if self.relax_steps is not None:
            if not isinstance(self.relax_steps, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in self.relax_steps):
                raise ValueError(f"pcr relax_steps must be a list of step indices >= 0, e.g. relax_steps=[0,1,24]; got {self.relax_steps!r}")
            self.relax_steps = sorted(set(self.relax_steps))
        if self.reconstruction_iterations < 1:
            raise ValueError(f"pcr reconstruction_iterations must be >= 1, got {self.reconstruction_iterations}")
        if self.sensitivity_prompts < 0:
            raise ValueError(f"pcr sensitivity_prompts must be >= 0, got {self.sensitivity_prompts}")
        if self.sensitivity_prompts == 0 and self.relax_steps is None and self.relax_fraction > 0:
            raise ValueError("pcr needs the sensitivity analysis to pick relaxed steps: set sensitivity_prompts >= 1, "
                             "or give relax_steps=[...] or relax_fraction=0")


def schedule_timesteps(pipe, settings: SamplingSettings, prompt: str) -> list[float]:
    """The timestep of every denoiser call of ``settings``, read from one float sampling of ``prompt``."""
    seen: list[float] = []
    with denoiser_calls(pipe, before=lambda call: seen.append(call.timestep)):
        sample(pipe, [prompt], settings)
    return seen


def _reconstruct_weights(job: QuantJob, fp_denoiser: torch.nn.Module, iterations: int) -> dict:
    """Q-Diffusion's block reconstruction of the weights (AdaRound), reused from ``diffquant.learning.reconstruction``.

    Runs on FP calibration trajectories (``job.calibration_set()``) with per-step activation ranges
    from those trajectories, learning weights only; progressive calibration then refits every
    activation group on the quantized trajectory of the reconstructed weights.
    """
    try:
        from ..learning.reconstruction import ReconstructionOptions, reconstruct_blocks
    except ModuleNotFoundError as e:
        if e.name != "diffquant.learning.reconstruction":
            raise
        raise ValueError("pcr reconstruct_weights=true needs diffquant.learning.reconstruction (the Q-Diffusion recipe), "
                         "which is not installed here; drop the option") from None
    start = time.perf_counter()
    calibration = job.calibration_set()
    set_state(job.denoiser, QuantState.CALIBRATING, seed=job.config.seed)
    replay(job.denoiser, calibration, progress=job.progress, desc="pcr: activation ranges for reconstruction")
    set_state(job.denoiser, QuantState.LEARNING)
    options = ReconstructionOptions(iterations=iterations, learn_activations=False, seed=job.config.seed)
    stats = reconstruct_blocks(
        job.denoiser, fp_denoiser, calibration, options,
        workdir=job.workdir / "reconstruction" if job.workdir else None, progress=job.progress, memory=job.memory(),
    )
    learned = [b for b in stats if b.weight_loss is not None]
    return {
        "blocks": len(stats), "iterations": iterations, "calibration_calls": len(calibration),
        "rtn_loss_sum": sum(b.rtn_loss for b in learned), "weight_loss_sum": sum(b.weight_loss for b in learned),
        "flipped_fraction_mean": sum(b.flipped_fraction or 0.0 for b in learned) / max(len(learned), 1),
        "seconds": time.perf_counter() - start,
    }


class PCR(Method):
    """Progressive calibration + activation relaxing (seed 002); see the module docstring."""

    name = "pcr"
    Options = PCROptions

    def run(self, job: QuantJob) -> None:
        options: PCROptions = self.options(job.config)
        if job.pipeline is None:
            raise ValueError("pcr samples the quantized trajectory, so it needs the pipeline: pass the pipeline "
                             "(not a bare denoiser) and calibration prompts")
        if job.config.abits is None:
            raise ValueError("pcr calibrates activations per step; set abits (e.g. --abits 8) or use --method rtn for weight-only")
        if "per_channel_smooth" in (job.config.act_granularity, job.config.conv_act_granularity):
            raise ValueError("pcr fits activations step by step on already quantized weights, so it cannot migrate smoothing "
                             "factors into them; use --act-granularity per_tensor, per_token or per_group with pcr")
        if not job.prompts:
            raise ValueError("pcr needs calibration prompts: pass calibration=<list of prompts> or --prompts FILE")
        prompts = job.prompts[: job.config.calibration.num_prompts]
        sampling = job.sampling()
        timesteps = schedule_timesteps(job.pipeline, sampling, prompts[0])
        steps = len(timesteps)
        if options.relax_steps and options.relax_steps[-1] >= steps:
            raise ValueError(f"pcr relax_steps {options.relax_steps} out of range: calibration has {steps} steps (0..{steps - 1})")
        fp_denoiser = job.float_reference() if options.reconstruct_weights else None
        record = wrap_denoiser(job.denoiser, job.config, groups=TimestepGroups.per_step(timesteps))
        group_of_step = [int(record.groups.index(t)) for t in timesteps]
        report: dict = {"calibration_timesteps": timesteps, "group_of_step": group_of_step}
        start = time.perf_counter()
        if fp_denoiser is not None:
            report["reconstruction"] = _reconstruct_weights(job, fp_denoiser, options.reconstruction_iterations)
            del fp_denoiser
        prior = None
        seeds = job.config.calibration.seeds_for(0, len(prompts))
        if options.step_ranges == "pooled_shrink":
            if "reconstruction" not in report:  # reconstruction fitted every step on the FP trajectories already
                set_state(job.denoiser, QuantState.CALIBRATING, seed=job.config.seed)
                sample(job.pipeline, prompts, sampling, seeds=seeds)
                set_state(job.denoiser, QuantState.LEARNING)
            prior = RangePrior(pooled_ranges(job.denoiser), float(options.prior_samples))
            report["step_ranges"] = {"form": "pooled_shrink", "prior_samples": prior.prior_samples}
        relaxed = options.relax_steps
        if relaxed is not None:
            self._relax(job, group_of_step, relaxed, options.relax_bits)
        work = job.workdir / "pcr" if job.workdir else None
        settings = {"config": job.config.to_dict()}
        progressive_calibrate(job.pipeline, prompts, sampling, seed=job.config.seed, progress=job.progress,
                              checkpoint_dir=work / "pass-1" if work else None, depends_on=settings, freeze=False, seeds=seeds,
                              prior=prior)
        report["progressive_passes"] = 1
        sensitivity = None
        if options.sensitivity_prompts > 0:
            sensitivity = self._sensitivity(job, job.prompts[: options.sensitivity_prompts], sampling, work, settings)
            sensitivity["measured_on"] = "relaxed model" if relaxed is not None else f"a{job.config.abits} model before relaxing"
        if relaxed is None:
            relaxed = most_sensitive_steps(sensitivity, options.relax_fraction, options.sensitivity_metric) if sensitivity else []
            if relaxed:
                self._relax(job, group_of_step, relaxed, options.relax_bits)
                progressive_calibrate(job.pipeline, prompts, sampling, start_step=relaxed[0], seed=job.config.seed,
                                      progress=job.progress, checkpoint_dir=work / "pass-2" if work else None, depends_on=settings,
                                      seeds=seeds, prior=prior)
                report["progressive_passes"] = 2
        set_state(job.denoiser, QuantState.FROZEN)
        step_bits = [self._step_bits(job, group_of_step[s]) for s in range(steps)]
        report.update({
            "sensitivity": sensitivity,
            "sensitivity_metric": options.sensitivity_metric,
            "relaxed_steps": relaxed,
            "relax_bits": options.relax_bits,
            "step_activation_bits": step_bits,
            "average_step_activation_bits": sum(step_bits) / len(step_bits),
            "pcr_seconds": time.perf_counter() - start,
        })
        job.denoiser.diffquant.report["pcr"] = report
        job.denoiser.diffquant.report.update(average_bits(job.denoiser))

    @staticmethod
    def _sensitivity(job: QuantJob, prompts: list[str], sampling: SamplingSettings, work: Path | None, settings: dict) -> dict:
        """``step_sensitivity`` of the current model, kept in ``work/sensitivity/`` so a rerun skips it."""
        seeds = job.config.calibration.seeds_for(0, len(prompts))
        if work is None:
            return step_sensitivity(job.pipeline, prompts, sampling, progress=job.progress, seeds=seeds)
        checkpoint = state_checkpoint(work / "sensitivity", job.denoiser,
                                      {"prompts": prompts, "sampling": sampling.to_dict(), "settings": settings},
                                      "a per-step sensitivity")
        saved = checkpoint.load_json("sensitivity.json")
        if saved is not None:
            checkpoint.reused(1, "measurement")
            return saved
        sensitivity = step_sensitivity(job.pipeline, prompts, sampling, progress=job.progress, seeds=seeds)
        checkpoint.save_json("sensitivity.json", sensitivity)
        return sensitivity

    @staticmethod
    def _relax(job: QuantJob, group_of_step: list[int], steps: list[int], bits: int) -> None:
        """Raise every activation quantizer of the given steps' groups to ``bits`` (never lowering a wider one)."""
        for q in activation_quantizers(job.denoiser):
            for s in steps:
                g = group_of_step[s]
                q.set_group_bits(g, max(q.group_bits(g), bits))

    @staticmethod
    def _step_bits(job: QuantJob, group: int) -> float:
        """Mean activation width of one step's group over every activation quantizer."""
        quantizers = activation_quantizers(job.denoiser)
        return sum(q.group_bits(group) for q in quantizers) / len(quantizers)
