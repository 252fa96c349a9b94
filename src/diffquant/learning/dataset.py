"""Serial dataset generation (EMF): training rows taken from the FP model's own sampling trajectories.

The float pipeline samples every calibration prompt with its real scheduler and guidance; for
each prompt ``steps_per_prompt`` steps are drawn at random and the denoiser inputs of that
prompt at those steps (both classifier-free-guidance rows, conditional and unconditional: the
quantized model sees both at inference) are kept with the FP output. So x_t has inference-time
statistics, not forward-noised ones. FP features of the sensitive layers are added later
(``record_features``), once a sensitivity measurement has named the layers.

In memory the rows live in a ``diffquant.store.TensorStore``: resident while the memory budget allows, read
memory-mapped from the batch shards (or spilled ones) beyond it, so the dataset's resident size is bounded
whatever the prompt count; every read returns the same bytes. Only the FP features of the few sensitive
layers (``record_features``) stay resident.

On disk (a ``diffquant.checkpoint`` folder for the settings' fingerprint): one safetensors shard per
prompt batch plus an index ``dataset.json``; a rerun with the same settings skips the shards already
written (resumable), a finished folder is reused as is, and a folder of other settings is refused.
Under ``accelerate launch`` process ``i`` of ``n`` samples batches ``b % n == i`` into the shared
folder and, after a barrier, every process loads all shards in batch order: the same dataset as one
process (each batch has its own seed).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationSet
from ..calibration.collect import DenoiserCall, _flatten_call
from ..checkpoint import Checkpoint, fingerprint
from ..distributed import barrier, is_main, rank_and_size
from ..io import atomic_save_tensors
from ..sampling import DenoiserStep, SamplingSettings, denoiser_calls, sample
from ..store import MemoryBudget, TensorStore
from ..wrap import get_denoiser

_META = ("__output__", "__step__", "__prompt__")
_SHARED = "__shared__/"  # key prefix, on disk, of the inputs every row shares


@dataclass
class SerialDatasetConfig:
    """Which trajectories to sample (``sampling``, resolved: steps set; batch ``b`` uses seed ``sampling.seed + b``,
    or with ``seeds`` prompt i its own seed ``seeds[i]``) and how many of their steps to keep per prompt."""

    sampling: SamplingSettings
    steps_per_prompt: int = 4
    batch_size: int = 8
    seeds: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingSettings.from_dict(self.sampling)
        if self.sampling.steps is None:
            raise ValueError("the serial dataset needs a step count; resolve the sampling settings first (settings.resolve(pipe))")
        if not 1 <= self.steps_per_prompt <= self.sampling.steps:
            raise ValueError(f"steps_per_prompt must be in 1..steps ({self.sampling.steps}), got {self.steps_per_prompt}")

    def to_dict(self) -> dict:
        return {"sampling": self.sampling.to_dict(), "steps_per_prompt": self.steps_per_prompt, "batch_size": self.batch_size,
                **({"seeds": self.seeds} if self.seeds is not None else {})}  # absent: earlier datasets keep their fingerprint

    def fingerprint(self, prompts: list[str]) -> str:
        return fingerprint({"config": self.to_dict(), "prompts": prompts})


class SerialDataset:
    """Rows of denoiser inputs (flat kwargs, ``timestep`` one value per row), FP outputs, steps, prompt ids.
    ``shared``: inputs without a batch dimension, the same for every row (Flux's ``img_ids``/``txt_ids``).
    ``inputs`` values and ``output`` are tensors or store columns (``column[rows]`` reads rows either way)."""

    def __init__(self, inputs: dict[str, torch.Tensor], output: torch.Tensor, step: torch.Tensor, prompt: torch.Tensor,
                 shared: dict[str, torch.Tensor] | None = None) -> None:
        self.inputs, self.output, self.step, self.prompt = inputs, output, step.long(), prompt.long()
        self.shared = dict(shared or {})
        self.features: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.step.shape[0]

    @property
    def timestep(self) -> torch.Tensor:
        return self.inputs["timestep"]

    def kwargs(self, rows: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> dict:
        """``denoiser(**kwargs)`` arguments for ``rows`` (a batch that may mix timesteps and prompts)."""
        call = DenoiserCall({**self.shared, **{k: v[rows] for k, v in self.inputs.items()}}, 0, 0)
        return call.kwargs(device=device, dtype=dtype)

    def conditioning(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The flat inputs whose key starts with one of ``names`` (e.g. pooled text for time tables), all rows."""
        return {k: v[:] for k, v in self.inputs.items() if k.split(".", 1)[0] in names}

    def batches(self, order: str, batch_size: int, iterations: int, seed: int) -> list[torch.Tensor]:
        """Row indices of every training batch, fixed by ``seed`` (so a resumed run sees the same ones).

        ``parallel``: each batch a random draw across all timesteps and prompts (epoch-wise permutations).
        ``serial``: rows ordered along the trajectories (denoising step first, then prompt) and taken
        in that order, so a batch holds one or two neighbouring timesteps.
        """
        n = len(self)
        if order == "parallel":
            g = torch.Generator().manual_seed(seed)
            stream = torch.cat([torch.randperm(n, generator=g) for _ in range(batch_size * iterations // n + 1)])
        elif order == "serial":
            ranked = sorted(range(n), key=lambda i: (int(self.step[i]), int(self.prompt[i]), i))
            stream = torch.tensor(ranked).repeat(batch_size * iterations // n + 1)
        else:
            raise ValueError(f"unknown batch order {order!r}; choose 'parallel' or 'serial'")
        return [stream[i * batch_size : (i + 1) * batch_size] for i in range(iterations)]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inputs, "__output__": self.output, "__step__": self.step, "__prompt__": self.prompt,
                **{_SHARED + k: v for k, v in self.shared.items()}}

    @classmethod
    def _from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SerialDataset:
        inputs = {k: v for k, v in tensors.items() if k not in _META and not k.startswith(_SHARED)}
        shared = {k[len(_SHARED):]: v for k, v in tensors.items() if k.startswith(_SHARED)}
        return cls(inputs, tensors["__output__"], tensors["__step__"], tensors["__prompt__"], shared)

    @classmethod
    def _from_store(cls, store: TensorStore, shared: dict[str, torch.Tensor]) -> SerialDataset:
        """Rows in ``store``; the small per-row columns (timestep, step, prompt) are read into memory."""
        inputs = {k: store.column(k) for k in store.keys if k not in _META}
        inputs["timestep"] = inputs["timestep"][:]
        small = store.rows(slice(None), ["__step__", "__prompt__"])
        return cls(inputs, store.column("__output__"), small["__step__"], small["__prompt__"], shared)

    @classmethod
    def concat(cls, parts: list[SerialDataset]) -> SerialDataset:
        shared = parts[0].shared
        for part in parts[1:]:
            if part.shared.keys() != shared.keys() or not all(torch.equal(part.shared[k], v) for k, v in shared.items()):
                raise ValueError(f"denoiser inputs {sorted(shared)} differ between batches; sample every batch at the same size")
        keys = [k for k in parts[0]._tensors() if not k.startswith(_SHARED)]
        return cls._from_tensors({**{k: torch.cat([p._tensors()[k] for p in parts]) for k in keys},
                                  **{_SHARED + k: v for k, v in shared.items()}})

    @classmethod
    def from_calibration(cls, calibration: CalibrationSet) -> SerialDataset:
        """Rows of recorded calls that carry their FP outputs (for a bare denoiser without a pipeline)."""
        parts = []
        for call in calibration:
            if call.output is None:
                raise ValueError("the calibration set has no FP outputs; record it with keep_outputs=True or pass prompts and a pipeline")
            n = call.batch_size
            inputs = {k: (v.expand(n) if k == "timestep" and v.numel() == 1 else v) for k, v in call.inputs.items()}
            inputs["timestep"] = inputs["timestep"].reshape(n)
            shared = {k: inputs.pop(k) for k, v in list(inputs.items()) if v.dim() == 0 or v.shape[0] != n}
            parts.append(cls(inputs, call.output, torch.full((n,), call.step), torch.full((n,), -1), shared))
        return cls.concat(parts)

    def save_features(self, folder: str | Path) -> None:
        """Write the FP features for the current sensitive layers next to the shards (the main process only)."""
        if not is_main():
            return
        folder = Path(folder)
        names = sorted(self.features)
        atomic_save_tensors(self.features, folder / f"features-{_names_digest(names)}.safetensors")

    def load_features(self, folder: str | Path, names: list[str]) -> bool:
        path = Path(folder) / f"features-{_names_digest(sorted(names))}.safetensors"
        if not path.is_file():
            return False
        self.features = load_file(str(path))
        return True


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


def _rows_for_step(chosen: list[set[int]], step: int, batch: int) -> list[int]:
    """Batch rows of the prompts that keep ``step``; with guidance the batch is [uncond..., cond...]."""
    prompts = len(chosen)
    if batch % prompts:
        raise ValueError(f"denoiser batch {batch} is not a multiple of the {prompts} prompts; use one image per prompt")
    copies = batch // prompts
    return [p + c * prompts for c in range(copies) for p in range(prompts) if step in chosen[p]]


def _sample_batch(pipe, prompts: list[str], first_prompt: int, config: SerialDatasetConfig, seed: int) -> SerialDataset:
    signature = inspect.signature(get_denoiser(pipe).forward)
    steps = config.sampling.steps
    g = torch.Generator().manual_seed(seed)
    chosen = [set(torch.randperm(steps, generator=g)[: config.steps_per_prompt].tolist()) for _ in prompts]
    parts: list[SerialDataset] = []
    pending: dict[int, tuple] = {}  # step -> (inputs, steps, prompt ids, rows), output to come

    def before(call: DenoiserStep) -> None:
        flat = _flatten_call(signature, call.args, call.kwargs)
        batch = next(v.shape[0] for k, v in flat.items() if k != "timestep" and v.dim() > 0)
        rows = _rows_for_step(chosen, call.step, batch)
        if not rows:
            return
        index = torch.tensor(rows)
        inputs, shared = {}, {}
        for key, value in flat.items():
            if key == "timestep":
                value = value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)
            elif value.dim() == 0 or value.shape[0] != batch:  # e.g. Flux's img_ids: one for the whole batch
                shared[key] = value.clone()
                continue
            inputs[key] = value[index].clone()
        prompt_ids = torch.tensor([first_prompt + r % len(prompts) for r in rows])
        pending[call.step] = (inputs, torch.full((len(rows),), call.step), prompt_ids, index, shared)

    def after(call: DenoiserStep) -> None:
        if call.step in pending:
            inputs, step_ids, prompt_ids, index, shared = pending.pop(call.step)
            parts.append(SerialDataset(inputs, call.prediction[index].detach().clone(), step_ids, prompt_ids, shared))

    with denoiser_calls(pipe, before, after) as seen:
        seeds = None if config.seeds is None else config.seeds[first_prompt:first_prompt + len(prompts)]
        sample(pipe, prompts, config.sampling.replace(seed=seed), seeds=seeds)
    if seen.calls != steps:
        raise RuntimeError(f"the pipeline called its denoiser {seen.calls} times for {steps} steps; "
                           "the serial dataset needs one call per step")
    return SerialDataset.concat(parts)


class _Rows:
    """Batches added in order to one store within a budget; inputs without a row dimension checked equal."""

    def __init__(self, memory: MemoryBudget | None) -> None:
        self.store, self.shared = TensorStore(memory), None

    def _shared(self, shared: dict[str, torch.Tensor]) -> None:
        if self.shared is None:
            self.shared = shared
        elif shared.keys() != self.shared.keys() or not all(torch.equal(shared[k], v) for k, v in self.shared.items()):
            raise ValueError(f"denoiser inputs {sorted(shared)} differ between batches; sample every batch at the same size")

    def add(self, part: SerialDataset, saved: Path | None = None) -> None:
        self._shared(part.shared)
        self.store.append({k: v for k, v in part._tensors().items() if not k.startswith(_SHARED)}, saved=saved)

    def adopt(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            self._shared({k[len(_SHARED):]: f.get_tensor(k) for k in keys if k.startswith(_SHARED)})
        self.store.adopt(path, [k for k in keys if not k.startswith(_SHARED)])

    def dataset(self) -> SerialDataset:
        return SerialDataset._from_store(self.store, self.shared or {})


def generate_serial_dataset(
    pipe, prompts: list[str], config: SerialDatasetConfig, folder: str | Path | None = None, progress: bool = True,
    memory: MemoryBudget | None = None,
) -> SerialDataset:
    """Sample ``prompts`` with the float ``pipe`` and keep random steps per prompt (see the module docstring).

    With ``folder``, every prompt batch becomes a shard written as soon as it is done; shards of a
    previous run with the same prompts and settings are loaded instead of sampled again. Under a
    multi-process launch the processes share the batches (a shared ``folder`` is needed for that).
    ``memory`` bounds the rows held resident (default: half the available RAM); beyond it they are read
    memory-mapped from the shards (or from spilled copies without ``folder``).
    """
    if not prompts:
        raise ValueError("no calibration prompts given; pass a prompt list or a non-empty prompt file")
    checkpoint = Checkpoint(folder, config.fingerprint(prompts), "an EMF serial dataset").open() if folder is not None else None
    rank, world = rank_and_size() if folder is not None else (0, 1)
    batches = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    names = [f"serial-{b:05d}.safetensors" for b in range(len(batches))]
    rows = _Rows(memory if memory is not None else MemoryBudget())
    mine, sampled = range(rank, len(batches), world), 0
    for b in tqdm(mine, desc="emf: serial dataset (FP sampling)", disable=not progress or rank != 0):
        path = checkpoint.path(names[b]) if checkpoint is not None else None
        if path is not None and path.is_file():
            if world == 1:
                rows.adopt(path)
            continue
        part = _sample_batch(pipe, batches[b], b * config.batch_size, config, config.sampling.seed + b)
        sampled += 1
        if checkpoint is not None:
            checkpoint.save_tensors(names[b], part._tensors())
        if world == 1:  # in batch order; with several processes every one reads all shards after the barrier
            rows.add(part, saved=path)
    if world > 1:
        barrier()
        for name in names:
            rows.adopt(checkpoint.path(name))
    if checkpoint is not None and rank == 0:
        checkpoint.reused(len(mine) - sampled, "batch", "batches")
        checkpoint.save_json("dataset.json", {"fingerprint": checkpoint.fingerprint, "shards": names, "batches": len(batches),
                                              "config": config.to_dict(), "prompts": len(prompts)})
    return rows.dataset()


@torch.no_grad()
def record_features(denoiser: nn.Module, dataset: SerialDataset, layer_names: list[str], batch_size: int = 16,
                    progress: bool = True) -> None:
    """Put each named layer's output on every row into ``dataset.features`` (run ``denoiser`` as it is:
    call it with quantization switched off to record FP features)."""
    param = next(denoiser.parameters())
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
    handles = [
        denoiser.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: captured[name].append(out.detach().cpu()))
        for name in layer_names
    ]
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="emf: FP features of sensitive layers", disable=not progress):
            rows = torch.arange(start, min(start + batch_size, len(dataset)))
            denoiser(**dataset.kwargs(rows, param.device, param.dtype))
    finally:
        for h in handles:
            h.remove()
    dataset.features = {name: torch.cat(chunks) for name, chunks in captured.items()}
