"""BRECQ block reconstruction with AdaRound weights and LSQ activation step sizes, resumable per block.

Usage (a wrapped denoiser whose activation quantizers are already calibrated, e.g. by min/max)::

    from diffquant.learning.reconstruction import ReconstructionOptions, reconstruct_blocks
    fp = copy.deepcopy(denoiser)                    # before wrap_denoiser
    wrap_denoiser(denoiser, config); ...calibrate activations...
    stats = reconstruct_blocks(denoiser, fp, calibration_set, ReconstructionOptions(), workdir="work/recon")

What it does, block by block in forward execution order (``get_adapter(denoiser).blocks()``: ResNet
blocks, transformer blocks, samplers, then every remaining quantized layer on its own):

1. Inputs and targets. The block's inputs come from the quantized model run up to that block (every
   finished block quantized, weights and activations), its targets are the float model's block
   outputs on the same calibration calls ("asymmetric" reconstruction, as in Q-Diffusion's code).
   Both are captured by hooks that stop the forward at the block, and kept on the CPU.
2. Weights (AdaRound). With weight quantization on in this block (its activations off), learn the
   rounding variables on random mini-batches: loss = reconstruction + lambda * sum(1 - |2h - 1|^beta),
   the rounding term off for the warm-up fraction, beta annealed start -> end afterwards. Then the
   rounding is made hard, and the weights are replaced by their quantized values (what save/load
   gives anyway; the float weights are no longer needed).
3. Activations (LSQ). With weights hard and activations quantized, learn the block's activation step
   sizes (every input/q/k/v/softmax quantizer inside it) on the same data; zero points stay; Adam's
   learning rate is ``act_lr`` x each step-size tensor's mean magnitude (an absolute rate made mini-sd3's
   held-out images worse than RTN's: docs/results-methods.md). If the
   learned step sizes give a higher loss on the block's data than the calibrated ones, the calibrated
   ones are kept (a guard we added; the report marks such blocks ``act_reverted``).
4. Checkpoint (``diffquant.checkpoint``). The block's tensors go to ``workdir/block-NNNN.safetensors``,
   then its done marker; a killed run restarted with the same workdir loads finished blocks and
   continues at the next one, ending bit-identical to an uninterrupted run (each block seeds its own
   mini-batch sampler).

Reconstruction loss: squared error summed over channels (dim 1 of [B, C, H, W], the last dim of
[B, L, C] and [B, C]) and averaged over samples and positions, as BRECQ's ``lp_loss``; a block with
several outputs (SD3 joint blocks) sums them. The weight scales stay as calibrated (RTN/MSE); only the
rounding is learned, as in AdaRound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationSet
from ..checkpoint import Checkpoint, fingerprint
from ..models.adapters import get_adapter
from ..nn import QuantModule, QuantState, quantized_layers, set_quant_enabled
from ..quant.adaround import BetaSchedule
from ..quant.lsq import StepSizes
from ..store import MemoryBudget, TensorStore
from .loop import optimizer_step

@dataclass
class ReconstructionOptions:
    """Iterations and learning rates of block reconstruction (defaults: small, for the mini models on a CPU)."""

    iterations: int = 200
    warmup: float = 0.2
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    weight_lr: float = 1e-2
    act_iterations: int = 100
    act_lr: float = 1e-3  # relative: x each step-size tensor's mean magnitude (quant.lsq.step_size_lr)
    batch_size: int = 8
    learn_weights: bool = True
    learn_activations: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "act_iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"reconstruction {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"reconstruction warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ValueError(f"beta must anneal downwards to a positive value, got {self.beta_start} -> {self.beta_end}")


@dataclass
class BlockStats:
    """What reconstruction did to one block; losses are on the block's whole calibration data.

    ``rtn_loss``: weights rounded to nearest, activations float. ``weight_loss``: after AdaRound.
    ``act_init_loss``: learned weights, activations at their calibrated scales. ``act_loss``: after LSQ
    (``act_reverted`` when LSQ raised the loss and the calibrated scales were kept instead).
    ``binary_fraction``: share of h(V) within 0.01 of 0/1 at the end; ``flipped_fraction``: share of
    weights rounded against nearest.
    """

    name: str
    samples: int
    rtn_loss: float
    weight_loss: float | None = None
    act_init_loss: float | None = None
    act_loss: float | None = None
    binary_fraction: float | None = None
    flipped_fraction: float | None = None
    act_reverted: bool = False
    seconds: float = 0.0


class _StopForward(Exception):
    """Raised by a capture hook once the block of interest has run: the rest of the model is skipped."""


@dataclass
class BlockData:
    """A block's recorded call arguments over all calibration samples: the batched ones in ``store`` (rows =
    samples, keys ``arg/<i>`` and ``kw/<name>``, resident or spilled within the memory budget), the others as
    the first call passed them."""

    store: TensorStore
    args: list
    kwargs: dict
    batched_args: list[int]
    batched_kwargs: list[str]
    timesteps: torch.Tensor

    @property
    def num_samples(self) -> int:
        return self.timesteps.shape[0]

    def batch(self, rows: torch.Tensor, device: torch.device) -> tuple[list, dict]:
        got = self.store.rows(rows)
        args = [got[f"arg/{i}"].to(device) if i in self.batched_args else a for i, a in enumerate(self.args)]
        kwargs = {k: (got[f"kw/{k}"].to(device) if k in self.batched_kwargs else v) for k, v in self.kwargs.items()}
        return args, kwargs


def _is_batched(value, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch


def _outputs(out) -> list[torch.Tensor | None]:
    """A block's outputs as a list (tuple outputs of SD3 joint blocks keep their positions)."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o if torch.is_tensor(o) or o is None else None for o in out]
    raise TypeError(f"cannot reconstruct a block returning {type(out).__name__}")


def _call_timesteps(call, batch: int) -> torch.Tensor:
    t = call.timestep.detach().float().flatten()
    return t.expand(batch).clone() if t.numel() == 1 else t.clone()


class _Inputs:
    """Appends each call's batched block inputs to a store; the first call fixes which positions are batched."""

    def __init__(self, budget: MemoryBudget | None) -> None:
        self.store, self.data = TensorStore(budget), None

    def add(self, args: tuple, kwargs: dict) -> None:
        batch = next((v.shape[0] for v in [*args, *kwargs.values()] if torch.is_tensor(v) and v.dim() > 0), None)
        if batch is None:
            raise RuntimeError("a reconstruction block received no batched tensor input")
        if self.data is None:
            self.data = BlockData(self.store, list(args), dict(kwargs), [i for i, a in enumerate(args) if _is_batched(a, batch)],
                                  [k for k, v in kwargs.items() if _is_batched(v, batch)], torch.empty(0))
            for i in self.data.batched_args:
                self.data.args[i] = None
            for k in self.data.batched_kwargs:
                self.data.kwargs[k] = None
        self.store.append({**{f"arg/{i}": args[i] for i in self.data.batched_args},
                           **{f"kw/{k}": kwargs[k] for k in self.data.batched_kwargs}})


def _run_until(denoiser: nn.Module, module: nn.Module, calibration: CalibrationSet, budget: MemoryBudget | None, *,
               inputs: bool, outputs: bool):
    """Run every calibration call through ``denoiser`` and keep ``module``'s call inputs (a ``BlockData``) and/or
    outputs (one store column per output position, None where the block returns None), within ``budget``."""
    param = next(denoiser.parameters())
    captured = _Inputs(budget)
    targets_store, layout, seen = TensorStore(budget), [], [0]

    def pre_hook(mod, args, kwargs):
        captured.add(args, kwargs)
        if not outputs:
            seen[0] += 1
            raise _StopForward

    def post_hook(mod, args, kwargs, out):
        outs = _outputs(out)
        if not layout:
            layout.extend(o is not None for o in outs)
        targets_store.append({f"out/{j}": o for j, o in enumerate(outs) if o is not None})
        seen[0] += 1
        raise _StopForward

    handles = []
    if inputs:
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if outputs:
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    timesteps = []
    try:
        with torch.no_grad():
            for call in calibration:
                before = seen[0]
                try:
                    denoiser(**call.kwargs(device=param.device, dtype=param.dtype))
                except _StopForward:
                    pass
                if seen[0] != before + 1:
                    raise RuntimeError(f"block {type(module).__name__} ran {seen[0] - before} times in one denoiser call; "
                                       "reconstruction needs blocks that run exactly once per call")
                timesteps.append(_call_timesteps(call, call.batch_size))
    except BaseException:
        captured.store.close()
        targets_store.close()
        raise
    finally:
        for h in handles:
            h.remove()
    data = None
    if inputs:
        data = captured.data
        data.timesteps = torch.cat(timesteps)
    targets = [targets_store.column(f"out/{j}") if present else None for j, present in enumerate(layout)]
    return data, (targets, targets_store)


def _reconstruction_loss(outputs: list, targets: list) -> torch.Tensor:
    total = 0.0
    for out, tgt in zip(outputs, targets):
        if out is None or tgt is None:
            continue
        channel_dim = 1 if out.dim() == 4 else -1
        total = total + (out.float() - tgt.float()).pow(2).sum(channel_dim).mean()
    return total


def _block_forward(block: nn.Module, data: BlockData, rows: torch.Tensor, context, device) -> list:
    args, kwargs = data.batch(rows, device)
    if context is not None:
        context.set_timestep(data.timesteps[rows])
    return _outputs(block(*args, **kwargs))


@torch.no_grad()
def _dataset_loss(block, data: BlockData, targets: list, context, device, batch_size: int) -> float:
    """Mean reconstruction loss over every calibration sample (evaluation in fixed order)."""
    total, n = 0.0, data.num_samples
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        outs = _block_forward(block, data, rows, context, device)
        tgts = [None if t is None else t[rows].to(device) for t in targets]
        total += float(_reconstruction_loss(outs, tgts)) * rows.numel()
    return total / n


def _train(block, data, targets, context, device, param_groups: list[dict], iterations: int,
           batch_size: int, generator: torch.Generator, extra_loss: Callable[[int], torch.Tensor] | None = None,
           step_sizes: StepSizes | None = None) -> None:
    optimizer = torch.optim.Adam(param_groups)
    n = data.num_samples
    for step in range(iterations):
        rows = torch.randperm(n, generator=generator)[: min(batch_size, n)]

        def backward(rows: torch.Tensor = rows, step: int = step) -> None:
            outs = _block_forward(block, data, rows, context, device)
            tgts = [None if t is None else t[rows].to(device) for t in targets]
            loss = _reconstruction_loss(outs, tgts)
            if extra_loss is not None:
                loss = loss + extra_loss(step)
            loss.backward()

        optimizer_step(optimizer, backward, step_sizes=step_sizes)


def execution_order(denoiser: nn.Module, calibration: CalibrationSet) -> list[str]:
    """The reconstruction units holding quantized modules, in the order one forward of ``denoiser`` runs them."""
    layers = quantized_layers(denoiser)
    units = [b for b in get_adapter(denoiser, warn=False).blocks() if any(n == b or n.startswith(b + ".") for n in layers)]
    order: list[str] = []
    handles = [denoiser.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: order.append(name) if name not in order else None) for name in units]
    call = calibration.calls[0]
    param = next(denoiser.parameters())
    try:
        with torch.no_grad():
            denoiser(**call.kwargs(device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    return order


def _members(layers: dict[str, QuantModule], block: str) -> dict[str, QuantModule]:
    return {n: m for n, m in layers.items() if n == block or n.startswith(block + ".")}


def _checkpoint(workdir: Path, fp_denoiser: nn.Module, qdenoiser: nn.Module, calibration: CalibrationSet,
                options: ReconstructionOptions, order: list[str]) -> Checkpoint:
    """Keyed by everything a block depends on: float weights, quantizer init, data, options, block order."""
    key = fingerprint({"options": asdict(options), "order": order}, fp_denoiser.state_dict(),
                      {k: v for k, v in qdenoiser.state_dict().items() if "quantizer" in k},
                      *(c.inputs for c in calibration))
    return Checkpoint(workdir, key, "a reconstruction").open()


def _block_file(index: int) -> str:
    return f"block-{index:04d}.safetensors"


def _save_checkpoint(checkpoint: Checkpoint, index: int, block: nn.Module, stats: BlockStats) -> None:
    checkpoint.save_tensors(_block_file(index), block.state_dict())
    checkpoint.mark_done(f"block-{index:04d}", asdict(stats))


def _freeze(members: dict[str, QuantModule]) -> None:
    for module in members.values():
        module.set_state(QuantState.FROZEN)


def reconstruct_blocks(
    qdenoiser: nn.Module,
    fp_denoiser: nn.Module,
    calibration: CalibrationSet,
    options: ReconstructionOptions | None = None,
    workdir: str | Path | None = None,
    progress: bool = True,
    memory: MemoryBudget | None = None,
) -> list[BlockStats]:
    """Reconstruct every block of ``qdenoiser`` against ``fp_denoiser``; returns per-block statistics.

    ``qdenoiser`` must be wrapped (``wrap_denoiser``) with its activation quantizers calibrated (mode
    ``quantize``) or absent (weight-only); ``fp_denoiser`` is the float model it came from, untouched.
    On return every quantized module is frozen with quantization enabled. ``workdir`` (optional) holds
    per-block checkpoints; a run restarted on the same workdir resumes at the first unfinished block.
    ``memory`` bounds the block caches held resident (default: half the available RAM, spilling under
    ``workdir/spill`` or the system temporary folder); the result does not depend on it.
    """
    options = options or ReconstructionOptions()
    if len(calibration) == 0:
        raise ValueError("reconstruction needs calibration data; record some with record_denoiser_calls")
    record = getattr(qdenoiser, "diffquant", None)
    if record is None:
        raise ValueError("reconstruct_blocks needs a wrapped denoiser; call wrap_denoiser (or diffquant.quantize) first")
    context = record.context
    device = next(qdenoiser.parameters()).device
    layers = quantized_layers(qdenoiser)
    pending = [q.name or n for n, m in layers.items() for q in m.activation_quantizers() if q.mode != "quantize"]
    if pending:
        raise ValueError(f"activation quantizers not calibrated (e.g. {pending[0]}); calibrate activations before reconstruction")
    requires_grad = {n: p.requires_grad for n, p in qdenoiser.named_parameters()}
    fp_requires_grad = {n: p.requires_grad for n, p in fp_denoiser.named_parameters()}
    for p in [*qdenoiser.parameters(), *fp_denoiser.parameters()]:
        p.requires_grad_(False)
    for module in layers.values():
        if module.state is not QuantState.FROZEN:
            module.set_state(QuantState.LEARNING)
    set_quant_enabled(qdenoiser, False)
    order = execution_order(qdenoiser, calibration)
    checkpoint = _checkpoint(Path(workdir), fp_denoiser, qdenoiser, calibration, options, order) if workdir is not None else None
    done = list(checkpoint.done().values()) if checkpoint is not None else []
    if checkpoint is not None:
        checkpoint.reused(len(done), "block")
    stats = [BlockStats(**d) for d in done]
    budget = memory or MemoryBudget(spill_root=Path(workdir) / "spill" if workdir is not None else None)
    try:
        for index, name in enumerate(tqdm(order, desc="qdiffusion: block reconstruction", disable=not progress)):
            block = qdenoiser.get_submodule(name)
            members = _members(layers, name)
            if index < len(done):
                block.load_state_dict(checkpoint.load_tensors(_block_file(index)), strict=True)
                _freeze(members)
                set_quant_enabled(qdenoiser, True, names=members)
                continue
            result = _reconstruct_block(qdenoiser, fp_denoiser, name, members, calibration, options, index, context, device,
                                        budget)
            stats.append(result)
            _freeze(members)
            set_quant_enabled(qdenoiser, True, names=members)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, index, block, result)
    finally:
        if memory is None:
            budget.close()
        for n, p in qdenoiser.named_parameters():
            p.requires_grad_(requires_grad.get(n, False))
        for n, p in fp_denoiser.named_parameters():
            p.requires_grad_(fp_requires_grad[n])
    for module in layers.values():
        if module.state is not QuantState.FROZEN:
            module.set_state(QuantState.FROZEN)
    set_quant_enabled(qdenoiser, True)
    return stats


def _reconstruct_block(qdenoiser, fp_denoiser, name: str, members: dict[str, QuantModule], calibration: CalibrationSet,
                       options: ReconstructionOptions, index: int, context, device, budget: MemoryBudget) -> BlockStats:
    """One block's inputs (quantized model) and targets (float model), held within ``budget``, then its learning."""
    start = time.perf_counter()
    block = qdenoiser.get_submodule(name)
    data, _ = _run_until(qdenoiser, block, calibration, budget, inputs=True, outputs=False)
    try:
        _, (targets, target_store) = _run_until(fp_denoiser, fp_denoiser.get_submodule(name), calibration, budget,
                                                inputs=False, outputs=True)
    except BaseException:
        data.store.close()
        raise
    try:
        return _learn_block(qdenoiser, block, name, members, data, targets, options, index, context, device, start)
    finally:
        data.store.close()
        target_store.close()


def _learn_block(qdenoiser, block, name: str, members: dict[str, QuantModule], data: BlockData, targets: list,
                 options: ReconstructionOptions, index: int, context, device, start: float) -> BlockStats:
    generator = torch.Generator().manual_seed(options.seed * 100003 + index)
    weighted = {n: m for n, m in members.items() if m.weight_quantizer is not None}
    set_quant_enabled(qdenoiser, True, names=weighted, activations=False)
    rtn_loss = _dataset_loss(block, data, targets, context, device, options.batch_size)
    result = BlockStats(name=name, samples=data.num_samples, rtn_loss=rtn_loss)
    if options.learn_weights and weighted:
        roundings = {module: module.weight_quantizer.learn_rounding(module.weight) for module in weighted.values()}
        schedule = BetaSchedule(options.iterations, options.warmup, options.beta_start, options.beta_end)

        def rounding_loss(step: int) -> torch.Tensor:
            if not schedule.active(step):
                return torch.zeros(())
            beta = schedule.beta(step)
            return options.round_weight * sum(r.regularizer(beta) for r in roundings.values())

        _train(block, data, targets, context, device, [{"params": [r.alpha for r in roundings.values()], "lr": options.weight_lr}],
               options.iterations, options.batch_size, generator, extra_loss=rounding_loss)
        n_total = sum(r.alpha.numel() for r in roundings.values())
        result.binary_fraction = sum(r.binary_fraction() * r.alpha.numel() for r in roundings.values()) / n_total
        flipped = 0.0
        with torch.no_grad():
            for module, rounding in roundings.items():
                rounding.harden()
                w2 = module.weight.reshape(module.weight.shape[0], -1)
                flipped += rounding.flipped_fraction(w2, module.weight_quantizer.expanded_scale()) * rounding.alpha.numel()
                module.bake_rounding()
        result.flipped_fraction = flipped / n_total
        result.weight_loss = _dataset_loss(block, data, targets, context, device, options.batch_size)
    act_quantizers = [q for m in members.values() for q in m.activation_quantizers()]
    if act_quantizers:
        learned = [q for q in act_quantizers if not q.dynamic]  # dynamic scales: nothing for LSQ to learn
        set_quant_enabled(qdenoiser, True, names=members)
        result.act_init_loss = _dataset_loss(block, data, targets, context, device, options.batch_size)
        if options.learn_activations and learned:
            step_sizes = StepSizes(q.scale for q in learned)
            try:
                _train(block, data, targets, context, device, step_sizes.start(options.act_lr),
                       options.act_iterations, options.batch_size, generator, step_sizes=step_sizes)
            finally:
                step_sizes.stop()
            result.act_loss = _dataset_loss(block, data, targets, context, device, options.batch_size)
            if result.act_loss > result.act_init_loss:  # LSQ made the block worse on its own data: keep the start
                step_sizes.revert()
                result.act_reverted = True
                result.act_loss = result.act_init_loss
    result.seconds = time.perf_counter() - start
    return result
