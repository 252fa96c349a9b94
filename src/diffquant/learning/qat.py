"""The EMF QAT loop: parallel (or serial, for the ablation) minibatches, LSQ step sizes, weight
fine-tuning (full or low-rank), inter-layer distillation, selective freezing, checkpoint/resume.

Loss (reading chosen): relative MSE of the denoiser output against the FP output plus
``feature_weight`` × the mean relative MSE of the sensitive layers' outputs against their FP
features, every term normalised by the target's mean square so layers of different scale weigh
alike. Learned: every weight and activation step size (LSQ; activation ones per timestep group,
zero points stay as calibrated; Adam learning rate ``lr_scales`` relative to each tensor's initial
magnitude) and, per ``weight_training``, the float weights of the quantized layers (``full``),
low-rank adapters on them (``lowrank``, merged at the end) or nothing (``none``).

Checkpoints (safetensors + JSON, written atomically every ``checkpoint_every`` steps and at the end)
hold the trainable tensors, Adam's moments, the freezer's statistics and the curves; batches come
from a seeded schedule, so a resumed run takes exactly the remaining batches of the same run.

Micro-batches and data parallelism (``accelerate launch --num_processes N``, docs/scale-out.md):
a batch's rows are split into ``N × micro_batches`` equal chunks; process ``r`` holds the whole
model and dataset and runs chunks ``r·m … r·m+m-1`` one after another, each chunk's loss being its
part of the full-batch loss (normalisers from the whole batch), and sums their gradients; the
processes then sum theirs (``all_reduce``) and all take the same optimizer step, so parameters stay
identical everywhere (checked at the end) and the main process writes the checkpoints. The result
is the full-batch gradient up to float summation order; two processes give bit for bit what one
process gives with ``micro_batches=2``. Fake quantization makes outputs depend slightly on how rows
are batched, so runs with other chunkings differ a little (not only by rounding).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum, broadcast_from_main, check_same_everywhere, rank_and_size
from ..checkpoint import Checkpoint, fingerprint
from ..nn import QuantModule, quantized_layers
from ..store import available_memory
from ..quant.lsq import StepSizes, step_size_parameters
from .dataset import SerialDataset
from .freezing import BYTES_PER_WEIGHT as FREEZER_BYTES, SelectiveFreezer
from .loop import FloatMasters, optimizer_step
from .lowrank import add_low_rank, base_weight, merge_low_rank

CHECKPOINT_JSON = "qat-checkpoint.json"
CHECKPOINT_TENSORS = "qat-checkpoint.safetensors"


@dataclass
class QATConfig:
    """Training budget and knobs; ``freeze_at`` are fractions of ``iterations`` where a freezing round runs
    (the first covers the sensitive layers only, when there are any; later ones every quantized layer)."""

    iterations: int = 200
    batch_size: int = 16
    order: str = "parallel"
    weight_training: str = "full"
    lowrank_rank: int = 8
    lr_weights: float = 1e-5
    lr_lowrank: float = 1e-4
    # Relative: each step-size tensor gets Adam lr = lr_scales x its initial mean magnitude. Adam moves a
    # parameter by about lr per step whatever the gradient's size, so an absolute 1e-4 on mini-sd's step sizes
    # (~0.02) changed them by 5 % (median) to 50 % in 100 steps, re-rounding whole channels and making the
    # held-out images worse than RTN's (docs/emf.md, reading 5 and "Measured fixes").
    lr_scales: float = 1e-4
    feature_weight: float = 1.0
    freeze_at: list[float] = field(default_factory=lambda: [0.5, 0.75])
    freeze_threshold: float = 0.1
    checkpoint_every: int = 50
    micro_batches: int = 1
    # Recompute each block's activations in the backward instead of keeping them (diffusers' own checkpointing): the
    # whole model's fake-quant activations at batch 2 outgrow 24 GiB on an SDXL-sized UNet; same result, more time.
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.order not in ("parallel", "serial"):
            raise ValueError(f"order must be 'parallel' or 'serial', got {self.order!r}")
        if self.weight_training not in ("full", "lowrank", "none"):
            raise ValueError(f"weight_training must be 'full', 'lowrank' or 'none', got {self.weight_training!r}")
        if self.iterations < 0 or self.batch_size < 1 or self.micro_batches < 1:
            raise ValueError("iterations must be >= 0, batch_size and micro_batches >= 1")
        if any(not 0 < f <= 1 for f in self.freeze_at):
            raise ValueError(f"freeze_at holds fractions of the iterations in (0, 1], got {self.freeze_at}")

    def check_batch_split(self, processes: int) -> None:
        """Every process needs at least one row per micro-batch; checked before any work starts."""
        if self.batch_size < processes * self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is smaller than {processes} process(es) x "
                             f"{self.micro_batches} micro-batches; raise batch_size or lower micro_batches")

    def fingerprint(self, extra: dict) -> str:
        knobs = {k: v for k, v in asdict(self).items() if k != "gradient_checkpointing"}  # changes memory, not the result
        return fingerprint({"qat": knobs, **extra})


def _nmse(out: torch.Tensor, ref: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """MSE of ``out`` against ``ref``, normalised by the mean square of ``norm`` (``ref`` itself, or the whole batch's targets)."""
    return ((out.float() - ref.float()) ** 2).mean() / (norm.float() ** 2).mean().clamp_min(1e-12)


FULL_TRAINING_BYTES = 4 + 8  # per trained weight: its float32 gradient and Adam's two float32 moments


def check_training_memory(denoiser: nn.Module, config: QATConfig) -> None:
    """Refuse QAT whose per-weight state cannot fit, before any data is generated, naming the fixes in one line.

    Counts only what training certainly adds for the weights of every Linear and convolution: with full weight
    training their float32 gradients, Adam moments and the float32 master of a half-precision weight (14 bytes a
    bf16 weight); with freezing rounds (``freeze_at``) selective freezing's flip statistics (11 bytes a weight).
    Activations come on top, so passing is no promise. On an SDXL-sized UNet (2.57 G weights) in bf16 that is
    33.5 + 26.3 GiB, beyond a 24 GiB machine, where ``lowrank`` adapters without freezing add a few MB."""
    weights = [m.weight for m in denoiser.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    count = sum(w.numel() for w in weights)
    parts, fixes = {}, []
    if config.weight_training == "full":
        parts["gradients and Adam moments"] = sum(w.numel() * (FULL_TRAINING_BYTES + max(0, 4 - w.element_size())) for w in weights)
        fixes.append("train low-rank adapters (--option weight_training=lowrank) or step sizes only (weight_training=none)")
    if config.freeze_at:
        parts["selective freezing's flip statistics"] = count * FREEZER_BYTES
        fixes.append("turn selective freezing off (--option freeze_at=[])")
    if not weights or not parts:
        return
    device = weights[0].device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    needed = sum(parts.values())
    if needed > free:
        raise ValueError(
            f"QAT needs about {needed / 2**30:.1f} GiB for {' and '.join(parts)} of {count / 1e6:.0f}M weights, more than "
            f"the {free / 2**30:.1f} GiB free on {device.type}; {'; '.join(fixes)}")


class QATTrainer:
    """Sets up the trainable parameters of a wrapped denoiser (learning state) and trains it on a serial dataset."""

    def __init__(self, denoiser: nn.Module, dataset: SerialDataset, config: QATConfig, sensitive_layers: list[str],
                 checkpoint_dir: str | Path | None = None, progress: bool = True) -> None:
        missing = [n for n in sensitive_layers if n not in dataset.features]
        if missing and config.feature_weight:
            raise ValueError(f"no FP features recorded for {missing[:3]}; run record_features with the sensitive layers first")
        self.rank, self.world = rank_and_size()
        config.check_batch_split(self.world)
        self.denoiser, self.dataset, self.config, self.progress = denoiser, dataset, config, progress and self.rank == 0
        self.sensitive = list(sensitive_layers)
        self.layers: dict[str, QuantModule] = {n: m for n, m in quantized_layers(denoiser).items() if m.weight_quantizer is not None}
        for p in denoiser.parameters():
            p.requires_grad_(False)
        weight_groups = []
        if config.weight_training == "full":
            weights = [base_weight(m) for m in self.layers.values()] + [m.bias for m in self.layers.values() if m.bias is not None]
            for p in weights:
                p.requires_grad_(True)
            weight_groups.append({"params": weights, "lr": config.lr_weights})
        elif config.weight_training == "lowrank":
            adapters = [p for m in self.layers.values() for p in add_low_rank(m, config.lowrank_rank).parameters()]
            weight_groups.append({"params": adapters, "lr": config.lr_lowrank})
        broadcast_from_main([t for t in denoiser.state_dict().values() if t.is_floating_point()])
        # Every weight and activation step size (LSQ), each its own group with a learning rate relative to its
        # magnitude after the broadcast (Adam's step is ~lr in absolute units whatever the gradient; QATConfig.lr_scales).
        self.step_sizes = StepSizes(step_size_parameters(denoiser).values())
        groups = self.step_sizes.start(config.lr_scales) + weight_groups
        self.params = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
        self.compute_dtype = next(denoiser.parameters()).dtype  # inputs stay in it while masters are float32
        self.masters = FloatMasters(list(self.params.values()))
        self.optimizer = torch.optim.Adam(groups)
        # No freezing rounds, no per-weight flip statistics (freezing.BYTES_PER_WEIGHT: the largest state at full size).
        self.freezer = SelectiveFreezer(self.layers if config.freeze_at else {})
        self.batches = dataset.batches(config.order, config.batch_size, config.iterations, config.seed)
        self.freeze_steps = {max(1, round(f * config.iterations)): r for r, f in enumerate(sorted(config.freeze_at))}
        self.history: dict = {"loss": [], "output_loss": [], "flip_rate": [], "freeze_events": [], "seconds": 0.0}
        self.iteration = 0
        # Keyed by the run's fingerprint: a run with other data or knobs sharing the workdir (e.g. the
        # serial/parallel ablation) neither resumes from nor overwrites another run's checkpoint.
        key = config.fingerprint({"rows": len(dataset), "sensitive": self.sensitive, "params": sorted(self.params)})
        self.checkpoint = Checkpoint.keyed(checkpoint_dir, key, "an EMF training run") if checkpoint_dir else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if self.checkpoint is None or self.rank != 0:
            return
        tensors = {f"param/{n}": p.detach() for n, p in self.params.items()}
        for n, p in self.params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"adam/{n}/{key}"] = torch.as_tensor(value).detach().reshape(-1) if key == "step" else value.detach()
        tensors.update({f"freezer/{k}": v for k, v in self.freezer.tensors().items()})
        self.checkpoint.open().save_tensors(CHECKPOINT_TENSORS, tensors)
        self.checkpoint.save_json(CHECKPOINT_JSON, {
            "iteration": self.iteration, "freezer_steps": self.freezer.steps, "history": self.history,
        })

    def try_resume(self) -> bool:
        """Load this run's checkpoint (same fingerprint, so same folder), if one exists; returns whether it did."""
        if self.checkpoint is None or not self.checkpoint.has(CHECKPOINT_JSON):
            return False
        meta = self.checkpoint.open().load_json(CHECKPOINT_JSON)
        tensors = self.checkpoint.load_tensors(CHECKPOINT_TENSORS)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param/{n}"])
                state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"adam/{n}/")}
                if state:
                    state["step"] = state["step"].reshape(())
                    self.optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state.items()}
        self.freezer.load_tensors({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("freezer/")}, meta["freezer_steps"])
        self.iteration, self.history = meta["iteration"], meta["history"]
        of_all = f"of {self.config.iterations} iterations"
        self.checkpoint.reused(self.iteration, of_all, of_all)
        return True

    # ------------------------------------------------------------------ training
    def _loss(self, part: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``part``'s share of the loss of batch ``rows`` (total, output term)."""
        param = next(self.denoiser.parameters())
        share = part.numel() / rows.numel()
        captured: dict[str, torch.Tensor] = {}
        hooks = [self.denoiser.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out))
                 for n in self.sensitive if self.config.feature_weight]
        try:
            out = self.denoiser(**self.dataset.kwargs(part, param.device, self.compute_dtype))[0]
        finally:
            for h in hooks:
                h.remove()
        target = self.dataset.output
        output_loss = _nmse(out, target[part].to(param.device), target[rows].to(param.device)) * share
        loss = output_loss
        if captured:
            features = self.dataset.features
            feature_loss = torch.stack([_nmse(captured[n], features[n][part].to(param.device), features[n][rows].to(param.device))
                                        for n in captured]).mean() * share
            loss = loss + self.config.feature_weight * feature_loss
        return loss, output_loss

    def _step(self, rows: torch.Tensor) -> tuple[float, float]:
        """One optimizer step on batch ``rows`` (this process's chunks of them); returns the full batch's losses."""
        m = self.config.micro_batches
        losses = torch.zeros(2, device=next(self.denoiser.parameters()).device)

        def backward() -> None:
            for part in rows.tensor_split(self.world * m)[self.rank * m : (self.rank + 1) * m]:
                loss, output_loss = self._loss(part, rows)
                loss.backward()
                losses.add_(torch.stack([loss.detach(), output_loss.detach()]))

        def before_step() -> None:
            if self.world > 1:
                for p in self.params.values():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                all_reduce_sum([losses, *(p.grad for p in self.params.values())])
            self.freezer.zero_frozen_grads()

        optimizer_step(self.optimizer, backward, step_sizes=self.step_sizes, before_step=before_step,
                       after_step=self.freezer.pin)
        return float(losses[0]), float(losses[1])

    def train(self, callback: Callable[[int, dict], None] | None = None) -> dict:
        """Run the remaining iterations; returns the history (curves, freezing events, wall time)."""
        if not self.config.gradient_checkpointing:
            return self._train(callback)
        if not getattr(self.denoiser, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.denoiser).__name__} has no gradient checkpointing; train without "
                             "gradient_checkpointing (lower batch_size or raise micro_batches to save memory)")
        self.denoiser.enable_gradient_checkpointing()
        try:
            return self._train(callback)
        finally:
            self.denoiser.disable_gradient_checkpointing()

    def _train(self, callback: Callable[[int, dict], None] | None) -> dict:
        self.denoiser.eval()
        start = time.perf_counter()
        seconds_before = self.history["seconds"]
        bar = tqdm(total=self.config.iterations, initial=self.iteration, desc=f"emf: QAT ({self.config.order})", disable=not self.progress)
        while self.iteration < self.config.iterations:
            loss, output_loss = self._step(self.batches[self.iteration])
            flip_rate = self.freezer.observe()
            self.iteration += 1
            self.history["loss"].append(loss)
            self.history["output_loss"].append(output_loss)
            if self.freezer.layers:
                self.history["flip_rate"].append(flip_rate)
            round_index = self.freeze_steps.get(self.iteration)
            if round_index is not None:
                sensitive_only = round_index == 0 and any(n in self.layers for n in self.sensitive)
                names = [n for n in self.sensitive if n in self.layers] if sensitive_only else list(self.layers)
                counts = self.freezer.freeze(names, self.config.freeze_threshold)
                self.history["freeze_events"].append({
                    "iteration": self.iteration, "round": round_index, "scope": "sensitive layers" if sensitive_only else "all layers",
                    "frozen": sum(counts.values()), "layers": counts, "frozen_total": self.freezer.frozen_count(),
                })
            self.history["seconds"] = seconds_before + time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.config.checkpoint_every and self.iteration % self.config.checkpoint_every == 0:
                self.save_checkpoint()
            if callback is not None:
                callback(self.iteration, self.history)
        bar.close()
        check_same_everywhere(list(self.params.values()), "trained parameters")
        self.save_checkpoint()
        return self.history

    def finish(self) -> None:
        """Merge low-rank adapters into the weights and stop every gradient (ready to freeze and save)."""
        self.masters.restore()
        for module in self.layers.values():
            merge_low_rank(module)
        for p in self.denoiser.parameters():
            p.requires_grad_(False)
        self.freezer.pin()
