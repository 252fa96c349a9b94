"""``diffquant.convert``: frozen fake-quant layers -> integer layers, on a fixed kernel per device (or timed, on request)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import QuantConv2d, QuantLinear, QuantModule, QuantState, quantized_layers
from ..wrap import set_submodule, get_denoiser, quant_record
from .modules import IntConv2d, IntLinear, IntLayer, dynamic_kernel_reason, integer_backends, onednn_available

ATTENTION_REASON = "attention matmuls stay fake-quant in float (no integer attention kernel)"
# Another form replaces the default integer kernel only when it is this much faster: single timings on a
# busy machine scatter by more, and a float layer also holds a float copy of its weight.
SWITCH_MARGIN = 0.9
# The fixed rule on a CPU without oneDNN int8 (no VNNI): torch._int_mm there beats float only on large products
# (mini-sd's layers, <= ~5M multiply-adds per call, all ran faster in float; SD 1.5's run 0.1-8G).
INT_MM_CPU_MIN_MACS = 100_000_000


def not_convertible(layer: QuantModule) -> str | None:
    """Why a quantized module cannot become an integer layer, or None when it can."""
    if not isinstance(layer, (QuantLinear, QuantConv2d)):
        return ATTENTION_REASON
    if layer.state is not QuantState.FROZEN:
        return f"state {layer.state.value}, not frozen"
    if layer.input_quantizer is None:
        return "weight-only quantization: an int8 kernel needs integer activations"
    if not (layer.weight_quant_enabled and layer.act_quant_enabled):
        return "fake quantization switched off on this layer"
    spec = layer.weight_quantizer.spec
    if spec.bits > 8:
        return f"{spec.bits}-bit weights do not fit int8"
    if not spec.symmetric or bool(layer.weight_quantizer.zero_point.abs().sum() > 0):
        return "asymmetric weight grid: int8 kernels take no weight zero point"
    if int(layer.input_quantizer.bits.min()) > 8:
        return "activations wider than 8 bits in every timestep group"
    return None


def _int_layer(layer: QuantLinear | QuantConv2d, backend: str) -> IntLayer:
    return (IntLinear if isinstance(layer, QuantLinear) else IntConv2d)(layer, backend)


def default_backend(device: torch.device | str = "cpu") -> str:
    """oneDNN on CPUs where PyTorch has it, ``torch._int_mm`` elsewhere (CUDA)."""
    return "onednn" if torch.device(device).type == "cpu" and onednn_available() else "int_mm"


def _time_ms(fn, x: torch.Tensor, repeats: int) -> float:
    """Fastest of ``repeats`` calls after a warm-up (the minimum is the least disturbed by other load)."""
    fn(x)  # warm-up: packs weights, fills caches
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def _choose(timings: dict[str, float]) -> str:
    """The first (default) form unless another is faster by ``SWITCH_MARGIN``."""
    default = next(iter(timings))
    best = min(timings, key=timings.get)
    return best if timings[best] < SWITCH_MARGIN * timings[default] else default


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def convert(
    model: Any,
    *,
    example_inputs: dict | None = None,
    backend: str | None = None,
    autotune: bool = False,
    repeats: int = 3,
    progress: bool = True,
) -> Any:
    """Turn every frozen quantized Linear/Conv2d of ``model`` (pipeline or denoiser) into an integer layer, in place.

    By default a fixed rule: every layer takes ``backend`` (default: oneDNN on CPUs with VNNI, else int_mm),
    float where that kernel cannot run the layer and, for int_mm on a CPU given ``example_inputs``, where the
    layer's call does fewer than ``INT_MM_CPU_MIN_MACS`` multiply-adds; two conversions of the same model give
    the same layers and bit-identical images. With ``autotune=True`` and ``example_inputs`` (keyword arguments of one
    denoiser call, e.g. ``CalibrationSet`` call kwargs), every layer is timed on its real input in each
    form it can take (oneDNN, ``torch._int_mm``, float; fastest of ``repeats`` calls) and keeps the default
    integer kernel unless another form is clearly faster (``SWITCH_MARGIN``). Timings on a loaded machine
    scatter, so autotuned runs may pick differently (on mini-sd the fixed rule ran within a few percent of
    the autotuned choice, docs/runtime.md). Choices and reasons go to ``quant_record(denoiser).report["runtime"]``.
    """
    denoiser = get_denoiser(model)
    record = quant_record(denoiser)
    device = next(denoiser.parameters()).device
    layers = {n: m for n, m in quantized_layers(denoiser).items() if not isinstance(m, IntLayer)}
    if any(m.state in (QuantState.CALIBRATING, QuantState.LEARNING) for m in layers.values()):
        raise ValueError("only frozen models convert; finish diffquant.quantize (or set_state(model, 'frozen')) first")
    runtime = record.report.setdefault("runtime", {"backends": {}, "float_fallback": {}, "timings_ms": {}})
    todo: dict[str, QuantLinear | QuantConv2d] = {}
    for name, layer in layers.items():
        reason = not_convertible(layer)
        if reason is None:
            todo[name] = layer
        else:
            runtime["float_fallback"][name] = reason
    chosen: dict[str, IntLayer] = {}
    bar = tqdm(total=len(todo), desc="convert", disable=not progress)
    if autotune and example_inputs is None:
        raise ValueError("autotune=True times each layer on a real denoiser call; pass example_inputs=")
    if not autotune:
        fixed = backend or default_backend(device)
        sized = fixed == "int_mm" and device.type == "cpu" and example_inputs is not None and backend is None
        macs = _call_macs(denoiser, todo, example_inputs) if sized else {}
        for name, layer in todo.items():
            int_layer = _int_layer(layer, fixed)
            kernels = integer_backends(int_layer)
            if fixed != "float" and fixed not in kernels and backend is None and kernels:
                int_layer.backend = kernels[0]  # the default rule's other kernel (dynamic per-token activations: int_mm)
            elif fixed != "float" and fixed not in kernels:
                int_layer.backend = "float"
                runtime["float_fallback"][name] = (dynamic_kernel_reason(int_layer)
                                                   or f"no {fixed} kernel for this layer (padding mode, groups or dilation)")
            elif sized and macs.get(name, 0) < INT_MM_CPU_MIN_MACS:
                int_layer.backend = "float"
                runtime["float_fallback"][name] = (f"{macs.get(name, 0) / 1e6:.1f}M multiply-adds per call: below int_mm's "
                                                   f"break-even on this CPU ({INT_MM_CPU_MIN_MACS / 1e6:.0f}M)")
            chosen[name] = int_layer
            bar.update()
    else:
        _autotune(denoiser, todo, example_inputs, chosen, runtime, repeats, bar)
    bar.close()
    for name, int_layer in chosen.items():
        runtime["backends"][name] = int_layer.backend
        set_submodule(denoiser, name, int_layer)
    runtime["onednn"] = onednn_available()
    return model


def _each_layer_input(denoiser: nn.Module, todo: dict, example_inputs: dict, visit) -> None:
    """Run one denoiser call on ``example_inputs``, calling ``visit(name, layer, input)`` as each layer of ``todo`` is reached."""
    names = {id(m): n for n, m in todo.items()}
    handles = [m.register_forward_pre_hook(lambda module, args: visit(names[id(module)], module, args[0])) for m in todo.values()]
    try:
        with torch.no_grad():
            denoiser(**example_inputs)
    finally:
        for h in handles:
            h.remove()


def _call_macs(denoiser: nn.Module, todo: dict, example_inputs: dict) -> dict[str, int]:
    """Multiply-adds of each layer in one denoiser call on ``example_inputs`` (shapes only: deterministic)."""
    macs: dict[str, int] = {}

    def count(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if isinstance(module, QuantLinear):
            macs[name] = x.numel() // module.in_features * module.in_features * module.out_features
        else:
            (kh, kw), (sh, sw) = module.kernel_size, module.stride
            macs[name] = (x.shape[0] * (x.shape[-2] // sh) * (x.shape[-1] // sw) * module.out_channels
                          * module.in_channels // module.groups * kh * kw)

    _each_layer_input(denoiser, todo, example_inputs, count)
    return macs


def _autotune(
    denoiser: nn.Module, todo: dict, example_inputs: dict, chosen: dict, runtime: dict, repeats: int, bar: tqdm
) -> None:
    """Time each layer's candidate forms on the input it sees in one denoiser call; keep the fastest."""
    errors: dict[str, float] = {}

    def tune(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if name in chosen:
            return
        reference = module.forward(x)
        candidate = _int_layer(module, "float")
        timings = {}
        for b in integer_backends(candidate) + ["float"]:
            candidate.backend = b
            candidate.clear_cache()
            timings[b] = _time_ms(candidate, x, repeats)
            if b != "float":
                errors[name] = max(errors.get(name, 0.0), _rel_err(candidate(x), reference))
        best = _choose(timings)
        candidate.backend = best
        candidate.clear_cache()
        if best == "float":
            ints = {b: t for b, t in timings.items() if b != "float"}
            detail = ", ".join(f"{b} {t:.2f} ms" for b, t in ints.items()) or "no integer kernel"
            runtime["float_fallback"][name] = f"integer form slower ({detail} vs float {timings['float']:.2f} ms)"
        runtime["timings_ms"][name] = {b: round(t, 4) for b, t in timings.items()}
        chosen[name] = candidate
        bar.update()

    _each_layer_input(denoiser, todo, example_inputs, tune)
    unseen = [n for n in todo if n not in chosen]
    if unseen:
        raise ValueError(f"{len(unseen)} layers (e.g. {unseen[0]}) never ran on the example inputs; pass a full denoiser call")
    runtime["max_rel_error_vs_fake_quant"] = max(errors.values(), default=0.0)


def is_converted(model: Any) -> bool:
    """Whether any layer of ``model`` runs on integer kernels."""
    return any(isinstance(m, IntLayer) for m in get_denoiser(model).modules())


__all__ = ["convert", "default_backend", "is_converted", "not_convertible"]
