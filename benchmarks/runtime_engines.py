"""The other engines of ``benchmarks/runtime.py``: OpenVINO (float, NNCF INT8, diffquant's export) and PT2E int8.

Each builder returns ``(fn, weights_mb, note)``: ``fn()`` runs one denoiser call on the benchmark's
inputs and returns the prediction, ``weights_mb`` is what the engine keeps on disk for the denoiser
(the IR's weight file of the graph that runs; for PT2E the int8 and float tensors of the converted graph), and ``note`` says
what ran (OpenVINO's kernel precision per layer type, NNCF's sample count, PT2E's failure line).
OpenVINO models run through ``OVDenoiser``, the same wrapper a deployed pipeline uses, so the
torch<->numpy hand-over of every step is part of the time, as it is when generating.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import torch
from torch import nn

from diffquant.calibration import CalibrationSet
from diffquant.evaluation.peers import flat_call, nncf_int8
from diffquant.runtime.openvino import ir_bytes

OPENVINO_VARIANTS = ("openvino_fp32", "openvino_bf16", "openvino_nncf_int8", "openvino_w8a8", "openvino_w4a8",
                     "openvino_w8a8_float", "openvino_w4a8_float")
ENGINE_VARIANTS = OPENVINO_VARIANTS + ("pt2e_x86_int8_compiled",)


def kernel_precisions(denoiser) -> dict[str, int]:
    """How many Convolution / FullyConnected / MatMul nodes of the compiled graph run at each precision (OpenVINO's choice)."""
    counts: collections.Counter = collections.Counter()
    for compiled in denoiser.compiled.values():
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str) if "layerType" in info else ""
            if kind in ("Convolution", "FullyConnected", "MatMul"):
                counts[f"{kind} {info['runtimePrecision'].astype(str)}"] += 1
    return dict(sorted(counts.items()))


def _run(denoiser, inputs: dict):
    def fn() -> torch.Tensor:
        return denoiser(**inputs)[0]
    return fn


def openvino_float(unet: nn.Module, calib: CalibrationSet, inputs: dict, precision: str):
    """The float UNet traced into OpenVINO and compiled at ``precision`` (``f32`` or ``bf16``)."""
    from diffquant.runtime.openvino import OVDenoiser
    from diffquant.runtime.ovgraph import float_model

    start = time.perf_counter()
    model = float_model(unet, flat_call(unet, calib.calls[0].kwargs()))
    denoiser = OVDenoiser(model, dict(unet.config), type(unet).__name__, precision=precision)
    note = {"build_s": time.perf_counter() - start, "kernels": kernel_precisions(denoiser)}
    return _run(denoiser, inputs), denoiser.ir_bytes / 2**20, note


def openvino_nncf(unet: nn.Module, calib: CalibrationSet, inputs: dict, precision: str = "bf16"):
    """NNCF's INT8 of the float UNet (the ``nncf-int8`` peer's recipe), calibrated on every call of ``calib``."""
    from diffquant.runtime.openvino import OVDenoiser

    start = time.perf_counter()
    model = nncf_int8(unet, calib)
    quantize_s = time.perf_counter() - start
    denoiser = OVDenoiser(model, dict(unet.config), type(unet).__name__, precision=precision)
    note = {"calibration_samples": calib.num_samples(), "calibration_calls": len(calib), "quantize_s": quantize_s,
            "kernels": kernel_precisions(denoiser)}
    return _run(denoiser, inputs), denoiser.ir_bytes / 2**20, note


def openvino_export(model: nn.Module, folder: Path, inputs: dict, graph: str, precision: str, in_memory: bool = False):
    """diffquant's own export of a quantized model (``export_openvino``: its calibrated scales), its ``graph`` compiled.

    ``graph="int"``: int8 kernels (``OVDenoiser`` picks it by itself only where the CPU has VNNI/AMX);
    ``"float"``: the exact fake-quant arithmetic with int8 weights decompressed. ``in_memory``: trace only that
    graph, in memory (``OVDenoiser.from_denoiser``'s path, the same graph), instead of exporting both to ``folder``:
    one trace instead of the export's two (the export writes both graphs, each as soon as it is traced).
    """
    from diffquant.deployment.openvino import export_openvino
    from diffquant.runtime.openvino import GRAPHS, OVDenoiser

    start = time.perf_counter()
    if in_memory:
        from diffquant.runtime.openvino import pipeline_inputs
        from diffquant.runtime.ovgraph import quantized_models

        models, plan = quantized_models(model, pipeline_inputs(model), graphs=(graph,))  # as OVDenoiser.from_denoiser
        build_s = time.perf_counter() - start
        weights = ir_bytes(models[graph]) / 2**20
        denoiser = OVDenoiser.from_traced(model, models, plan, graph=graph, precision=precision)
        return _run(denoiser, inputs), weights, {"build_s": build_s, "in_memory": True, "kernels": kernel_precisions(denoiser)}
    if not folder.exists():
        export_openvino(model, folder)
    export_s = time.perf_counter() - start
    denoiser = OVDenoiser.from_folder(folder, graph=graph, precision=precision)
    weights = sum(p.stat().st_size for p in folder.rglob(Path(GRAPHS[graph]).with_suffix(".bin").name)) / 2**20
    folder_mb = sum(p.stat().st_size for p in folder.rglob("*.bin")) / 2**20  # every graph the export wrote
    return _run(denoiser, inputs), weights, {"export_s": export_s, "export_folder_mb": folder_mb, "kernels": kernel_precisions(denoiser)}


def pt2e_int8(unet: nn.Module, calib: CalibrationSet, inputs: dict):
    """PyTorch's own static int8: ``torch.export`` -> PT2E ``X86InductorQuantizer`` (calibrated on ``calib``) -> ``torch.compile``."""
    from torchao.quantization.pt2e.inductor_passes import x86  # noqa: F401  (registers the int8 fusions with Inductor)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from diffquant.runtime.flat import FlatCall

    start = time.perf_counter()
    example = flat_call(unet, calib.calls[0].kwargs())
    names = list(example)
    with torch.no_grad():
        exported = torch.export.export(FlatCall(unet, names).eval(), tuple(example.values())).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for call in calib:
            prepared(*flat_call(unet, call.kwargs()).values())
        converted = convert_pt2e(prepared)
    compiled = torch.compile(converted)
    args = tuple(flat_call(unet, inputs).values())
    tensors = {id(t): t for t in list(converted.parameters()) + list(converted.buffers())}
    tensors.update({id(v): v for v in vars(converted).values() if isinstance(v, torch.Tensor)})
    weights = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    return (lambda: compiled(*args)), weights, {"quantize_s": time.perf_counter() - start}



TARGETS = (  # (model, variant, baseline, at least this speed-up, the wording)
    ("sd15", "openvino_w8a8", "openvino_nncf_int8", 1.0, "SD 1.5 W8A8 on OpenVINO at least as fast as NNCF INT8"),
    ("sd15", "openvino_w8a8", "bf16_autocast", 3.0, "SD 1.5 W8A8 on OpenVINO at least 3x torch BF16 autocast"),
    ("sd15", "openvino_w4a8", "openvino_w8a8", 1.0, "SD 1.5 W4A8 on OpenVINO no slower than W8A8"),
    ("mini-sd", "openvino_w8a8", "fp32", 3.0, "mini-sd deployed W8A8 at least 3x torch FP32 eager"),
    ("sd15", "openvino_w8a8_tok", "openvino_w8a8", 1 / 1.2,  # issue 22: ratio static/dynamic >= 1/1.2
     "SD 1.5 dynamic per-token W8A8 on OpenVINO within 1.2x of static W8A8's step time"),
    ("sd15", "openvino_w8a8_tokfc", "openvino_w8a8", 1 / 1.2,
     "SD 1.5 dynamic per-token W8A8 (convolutions static) on OpenVINO within 1.2x of static W8A8's step time"),
)


def target_lines(name: str, result: dict) -> list[str]:
    """Issue 14's speed targets for this model: met or missed, by how much; the float-graph row beside the int8 one."""
    rows = result["variants"]
    lines = []
    for model, variant, baseline, goal, text in TARGETS:
        if model != name:
            continue
        for form in (variant, f"{variant}_float"):
            if form not in rows or baseline not in rows:
                missing = form if form not in rows else baseline
                lines.append(f"{text} (`{form}`): not measured (`{missing}` has no row{': ' + str(result['notes'].get(missing)) if missing in result['notes'] else ''})")
                continue
            ratio = rows[baseline]["median_s"] / rows[form]["median_s"]
            verdict = "met" if ratio >= goal else f"missed by {goal / ratio:.2f}x"
            lines.append(f"{text} (`{form}` vs `{baseline}`): {ratio:.2f}x, target {goal:.3g}x: **{verdict}**")
    return lines
