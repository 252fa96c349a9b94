"""Coverage and average bits of a denoiser, diffquant's or a peer's, computed one way for every eval/bench row.

A row's numbers are only comparable when the table says what each row quantizes: torchao's int8 dynamic
leaves the convolutions float, quanto W4 leaves every activation float, diffquant quantizes every Conv2d,
Linear and attention matmul. So every row gets, from one function (:func:`coverage`):

- ``weight_coverage``: the quantized share of the denoiser's parameters (every parameter element counts:
  biases, norms and embeddings stay float in every library here, so they are in the denominator);
- ``mac_coverage``: the share of its multiply-accumulates (Linear, Conv2d and the attention matmuls
  QK^T and PV) whose two operands are both quantized (weight and input activation; for attention, the
  activations on both sides). Weight-only quantization dequantizes before a float matmul: 0 here;
- ``avg_wbits``: bits per parameter element over the WHOLE denoiser, quantized weights at their code width
  (scales, zero points and low-rank branches not counted: the file size shows them), every float element
  at the bits of the dtype it runs in (32 for float32, 16 for float16/bfloat16);
- ``avg_abits``: bits of the input activation per MAC over the whole denoiser (MAC-weighted), float
  inputs at their dtype's bits; an attention matmul counts the mean of its quantized operands' bits;
- ``denoiser_mib`` (:func:`shipped_mib`): the file that would ship (diffquant: the denoiser files
  ``diffquant.save`` writes; OpenVINO: the IR's weight file; a peer: its state dict as safetensors, tensor
  subclasses flattened to what they store).

MACs are counted once, on the float reference, with forward hooks on one real denoiser call of the
bench's sampling settings (its latent size, sequence length and guidance batch): quantization does not change
them. A row's layers are matched to the reference's by module name; :func:`layer_bits` reads each
library's modules (diffquant's wrapped or converted layers and attention processors, torchao's quantized
tensors, optimum-quanto's QModules, SDNQ's layers, bitsandbytes' parameters). A denoiser without torch layers
(an OpenVINO graph) carries the same map as ``layer_bits`` (``peers.openvino_layer_bits``).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..sampling import SamplingSettings, is_unconditional, sample, unconditional_prompts
from ..wrap import get_denoiser

Bits = tuple[float | None, float | None]  # (weight bits, input activation bits); None = float
COVERAGE_KEYS = ("weight_coverage", "mac_coverage", "avg_wbits", "avg_abits")


@dataclass
class LayerTable:
    """The float reference's accounting: parameter elements and MACs per module name (one denoiser call)."""

    weight_numel: dict[str, int] = field(default_factory=dict)  # Linear/Conv weight elements
    other_numel: int = 0  # every other parameter element (biases, norms, embeddings)
    macs: dict[str, int] = field(default_factory=dict)  # layer, or "<attention module>:qk" / ":pv" -> MACs
    attention: set[str] = field(default_factory=set)  # keys of ``macs`` that are attention matmuls

    @property
    def total_numel(self) -> int:
        return sum(self.weight_numel.values()) + self.other_numel


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "processor") and hasattr(module, "to_q")


class _AttentionMacs(TorchFunctionMode):
    """Counts the MACs of the attention matmuls in the open attention module: ``<module>:qk`` (Q K^T) and
    ``<module>:pv`` (softmax times V), from SDPA or from the bmm/baddbmm pairs of an explicit processor."""

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
                q, k, v = args[:3]
                rows = q.numel() // q.shape[-1] * k.shape[-2]
                self._add(f"{name}:qk", rows * q.shape[-1])
                self._add(f"{name}:pv", rows * v.shape[-1])
            elif func in (torch.bmm, torch.baddbmm, torch.matmul):
                a, b = (args[1], args[2]) if func is torch.baddbmm else (args[0], args[1])
                if not isinstance(a, nn.Parameter) and not isinstance(b, nn.Parameter) and a.dim() >= 3:
                    n = self._seen.get(name, 0)
                    self._seen[name] = n + 1
                    self._add(f"{name}:{'qk' if n % 2 == 0 else 'pv'}", a.numel() * b.shape[-1])
        return func(*args, **kwargs)


def count_table(denoiser: nn.Module, run) -> LayerTable:
    """Parameter elements of ``denoiser`` and the MACs of each Linear/Conv2d and attention matmul during the first
    forward of ``denoiser`` that ``run()`` makes (forward hooks; later calls are not counted)."""
    table = LayerTable()
    for name, module in denoiser.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if type(module) in (nn.Linear, nn.Conv2d):
            table.weight_numel[name] = own.pop("weight").numel()
        table.other_numel += sum(p.numel() for p in own.values())
    mode = _AttentionMacs()
    state = {"done": False}

    def layer_hook(name):
        def hook(module, args, output):
            if not state["done"]:
                per_out = module.in_features if isinstance(module, nn.Linear) else \
                    module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
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
        if type(module) in (nn.Linear, nn.Conv2d):
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


def layer_table(pipe, settings: SamplingSettings, prompt: str = "a red circle") -> LayerTable:
    """:func:`count_table` of ``pipe``'s float denoiser on one call of ``settings`` (one sampling step of one prompt:
    the bench's latent size, text length and guidance batch)."""
    prompts = unconditional_prompts(1) if is_unconditional(pipe) else [prompt]
    with contextlib.suppress(AttributeError):
        pipe.set_progress_bar_config(disable=True)
    return count_table(get_denoiser(pipe), lambda: sample(pipe, prompts, settings.replace(steps=1, seed=0)))


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
    from ..nn import QuantModule

    out: dict[str, Bits] = {}
    for name, m in denoiser.named_modules():
        if isinstance(m, QuantModule):  # diffquant: wrapped, frozen or converted layer, or attention processor
            acts = [q.average_bits() for q in m.activation_quantizers()]
            wq = getattr(m, "weight_quantizer", None)
            abits = sum(acts) / len(acts) if acts else None
            if m.is_layer:
                out[name] = (float(wq.bits) if wq is not None else None, abits)
            else:  # an attention processor quantizes both matmuls' operands (q, k, v, softmax output)
                attention = name.rsplit(".", 1)[0]
                out[f"{attention}:qk"] = out[f"{attention}:pv"] = (None, abits)
        elif hasattr(m, "weight_qtype"):  # optimum-quanto QModule (frozen or not): activations quantized at its inputs
            act, wq = getattr(m, "activation_qtype", None), m.weight_qtype
            out[name] = (float(wq.bits) if wq is not None else None, float(act.bits) if act is not None else None)
        elif hasattr(m, "sdnq_dequantizer"):  # SDNQ layer; its quantized matmul quantizes activations per row at run time
            d = m.sdnq_dequantizer
            out[name] = (float(d.num_bits), float(d.num_bits_matmul) if d.use_quantized_matmul else None)
        elif _tensor_bits(getattr(m, "weight", None)) is not None:
            w = m.weight  # bnb LLM.int8 (Linear8bitLt) and torchao's dynamic configs quantize inputs per row at run time
            dynamic = type(m).__name__ == "Linear8bitLt" or getattr(w, "act_quant_kwargs", None) is not None
            out[name] = (_tensor_bits(w), 8.0 if dynamic else None)
    return {k: v for k, v in out.items() if v != (None, None)}


def float_bits(denoiser: nn.Module) -> int:
    """Bits of the float dtype the denoiser runs in (an engine's denoiser may say so as ``float_bits``)."""
    given = getattr(denoiser, "float_bits", None)
    if isinstance(given, int):
        return given
    floats = [p for p in denoiser.parameters() if p.is_floating_point() and type(p) in (torch.Tensor, nn.Parameter)]
    return floats[0].element_size() * 8 if floats else 32


def coverage(table: LayerTable, denoiser: nn.Module) -> dict[str, float]:
    """The row's coverage and average bits over the whole denoiser (module docstring): the reference's ``table``
    with each layer at the bits :func:`layer_bits` finds in ``denoiser``, float ones at :func:`float_bits`."""
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
        "mac_coverage": q_macs / max(total_macs, 1),
        "avg_wbits": wsum / max(table.total_numel, 1),
        "avg_abits": asum / total_macs if total_macs else f,
    }


def shipped_mib(pipe, reference: bool = False) -> float:
    """MiB of the denoiser as it would ship: what ``diffquant.save`` writes for a diffquant model, the IR's weight
    file for an OpenVINO denoiser (``ir_bytes`` set by the peer), else its state dict as safetensors. The float
    ``reference`` ships as the files it was loaded from (e.g. fp16 safetensors run in float32), when on disk."""
    from .peers import saved_size_bytes

    denoiser = get_denoiser(pipe)
    origin = str(getattr(pipe.config, "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
    if reference and origin and Path(origin).is_dir():
        return denoiser_bytes(Path(origin)) / 2**20
    if isinstance(getattr(denoiser, "ir_bytes", None), int):
        return denoiser.ir_bytes / 2**20
    if getattr(denoiser, "diffquant", None) is not None:
        import diffquant

        with tempfile.TemporaryDirectory() as folder:
            diffquant.save(pipe, folder)
            return denoiser_bytes(Path(folder)) / 2**20
    return saved_size_bytes(denoiser) / 2**20


def denoiser_bytes(folder: Path, denoiser_names: tuple[str, ...] = ("unet", "transformer")) -> int:
    """Bytes of the denoiser's weight files inside a saved pipeline folder (all weight files if none is named so)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")]
    denoiser_files = [p for p in files if any(part in denoiser_names for part in p.relative_to(folder).parts)]
    return sum(p.stat().st_size for p in (denoiser_files or files))
