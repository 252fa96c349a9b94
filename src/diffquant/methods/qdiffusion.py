"""Q-Diffusion (Li et al., ICCV 2023; seed 001) as a recipe over the shared core.

1. Time step-aware calibration: the float pipeline samples the calibration prompts with its own
   scheduler and guidance; every k-th step's denoiser inputs are kept (conditional and unconditional
   halves with classifier-free guidance). Recorded one prompt batch at a time into
   ``workdir/calibration/batch-NNNNN/`` (safetensors shards), so a killed recording resumes at the
   next batch and a finished one is reused.
2. Shortcut splitting: on by default (``split_shortcut_default``); the adapter names the layers fed
   by a raw skip concatenation and ``wrap_denoiser`` gives them split activation and weight quantizers.
3. Activation ranges from the recorded calls (the config's observer), then BRECQ block
   reconstruction with AdaRound weights and LSQ activation step sizes (``diffquant.learning.reconstruction``),
   checkpointed per block under ``workdir/reconstruction/``.
4. Attention: q, k, v and the softmax output are quantized (``softmax_bits``; the paper preset uses 16).

Presets (``options["preset"]``): ``default`` is sized for the mini models on a CPU (a few minutes);
``faithful`` (the recipe of that name, ``diffquant.recipes``) runs 1000 AdaRound iterations at batch 16;
``paper`` is our reading of the paper's Stable Diffusion setting for a GPU: 50 sampling steps with
every 2nd kept (25 steps) x 64 prompts with guidance (128 samples per step), 20k AdaRound iterations,
5k LSQ iterations, batch 32, lambda 0.01, beta 20 -> 2 after a 20 % warm-up, Adam lr 1e-3 for the
rounding variables and 4e-5 for activation step sizes (BRECQ's values), softmax at 16 bits.
Any option given explicitly overrides the preset.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..calibration import CalibrationSet, record_denoiser_calls, replay
from ..checkpoint import Checkpoint, fingerprint
from ..config import CalibrationConfig, QuantConfig
from ..nn import QuantState, set_state
from ..learning.reconstruction import ReconstructionOptions, reconstruct_blocks
from ..wrap import wrap_denoiser
from .base import Method, QuantJob

PRESETS: dict[str, dict] = {
    "default": dict(
        iterations=200, act_iterations=100, warmup=0.2, round_weight=0.01, beta_start=20.0, beta_end=2.0,
        weight_lr=1e-2, act_lr=1e-3, batch_size=8, every_k=5,
    ),
    # The ``faithful`` recipe's (diffquant.recipes): 5x the AdaRound iterations at twice the batch (~4x the time).
    "faithful": dict(
        iterations=1000, act_iterations=100, warmup=0.2, round_weight=0.01, beta_start=20.0, beta_end=2.0,
        weight_lr=1e-2, act_lr=1e-3, batch_size=16, every_k=5,
    ),
    "paper": dict(
        iterations=20000, act_iterations=5000, warmup=0.2, round_weight=0.01, beta_start=20.0, beta_end=2.0,
        weight_lr=1e-3, act_lr=2e-5, batch_size=32, num_prompts=64, num_inference_steps=50, every_k=2, softmax_bits=16,
    ),
}

_CALIBRATION_FIELDS = ("num_prompts", "num_inference_steps", "every_k", "samples_per_step")


@dataclass
class Options:
    """Q-Diffusion knobs; ``None`` takes the preset's value (or, for calibration sizes, the config's).

    ``every_k``/``num_prompts``/``num_inference_steps``/``samples_per_step`` override the config's
    ``CalibrationConfig`` (the default preset keeps every 5th step); ``softmax_bits`` overrides the
    config's. ``reconstruct_weights``/``learn_act_scales`` switch the two learning stages off for ablations.
    """

    preset: str = "default"
    iterations: int | None = None
    act_iterations: int | None = None
    warmup: float | None = None
    round_weight: float | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    weight_lr: float | None = None
    act_lr: float | None = None
    batch_size: int | None = None
    num_prompts: int | None = None
    num_inference_steps: int | None = None
    every_k: int | None = None
    samples_per_step: int | None = None
    softmax_bits: int | None = None
    reconstruct_weights: bool = True
    learn_act_scales: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown qdiffusion preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        self.reconstruction()  # validates ranges with one-line messages

    def value(self, name: str):
        given = getattr(self, name)
        return given if given is not None else PRESETS[self.preset].get(name)

    def reconstruction(self, seed: int = 0) -> ReconstructionOptions:
        names = [f.name for f in dataclasses.fields(ReconstructionOptions) if f.name in PRESETS["default"]]
        return ReconstructionOptions(
            **{n: self.value(n) for n in names}, learn_weights=self.reconstruct_weights,
            learn_activations=self.learn_act_scales, seed=seed,
        )

    def calibration_overrides(self, calibration: CalibrationConfig) -> dict:
        """Calibration sizes to change: explicit options, else preset values for fields the config left at default."""
        defaults = CalibrationConfig()
        out = {}
        for name in _CALIBRATION_FIELDS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
            elif getattr(calibration, name) == getattr(defaults, name) and name in PRESETS[self.preset]:
                out[name] = PRESETS[self.preset][name]
        return out

    def softmax_bits_for(self, config: QuantConfig) -> int:
        """Explicit option, else the config's when changed from its default, else the preset's."""
        if self.softmax_bits is not None:
            return self.softmax_bits
        if config.softmax_bits != QuantConfig.__dataclass_fields__["softmax_bits"].default:
            return config.softmax_bits
        return PRESETS[self.preset].get("softmax_bits", config.softmax_bits)


def record_calibration(job: QuantJob, overrides: dict, folder: Path | None) -> CalibrationSet:
    """The job's calibration set, recorded one prompt batch at a time; with ``folder``, saved and resumable.

    Batch b is sampled with seed ``config.seed + b`` whether or not it was recorded in an earlier
    (killed) run, so a resumed recording equals an uninterrupted one.
    """
    if job.calibration is not None:
        return job.calibration
    if job.pipeline is None or not job.prompts:
        raise ValueError("qdiffusion needs calibration data: pass calibration=<list of prompts> with a pipeline, "
                         "or calibration=<CalibrationSet> for a bare denoiser")
    cfg = dataclasses.replace(job.config.calibration, **overrides)
    prompts = job.prompts[: cfg.num_prompts]
    batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    settings = {"prompts": prompts, "calibration": dataclasses.asdict(cfg), "defaults": job.sampling_defaults}
    checkpoint = Checkpoint(folder, fingerprint(settings), "calibration data").open() if folder is not None else None
    calls, reused = [], 0
    for b, batch in enumerate(batches):
        name = f"batch-{b:05d}"
        if checkpoint is not None and checkpoint.is_done(name):
            part = CalibrationSet.load(checkpoint.path(name)).bounded(job.memory())
            reused += 1
        else:
            part = record_denoiser_calls(
                job.pipeline, batch, dataclasses.replace(cfg, seed=cfg.seed + b), progress=False,
                defaults=job.sampling_defaults, memory=job.memory(),
            )
            if checkpoint is not None:
                part.save(checkpoint.path(name))
                checkpoint.mark_done(name)
        calls.extend(part.calls)
    if checkpoint is not None:
        checkpoint.reused(reused, "batch", "batches")
    job.calibration = CalibrationSet(calls)
    return job.calibration


class QDiffusion(Method):
    """Time step-aware calibration, shortcut splitting, BRECQ + AdaRound reconstruction, LSQ activations."""

    name = "qdiffusion"
    Options = Options
    split_shortcut_default = True

    def run(self, job: QuantJob) -> None:
        options: Options = self.options(job.config)
        config = job.config
        if options.softmax_bits_for(config) != config.softmax_bits:
            config = dataclasses.replace(config, softmax_bits=options.softmax_bits_for(config))
        fp_denoiser = job.float_reference()
        workdir = job.workdir
        start = time.perf_counter()
        calibration = record_calibration(job, options.calibration_overrides(config.calibration), workdir / "calibration" if workdir else None)
        record_seconds = time.perf_counter() - start
        record = wrap_denoiser(job.denoiser, config)
        start = time.perf_counter()
        if config.abits is not None:
            set_state(job.denoiser, QuantState.CALIBRATING, seed=config.seed)
            replay(job.denoiser, calibration, progress=job.progress, desc="qdiffusion: activation ranges")
        set_state(job.denoiser, QuantState.LEARNING)
        range_seconds = time.perf_counter() - start
        start = time.perf_counter()
        stats = reconstruct_blocks(
            job.denoiser, fp_denoiser, calibration, options.reconstruction(seed=config.seed),
            workdir=workdir / "reconstruction" if workdir else None, progress=job.progress, memory=job.memory(),
        )
        record.report["qdiffusion"] = {
            "options": {**dataclasses.asdict(options.reconstruction(seed=config.seed)), "preset": options.preset,
                        "softmax_bits": config.softmax_bits},
            "calibration_calls": len(calibration),
            "calibration_samples": calibration.num_samples(),
            "calibration_steps": sorted({c.step for c in calibration}),
            "record_seconds": record_seconds,
            "activation_range_seconds": range_seconds,
            "reconstruction_seconds": time.perf_counter() - start,
            "memory": job.memory().stats(),
            "blocks": [dataclasses.asdict(s) for s in stats],
        }
