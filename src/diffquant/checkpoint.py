"""Resumable state of long jobs: one primitive, ``Checkpoint(folder, fingerprint, what)``.

Calibration recording, Q-Diffusion's recording batches, block reconstruction, PCR passes and
sensitivity, the EMF serial dataset and QAT, and the evaluation PNG cache all keep their state
through it (docs/scale-out.md lists the folders)::

    ckpt = Checkpoint(workdir / "reconstruction", fingerprint(settings, tensors), "a reconstruction").open()
    for i, block in enumerate(blocks):
        if ckpt.is_done(f"block-{i:04d}"):
            ...load ckpt.load_tensors(...)...
        else:
            ...work...; ckpt.save_tensors(...); ckpt.mark_done(f"block-{i:04d}", stats)
    ckpt.reused(count, "block")   # "resumed ...: reused a reconstruction (3 blocks)"

``open()`` writes ``checkpoint.json`` (the fingerprint) into a new folder and refuses a folder written
for another fingerprint with one message. Every file is written atomically, so a file that exists is
complete; "done" markers are small JSON files under ``.done/`` (one per unit, so processes sharing a
folder under ``accelerate launch`` never rewrite each other's). ``Checkpoint.keyed(root, settings)``
is a folder named by the fingerprint: a changed configuration starts fresh beside the old state and
an identical one resumes (``diffquant quantize``'s work folder, EMF QAT runs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .io import atomic_save_tensors, atomic_write_json

MARKER = "checkpoint.json"
DONE = ".done"
_REUSED: ContextVar[list[str] | None] = ContextVar("diffquant_reused", default=None)


def fingerprint(settings: Any, *tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex digest of JSON ``settings`` and the exact bytes of every tensor table (e.g. state dicts)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for table in tensors:
        for key in sorted(table):
            value = table[key].detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}:{value.dtype}:{value.numel()}".encode())
            if value.numel():
                digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


@contextmanager
def resume_log() -> Iterator[list[str]]:
    """Collect, inside the block, what checkpoints reused (``["a reconstruction (3 blocks)", ...]``)."""
    reused: list[str] = []
    token = _REUSED.set(reused)
    try:
        yield reused
    finally:
        _REUSED.reset(token)


class Checkpoint:
    """A job's resumable state in ``folder``, valid for one ``fingerprint``; ``what`` names it in messages."""

    def __init__(self, folder: str | Path, fingerprint: str, what: str) -> None:
        self.folder, self.fingerprint, self.what = Path(folder), fingerprint, what

    @classmethod
    def keyed(cls, root: str | Path, settings: Any, what: str) -> Checkpoint:
        """The checkpoint of ``settings`` (JSON, or a fingerprint already computed) in ``root/<fingerprint>``:
        other settings get another folder."""
        key = settings if isinstance(settings, str) else fingerprint(settings)[:16]
        return cls(Path(root) / key, key, what)

    def open(self) -> Checkpoint:
        """Create the folder, or check that it holds this fingerprint's state (the one refusal message)."""
        marker = self.folder / MARKER
        if marker.is_file():
            if json.loads(marker.read_text()).get("fingerprint") != self.fingerprint:
                raise ValueError(f"{self.folder} holds {self.what} made with other settings (another model, prompts "
                                 "or config); delete it or pass a fresh workdir")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, {"fingerprint": self.fingerprint, "what": self.what})
        return self

    def path(self, name: str) -> Path:
        return self.folder / name

    def has(self, name: str) -> bool:
        """Whether file ``name`` was written (writes are atomic: it is complete)."""
        return self.path(name).is_file()

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        atomic_save_tensors(dict(tensors), self.path(name), metadata=metadata)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(name)))

    def save_json(self, name: str, data: Any) -> None:
        atomic_write_json(self.path(name), data)

    def load_json(self, name: str) -> Any | None:
        return json.loads(self.path(name).read_text()) if self.has(name) else None

    def mark_done(self, name: str, info: Any = None) -> None:
        """Record unit ``name`` as finished, with JSON ``info`` to hand back on resume."""
        atomic_write_json(self.folder / DONE / f"{name}.json", {"info": info})

    def is_done(self, name: str) -> bool:
        return (self.folder / DONE / f"{name}.json").is_file()

    def done(self) -> dict[str, Any]:
        """Every finished unit's ``info``, by name in sorted order (zero-padded names: in job order)."""
        folder = self.folder / DONE
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
        return {p.stem: json.loads(p.read_text())["info"] for p in paths}

    def reused(self, count: int, unit: str, plural: str | None = None) -> None:
        """Tell an active ``resume_log`` that ``count`` finished units were reused (nothing when 0)."""
        log = _REUSED.get()
        if count and log is not None:
            log.append(f"{self.what} ({count} {unit if count == 1 else plural or unit + 's'})")


def folder_identity(path: str | Path) -> Any:
    """What a work folder's key takes from an input folder (its path and each file's size and mtime), or the
    name itself for a non-folder (a bundled model name): a changed model gets a fresh work folder."""
    folder = Path(path)
    if not folder.is_dir():
        return str(path)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {"path": str(folder.resolve()),
            "files": [[p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def work_folder(out: str | Path, settings: Any) -> Path:
    """``.<out>.work/<fingerprint of settings>`` beside ``out``: the resumable state of the run writing ``out``
    with these settings. Other settings get their own folder (they start fresh); the same settings resume."""
    out = Path(out)
    return Checkpoint.keyed(out.parent / f".{out.name}.work", settings, "a quantize work folder").open().folder


def _size(folder: Path) -> str:
    return f"{sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 2**20:.1f} MiB"


def finish_work_folder(work: Path, keep: bool = False) -> str | None:
    """After success: delete ``work`` (or keep it) and return a line about what stays on disk, if anything."""
    if keep:
        return f"kept the work folder {work} ({_size(work)}); delete it with: rm -r {work}"
    shutil.rmtree(work, ignore_errors=True)
    root = work.parent
    others = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if not others:
        shutil.rmtree(root, ignore_errors=True)
        return None
    return (f"{root} still holds {len(others)} interrupted run(s) with other settings ({_size(root)}); "
            f"delete it with: rm -r {root}")
