"""Atomic writes and integrity manifests. Only safetensors and JSON are ever read back."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def file_mode(folder: bool = False) -> int:
    """The mode ``open`` or ``mkdir`` gives a new file or folder: 0o666/0o777 less the user's umask.

    ``mkstemp`` and safetensors create 0600 files; written outputs get this mode instead.
    """
    try:  # Linux: read the umask without changing it (os.umask is process-wide and racy)
        mask = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed over ``path`` (with the user's umask) when the block
    succeeds, removed when it fails, so readers never see half a file (nor a glob for ``*.png`` a leftover one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors raises its own error type for I/O faults; a full disk becomes the ``OSError(ENOSPC)`` the CLI
    turns into one line (found by benchmarks/soak.py on a full tmpfs)."""
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors' SafetensorError is not an OSError
            if "os error 28" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """relative path -> {sha256, bytes} for every file under ``folder``."""
    folder = Path(folder)
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in exclude:
            table[rel] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return table


def refuse_pickles(folder: str | Path) -> None:
    """Raise if any pickle-format file sits in ``folder``: diffquant never unpickles. (An OpenVINO ``.bin``
    beside its ``.xml`` holds raw graph constants, read by OpenVINO only.)"""
    for path in Path(folder).rglob("*"):
        openvino_weights = path.suffix == ".bin" and path.with_suffix(".xml").is_file()
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES and not openvino_weights:
            raise ValueError(
                f"refusing to load {path}: pickle files can run arbitrary code and are never loaded; "
                "remove it (diffquant reads only safetensors and JSON)"
            )


def verify_files(folder: str | Path, table: dict[str, dict]) -> None:
    """Check every listed file exists with its size and hash; the message names the bad file."""
    folder = Path(folder)
    for rel, info in table.items():
        path = folder / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the saved model is incomplete, save it again")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise ValueError(f"{path} is truncated or altered ({size} bytes, manifest says {info['bytes']}); save the model again")
        if sha256(path) != info["sha256"]:
            raise ValueError(f"{path} is corrupted (hash differs from the manifest); save the model again")


def null_components(folder: str | Path) -> dict[str, None]:
    """Components a diffusers pipeline folder saved as null (SD3 without T5: ``text_encoder_3``), as ``None`` keyword
    arguments: ``from_pretrained`` refuses such a folder unless they are passed explicitly."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {k: None for k, v in index.items() if not k.startswith("_") and (v is None or v == [None, None])}
