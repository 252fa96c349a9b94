"""Deployed folders: ``diffquant.load(folder, backend=...)`` and ``export_openvino(model, folder)``.

A deployment engine keeps its graphs and its denoiser wrapper in ``runtime/`` (``runtime/openvino.py``);
this module only puts them into folders and back, beside ``serialization`` (the torch form), so the
runtime never imports the layer that saves models. Text encoders and the VAE stay torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import serialization
from .io import atomic_write_json, file_table, null_components
from .outputs import claim_output
from .runtime.openvino import OV_CONFIG, OVDenoiser, is_openvino_folder, pipeline_inputs, write_graphs
from .runtime.ovgraph import quantized_models
from .wrap import get_denoiser, quant_record

BACKENDS = ("torch", "openvino")


def load(
    folder: str | Path, *, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
    backend: str = "torch",
) -> Any:
    """Load what ``save`` or ``export_openvino`` wrote: a pipeline that generates (or the bare denoiser).

    ``backend="openvino"`` gives the pipeline an ``OVDenoiser`` (traced in memory from a ``save`` folder);
    a folder written by ``export_openvino`` always loads that way. Hashes are verified first.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    folder = Path(folder)
    if backend == "torch" and not is_openvino_folder(folder):
        return serialization.load(folder, device=device, torch_dtype=torch_dtype)
    if not is_openvino_folder(folder):
        pipe = serialization.load(folder)
        if isinstance(pipe, nn.Module):
            return OVDenoiser.from_denoiser(pipe)
        return _with_denoiser(pipe, serialization.denoiser_attr(pipe, get_denoiser(pipe)), OVDenoiser.from_denoiser(pipe))
    serialization.verify(folder)
    ov_denoiser = OVDenoiser.from_folder(folder)
    if not (folder / "model_index.json").is_file():
        return ov_denoiser
    import diffusers

    attr = json.loads((folder / OV_CONFIG).read_text())["denoiser_folder"]  # from_pretrained type-checks components
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        str(folder), **null_components(folder), **{attr: None}, use_safetensors=True
    )
    return _with_denoiser(pipe, attr, ov_denoiser)


def export_openvino(model: Any, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model``'s quantized denoiser as OpenVINO IR (with the pipeline's other components) to ``folder``.

    Scales are diffquant's own (weights int8 codes with per-channel scales, activations FakeQuantize with
    the calibrated ranges); every timestep group survives (runtime/ovgraph.py). Both graphs are written (int8
    and float; ``OVDenoiser`` picks per CPU). Inputs are dynamic: batch for every family (tested), latent size
    for the UNets (tested at other sizes than traced). Returns the folder; it appears only when complete.
    """
    folder = Path(folder)
    with claim_output(folder, overwrite=overwrite) as output:  # refused at once if present or being written
        denoiser = get_denoiser(model)
        record = quant_record(denoiser)
        models, plan = quantized_models(denoiser, pipeline_inputs(model))
        tmp = output.tmp
        tmp.mkdir()
        attr = "denoiser"
        if not isinstance(model, nn.Module):
            attr = serialization.denoiser_attr(model, denoiser)
            serialization.save_components(model, tmp, skip=denoiser)
        write_graphs(models, tmp / attr)
        atomic_write_json(tmp / OV_CONFIG, {
            "format": "diffquant-openvino", "class": type(denoiser).__name__, "denoiser_folder": attr,
            "config": {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")},
            "groups": record.groups.to_dict(), "graphs": sorted(models), "int_groups": plan.int_groups,
            "float_groups": plan.float_groups, "quant_config": record.config.to_dict(), "report": record.report,
        })
        atomic_write_json(tmp / serialization.MANIFEST, {"format_version": 1, "files": file_table(tmp), "backend": "openvino"})
        output.publish()
    return folder


def _with_denoiser(pipe: Any, attr: str, denoiser: nn.Module) -> Any:
    """The same pipeline class built around ``denoiser`` (its __init__ reads the denoiser's config)."""
    return type(pipe)(**{**pipe.components, attr: denoiser})


__all__ = ["BACKENDS", "export_openvino", "load"]
