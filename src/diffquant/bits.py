"""Coverage and average bits of a denoiser, diffquant's or a peer's: the one convention every number uses.

``diffquant.average_bits`` (what ``save`` records and ``diffquant info`` shows, and PCR's and EMF's reports), and
every eval/bench row (``evaluation.harness``) compute the same function, :func:`coverage`, over the WHOLE denoiser:

- ``weight_coverage``: the quantized share of the denoiser's parameter elements (biases, norms and embeddings stay
  float in every library here, so they are in the denominator);
- ``mac_coverage``: the share of its multiply-accumulates (Linear, Conv2d and the attention matmuls QK^T and PV)
  whose two operands are both quantized (weight and input activation; for attention, the activations on both
  sides). Weight-only quantization dequantizes before a float matmul: 0 here;
- ``avg_wbits``: bits per parameter element, quantized weights at their code width plus diffquant's low-rank float
  branch (``QuantConfig.lowrank_rank``) at 16 bits per branch parameter and per-group scales (``per_group`` weights)
  at 16 bits each, spread over its layer's weight (per-tensor/per-channel scales, zero points and a peer's branches
  or group scales, e.g. SDNQ's SVD, not counted: the file size shows them), every float element
  at the bits of the dtype it runs in (32 for float32, 16 for float16/bfloat16);
- ``avg_abits``: bits of the input activation per MAC (MAC-weighted), float inputs at their dtype's bits; an
  attention matmul counts the mean of its quantized operands' bits (so PCR's relaxed steps, averaged over the
  timestep groups, and EMF's float layers show up).

The parameters and MACs come from a :class:`LayerTable` counted with forward hooks on one denoiser call
(:func:`count_table`): eval/bench count it on the float reference at the bench's sampling settings
(``evaluation.coverage.layer_table``); :func:`average_bits` counts it on the quantized denoiser itself, on its
family adapter's example call (batch 1, the model's sample size, 77 text tokens). Quantization changes neither
count (tests/test_coverage.py), so the two agree exactly on weights and up to the call's shape on activations.
:func:`layer_bits` reads each library's modules by name (diffquant's wrapped or converted layers and attention
processors, torchao's quantized tensors, optimum-quanto's QModules, SDNQ's layers, bitsandbytes' parameters); a
denoiser without torch layers (an OpenVINO graph) carries the same map as ``layer_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .models.adapters import get_adapter
from .nn import QuantModule, QuantState, quantized_layers
from .nn.lowrank import LowRankBranch, branch_bits
from .quant import ActivationQuantizer, WeightQuantizer

Bits = tuple[float | None, float | None]  # (weight bits, input activation bits); None = float
COVERAGE_KEYS = ("weight_coverage", "mac_coverage", "avg_wbits", "avg_abits")
BITS_CONVENTION = "whole denoiser, float parts at their dtype's bits"  # named in saved folders and `diffquant info`


@dataclass
class LayerTable:
    """A denoiser's accounting: parameter elements and MACs per module name (one denoiser call)."""

    weight_numel: dict[str, int] = field(default_factory=dict)  # Linear/Conv weight elements
    other_numel: int = 0  # every other parameter element (biases, norms, embeddings)
    macs: dict[str, int] = field(default_factory=dict)  # layer, or "<attention module>:qk" / ":pv" -> MACs
    attention: set[str] = field(default_factory=set)  # keys of ``macs`` that are attention matmuls

    @property
    def total_numel(self) -> int:
        return sum(self.weight_numel.values()) + self.other_numel


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "processor") and hasattr(module, "to_q")


def _weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The weight shape of a Linear/Conv2d layer: float, a peer's, wrapped, or converted (which keeps codes, not a
    weight); None for any other module."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return tuple(module.weight.shape)
    if isinstance(module, QuantModule) and module.is_layer:
        return tuple(module.weight_shape)
    return None


def _model_parameters(denoiser: nn.Module):
    """(module name, module, its own parameters) of every module outside diffquant's quantizers (their scales are
    quantization parameters, not the model's)."""
    inside = {id(m) for q in denoiser.modules() if isinstance(q, (WeightQuantizer, ActivationQuantizer, LowRankBranch))
              for m in q.modules()}  # a low-rank branch counts in its layer's weight bits (layer_bits)
    for name, module in denoiser.named_modules():
        if id(module) not in inside:
            yield name, module, dict(module.named_parameters(recurse=False))


# ``a @ b`` reaches a torch function mode as ``Tensor.matmul`` (diffquant's quantized processors write it so).
_MATMULS = (torch.bmm, torch.baddbmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm)


class _AttentionMacs(TorchFunctionMode):
    """Counts the MACs of the attention matmuls in the open attention module: ``<module>:qk`` (Q K^T) and
    ``<module>:pv`` (softmax times V), from SDPA or from the matmul pairs of an explicit processor (diffquant's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.macs: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # explicit matmuls per module: even ones are QK^T, odd ones PV

    def _add(self, key: str, macs: int) -> None:
        self.macs[key] = self.macs.get(key, 0) + macs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack:
            name = self.stack[-1]
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, k, v = (*args, *(kwargs[n] for n in ("query", "key", "value")[len(args):3]))[:3]  # positional or by name
                rows = q.numel() // q.shape[-1] * k.shape[-2]
                self._add(f"{name}:qk", rows * q.shape[-1])
                self._add(f"{name}:pv", rows * v.shape[-1])
            elif func in _MATMULS:
                a, b = (args[1], args[2]) if func is torch.baddbmm else (args[0], args[1])
                if not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter) and a.dim() >= 3:
                    n = self._seen.get(name, 0)
                    self._seen[name] = n + 1
                    self._add(f"{name}:{'qk' if n % 2 == 0 else 'pv'}", a.numel() * b.shape[-1])
        return func(*args, **kwargs)


def count_table(denoiser: nn.Module, run) -> LayerTable:
    """Parameter elements of ``denoiser`` and the MACs of each Linear/Conv2d and attention matmul during the first
    forward of ``denoiser`` that ``run()`` makes (forward hooks; later calls are not counted). The same on the float
    denoiser and on its wrapped or converted form."""
    table = LayerTable()
    layers = {}
    for name, module, own in _model_parameters(denoiser):
        shape = _weight_shape(module)
        if shape is not None:
            own.pop("weight", None)
            layers[name] = module
            table.weight_numel[name] = int(torch.Size(shape).numel())
        table.other_numel += sum(p.numel() for p in own.values())
    mode = _AttentionMacs()
    state = {"done": False}

    def layer_hook(name):
        per_out = table.weight_numel[name] // _weight_shape(layers[name])[0]  # in_features, or in/groups * kh * kw

        def hook(module, args, output):
            if not state["done"]:
                table.macs[name] = table.macs.get(name, 0) + output.numel() * per_out
        return hook

    def enter(name):
        return lambda module, args: None if state["done"] else mode.stack.append(name)

    def leave(module, args, output):
        if not state["done"] and mode.stack:
            mode.stack.pop()

    def finish(module, args, output):
        state["done"] = True

    handles = [denoiser.register_forward_hook(finish)]
    for name, module in denoiser.named_modules():
        if name in layers:
            handles.append(module.register_forward_hook(layer_hook(name)))
        elif _is_attention(module):
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with mode, torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    table.macs.update(mode.macs)
    table.attention = set(mode.macs)
    return table


def own_table(denoiser: nn.Module) -> LayerTable:
    """:func:`count_table` on the family adapter's example call of ``denoiser`` (batch 1, its sample size, 77 text
    tokens), on its device and float dtype. A family without an example call gets no MACs (activation bits and MAC
    coverage are then NaN). Refused while calibrating: the call would add to the observed ranges."""
    if any(m.state is QuantState.CALIBRATING for m in quantized_layers(denoiser).values()):
        raise ValueError("average bits run one denoiser call, which would be observed during calibration; "
                         "ask after diffquant.quantize (or set_state(model, 'frozen'))")
    adapter = get_adapter(denoiser, warn=False)
    try:
        inputs = adapter.example_inputs(batch=1)
    except ValueError:
        return count_table(denoiser, lambda: None)
    p = next(p for _, _, own in _model_parameters(denoiser) for p in own.values() if p.is_floating_point())
    inputs = {k: v.to(p.device, p.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    return count_table(denoiser, lambda: adapter.call(inputs))


def _tensor_bits(w) -> float | None:
    """Code bits of a quantized weight tensor (optimum-quanto, bitsandbytes, torchao); None for a float one."""
    if w is None or type(w) in (torch.Tensor, nn.Parameter):
        return None
    qtype = getattr(w, "qtype", None)
    if qtype is not None and hasattr(qtype, "bits"):  # quanto qint8 / qint4
        return float(qtype.bits)
    if "4bit" in type(w).__name__ or "Int4" in type(w).__name__:  # bnb Params4bit (nf4/fp4, packed), torchao Int4*
        return 4.0
    if not w.is_floating_point():  # bnb Int8Params
        return float(w.element_size() * 8)
    if hasattr(w, "__tensor_flatten__"):  # torchao: the integer tensor inside
        inner = [getattr(w, n) for n in w.__tensor_flatten__()[0]]
        ints = [t for t in inner if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        return float(ints[0].element_size() * 8) if ints else None
    return None


def layer_bits(denoiser: nn.Module) -> dict[str, Bits]:
    """Module name -> (weight bits, input activation bits) of every quantized layer or attention module of a denoiser,
    whatever library quantized it; float layers are absent."""
    given = getattr(denoiser, "layer_bits", None)
    if isinstance(given, dict):
        return given
    out: dict[str, Bits] = {}
    for name, m in denoiser.named_modules():
        if isinstance(m, QuantModule):  # diffquant: wrapped, frozen or converted layer, or attention processor
            acts = [q.average_bits() for q in m.activation_quantizers()]
            wq = getattr(m, "weight_quantizer", None)
            abits = sum(acts) / len(acts) if acts else None
            if m.is_layer:
                out[name] = (float(wq.bits) + branch_bits(m) + wq.group_param_bits() if wq is not None else None, abits)
            else:  # an attention processor quantizes both matmuls' operands (q, k, v, softmax output) or QK^T's only
                attention = name.rsplit(".", 1)[0]
                out[f"{attention}:qk"] = (None, abits)
                if getattr(m, "v_quantizer", None) is not None:
                    out[f"{attention}:pv"] = (None, abits)
        elif hasattr(m, "weight_qtype"):  # optimum-quanto QModule (frozen or not): activations quantized at its inputs
            act, wq = getattr(m, "activation_qtype", None), m.weight_qtype
            out[name] = (float(wq.bits) if wq is not None else None, float(act.bits) if act is not None else None)
        elif hasattr(m, "sdnq_dequantizer"):  # SDNQ layer; its quantized matmul quantizes activations per row at run time
            d = m.sdnq_dequantizer
            out[name] = (float(d.num_bits), float(d.num_bits_matmul) if d.use_quantized_matmul else None)
        elif _tensor_bits(getattr(m, "weight", None)) is not None:
            # torchao's dynamic configs quantize inputs per row at run time; so does bnb LLM.int8 (Linear8bitLt), but on
            # CUDA only: its CPU backend multiplies the input in float by the dequantized weight (tested), weight-only
            w = m.weight
            bnb_int8 = type(m).__name__ == "Linear8bitLt" and w.device.type == "cuda"
            dynamic = bnb_int8 or getattr(w, "act_quant_kwargs", None) is not None
            out[name] = (_tensor_bits(w), 8.0 if dynamic else None)
    return {k: v for k, v in out.items() if v != (None, None)}


def float_bits(denoiser: nn.Module) -> int:
    """Bits of the float dtype the denoiser runs in (an engine's denoiser may say so as ``float_bits``)."""
    given = getattr(denoiser, "float_bits", None)
    if isinstance(given, int):
        return given
    floats = (p for _, _, own in _model_parameters(denoiser) for p in own.values()
              if p.is_floating_point() and type(p) in (torch.Tensor, nn.Parameter))
    first = next(floats, None)
    return first.element_size() * 8 if first is not None else 32


def coverage(table: LayerTable, denoiser: nn.Module) -> dict[str, float]:
    """Coverage and average bits over the whole denoiser (module docstring): ``table``'s elements and MACs with
    each layer at the bits :func:`layer_bits` finds in ``denoiser``, float ones at :func:`float_bits`."""
    bits, f = layer_bits(denoiser), float(float_bits(denoiser))
    quantized = sum(n for name, n in table.weight_numel.items() if bits.get(name, (None, None))[0] is not None)
    wsum = table.other_numel * f + sum(n * (bits.get(name, (None, None))[0] or f) for name, n in table.weight_numel.items())
    total_macs = sum(table.macs.values())
    q_macs = asum = 0.0
    for name, macs in table.macs.items():
        wbits, abits = bits.get(name, (None, None))
        both = abits is not None and (wbits is not None or name in table.attention)
        q_macs += macs if both else 0
        asum += macs * (abits if abits is not None else f)
    return {
        "weight_coverage": quantized / max(table.total_numel, 1),
        "mac_coverage": q_macs / total_macs if total_macs else float("nan"),
        "avg_wbits": wsum / max(table.total_numel, 1),
        "avg_abits": asum / total_macs if total_macs else float("nan"),
    }


def average_bits(denoiser: nn.Module) -> dict[str, float]:
    """:func:`coverage` of a (quantized) denoiser on its own example call (:func:`own_table`), as ``weight_bits``
    (= ``avg_wbits``), ``activation_bits`` (= ``avg_abits``), ``weight_coverage`` and ``mac_coverage``."""
    c = coverage(own_table(denoiser), denoiser)
    return {"weight_bits": c["avg_wbits"], "activation_bits": c["avg_abits"],
            "weight_coverage": c["weight_coverage"], "mac_coverage": c["mac_coverage"]}


__all__ = ["BITS_CONVENTION", "COVERAGE_KEYS", "Bits", "LayerTable", "average_bits", "count_table", "coverage", "float_bits", "layer_bits", "own_table"]
