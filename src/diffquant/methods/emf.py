"""EMF — Efficiency Meets Fidelity (seed 000): serial dataset, parallel QAT, as ``method="emf"``.

Recipe (each step a reusable piece of ``diffquant.learning``):

1. Serial dataset: the FP pipeline samples the calibration prompts with its own scheduler and
   guidance; ``steps_per_prompt`` random steps per prompt are kept with their FP outputs.
2. Time information precalculation: the time-dependent layers stay float and become lookup
   tables keyed by (t, pooled conditioning), filled before training and generation
   (``time_layers="quantized"``: they are quantized like the others and the tables cache their quantized
   outputs, so the model has the nominal weight bits).
3. Wrap with ``timestep_groups`` activation parameter sets (multi-timestep activation
   quantization), initialise activation ranges min/max (RTN) on every recorded calibration call
   (the FP trajectories RTN calibrates on; ``init_rows=N`` uses N serial-dataset rows instead: too
   few rows give ranges that clip held-out prompts, docs/emf.md reading 10).
4. Sensitivity: per-layer output error with only that layer quantized (saved + plotted), or the
   user's ``sensitive_layers``; the top ``distill_layers`` give the distillation features.
   Optional mixed precision: the ``mixed_precision_layers`` most sensitive stay float (16 bit).
5. Parallel QAT (batches mixing timesteps and prompts; ``order="serial"`` for the ablation): LSQ
   step sizes plus full or low-rank weight tuning, output + feature distillation, selective
   freezing of oscillating weights (sensitive layers first), checkpoints under the workdir.
6. Low-rank adapters merged, every module frozen; numbers in ``denoiser.diffquant.report["emf"]``.

Readings of details the paper's abstract leaves open are in each module's docstring and in docs/emf.md.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint, fingerprint
from ..distributed import rank_and_size
from ..models.adapters import get_adapter
from ..nn import QuantState, quantized_layers, set_quant_enabled, set_state, unwrap_layer
from ..quant import TimestepGroups
from ..learning import (
    QATConfig,
    QATTrainer,
    SerialDataset,
    SerialDatasetConfig,
    TimePrecalculation,
    check_training_memory,
    generate_serial_dataset,
    measure_layer_sensitivity,
    rank_layers,
    record_features,
    save_sensitivity,
)
from ..bits import average_bits
from ..wrap import float_layer_reasons, wrap_denoiser
from .base import Method, QuantJob

PRESETS: dict[str, dict] = {
    # A GPU-sized budget (SD 1.x/SDXL/SD3 on one accelerator); the defaults fit the mini models on a CPU.
    "gpu": dict(steps_per_prompt=8, iterations=2000, batch_size=32, distill_layers=12, sensitivity_rows=32,
                checkpoint_every=200),
}


TIME_LAYERS = ("float", "quantized")


@dataclass
class EMFOptions(QATConfig):
    """EMF knobs (``QuantConfig.options`` / ``--option key=value``; ``--preset gpu`` for a larger budget):
    the training budget of :class:`QATConfig` plus the recipe's own. The seed is QuantConfig's."""

    preset: str | None = None
    steps_per_prompt: int = 4
    timestep_groups: int | None = None  # None: QuantConfig.timestep_groups if > 1, else 4
    distill_layers: int = 6
    sensitive_layers: list[str] = field(default_factory=list)
    sensitivity_rows: int = 8
    mixed_precision_layers: int = 0
    # None: activation ranges from every recorded calibration call (RTN's data); an int: that many
    # serial-dataset rows (the earlier reading; on mini-sd W4A8 its ranges clip held-out prompts, docs/emf.md).
    init_rows: int | None = None
    # "float": the paper's precalculation, time layers kept float (their weights count 16 bits); "quantized": the
    # time layers are quantized like every other layer (wbits/abits) and the tables cache their quantized outputs,
    # so the model is compared at the nominal weight bits (docs/emf.md, "EMF at equal bits").
    time_layers: str = "float"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.time_layers not in TIME_LAYERS:
            raise ValueError(f"emf time_layers must be one of {', '.join(TIME_LAYERS)}, got {self.time_layers!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown emf preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.seed != 0:
            raise ValueError("emf takes its seed from the quantization config (QuantConfig.seed / --seed), not an option")
        for name in ("distill_layers", "mixed_precision_layers", "sensitivity_rows", "init_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"emf option {name} must be >= 0, got {getattr(self, name)}")

    def qat(self, seed: int = 0) -> QATConfig:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(QATConfig)}
        return QATConfig(**{**shared, "freeze_at": list(self.freeze_at), "seed": seed})


def _spread(n: int, k: int) -> torch.Tensor:
    """``k`` row indices spread evenly over ``n`` rows (deterministic, covers every timestep region)."""
    k = min(k, n)
    return torch.linspace(0, n - 1, k).round().long().unique() if k else torch.zeros(0, dtype=torch.long)


class EMF(Method):
    """Serial-to-parallel QAT with time precalculation, distillation and selective freezing (see module docstring)."""

    name = "emf"
    Options = EMFOptions

    def options(self, config) -> EMFOptions:
        opts = super().options(config)
        if opts.preset:
            given = set(config.options)
            opts = dataclasses.replace(opts, **{k: v for k, v in PRESETS[opts.preset].items() if k not in given})
        return opts

    def _dataset(self, job: QuantJob, opts: EMFOptions, folder: Path | None) -> SerialDataset:
        if job.pipeline is None or not job.prompts:
            return SerialDataset.from_calibration(job.calibration_set(keep_outputs=True))
        calib = job.config.calibration
        config = SerialDatasetConfig(job.sampling(), steps_per_prompt=opts.steps_per_prompt, batch_size=calib.batch_size,
                                     seeds=calib.seeds)
        return generate_serial_dataset(job.pipeline, job.prompts[: calib.num_prompts], config, folder=folder, progress=job.progress,
                                       memory=job.memory())

    def run(self, job: QuantJob) -> None:
        opts, config, denoiser = self.options(job.config), job.config, job.denoiser
        opts.check_batch_split(rank_and_size()[1])  # before the serial dataset and sensitivity passes
        check_training_memory(denoiser, opts)
        workdir = job.workdir / "emf" if job.workdir else None
        start = time.perf_counter()
        dataset = self._dataset(job, opts, workdir / "dataset" if workdir else None)
        dataset_seconds = time.perf_counter() - start
        # Activation-range data, recorded while the denoiser is still float (the same calls RTN calibrates on).
        init_calls = job.calibration_set() if config.abits is not None and opts.init_rows is None else None

        adapter = get_adapter(denoiser)
        time_layers = {n: "EMF time precalculation (float lookup table)" for n in adapter.time_layers()} if opts.time_layers == "float" else {}
        num_groups = opts.timestep_groups or (config.timestep_groups if config.timestep_groups > 1 else 4)
        record = wrap_denoiser(denoiser, config, groups=TimestepGroups.uniform(num_groups, adapter.timestep_range),
                               float_layers=float_layer_reasons(adapter, config, time_layers))
        param = next(denoiser.parameters())

        if config.abits is not None:
            set_state(denoiser, QuantState.CALIBRATING, seed=config.seed)
            with torch.no_grad():
                if init_calls is not None:
                    for call in init_calls:
                        denoiser(**call.kwargs(device=param.device, dtype=param.dtype))
                else:
                    for chunk in _spread(len(dataset), opts.init_rows).split(opts.batch_size):
                        denoiser(**dataset.kwargs(chunk, param.device, param.dtype))
        set_state(denoiser, QuantState.LEARNING)

        weighted = [n for n, m in quantized_layers(denoiser).items() if m.weight_quantizer is not None]
        unknown = [n for n in opts.sensitive_layers if n not in weighted]
        if unknown:
            raise ValueError(f"sensitive_layers {unknown[:3]} are not quantized weight layers; see diffquant.quantized_layers(model)")
        errors = self._sensitivity(denoiser, dataset, opts, config, workdir, job.progress) if not opts.sensitive_layers or opts.mixed_precision_layers else {}
        ranked = rank_layers(errors) if errors else []
        float_picked = ranked[: opts.mixed_precision_layers]
        for name in float_picked:
            unwrap_layer(denoiser, name)
            record.float_layers[name] = f"EMF mixed precision: among the {opts.mixed_precision_layers} most sensitive layers"
        sensitive = list(opts.sensitive_layers) or [n for n in ranked if n not in float_picked][: opts.distill_layers]

        if sensitive and opts.feature_weight:
            feature_dir = workdir / "dataset" if workdir else None
            if feature_dir is None or not dataset.load_features(feature_dir, sensitive):
                set_quant_enabled(denoiser, False)
                try:
                    record_features(denoiser, dataset, sensitive, batch_size=opts.batch_size, progress=job.progress)
                finally:
                    set_quant_enabled(denoiser, True)
                if feature_dir is not None:
                    dataset.save_features(feature_dir)

        # Tables from here on: calibration, sensitivity and FP features above ran the time layers live, so quantized time
        # layers were observed and switched off like any layer; training then reads their (fixed) outputs from the tables.
        tables = TimePrecalculation.install(denoiser)
        tables.precalculate(dataset.timestep, dataset.conditioning(tables.condition_args))
        if job.pipeline is not None:
            tables.attach_scheduler(job.pipeline.scheduler)
        trainer = QATTrainer(denoiser, dataset, opts.qat(seed=config.seed), sensitive,
                             checkpoint_dir=workdir / "qat" if workdir else None, progress=job.progress)
        resumed = trainer.iteration if trainer.try_resume() else 0
        misses_before = tables.misses
        history = trainer.train()
        trainer.finish()
        set_state(denoiser, QuantState.FROZEN)

        record.report["emf"] = {
            "dataset": {"rows": len(dataset), "steps_per_prompt": opts.steps_per_prompt, "distinct_timesteps": int(dataset.timestep.unique().numel()),
                        "seconds": dataset_seconds},
            "timestep_groups": num_groups,
            "time_precalculation": {"layers": len(tables.layer_names), "time_layers": opts.time_layers, "table_entries": tables.entries(),
                                    "misses_during_training": tables.misses - misses_before},
            "sensitivity_top": {n: errors[n] for n in ranked[:10]},
            "sensitive_layers": sensitive,
            "mixed_precision_layers": float_picked,
            "train": {"order": opts.order, "iterations": opts.iterations, "batch_size": opts.batch_size,
                      "weight_training": opts.weight_training, "resumed_from_iteration": resumed, **history,
                      "frozen_weights": trainer.freezer.frozen_count()},
            "average_bits": average_bits(denoiser),
            "memory": job.memory().stats(),
            "seconds": time.perf_counter() - start,
        }
        # Training's rows were computed many at a time; generation refills them one step at a time, shaped as its live
        # calls, so the model gives the same images as after save/load (live layers) on CPUs whose GEMM rounding
        # depends on the row count.
        tables.clear()

    def _sensitivity(self, denoiser: nn.Module, dataset: SerialDataset, opts: EMFOptions, config, workdir: Path | None,
                     progress: bool) -> dict[str, float]:
        setting = {k: v for k, v in config.to_dict().items() if k != "options"}  # training knobs do not change it
        checkpoint = None if workdir is None else Checkpoint(
            workdir / "sensitivity", fingerprint([setting, len(dataset), opts.sensitivity_rows, opts.timestep_groups]
                                                 + ([opts.time_layers] if opts.time_layers != "float" else [])),
            "an EMF layer sensitivity").open()
        saved = checkpoint.load_json("layers.json") if checkpoint is not None else None
        if saved is not None:
            checkpoint.reused(1, "measurement")
            return saved
        errors = measure_layer_sensitivity(denoiser, dataset, _spread(len(dataset), opts.sensitivity_rows), progress=progress)
        if checkpoint is not None:
            checkpoint.save_json("layers.json", errors)
            save_sensitivity(errors, workdir, key=checkpoint.fingerprint)  # the ranking and bar chart, for the reader
        return errors
