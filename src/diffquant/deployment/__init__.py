"""Deployment engines: ``diffquant.load(folder, backend=...)`` and ``export(model, out, format=...)``.

Each engine is one module here, ``deployment/<engine>.py``, that implements its folder side (export, load, and an
in-memory ``deploy``) over its graphs in ``runtime/`` and registers a ``registry.Engine``; the modules named in
``ENGINE_MODULES`` below are imported with this package, which registers them. ``load``, ``export``,
``generate --backend``, ``export --format``, ``eval --backend`` and ``bench --backend`` consult the registry only.
An engine imports its own library inside its functions (``import openvino`` on first use), so it registers where
the library is not installed (using it then raises ImportError). This layer sits beside ``serialization`` (the
torch form) and above the runtime, which never imports the layer that saves models.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..registry import ENGINES, Engine, engine

# Engine modules of this package, imported (so registered) with it; a new engine adds its module's name here.
ENGINE_MODULES = ("torch", "onnx", "openvino")


def folder_engine(path: str | Path) -> Engine | None:
    """The engine whose export ``path`` holds (``diffquant.save`` folders are the torch engine's), else None."""
    found = [e for e in ENGINES.values() if e.name != "torch" and e.is_folder(Path(path))]
    return found[0] if found else (ENGINES["torch"] if ENGINES["torch"].is_folder(Path(path)) else None)


def load(folder: str | Path, *, device: Any = None, torch_dtype: Any = None, backend: str = "torch") -> Any:
    """Load a quantized model as a pipeline that generates (or the bare denoiser), its denoiser on ``backend``.

    A folder an engine exported loads on that engine (``backend`` may stay ``torch``); a ``diffquant.save`` folder
    loads on torch, or is put on another engine in memory (``Engine.deploy``: e.g. traced into OpenVINO). Hashes are
    verified first.
    """
    wanted = engine(backend, loads=True)
    owner = folder_engine(folder)
    if owner is not None and owner.name != "torch":
        if owner.load is None:
            raise ValueError(f"{folder} was exported for {owner.name}, which diffquant does not run; load the folder it was "
                             "exported from")
        if backend not in ("torch", owner.name):
            raise ValueError(f"{folder} was exported for {owner.name}; load it with backend={owner.name!r}")
        return owner.load(folder, device=device, torch_dtype=torch_dtype)
    model = ENGINES["torch"].load(folder, device=device, torch_dtype=torch_dtype)
    if wanted.name == "torch":
        return model
    if wanted.deploy is None:
        raise ValueError(f"backend {backend!r} runs only its own exports; run `diffquant export --format {backend}` first")
    return wanted.deploy(model)


def export(model: Any, out: str | Path, *, format: str, overwrite: bool = False, group: int | None = None,
           batch: int = 2) -> Path:
    """Write ``model`` (a quantized pipeline or denoiser) in engine ``format``'s form to ``out``; returns the path.

    ``group``: one timestep group, for formats holding one (ONNX); ``batch``: the batch a graph is traced with."""
    return engine(format).export(model, out, overwrite=overwrite, group=group, batch=batch)


def _discover() -> None:
    for name in ENGINE_MODULES:
        importlib.import_module(f"{__name__}.{name}")


_discover()

__all__ = ["ENGINE_MODULES", "export", "folder_engine", "load"]
