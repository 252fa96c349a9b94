"""Resolve what a user names as a model: a bundled model name (``diffquant.registry``), a diffquant folder, or a diffusers folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .io import null_components
from .registry import MODELS


def load_pipeline(
    spec: str | Path, *, device: str = "cpu", torch_dtype: torch.dtype = torch.float32, backend: str = "torch"
) -> Any:
    """A pipeline from a zoo name (``mini-sd``), a ``diffquant.save`` folder, or a diffusers pipeline folder.

    ``backend`` names a registered engine (``diffquant.registry.ENGINES``): ``openvino`` runs the denoiser of a
    quantized folder on OpenVINO; an exported folder always runs on its engine.

    Float pipelines load with ``use_safetensors=True``: pickled ``.bin`` weights are never unpickled.
    """
    from diffusers import DiffusionPipeline

    from .deployment import load
    from .registry import engine
    from .serialization import is_quantized_folder

    engine(backend, loads=True)
    name = str(spec)
    if backend != "torch" and (name in MODELS or not is_quantized_folder(spec)):
        raise ValueError(f"--backend {backend} runs a quantized model; pass a folder written by `diffquant quantize` or `export`")
    if name in MODELS:
        return MODELS[name].load(torch_dtype=torch_dtype, device=device)
    path = Path(spec)
    if not path.exists():
        hint = f" or a bundled model ({', '.join(MODELS)})" if MODELS else ""
        raise FileNotFoundError(f"model folder {path} not found; pass a diffusers pipeline folder{hint}")
    if is_quantized_folder(path):
        pipe = load(path, device=device, backend=backend)
    elif (path / "model_index.json").is_file():
        try:
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch_dtype, use_safetensors=True,
                                                     **null_components(path))
        except (OSError, EnvironmentError) as e:
            raise ValueError(f"cannot load {path} as a diffusers pipeline with safetensors weights ({str(e).splitlines()[0]})") from None
        pipe = pipe.to(device)
    else:
        raise ValueError(f"{path} is not a diffusers pipeline (no model_index.json); save it with pipe.save_pretrained(folder)")
    pipe.set_progress_bar_config(disable=True)
    return pipe

