"""The OpenVINO engine's folders: ``export --format openvino`` and ``load(folder, backend="openvino")``.

The graphs and the denoiser wrapper (``OVDenoiser``) live in ``runtime/openvino.py`` + ``runtime/ovgraph.py``, which
the peers and benchmarks use too; this module puts them into folders and back, beside ``serialization`` (the
torch form; the runtime never imports the layer that saves models), and registers the engine. Text encoders and
the VAE stay torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..bits import layer_bits
from ..io import atomic_write_json, file_table, null_components
from ..outputs import claim_output
from ..registry import Engine, register_engine
from ..runtime.openvino import OV_CONFIG, OVDenoiser, graph_writer, is_openvino_folder, pipeline_inputs
from ..runtime.ovgraph import quantized_models
from ..serialization import MANIFEST, denoiser_attr, save_components, verify, with_denoiser
from ..wrap import get_denoiser, quant_record


def load_openvino(folder: str | Path, *, device: Any = None, torch_dtype: Any = None) -> Any:
    """What ``export_openvino`` wrote: the pipeline with an ``OVDenoiser`` (the denoiser alone for a bare export);
    hashes verified first. It runs on the CPU: ``device`` and ``torch_dtype`` are not used (the torch parts load as
    exported)."""
    folder = Path(folder)
    verify(folder)
    ov_denoiser = OVDenoiser.from_folder(folder)
    if not (folder / "model_index.json").is_file():
        return ov_denoiser
    import diffusers

    attr = json.loads((folder / OV_CONFIG).read_text())["denoiser_folder"]  # from_pretrained type-checks components
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        str(folder), **null_components(folder), **{attr: None}, use_safetensors=True
    )
    return with_denoiser(pipe, ov_denoiser, attr)


def deploy_openvino(model: Any) -> Any:
    """``model`` (a quantized pipeline or denoiser, in memory) with its denoiser traced into OpenVINO and compiled."""
    deployed = OVDenoiser.from_denoiser(model)
    return deployed if isinstance(model, nn.Module) else with_denoiser(model, deployed)


def export_openvino(model: Any, folder: str | Path, *, overwrite: bool = False, group: int | None = None, batch: int = 2) -> Path:
    """Write ``model``'s quantized denoiser as OpenVINO IR (with the pipeline's other components) to ``folder``.

    Scales are diffquant's own (weights int8 codes with per-channel scales, activations FakeQuantize with
    the calibrated ranges); every timestep group survives (runtime/ovgraph.py). Both graphs are written (int8
    and float; ``OVDenoiser`` picks per CPU), each as soon as it is traced (one trace in memory at a time). Inputs
    are dynamic: batch for every family (tested), latent size for the UNets (tested at other sizes than traced);
    ``batch`` is the traced one. Returns the folder; it appears only when complete.
    """
    if group is not None:
        raise ValueError("an OpenVINO export serves every timestep group from one graph; drop --group")
    folder = Path(folder)
    with claim_output(folder, overwrite=overwrite) as output:  # refused at once if present or being written
        denoiser = get_denoiser(model)
        record = quant_record(denoiser)
        tmp = output.tmp
        tmp.mkdir()
        attr = "denoiser"
        if not isinstance(model, nn.Module):
            attr = denoiser_attr(model, denoiser)
            save_components(model, tmp, skip=denoiser)
        models, plan = quantized_models(denoiser, pipeline_inputs(model, batch=batch), sink=graph_writer(tmp / attr))
        atomic_write_json(tmp / OV_CONFIG, {
            "format": "diffquant-openvino", "class": type(denoiser).__name__, "denoiser_folder": attr,
            "config": {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")},
            "groups": record.groups.to_dict(), "graphs": sorted(models), "int_groups": plan.int_groups,
            "float_groups": plan.float_groups, "quant_config": record.config.to_dict(), "report": record.report,
            "layer_bits": layer_bits(denoiser),  # what eval/bench report as coverage and average bits
        })
        atomic_write_json(tmp / MANIFEST, {"format_version": 1, "files": file_table(tmp), "backend": "openvino"})
        output.publish()
    return folder


register_engine(Engine(
    "openvino", export=export_openvino, load=load_openvino, is_folder=is_openvino_folder, deploy=deploy_openvino,
    summary="OpenVINO IR with diffquant's scales, every timestep group (CPU; Intel GPU/NPU)",
))

__all__ = ["deploy_openvino", "export_openvino", "load_openvino"]
