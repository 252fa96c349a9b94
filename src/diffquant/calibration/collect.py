"""Record the denoiser's inputs while the float pipeline samples, and replay them.

Recording hooks the denoiser's forward, so the pipeline's own scheduler, guidance and
conditioning (SDXL added conditions, SD3 pooled projections) produce the inputs: calibration data
has inference-time statistics. Records are flat dicts of tensors (nested kwargs become
``"added_cond_kwargs.text_embeds"``), stored as safetensors shards. Given a memory budget, each recorded
batch's tensors move into a ``diffquant.store.TensorStore`` (resident while the budget allows, else on disk):
the set's resident size stays bounded whatever the sample count.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, fingerprint
from ..config import CalibrationConfig
from ..io import atomic_save_tensors, atomic_write_json
from ..models.adapters import get_denoiser
from ..sampling import DenoiserStep, SamplingSettings, denoiser_calls, sample
from ..store import MemoryBudget, TensorStore

_META_KEYS = ("__step__", "__num_steps__")


@dataclass
class DenoiserCall:
    """One recorded denoiser call: its tensor kwargs, the step index, and optionally the output."""

    inputs: Mapping[str, torch.Tensor]
    step: int
    num_steps: int
    output: torch.Tensor | None = None

    @property
    def timestep(self) -> torch.Tensor:
        return self.inputs["timestep"]

    def kwargs(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> dict:
        """The call's keyword arguments, nested again, ready for ``denoiser(**kwargs)``."""
        out: dict = {"return_dict": False}
        for key, value in self.inputs.items():
            if device is not None or dtype is not None:
                value = value.to(device=device, dtype=dtype if value.is_floating_point() and key != "timestep" else None)
            if "." in key:
                head, sub = key.split(".", 1)
                out.setdefault(head, {})[sub] = value
            else:
                out[key] = value
        return out

    @property
    def batch_size(self) -> int:
        first = next(v for k, v in self.inputs.items() if k != "timestep")
        return first.shape[0]


@dataclass
class CalibrationSet:
    """An ordered list of recorded denoiser calls, savable as safetensors shards."""

    calls: list[DenoiserCall] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[DenoiserCall]:
        return iter(self.calls)

    def timesteps(self) -> list[float]:
        return sorted({float(c.timestep.flatten()[0]) for c in self.calls}, reverse=True)

    def num_samples(self) -> int:
        return sum(c.batch_size for c in self.calls)

    def bounded(self, memory: MemoryBudget | None) -> CalibrationSet:
        """The same calls, their batched inputs held in stores drawing from ``memory`` (reads give the same bytes)."""
        if memory is None:
            return self
        stores: dict[tuple, TensorStore] = {}
        calls = []
        for call in self.calls:
            n = call.batch_size
            rows = {k: v for k, v in call.inputs.items() if k != "timestep" and v.dim() > 0 and v.shape[0] == n}
            layout = tuple(sorted((k, v.dtype, tuple(v.shape[1:])) for k, v in rows.items()))
            store = stores.setdefault(layout, TensorStore(memory))
            start = len(store)
            store.append(rows)
            fixed = {k: v for k, v in call.inputs.items() if k not in rows}
            calls.append(DenoiserCall(_StoredInputs(store, start, n, list(call.inputs), fixed), call.step, call.num_steps,
                                      call.output))
        return CalibrationSet(calls)

    def save(self, folder: str | Path, shard_size: int = 64) -> None:
        """Write shards ``calib-00000.safetensors`` and an index, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        shards = []
        for start in range(0, len(self.calls), shard_size):
            name = f"calib-{start // shard_size:05d}.safetensors"
            _write_shard(self.calls[start : start + shard_size], folder / name)
            shards.append(name)
        atomic_write_json(folder / INDEX, {"shards": shards, "calls": len(self.calls)})

    @classmethod
    def load(cls, folder: str | Path) -> CalibrationSet:
        folder = Path(folder)
        index = folder / INDEX
        if not index.exists():
            raise FileNotFoundError(f"{folder} holds no calibration set ({INDEX} missing); record one first")
        calls = []
        for name in json.loads(index.read_text())["shards"]:
            calls.extend(_read_shard(folder / name))
        return cls(calls)


INDEX = "calibration.json"


class _StoredInputs(Mapping):
    """A recorded call's inputs: rows ``start .. start + n`` of a store, plus the unbatched ones (``timestep``)."""

    def __init__(self, store: TensorStore, start: int, n: int, order: list[str], fixed: dict[str, torch.Tensor]) -> None:
        self.store, self.rows, self.order, self.fixed = store, slice(start, start + n), order, fixed

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.fixed:
            return self.fixed[key]
        if key not in self.order:
            raise KeyError(key)
        return self.store.rows(self.rows, [key])[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _write_shard(calls: list[DenoiserCall], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i, call in enumerate(calls):
        for key, value in call.inputs.items():
            tensors[f"{i}/{key}"] = value
        if call.output is not None:
            tensors[f"{i}/__output__"] = call.output
        tensors[f"{i}/__step__"] = torch.tensor([call.step, call.num_steps])
    atomic_save_tensors(tensors, path)


def _read_shard(path: Path) -> list[DenoiserCall]:
    by_call: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        i, sub = key.split("/", 1)
        by_call.setdefault(int(i), {})[sub] = value
    calls = []
    for i in sorted(by_call):
        entry = by_call[i]
        step, num_steps = entry.pop("__step__").tolist()
        output = entry.pop("__output__", None)
        calls.append(DenoiserCall(entry, int(step), int(num_steps), output))
    return calls


def _flatten_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    bound = signature.bind_partial(*args, **kwargs)
    flat: dict[str, torch.Tensor] = {}
    for name, value in bound.arguments.items():
        if torch.is_tensor(value):
            flat[name] = value.detach().clone()
        elif isinstance(value, (int, float)) and name == "timestep":
            flat[name] = torch.tensor(value)
        elif isinstance(value, dict):
            for sub, v in value.items():
                if torch.is_tensor(v):
                    flat[f"{name}.{sub}"] = v.detach().clone()
    return flat


def _select_rows(flat: dict[str, torch.Tensor], rows: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    return {k: (v[rows] if v.dim() > 0 and v.shape[0] == batch and k != "timestep" else v) for k, v in flat.items()}


def record_denoiser_calls(
    pipe,
    prompts: list[str],
    config: CalibrationConfig,
    *,
    keep_outputs: bool = False,
    progress: bool = True,
    defaults: dict | None = None,
    cache_dir: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    memory: MemoryBudget | None = None,
) -> CalibrationSet:
    """Sample ``prompts`` with the float pipeline and keep the denoiser inputs of every k-th step.

    Unset sampling settings come from ``defaults`` (the registered ones) and the pipeline
    (``SamplingSettings.resolve``).
    With ``cache_dir`` every prompt batch is written as a shard when done, and a rerun with the same
    settings loads finished batches instead of sampling them again: an interrupted recording
    resumes and ends with the same data (each batch has its own seeded generator).
    ``shard=(i, n)`` samples only batches ``b % n == i`` into ``cache_dir`` (one process of ``n``);
    a final call with the default shard then merges every batch in order, deterministically.
    ``memory``: each finished batch's calls move into stores within that budget (``CalibrationSet.bounded``).
    """
    index, num_shards = shard
    if num_shards > 1 and cache_dir is None:
        raise ValueError("sharded recording needs a cache_dir shared by all processes")
    if not prompts:
        raise ValueError("no calibration prompts given; pass a prompt list or a non-empty prompt file")
    signature = inspect.signature(get_denoiser(pipe).forward)
    settings = config.sampling.resolve(pipe, defaults)
    calls: list[DenoiserCall] = []
    sampler = torch.Generator().manual_seed(config.seed)
    pending: dict[int, tuple[DenoiserCall, torch.Tensor | None]] = {}  # step -> record and rows kept, output to come

    def before(call: DenoiserStep) -> None:
        if call.step % config.every_k != 0:
            return
        flat = _flatten_call(signature, call.args, call.kwargs)
        batch = next(v.shape[0] for k, v in flat.items() if k != "timestep" and v.dim() > 0)
        rows = None
        if config.samples_per_step is not None and config.samples_per_step < batch:
            rows = torch.randperm(batch, generator=sampler)[: config.samples_per_step].sort().values
            flat = _select_rows(flat, rows, batch)
        calls.append(DenoiserCall(flat, call.step, settings.steps))
        pending[call.step] = (calls[-1], rows)

    def after(call: DenoiserStep) -> None:
        record, rows = pending.pop(call.step, (None, None))
        if record is not None and keep_outputs:
            out = call.prediction
            record.output = (out if rows is None else out[rows]).detach().clone()

    batches = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    cache = _prepare_cache(cache_dir, prompts, config, settings, keep_outputs)
    reused = 0
    for b, batch in enumerate(tqdm(batches, desc="recording calibration trajectories", disable=not progress)):
        if b % num_shards != index:
            continue
        path = None if cache is None else cache.path(f"batch-{b:05d}.safetensors")
        if path is not None and path.is_file():
            calls.extend(CalibrationSet(_read_shard(path)).bounded(memory).calls)
            reused += 1
            continue
        first = len(calls)
        sampler.manual_seed(config.seed + 7919 * (b + 1))
        with denoiser_calls(pipe, before, after):
            sample(pipe, batch, settings.replace(seed=config.seed + b), seeds=config.seeds_for(b * config.batch_size, len(batch)))
        if path is not None:
            _write_shard(calls[first:], path)
        calls[first:] = CalibrationSet(calls[first:]).bounded(memory).calls
    if cache is not None and num_shards == 1:
        cache.reused(reused, "batch", "batches")
        cache.save_json(INDEX, {"shards": [f"batch-{b:05d}.safetensors" for b in range(len(batches))], "calls": len(calls),
                                "fingerprint": cache.fingerprint})
    return CalibrationSet(calls)


def _prepare_cache(cache_dir, prompts, config: CalibrationConfig, settings: SamplingSettings, keep_outputs) -> Checkpoint | None:
    """Open the recording's checkpoint: its settings must match, or resuming would mix data."""
    if cache_dir is None:
        return None
    key = {
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "config": asdict(config),
        "sampling": settings.to_dict(), "keep_outputs": keep_outputs,
    }
    return Checkpoint(cache_dir, fingerprint(key), "calibration data").open()


def replay(
    denoiser: nn.Module, calibration: CalibrationSet, *, progress: bool = True, desc: str = "calibrating"
) -> None:
    """Run every recorded call through ``denoiser`` (observers see them), without gradients."""
    param = next(denoiser.parameters())
    with torch.no_grad():
        for call in tqdm(calibration.calls, desc=desc, disable=not progress):
            denoiser(**call.kwargs(device=param.device, dtype=param.dtype))
