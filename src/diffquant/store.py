"""Row tables within a memory budget: calibration data, block reconstruction's caches, EMF's serial dataset.

A ``TensorStore`` is a table of named tensors sharing a first (row) dimension, filled chunk by chunk
(``append``) and read by row indices (``rows``, ``column(key)[rows]``). A chunk stays in memory while the
``MemoryBudget`` the store draws from has room; a chunk that would exceed it is written as a safetensors
shard (atomically, ``io.atomic_save_tensors``) and read back memory-mapped (``safe_open``: one slice per run
of consecutive rows), so resident bytes stay under the budget whatever the sample count. A shard already on
disk (a checkpoint's) is adopted as it is. Reads return the same bytes either way, so a result does not
depend on the budget (tests/test_store.py checks reconstruction and EMF bit for bit).

The budget counts data only (not model weights); by default it is half of the RAM available when it is made
(``MemAvailable`` in /proc/meminfo). ``parse_bytes`` reads ``"4GiB"``, ``"512MB"`` or a plain byte count.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import itertools
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .io import atomic_save_tensors

DEFAULT_FRACTION = 0.5
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"4GiB"`` / ``"512MB"`` / ``"1e9"`` / ``4096`` as a byte count; a one-line error otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read the memory size {text!r}; write e.g. 4GiB, 512MB or a byte count")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def available_memory() -> int:
    """Bytes of RAM available now (``MemAvailable``), or physical RAM where /proc is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). glibc keeps freed pieces
    resident: an OpenVINO trace of SD 1.5 (16x16 latents) held 5.4 GB after it finished, 1.8 GB once trimmed, and a
    memory measurement would see an earlier row's garbage as its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryBudget:
    """Bytes that the stores drawing from it may keep resident; spilled shards go to a fresh folder under
    ``spill_root`` (default: the system temporary folder), deleted when the budget is closed or collected."""

    def __init__(self, limit: str | int | None = None, spill_root: str | Path | None = None) -> None:
        self.limit = int(DEFAULT_FRACTION * available_memory()) if limit is None else parse_bytes(limit)
        self.resident = self.peak = self.spilled = 0
        self.files = 0
        self._root, self._folder = spill_root, None

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit under the limit; False means: spill them."""
        if self.resident + nbytes > self.limit:
            return False
        self.resident += nbytes
        self.peak = max(self.peak, self.resident)
        return True

    def release(self, nbytes: int) -> None:
        self.resident -= nbytes

    def spill_path(self) -> Path:
        """A new shard path in this budget's spill folder."""
        if self._folder is None:
            if self._root is not None:
                Path(self._root).mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="diffquant-spill-", dir=self._root))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        self.files += 1
        return self._folder / f"shard-{self.files:06d}.safetensors"

    def close(self) -> None:
        """Delete the spill folder (stores still reading from it must be closed first)."""
        if self._folder is not None:
            self._cleanup()
            self._folder = None

    def stats(self) -> dict:
        return {"limit_bytes": self.limit, "peak_resident_bytes": self.peak, "spilled_bytes": self.spilled,
                "spilled_files": self.files}


@dataclass
class _Chunk:
    start: int
    rows: int
    tensors: dict[str, torch.Tensor] | None = None  # resident
    path: Path | None = None  # spilled or adopted
    owned: bool = False  # a spill file this store wrote (deleted on close)
    handle: object = None
    nbytes: int = 0


@dataclass
class TensorStore:
    """Named tensors with a common row dimension, resident or spilled chunk by chunk (see the module docstring).
    Without a budget every chunk stays resident."""

    budget: MemoryBudget | None = None
    chunks: list[_Chunk] = field(default_factory=list)
    keys: tuple[str, ...] | None = None
    _meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.chunks[-1].start + self.chunks[-1].rows if self.chunks else 0

    def _check(self, keys: Iterable[str], rows: int, meta: dict) -> None:
        keys = tuple(sorted(keys))
        if self.keys is None:
            self.keys, self._meta = keys, meta
        elif keys != self.keys or meta != self._meta:
            raise ValueError(f"a chunk with keys {list(keys)} does not match the store's {list(self.keys)}; "
                             "record every batch with the same inputs and sizes")
        if rows < 1:
            raise ValueError("a store chunk needs at least one row")

    def append(self, tensors: Mapping[str, torch.Tensor], saved: str | Path | None = None) -> None:
        """Add rows (every tensor's first dimension); kept resident if the budget allows, else written to disk, or,
        when ``saved`` names a safetensors file already holding these columns (a checkpoint shard), read from it."""
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        rows = {v.shape[0] for v in tensors.values()}
        if len(rows) != 1:
            raise ValueError(f"store columns differ in rows: {sorted(rows)}")
        n = rows.pop()
        self._check(tensors, n, {k: (v.dtype, tuple(v.shape[1:])) for k, v in tensors.items()})
        nbytes = sum(v.nbytes for v in tensors.values())
        chunk = _Chunk(len(self), n, nbytes=nbytes)
        if self.budget is None or self.budget.reserve(nbytes):
            chunk.tensors = tensors
        elif saved is not None:
            self.adopt(saved, tensors)
            return
        else:
            chunk.path, chunk.owned = self.budget.spill_path(), True
            atomic_save_tensors(tensors, chunk.path)
            self.budget.spilled += nbytes
            chunk.nbytes = 0
        self.chunks.append(chunk)

    def adopt(self, path: str | Path, keys: Iterable[str]) -> None:
        """Add the rows of columns ``keys`` of a safetensors file already on disk, memory-mapped (no copy)."""
        handle = safe_open(str(path), framework="pt")
        keys = list(keys)
        shapes = {k: handle.get_slice(k).get_shape() for k in keys}
        dtypes = {k: handle.get_slice(k).get_dtype() for k in keys}
        n = shapes[keys[0]][0]
        meta = {k: (_DTYPES[dtypes[k]], tuple(shapes[k][1:])) for k in keys}
        self._check(keys, n, meta)
        self.chunks.append(_Chunk(len(self), n, path=Path(path), handle=handle))

    def _read(self, chunk: _Chunk, key: str, local: torch.Tensor) -> torch.Tensor:
        if chunk.tensors is not None:
            return chunk.tensors[key][local]
        if chunk.handle is None:
            chunk.handle = safe_open(str(chunk.path), framework="pt")
        view = chunk.handle.get_slice(key)
        order, inverse = torch.unique(local, return_inverse=True)  # sorted; runs of consecutive rows read at once
        values = order.tolist()
        parts, begin = [], 0
        for i in range(1, len(values) + 1):
            if i == len(values) or values[i] != values[i - 1] + 1:
                parts.append(view[values[begin] : values[i - 1] + 1])
                begin = i
        return torch.cat(parts)[inverse]

    def rows(self, index: torch.Tensor | slice, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The rows ``index`` (in its order) of columns ``keys`` (default: all)."""
        keys = list(self.keys or ()) if keys is None else list(keys)
        index = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).long().reshape(-1)
        out = {k: torch.empty((index.numel(), *self._meta[k][1]), dtype=self._meta[k][0]) for k in keys}
        for chunk in self.chunks:
            mask = (index >= chunk.start) & (index < chunk.start + chunk.rows)
            if not bool(mask.any()):
                continue
            where = mask.nonzero().flatten()
            for k in keys:
                out[k][where] = self._read(chunk, k, index[where] - chunk.start)
        return out

    def column(self, key: str) -> Column:
        return Column(self, key)

    @property
    def resident_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks if c.tensors is not None)

    def close(self) -> None:
        """Release the budget and delete this store's spill files."""
        for chunk in self.chunks:
            if chunk.tensors is not None and self.budget is not None:
                self.budget.release(chunk.nbytes)
            chunk.handle = chunk.tensors = None
            if chunk.owned and chunk.path is not None:
                chunk.path.unlink(missing_ok=True)
        self.chunks = []


class Column:
    """One column of a store, indexed like a tensor by rows: ``column[rows]``, ``column[:]`` (all rows)."""

    def __init__(self, store: TensorStore, key: str) -> None:
        self.store, self.key = store, key

    def __getitem__(self, index) -> torch.Tensor:
        return self.store.rows(index, [self.key])[self.key]

    def __len__(self) -> int:
        return len(self.store)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.store), *self.store._meta[self.key][1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.store._meta[self.key][0]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def mapped_copy(module: nn.Module, path: str | Path) -> nn.Module:
    """A copy of a CPU ``module`` whose parameters and buffers are memory-mapped from a safetensors file written at
    ``path`` and unlinked at once (the mapping keeps its pages; nothing is left behind on a crash). The copy costs
    disk and page cache, which the kernel drops and re-reads under memory pressure, instead of process memory: the
    float reference that reconstruction reads block by block. Writing to the copy is copy-on-write (private)."""
    tensors: dict[str, torch.Tensor] = {}
    originals: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in itertools.chain(module.named_parameters(remove_duplicate=False),
                                        module.named_buffers(remove_duplicate=False)):
        if tensor.device.type != "cpu":
            raise ValueError(f"mapped_copy maps CPU tensors only; {name} is on {tensor.device}")
        if id(tensor) not in originals:
            originals[id(tensor)] = (name, tensor)
            tensors[name] = tensor.detach().contiguous()
    atomic_save_tensors(tensors, path)
    del tensors
    handle = safe_open(str(path), framework="pt")
    memo: dict[int, torch.Tensor] = {}
    for key, (name, tensor) in originals.items():
        mapped = handle.get_tensor(name)
        memo[key] = nn.Parameter(mapped, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else mapped
    Path(path).unlink()
    return copy.deepcopy(module, memo)
