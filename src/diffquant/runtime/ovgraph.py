"""The OpenVINO graph of a converted denoiser: FakeQuantize activations, int8 weight constants, all timestep groups.

OpenVINO runs a linear layer on int8 kernels when its input comes from a FakeQuantize with constant
ranges and its weight is an int8 constant with a per-channel ``Convert -> Multiply``; a scale fed as a
graph input (or gathered at run time) before the layer loses the int8 kernel (measured 3.4x slower,
docs/runtime.md). Timestep groups therefore keep one constant grid per layer, that of a reference
group ``g0`` with scale ``s0`` and zero point ``z0``, and reach group ``g`` (``s, z``) by runtime scalars
gathered from per-layer tables with a ``timestep_group`` input:

    x' = x / r + d,   r = s / s0,  d = s0 (z - z0)      ->  FakeQuantize(x'; s0, z0) gives group g's codes
    y  = r * (op(x_hat') - d * op(1)) + bias             ->  group g's exact output

``op(1)`` is the layer applied to ones: the weight's row sums for a Linear, a one-channel convolution
of a ones map (exact at zero-padded borders too) for a Conv2d; both vanish when zero points do not
change with t (symmetric activations). One compiled model then serves every group at full int8 speed.
Groups wider than 8 bits (PCR's relaxed steps) cannot share the 8-bit grid: a second, float graph serves
every group, with every quantizer's parameters gathered by group (float arithmetic, exact; weights stay
int8 constants that OpenVINO decompresses). It is also the graph for x86 CPUs without VNNI, whose int8
kernels sum u8 x s8 pairs in int16 and saturate on full-range weight codes. Quantizers outside integer
layers (attention matmuls, float-fallback layers) are constant FakeQuantize in the int graph when one grid
serves all its groups, else float fake quantization with gathered parameters.

Dynamic activations (per token / per group, and the per-row softmax) have no constant grid: in both graphs they are
their own fake quantization with per-row ranges computed in the graph (ReduceMin/ReduceMax; exact), and a layer's
int8 weight constant follows. Whether the matmul then runs on int8 kernels is OpenVINO's choice: its CPU plugin
quantizes the input of such weight-compressed FullyConnected layers itself where the CPU has int8 dot products
(``DYNAMIC_QUANTIZATION_GROUP_SIZE``, 32 by default), on top of the per-row grid.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..learning import live_time_layers
from ..nn import QuantSanaLinearAttnProcessor
from ..quant import ActivationQuantizer
from ..quant.affine import qrange
from ..store import return_freed_memory
from ..wrap import get_denoiser, quant_record
from .convert import convert, is_converted
from .flat import FlatCall, example_inputs
from .modules import IntConv2d, IntLayer

GROUP_INPUT = "timestep_group"
OUTPUT = "out_sample"


@dataclass
class GroupPlan:
    """Which timestep groups the int8 graph serves; ``float_groups`` (wider than 8 bits) need the float graph."""

    num_groups: int
    int_groups: list[int]
    float_groups: list[int] = field(default_factory=list)

    @property
    def ref(self) -> int:
        return self.int_groups[0] if self.int_groups else 0


def plan_groups(denoiser: nn.Module) -> GroupPlan:
    """A group is relaxed (float graph) when any quantizer holds more bits there than its lowest."""
    record = quant_record(denoiser)
    relaxed: set[int] = set()
    for q in _quantizers(denoiser):
        low = int(q.bits.min())
        relaxed |= {g for g in range(q.num_groups) if int(q.bits[g]) > low}
    groups = range(len(record.groups))
    return GroupPlan(len(record.groups), [g for g in groups if g not in relaxed], sorted(relaxed))


def _quantizers(denoiser: nn.Module) -> list[ActivationQuantizer]:
    return [q for q in denoiser.modules() if isinstance(q, ActivationQuantizer) and q.mode == "quantize"]


class _State:
    """The traced group-index input, read by every rendered layer."""

    def __init__(self, plan: GroupPlan, graph: str) -> None:
        self.plan, self.graph = plan, graph
        self.group: torch.Tensor | None = None

    def pick(self, table: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, self.group)

    @property
    def groups(self) -> list[int]:
        return self.plan.int_groups if self.graph == "int" else list(range(self.plan.num_groups))


def _varies(values: torch.Tensor, groups: list[int]) -> bool:
    return len(groups) > 1 and not bool((values[groups] == values[groups[0]]).all())


class _Gathered:
    """Float fake quantization with one quantizer's parameters gathered by group (exact; no int8 kernel)."""

    def __init__(self, q: ActivationQuantizer, st: _State, varying: bool) -> None:
        ranges = [qrange(int(q.bits[g]), q.spec.symmetric, q.spec.unsigned) for g in range(q.num_groups)]
        self.lo = torch.tensor([float(a) for a, _ in ranges])
        self.hi = torch.tensor([float(b) for _, b in ranges])
        self.scale, self.zero_point = q.scale.detach().float().clone(), q.zero_point.detach().float().clone()
        self.q, self.st, self.ref = q, st, st.groups[0]
        self.pick = st.pick if varying and st.plan.num_groups > 1 else (lambda t: t[self.ref : self.ref + 1])

    def __call__(self, x: torch.Tensor, segment: int | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` (one channel segment of the input when ``segment`` is given)."""
        s, z, a, b = self.pick(self.scale)[0], self.pick(self.zero_point)[0], self.pick(self.lo), self.pick(self.hi)
        if segment is not None:
            s, z = s[segment : segment + 1], z[segment : segment + 1]
        elif self.q.seg_index is not None:
            shape = [1] * x.dim()
            shape[self.q.channel_axis] = x.shape[self.q.channel_axis]
            s, z = s[self.q.seg_index].reshape(shape), z[self.q.seg_index].reshape(shape)
        else:
            s, z = s[:1], z[:1]
        codes = torch.minimum(torch.maximum(torch.round(x.float() / s) + z, a), b)
        return ((codes - z) * s).to(x.dtype)


def _dynamic_forward(q: ActivationQuantizer, st: _State):
    """A dynamic quantizer in either graph: its own fake quantization, per-row scales computed in the graph (exact),
    bits gathered by group where they change with t."""
    varying = _varies(q.bits, st.groups)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # fake_quantize's out-of-place form: OpenVINO's frontend rejects in-place ops on views
            return q.fake_quant(x, st.group if varying else st.groups[0])

    return forward


def _quantizer_forward(q: ActivationQuantizer, st: _State, constant_grid: bool = True):
    """Int graph: FakeQuantize with group g0's constants when one grid serves its groups (and ``constant_grid``);
    otherwise (and in the float graph, where a FakeQuantize would pull in int8 kernels) float arithmetic with
    gathered parameters."""
    if q.dynamic:
        return _dynamic_forward(q, st)
    groups, ref = st.groups, st.groups[0]
    bits = int(q.bits[ref])
    qmin, qmax = (int(v) for v in qrange(bits, q.spec.symmetric, q.spec.unsigned))
    varying = _varies(q.scale.detach(), groups) or _varies(q.zero_point, groups) or _varies(q.bits, groups)
    if st.graph == "int" and constant_grid and not varying and bits <= 8 and q.seg_index is None:
        scale, zp = float(q.scale[ref, 0]), int(round(float(q.zero_point[ref, 0]))) - qmin

        def fake_quant(x: torch.Tensor) -> torch.Tensor:
            return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, 0, qmax - qmin).to(x.dtype)

        return fake_quant
    return _Gathered(q, st, varying)


def _ones_op(layer: IntLayer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer (no bias) applied to an all-ones input: row sums, or a ones map convolved (exact at borders)."""
    if not isinstance(layer, IntConv2d):
        return w.sum(1)
    ones, padding = layer.padded(torch.ones_like(x[:1, :1]))
    return F.conv2d(ones, w.sum(1, keepdim=True), None, layer.stride, padding, layer.dilation)


def _int_layer_forward(layer: IntLayer, st: _State):
    """Int graph: FakeQuantize(x / r + d) -> int8-weight op per kernel block -> r * (y - d * op(1)) + bias.
    Float graph: gathered float fake quantization -> the same int8-weight ops (OpenVINO decompresses them)."""
    iq, groups, ref = layer.input_quantizer, st.groups, st.groups[0]
    dynamic = _dynamic_forward(iq, st) if iq.dynamic else None
    gathered = _Gathered(iq, st, varying=True) if st.graph == "float" and dynamic is None else None
    segments, blocks = layer.segments(), layer.blocks()
    grids, tables = [], []
    for s in range(len(segments)):
        scale0, zp0, qmax, _ = layer.act_params(ref, s)
        r = torch.ones(st.plan.num_groups)
        d = torch.zeros(st.plan.num_groups)
        for g in groups:
            r[g] = float(iq.scale[g, s]) / scale0
            d[g] = scale0 * (float(iq.zero_point[g, s]) - float(iq.zero_point[ref, s]))
        grids.append((scale0, zp0, qmax))
        tables.append((r if bool((r != 1).any()) else None, d if bool((d != 0).any()) else None))
    weights = []
    for c0, c1, w_seg, _ in blocks:
        codes, w_scale = layer.block_codes(c0, c1), layer.weight_scales(w_seg)
        weights.append((codes, w_scale.reshape([-1] + [1] * (codes.dim() - 1))))
    bias = None if layer.bias is None else layer.bias.detach().float().clone()
    whole = (0, layer.weight_shape[1])

    def forward(x_in: torch.Tensor) -> torch.Tensor:
        x, out = iq.smooth_input(x_in), None  # smoothing factors (per_channel_smooth): a constant division
        x_dynamic = None if dynamic is None else dynamic(x.float())  # every segment's rows at once
        for s, (a, b) in enumerate(segments):
            scale0, zp0, qmax = grids[s]
            xs = x.float() if (a, b) == whole else layer.channels(x.float(), a, b)
            if x_dynamic is not None:
                r = d = None
                x_hat = x_dynamic if (a, b) == whole else layer.channels(x_dynamic, a, b)
            elif gathered is not None:
                r = d = None
                x_hat = gathered(xs, segment=s)
            else:
                r, d = (None if t is None else st.pick(t) for t in tables[s])
                if r is not None:
                    xs = xs / r
                if d is not None:
                    xs = xs + d
                x_hat = torch.fake_quantize_per_tensor_affine(xs, scale0, zp0, 0, qmax)
            for i, (c0, c1, _, a_seg) in enumerate(blocks):
                if a_seg != s:
                    continue
                codes, w_scale = weights[i]
                w = codes.float() * w_scale
                xb = x_hat if (c0, c1) == (a, b) else layer.channels(x_hat, c0 - a, c1 - a)
                y = layer.float_op(xb, w, None)
                if d is not None:  # r and d are [1]: they broadcast over any output
                    y = y - d * _ones_op(layer, xb, w)
                if r is not None:
                    y = y * r
                out = y if out is None else out + y
        if bias is not None:
            out = out + (bias.reshape(-1, 1, 1) if isinstance(layer, IntConv2d) else bias)
        return layer._add_branch(x_in, out.to(x.dtype))  # a low-rank branch: float ops on the unquantized input

    return forward


@contextlib.contextmanager
def graph_mode(denoiser: nn.Module, st: _State):
    """Every quantizer (and, in the int graph, every integer layer) renders its OpenVINO form."""
    record = quant_record(denoiser)
    patched: list[nn.Module] = []
    # OpenVINO's CPU plugin does not compile a FakeQuantize feeding SANA's linear attention (its low-precision
    # transformations carry the dequantization into the pad/transpose that follow and break a Transpose's rank;
    # openvino 2026.4, tests/test_families.py): those quantizers take the float form.
    float_form = {id(q) for m in denoiser.modules() if isinstance(m, QuantSanaLinearAttnProcessor)
                  for q in m.activation_quantizers()}
    for q in _quantizers(denoiser):
        q.forward = _quantizer_forward(q, st, constant_grid=id(q) not in float_form)
        patched.append(q)
    for m in denoiser.modules():
        if isinstance(m, IntLayer):
            m.forward = _int_layer_forward(m, st)
            patched.append(m)
    record.context.force(st.groups[0])
    try:
        yield
    finally:
        record.context.force(None)
        for m in patched:
            del m.forward


def trace(module: nn.Module, names: list[str], inputs: tuple) -> Any:
    """``ov.convert_model`` of ``module`` (TorchScript trace) with named inputs and output.

    The trace is not re-run to check it (``check_trace=False``, otherwise OpenVINO's default): the check holds about
    two float copies of every weight the graph dequantizes until the process ends (SD 1.5: 7 GB) and doubles the
    tracing time; the graphs are verified against the fake-quant model by the tests instead. What the trace freed
    goes back to the OS before returning (``store.return_freed_memory``).
    """
    import openvino as ov
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with torch.no_grad():
        decoder = TorchScriptPythonDecoder(module, example_input=inputs, trace_kwargs={"check_trace": False})
        model = ov.convert_model(decoder, example_input=inputs)
    del decoder  # its TorchScript module: freed before the trim below
    for port, name in zip(model.inputs, names, strict=True):
        port.get_tensor().set_names({name})
    model.outputs[0].get_tensor().set_names({OUTPUT})
    narrow_weight_codes(model)
    hoist_attention_output_quantizers(model)
    return_freed_memory()
    return model


ATTENTION_OUTPUTS = ("ScaledDotProductAttention", "MatMul")  # float attention; diffquant's quantized one (probs @ v)


def hoist_attention_output_quantizers(model: Any) -> int:
    """Move each per-tensor FakeQuantize that reads ``attention -> Transpose -> Reshape`` (the attention output on its
    way to ``to_out``; the attention a ``ScaledDotProductAttention`` or, quantized, a ``MatMul``) to the attention's own
    output; returns how many moved.

    A per-tensor grid commutes with the head transpose and reshape, so the values are the same; but OpenVINO's CPU
    plugin fuses the quantizer only there: behind the reshape it ran on its own, in f32 between two layout Reorders
    (14 of diffquant's 38 standalone FakeQuantize nodes on mini-sd, NNCF's graph has none there;
    ``benchmarks/openvino_fq_fusion.py``)."""
    from openvino import opset13

    moved = 0
    for fq in model.get_ordered_ops():
        if fq.get_type_name() != "FakeQuantize" or any(math.prod(fq.input(i).get_shape()) != 1 for i in range(1, 5)):
            continue  # per-channel ranges do not commute with the transpose
        chain, node = [], fq.input(0).get_source_output().get_node()
        for kinds in (("Reshape",), ("Transpose",), ATTENTION_OUTPUTS):
            if node.get_type_name() not in kinds or len(node.output(0).get_target_inputs()) != 1:
                break
            chain.append(node)
            node = node.input(0).get_source_output().get_node()
        if len(chain) != 3:
            continue
        reshape, transpose, attention = chain
        ranges = [fq.input(i).get_source_output() for i in range(1, 5)]
        hoisted = opset13.fake_quantize(attention.output(0), *ranges, fq.get_attributes()["levels"])
        hoisted.set_friendly_name(fq.get_friendly_name())
        transpose.input(0).replace_source_output(hoisted.output(0))
        fq.output(0).replace(reshape.output(0))
        moved += 1
    return moved


def narrow_weight_codes(model: Any) -> int:
    """Store each int8 / uint8 weight constant whose codes fit in 4 bits as i4 / u4 (two codes per byte), widened
    back by a ``Convert`` that OpenVINO folds when it compiles; returns how many were narrowed.

    The trace holds 4-bit codes in int8 tensors, so a W4 IR was as large as a W8 one. Lossless (only constants whose
    values all fit are narrowed), and only the ``codes -> Convert -> Multiply(scale)`` weights this module emits are
    touched. The widening keeps the compiled model what it was (measured on mini-sd W4A8: the same kernels and
    runtime ops); i4 weights fed straight to the layers lost the u8 convolution kernels of 12 of 39 convolutions
    and the float graph's step took 1.7x as long."""
    import openvino as ov
    from openvino import opset13

    narrowed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() not in (ov.Type.i8, ov.Type.u8):
            continue
        if any(t.get_node().get_type_name() != "Convert" for t in op.output(0).get_target_inputs()):
            continue
        codes, signed = op.get_data(), op.get_element_type() == ov.Type.i8
        low, high = (-8, 7) if signed else (0, 15)
        if codes.size == 0 or int(codes.min()) < low or int(codes.max()) > high:
            continue
        packed = opset13.constant(codes, dtype=ov.Type.i4 if signed else ov.Type.u4)
        packed.set_friendly_name(op.get_friendly_name())
        widened = opset13.convert(packed, op.get_element_type())
        op.output(0).replace(widened.output(0))
        narrowed += 1
    return narrowed


def float_model(denoiser: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> Any:
    """An ``ov.Model`` of a float (or fake-quant) denoiser with the same named inputs: FP peers, NNCF's input."""
    inputs = inputs or example_inputs(denoiser)
    names = list(inputs)
    return trace(FlatCall(denoiser, names).eval(), names, tuple(inputs.values()))


def _shared_copy(denoiser: nn.Module) -> nn.Module:
    """A float32 copy of ``denoiser`` to convert and trace that shares its float32 parameters and buffers instead of
    duplicating them (nothing here writes to them): a full-size UNet is otherwise held twice while it is traced."""
    shared = {id(t): t for t in itertools.chain(denoiser.parameters(), denoiser.buffers()) if t.dtype == torch.float32}
    return copy.deepcopy(denoiser, shared).float()


def quantized_models(
    model: Any, inputs: dict[str, torch.Tensor] | None = None, graphs: tuple[str, ...] = ("int", "float"),
    sink: Callable[[str, Any], Any] | None = None,
) -> tuple[dict[str, Any], GroupPlan]:
    """``{"int": ov.Model, "float": ov.Model}`` (those of ``graphs``) of a quantized (frozen or converted)
    denoiser, and the group plan. The float graph is always traced when some group is wider than 8 bits.
    ``sink(graph, ov_model)``, when given, receives each graph as soon as it is traced and the dict keeps what it
    returns (e.g. the saved path) instead of the graph: a full-size UNet's two traces are then never held at once.

    A frozen model is converted on a float32 copy that shares its float32 tensors (no kernel timing: the graph
    ignores kernels).
    The graphs take the adapter's inputs, plus ``timestep_group`` (int64 [1]) when the model has
    several timestep groups.
    """
    denoiser = get_denoiser(model)
    quant_record(denoiser)
    work = _shared_copy(denoiser)
    if not is_converted(work):
        convert(work, backend="float", progress=False)
    plan = plan_groups(work)
    inputs = inputs or example_inputs(work)
    names = list(inputs)
    models = {}
    wanted = {g for g in graphs if g != "int" or plan.int_groups} | ({"float"} if plan.float_groups or not plan.int_groups else set())
    for graph in sorted(wanted, reverse=True):  # int first
        st = _State(plan, graph)
        extra = (torch.tensor([st.groups[0]]),) if plan.num_groups > 1 else ()
        with graph_mode(work, st), live_time_layers(work):
            traced = trace(FlatCall(work, names, st).eval(), names + [GROUP_INPUT] * bool(extra),
                           tuple(inputs.values()) + extra)
        models[graph] = traced if sink is None else sink(graph, traced)
        del traced
        if sink is not None:
            return_freed_memory()
    return models, plan


__all__ = ["GROUP_INPUT", "OUTPUT", "GroupPlan", "float_model", "hoist_attention_output_quantizers", "narrow_weight_codes", "plan_groups", "quantized_models", "trace"]
