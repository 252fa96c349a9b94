"""The torch runtime as an engine: ``export --format torch`` writes the model converted to integer kernels.

Its folders are ``diffquant.save``'s (``serialization``): fake-quant or converted, they load on torch with
``backend="torch"``, the default. ``deploy`` converts a copy in memory (oneDNN / ``int_mm`` layers, runtime/convert.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..calibration import record_denoiser_calls
from ..config import CalibrationConfig
from ..registry import Engine, register_engine
from ..runtime import convert
from ..sampling import is_unconditional, unconditional_prompts
from ..serialization import MANIFEST, save, with_denoiser
from ..serialization import load as load_saved
from ..wrap import get_denoiser, quant_record


def convert_pipeline(model: Any, prompts: list[str] | None = None) -> dict:
    """Convert ``model`` to integer layers in place with the fixed kernel rule (reproducible: runtime/convert.py), sized
    on the shapes of one recorded denoiser call of a pipeline (its first prompt); returns the runtime report."""
    denoiser = get_denoiser(model)
    example = None
    if not isinstance(model, nn.Module):
        one = unconditional_prompts(1) if is_unconditional(model) else (prompts or ["a photo"])[:1]
        calib = record_denoiser_calls(model, one, CalibrationConfig(num_prompts=1, num_inference_steps=2), progress=False)
        param = next(denoiser.parameters())
        example = calib.calls[0].kwargs(device=param.device, dtype=param.dtype)
    convert(model, example_inputs=example, progress=False)
    return quant_record(denoiser).report["runtime"]


def deploy_torch(model: Any) -> Any:
    """``model`` (a quantized pipeline or denoiser) with a converted copy of its denoiser; ``model`` is left as it is."""
    denoiser = copy.deepcopy(get_denoiser(model))
    if isinstance(model, nn.Module):
        convert_pipeline(denoiser)
        return denoiser
    pipe = with_denoiser(model, denoiser)
    convert_pipeline(pipe)
    return pipe


def export_torch(model: Any, out: str | Path, *, overwrite: bool = False, group: int | None = None, batch: int = 2) -> Path:
    """Save ``model`` converted to integer kernels (a ``diffquant.save`` folder that loads on torch); ``batch`` unused."""
    if group is not None:
        raise ValueError("the torch runtime serves every timestep group; drop --group")
    return save(deploy_torch(model), out, overwrite=overwrite)


def is_torch_folder(folder: Path) -> bool:
    """A ``diffquant.save`` folder (its manifest names no other engine)."""
    manifest = Path(folder) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("backend", "torch") == "torch"


register_engine(Engine(
    "torch", export=export_torch, load=load_saved, is_folder=is_torch_folder, deploy=deploy_torch,
    summary="diffquant's torch runtime: int8/int4 weights, oneDNN or int_mm kernels (the saved format)",
))

__all__ = ["convert_pipeline", "deploy_torch", "export_torch", "is_torch_folder"]
