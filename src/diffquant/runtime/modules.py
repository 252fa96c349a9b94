"""Integer Linear and Conv2d: the ``converted`` form of frozen ``QuantLinear`` / ``QuantConv2d``.

A converted layer holds its weight as integer codes (int8, or int4 packed two per byte) and reuses
the frozen layer's quantizers for the scales: per-(row, segment) weight scales and the
per-timestep-group activation scale, zero point and bit width. Per call it

1. looks up the activation parameters of the current timestep group (per sample when timesteps mix),
2. quantizes the input to uint8 codes ``u = q - qmin`` with zero point ``z - qmin`` (so signed,
   unsigned and asymmetric grids of up to 8 bits all become one uint8 grid),
3. multiplies int8 x int8 -> int32 and rescales by ``s_x * s_w`` plus the bias in the same kernel.

Backends: ``onednn`` (PyTorch's oneDNN int8 matmul/convolution, AMX/VNNI, fused rescale; CPU),
``int_mm`` (``torch._int_mm`` on CPU or CUDA, im2col for convolutions, zero-point correction
from weight row sums), ``float`` (the fake-quant arithmetic on the dequantized weight: used where
the integer form measured slower, and for timestep groups wider than 8 bits, e.g. PCR's 10-bit
steps, which no int8 kernel can take). Inputs split into channel segments (Q-Diffusion's shortcut
splitting) and per-group weight scales become several kernel calls whose outputs are summed. Smoothed inputs
are divided by their factors first (the weight codes hold them); per-token inputs take row scales (``_token_forward``).
"""

from __future__ import annotations

import math
from pathlib import Path
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..nn import QuantConv2d, QuantLinear, QuantModule, QuantState
from ..quant.affine import qrange
from ..registry import register_converted
from .packing import pack_int4, unpack_int4

BACKENDS = ("onednn", "int_mm", "float")


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies u8 x s8 without int16 saturation (AVX-512 VNNI, AVX-VNNI or AMX).

    Without it int8 kernels (oneDNN, OpenVINO, ONNX Runtime) add u8 x s8 pairs in int16 (``vpmaddubsw``),
    which saturates on full-range weights: measured here up to 33 % off fake quantization per layer.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def onednn_available() -> bool:
    """Whether PyTorch's oneDNN int8 kernels (``torch.ops.onednn.qconv2d_pointwise``) are built in and exact here.

    Without VNNI (``cpu_has_vnni``) its int16 sums saturate, so such CPUs use ``int_mm``.
    """
    ops = getattr(torch.ops, "onednn", None)
    try:
        built = torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "qconv2d_pointwise")
        return bool(built and cpu_has_vnni())
    except (AttributeError, RuntimeError):
        return False


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(x / scale) + zero_point, 0, qmax)``, rounded exactly like fake quantization.

    On CPU: a true division and a half-to-even rounding, then PyTorch's fused quantize kernel (clamp and
    store as bytes; its own ``x * (1 / scale) + zero_point`` rounding differs from ``round(x / scale)`` on
    a few elements per million, so it only sees integers) whose bytes are taken as a uint8 view, no copy.
    """
    y = x.float()
    x = (y.div_(scale) if y is not x else y.div(scale)).round_()  # never in place on the caller's tensor
    if x.device.type == "cpu":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated, their fused kernel is still the fastest
            q = torch.quantize_per_tensor(x, 1.0, zero_point, torch.quint8)
        codes = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())
    else:
        codes = x.add_(zero_point).clamp_(0, 255).to(torch.uint8)
    return codes.clamp_(max=qmax) if qmax < 255 else codes


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an integer layer writes: the autocast dtype when autocast is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` with CUDA's shape rules met by zero padding (M > 16, K and N multiples of 8)."""
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(17 - m, 0), (-k) % 8, (-n) % 8
    if pk or pm:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b = F.pad(b, (0, pn, 0, pk))
    return torch._int_mm(a, b)[:m, :n]


class IntLayer(QuantModule):
    """Shared part of ``IntLinear`` / ``IntConv2d`` (``isinstance`` finds any converted layer); not instantiated directly.

    Besides the forward, it names its structure for the exporters (onnx.py, ovgraph.py): ``blocks()``,
    ``segments()``, ``act_params(group, segment)``, ``block_codes``, ``weight_scales``, ``channels`` and ``float_op``.
    """

    is_layer = True

    def _init_from(self, source: QuantLinear | QuantConv2d, backend: str, codes: torch.Tensor | None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown runtime backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self._init_quant()
        self.state = QuantState.CONVERTED
        self.weight_shape = tuple(source.weight.shape)
        self.weight_quantizer = source.weight_quantizer
        self.input_quantizer = source.input_quantizer
        self.input_quantizer.mode = "quantize"
        self.bias = source.bias
        self.lowrank = source.lowrank  # the float branch runs beside the integer GEMM, on the unquantized input
        self.backend = backend
        if codes is None:
            codes = source.weight_quantizer.integer_codes(source.weight).to(torch.int8)
        rows = codes.reshape(self.weight_shape[0], -1)
        self.register_buffer("qweight", pack_int4(rows) if self.weight_quantizer.bits <= 4 else rows.to(torch.int8))
        self._cache: dict[str, Any] = {}
        self._export = False
        self._export_params: list[tuple[float, int, int, int]] = []

    # -- lifecycle and saving ----------------------------------------------------------------
    kind: ClassVar[str] = ""
    source_type: ClassVar[type] = QuantModule

    def check_move(self, state: QuantState, fit_activations_later: bool = False) -> None:
        if QuantState(state) is not QuantState.CONVERTED:
            raise ValueError("a converted layer cannot go back to fake quantization; load the unconverted model instead")

    def set_state(self, state: QuantState, seed: int = 0, fit_activations_later: bool = False) -> None:
        self.check_move(state)

    def saved_weight_codes(self) -> None:
        return None  # ``qweight`` in the state dict already holds the codes

    def converted_form(self) -> dict:
        return {"kind": self.kind, "backend": self.backend}

    @classmethod
    def from_saved(cls, source: QuantModule, info: dict) -> IntLayer:
        """An integer layer shaped like ``source`` whose tensors a state dict will fill (loading a converted model)."""
        if not isinstance(source, cls.source_type):
            raise ValueError(f"saved as an integer {cls.kind} layer but the model has a {type(source).__name__}")
        placeholder = torch.zeros(source.weight.shape, dtype=torch.int8, device=source.weight.device)
        return cls(source, info["backend"], codes=placeholder)

    def clear_cache(self) -> None:
        """Drop packed weights and looked-up activation parameters (rebuilt on the next call)."""
        self._cache = {}

    def begin_export(self, group: int) -> None:
        """Emit Q/DQ ops with timestep group ``group``'s parameters as constants (ONNX export) until ``end_export``."""
        self._export_params = [self.act_params(group, s) for s in range(len(self.segments()))]
        for i, (c0, c1, w_seg, _) in enumerate(self.blocks()):
            self._cache[f"qdq{i}"] = (self.block_codes(c0, c1), self.weight_scales(w_seg))
        self._export = True

    def end_export(self) -> None:
        self._export = False
        self._cache = {k: v for k, v in self._cache.items() if not k.startswith("qdq")}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # packed oneDNN weights cannot be copied; they are rebuilt on first use
        return state

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._cache = {}

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a float copy, for inspection; the layer computes on the codes)."""
        return self.weight_quantizer.dequantize(self.codes()).to(self._float_dtype())

    def _float_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self.weight_quantizer.scale.dtype

    def codes(self) -> torch.Tensor:
        """int8 weight codes in the weight's own shape."""
        if self.weight_quantizer.bits <= 4:
            return unpack_int4(self.qweight, self.weight_shape)
        return self.qweight.reshape(self.weight_shape)

    # -- structure ---------------------------------------------------------------------------
    @property
    def _unit(self) -> int:
        return math.prod(self.weight_shape[2:]) if len(self.weight_shape) > 2 else 1

    def blocks(self) -> list[tuple[int, int, int, int]]:
        """(first input channel, end, weight segment, activation segment) of each kernel call."""
        if "blocks" not in self._cache:
            starts = [a for a, _ in self.segments()]
            out = []
            for w_seg, (a, b) in enumerate(self.weight_quantizer.bounds):
                c0, c1 = a // self._unit, b // self._unit
                a_seg = max(i for i, s in enumerate(starts) if s <= c0)
                out.append((c0, c1, w_seg, a_seg))
            self._cache["blocks"] = out
        return self._cache["blocks"]

    def segments(self) -> list[tuple[int, int]]:
        """(first input channel, end) of each activation segment (one, unless the input is split)."""
        if "segments" not in self._cache:
            splits = self.input_quantizer.channel_splits or [self.weight_shape[1]]
            self._cache["segments"] = [(sum(splits[:i]), sum(splits[: i + 1])) for i in range(len(splits))]
        return self._cache["segments"]

    def act_params(self, group: int, segment: int) -> tuple[float, int, int, int]:
        """(scale, uint8 zero point z - qmin, uint8 max qmax - qmin, bits) of a group and segment."""
        iq = self.input_quantizer
        bits = int(iq.bits[group])
        qmin, qmax = qrange(bits, iq.spec.symmetric, iq.spec.unsigned)
        return float(iq.scale[group, segment]), int(round(float(iq.zero_point[group, segment]))) - int(qmin), int(qmax - qmin), bits

    def _group_params(self, group: int) -> list[tuple[float, int, int, int]]:
        """``act_params`` of every activation segment of ``group`` (looked up once, then cached)."""
        if self._export:
            return self._export_params
        key = f"act{group}"
        if key not in self._cache:
            self._cache[key] = [self.act_params(group, s) for s in range(len(self.segments()))]
        return self._cache[key]

    def weight_scales(self, w_seg: int) -> torch.Tensor:
        """Per-output-channel scales of weight segment ``w_seg`` (float32, one per output channel)."""
        scale = self.weight_quantizer.scale[:, w_seg].detach().float()
        return scale.expand(self.weight_shape[0]).contiguous()

    def block_codes(self, c0: int, c1: int) -> torch.Tensor:
        """int8 weight codes of input channels ``c0:c1`` (one kernel block)."""
        return self.codes()[:, c0:c1].contiguous()

    def _dequantized(self) -> torch.Tensor:
        if "float" not in self._cache:
            self._cache["float"] = self.weight.detach()
        return self._cache["float"]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_branch(x, self._integer_forward(x))

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        iq = self.input_quantizer
        x = iq.smooth_input(x)  # the weight codes hold the smoothing factors (per_channel_smooth)
        group = 0 if iq.context is None or iq.num_groups == 1 else iq.context.group
        if self.backend == "float" and not self._export:  # exported graphs keep int8 weights with Q/DQ
            return self._float_forward(iq(x))
        if isinstance(group, int):
            return self._group_forward(x, group)
        group = group.to(x.device)
        out = None
        for g in torch.unique(group).tolist():
            rows = group == g
            y = self._group_forward(x[rows], int(g))
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    def _group_forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        if self.input_quantizer.dynamic:
            return self._token_forward(x, group)
        params = self._group_params(group)
        if params[0][3] > 8:  # e.g. PCR's 10-bit steps: same arithmetic, in float
            return self._float_forward(self.input_quantizer.fake_quant(x, group))
        dtype = output_dtype(x)
        blocks = self.blocks()
        # One kernel call writes the output dtype itself; partial sums of several blocks add up in fp32.
        kernel_dtype = dtype if len(blocks) == 1 and dtype in (torch.float32, torch.bfloat16) else torch.float32
        out = None
        for s, (a, b) in enumerate(self.segments()):
            scale, zp, qmax, _ = params[s]
            xs = x if (a, b) == (0, self.weight_shape[1]) else self.channels(x, a, b)
            if self._export:
                codes = torch.ops.quantized_decomposed.quantize_per_tensor(xs.float(), scale, zp, 0, qmax, torch.uint8)
            else:
                codes = quantize_u8(xs, scale, zp, qmax)
            for i, (c0, c1, _, a_seg) in enumerate(blocks):
                if a_seg != s:
                    continue
                xb = codes if (c0, c1) == (a, b) else self.channels(codes, c0 - a, c1 - a)
                bias = self.bias if out is None else None
                y = self._block(i, xb, scale, zp, qmax, bias, kernel_dtype)
                out = y if out is None else out + y
        return out.to(dtype)

    def _token_forward(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """Per-token uint8 codes with each row's own scale and zero point (``dynamic_qparams``: fake quantization's),
        int_mm, rescaled by row scale x weight scale. Per-group scales and groups over 8 bits run in float."""
        iq = self.input_quantizer
        bits = int(iq.bits[group])
        if bits > 8 or iq.spec.granularity != "per_token":
            return self._float_forward(iq.fake_quant(x, group))
        qmin, qmax = (int(v) for v in qrange(bits, iq.spec.symmetric, iq.spec.unsigned))
        out = None
        for s, (a, b) in enumerate(self.segments()):
            xs = x if (a, b) == (0, self.weight_shape[1]) else self.channels(x, a, b)
            tokens = xs.float().movedim(iq.channel_axis, -1)
            scale, zero_point = iq.dynamic_qparams(tokens, bits)
            codes = tokens.div(scale).round_().add_(zero_point - qmin).clamp_(0, qmax - qmin).to(torch.uint8).movedim(-1, iq.channel_axis)
            rows_scale, rows_zp = scale.reshape(-1, 1), (zero_point - qmin).reshape(-1, 1)
            for i, (c0, c1, _, a_seg) in enumerate(self.blocks()):
                if a_seg != s:
                    continue
                xb = codes if (c0, c1) == (a, b) else self.channels(codes, c0 - a, c1 - a)
                y = self._int_mm_block(i, xb, rows_scale, rows_zp, self.bias if out is None else None)
                out = y if out is None else out + y
        return out.to(output_dtype(x))

    def _block(
        self, i: int, codes: torch.Tensor, scale: float, zp: int, qmax: int, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        if self._export:
            return self._qdq_block(i, codes, scale, zp, qmax, bias)
        if self.backend == "onednn":
            return self._onednn_block(i, codes, scale, zp, bias, dtype)
        return self._int_mm_block(i, codes, scale, zp, bias)

    def _qdq_block(self, i: int, codes: torch.Tensor, scale: float, zp: int, qmax: int, bias: torch.Tensor | None) -> torch.Tensor:
        """Export form: DequantizeLinear on uint8 activations, then ``qdq_op`` (ONNX Q/DQ)."""
        return self.qdq_op(i, torch.ops.quantized_decomposed.dequantize_per_tensor(codes, scale, zp, 0, qmax, torch.uint8), bias)

    def qdq_op(self, i: int, x_hat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Export form of block ``i`` on a dequantized input: DequantizeLinear on its int8 weight codes, the float op."""
        c0, c1, w_seg, _ = self.blocks()[i]
        if f"qdq{i}" not in self._cache:
            self._cache[f"qdq{i}"] = (self.block_codes(c0, c1), self.weight_scales(w_seg))
        w_codes, w_scale = self._cache[f"qdq{i}"]
        w_hat = torch.ops.quantized_decomposed.dequantize_per_channel(w_codes, w_scale, torch.zeros_like(w_scale, dtype=torch.long),
                                                                      0, -128, 127, torch.int8)
        return self.float_op(x_hat, w_hat, bias)

    def _onednn_weights(self, i: int, prepack: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(oneDNN-packed int8 codes of block ``i``, their per-channel scales, zero points), packed once by
        ``prepack(codes, scales)`` (the Linear or convolution packer) and cached."""
        key = f"onednn{i}"
        if key not in self._cache:
            c0, c1, w_seg, _ = self.blocks()[i]
            scales = self.weight_scales(w_seg)
            self._cache[key] = (prepack(self.block_codes(c0, c1), scales), scales, torch.zeros(scales.shape[0], dtype=torch.long))
        return self._cache[key]

    def _int_mm_rows(self, i: int, rows: torch.Tensor, scale: float, zp: int, bias: torch.Tensor | None) -> torch.Tensor:
        """uint8 activation rows [M, K] times block ``i``'s int8 codes, in float [M, out]: ``int_mm`` on ``rows - 128``
        (exact in int8), corrected by ``(128 - zp)`` times the weight's row sums, scaled, plus the bias."""
        key = f"int_mm{i}"
        if key not in self._cache:
            c0, c1, w_seg, _ = self.blocks()[i]
            w = self.block_codes(c0, c1).reshape(self.weight_shape[0], -1)
            self._cache[key] = (w.t().contiguous(), w.sum(dim=1, dtype=torch.int32).float(), self.weight_scales(w_seg))
        w_t, w_sum, w_scale = self._cache[key]
        acc = int_mm((rows ^ 0x80).view(torch.int8), w_t).float()  # u - 128, exactly
        y = (acc + (128 - zp) * w_sum) * (w_scale * scale)
        return y + bias.float() if bias is not None else y

    def extra_repr(self) -> str:
        return f"w{self.weight_quantizer.bits} backend={self.backend}, blocks={len(self.weight_quantizer.bounds)}"


class IntLinear(IntLayer):
    """Converted ``QuantLinear``: uint8 activations x int8 (or packed int4) weights."""

    kind = "linear"
    source_type = QuantLinear

    def __init__(self, source: QuantLinear, backend: str = "onednn", codes: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self._init_from(source, backend, codes)

    @staticmethod
    def channels(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return x[..., a:b].contiguous()

    def float_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's float operation with weight ``w``."""
        return F.linear(x, w, bias)

    def _float_forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        return F.linear(x_hat, self._dequantized(), self.bias)

    def _onednn_block(
        self, i: int, codes: torch.Tensor, scale: float, zp: int, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        packed, w_scale, w_zp = self._onednn_weights(i, lambda codes, scales: torch.ops.onednn.qlinear_prepack(codes, None))
        b = None if bias is None else bias.float()
        return torch.ops.onednn.qlinear_pointwise(codes, scale, zp, packed, w_scale, w_zp, b, 1.0, 0, dtype, "none", [], "")

    def _int_mm_block(self, i: int, codes: torch.Tensor, scale: float, zp: int, bias: torch.Tensor | None) -> torch.Tensor:
        lead = codes.shape[:-1]
        return self._int_mm_rows(i, codes.reshape(-1, codes.shape[-1]), scale, zp, bias).reshape(*lead, -1)


class IntConv2d(IntLayer):
    """Converted ``QuantConv2d``: uint8 activations x int8 (or packed int4) weights."""

    kind = "conv2d"
    source_type = QuantConv2d

    def __init__(self, source: QuantConv2d, backend: str = "onednn", codes: torch.Tensor | None = None) -> None:
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            setattr(self, attr, getattr(source, attr))
        self._reversed_padding_repeated_twice = source._reversed_padding_repeated_twice
        self._init_from(source, backend, codes)

    @staticmethod
    def channels(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return x[:, a:b].contiguous()

    def float_op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's float operation with weight ``w`` (Linear: ``F.linear``; here the convolution)."""
        x, padding = self.padded(x)
        return F.conv2d(x, w, bias, self.stride, padding, self.dilation, self.groups)

    def padded(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(input, padding left to the convolution): non-zero padding modes pad ``x`` here, zero padding is the conv's."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return x, self.padding

    def _float_forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        return self.float_op(x_hat, self._dequantized(), self.bias)

    def integer_backends(self) -> list[str]:
        """Integer backends able to run this convolution (oneDNN: zero padding; int_mm: also ungrouped, undilated)."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return []
        plain = self.groups == 1 and tuple(self.dilation) == (1, 1)
        return ["onednn"] + (["int_mm"] if plain else [])

    def _onednn_block(
        self, i: int, codes: torch.Tensor, scale: float, zp: int, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        packed, w_scale, w_zp = self._onednn_weights(i, lambda codes, scales: torch.ops.onednn.qconv_prepack(
            codes, scales, scale, zp, list(self.stride), list(self.padding), list(self.dilation), self.groups, None))
        b = None if bias is None else bias.float()
        return torch.ops.onednn.qconv2d_pointwise(
            codes, scale, zp, packed, w_scale, w_zp, b, list(self.stride), list(self.padding), list(self.dilation),
            self.groups, 1.0, 0, dtype, "none", [], "",
        )

    def _int_mm_block(self, i: int, codes: torch.Tensor, scale: float, zp: int, bias: torch.Tensor | None) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if ph or pw:
            codes = F.pad(codes, (pw, pw, ph, ph), value=zp)  # padding holds real zeros: code zp
        b, c = codes.shape[:2]
        patches = codes.unfold(2, kh, sh).unfold(3, kw, sw)  # [B, C, Ho, Wo, kh, kw]
        ho, wo = patches.shape[2:4]
        cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)
        return self._int_mm_rows(i, cols, scale, zp, bias).reshape(b, ho, wo, -1).permute(0, 3, 1, 2)


def dynamic_kernel_reason(layer: IntLayer) -> str | None:
    """Why a layer with dynamic activation scales has no integer kernel (None: ``torch._int_mm`` runs it per token)."""
    iq = layer.input_quantizer
    if iq.dynamic and iq.spec.granularity != "per_token":
        return f"dynamic {iq.spec.granularity} activations: no grouped int8 kernel; the dequantized float form runs"
    if iq.dynamic and isinstance(layer, IntConv2d) and not (tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1)
                                             and layer.padding in ((0, 0), 0) and "int_mm" in layer.integer_backends()):
        return "per-token activations of a kxk or strided convolution: a patch mixes tokens of different scales, runs in float"
    return None


def integer_backends(layer: IntLayer) -> list[str]:
    """Integer backends that can run ``layer`` on this build (oneDNN needs a CPU build with it; dynamic per-token
    activations run on int_mm only, per-row scales being no oneDNN argument)."""
    if layer.input_quantizer.dynamic:
        return [] if dynamic_kernel_reason(layer) else ["int_mm"]
    names = layer.integer_backends() if isinstance(layer, IntConv2d) else ["onednn", "int_mm"]
    if not onednn_available():
        names = [n for n in names if n != "onednn"]
    return names


__all__ = [
    "BACKENDS", "IntConv2d", "IntLayer", "IntLinear", "dynamic_kernel_reason", "int_mm", "integer_backends", "onednn_available", "quantize_u8",
]

for _layer in (IntLinear, IntConv2d):
    register_converted(_layer.kind, _layer.from_saved)
