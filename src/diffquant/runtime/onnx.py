"""ONNX export of a converted denoiser: QuantizeLinear/DequantizeLinear (Q/DQ) around every integer layer.

Each integer layer becomes ``QuantizeLinear(x, s_x, z_x) -> DequantizeLinear`` on its input,
``DequantizeLinear(int8 codes, per-channel s_w)`` on its weight, then the float Conv/MatMul: the
standard QDQ form that ONNX Runtime fuses into integer kernels where it can. The timestep group is
fixed at export (``group``); a model with several groups exports one file per group (OpenVINO serves all
groups from one graph: openvino.py). Layers that run in float (and timestep groups wider than 8 bits)
export their fake-quant arithmetic as float ops.

Dynamic activations (per token / per group, and the per-row softmax that follows them) compute their scales in
the graph, as fake quantization does (ReduceMin/ReduceMax per row), and quantize with ``QuantizeLinear`` /
``DequantizeLinear`` along the row axis (one scale and zero point per row: ``dynamic_qdq``). ONNX's
``DynamicQuantizeLinear`` does not fit: it computes one scale for the whole tensor, a coarser grid than the
model was evaluated with.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..learning import live_time_layers
from ..models.adapters import get_adapter
from ..quant import ActivationQuantizer
from ..quant.affine import fake_quantize, qrange
from ..wrap import get_denoiser, quant_record
from .flat import FlatCall, example_inputs
from .modules import IntLayer


@contextlib.contextmanager
def export_mode(denoiser: nn.Module, group: int):
    """Integer layers emit Q/DQ ops and every quantizer uses timestep group ``group``."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    record = quant_record(denoiser)
    layers = [m for m in denoiser.modules() if isinstance(m, IntLayer)]
    quantizers = [q for q in denoiser.modules() if isinstance(q, ActivationQuantizer) and q.mode == "quantize"]
    record.context.force(group)
    for m in layers:
        m.begin_export(group)
        if m.input_quantizer.dynamic:
            m.forward = _dynamic_layer_forward(m, group)
    for q in quantizers:  # constants instead of buffer lookups: the exporter cannot branch on tensor values
        q.forward = dynamic_qdq(q, group) if q.dynamic else _constant_fake_quant(q, group)
    try:
        yield
    finally:
        for q in quantizers:
            del q.forward
        for m in layers:
            m.__dict__.pop("forward", None)
            m.end_export()
        record.context.force(None)


def dynamic_qdq(q: ActivationQuantizer, group: int):
    """Export form of dynamic quantizer ``q`` in timestep group ``group``: each row's scale and zero point computed in
    the graph (``dynamic_qparams``), then per-row QuantizeLinear/DequantizeLinear (uint8, axis 0 of the rows: tokens,
    or tokens x channel groups); float ops over 8 bits or where groups differ in size."""
    bits = int(q.bits[group])
    qmin, qmax = (int(v) for v in qrange(bits, q.spec.symmetric, q.spec.unsigned))

    def forward(x: torch.Tensor) -> torch.Tensor:
        xm = x.float().movedim(q.channel_axis, -1)
        bounds = q.dynamic_bounds(xm.shape[-1])
        size = bounds[0][1] - bounds[0][0]
        if bits > 8 or any(b - a != size for a, b in bounds):
            return q.fake_quant(x, group)
        rows = xm.reshape(-1, size)
        scale, zero_point = q.dynamic_qparams(rows, bits)
        scale, zero_point = scale[:, 0], (zero_point[:, 0] - qmin).to(torch.int64)
        qd = torch.ops.quantized_decomposed
        codes = qd.quantize_per_channel(rows, scale, zero_point, 0, 0, qmax - qmin, torch.uint8)
        x_hat = qd.dequantize_per_channel(codes, scale, zero_point, 0, 0, qmax - qmin, torch.uint8)
        return x_hat.reshape(xm.shape).movedim(-1, q.channel_axis).to(x.dtype)

    return forward


def _dynamic_layer_forward(layer: IntLayer, group: int):
    """Export form of an integer layer with dynamic inputs: per-row Q/DQ of the input, then each block's int8-weight
    DequantizeLinear and float op (``IntLayer.qdq_op``)."""
    qdq = dynamic_qdq(layer.input_quantizer, group)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_hat, out = qdq(x), None
        for i, (c0, c1, _, _) in enumerate(layer.blocks()):
            xb = x_hat if (c0, c1) == (0, layer.weight_shape[1]) else layer.channels(x_hat, c0, c1)
            y = layer.qdq_op(i, xb, layer.bias if out is None else None)
            out = y if out is None else out + y
        return out.to(x.dtype)

    return forward


def _constant_fake_quant(q: ActivationQuantizer, group: int):
    """``q``'s fake quantization for one timestep group with its parameters as Python numbers: a
    QuantizeLinear/DequantizeLinear pair (uint8 grid) when it fits 8 bits and one scale, else float ops."""
    bits = int(q.bits[group])
    qmin, qmax = (int(v) for v in qrange(bits, q.spec.symmetric, q.spec.unsigned))
    scale = q.scale[group].detach().clone()
    zero_point = q.zero_point[group].detach().clone()
    if bits <= 8 and q.seg_index is None:
        s, zp, top = float(scale[0]), int(round(float(zero_point[0]))) - qmin, qmax - qmin

        def qdq(x: torch.Tensor) -> torch.Tensor:
            qd = torch.ops.quantized_decomposed
            codes = qd.quantize_per_tensor(x.float(), s, zp, 0, top, torch.uint8)
            return qd.dequantize_per_tensor(codes, s, zp, 0, top, torch.uint8).to(x.dtype)

        return qdq

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        s, z = scale[0], zero_point[0]
        if q.seg_index is not None:
            shape[q.channel_axis] = x.shape[q.channel_axis]
            s, z = scale[q.seg_index].reshape(shape), zero_point[q.seg_index].reshape(shape)
        return fake_quantize(x.float(), s, z, qmin, qmax).to(x.dtype)

    return forward


def export_onnx(
    model: Any, path: str | Path, *, group: int | None = None, inputs: dict[str, torch.Tensor] | None = None,
    batch: int = 2, seq_len: int = 77, opset: int = 18, dynamic: bool = True,
) -> Path:
    """Write the (converted) denoiser of ``model`` to ``path`` as ONNX with Q/DQ nodes; returns the path.

    Any family an adapter knows exports (UNets, SD3/3.5, Flux, PixArt, SANA; tests/test_families.py): the graph's
    inputs are the adapter's named tensors (``inputs``; default: its example inputs at ``batch`` and ``seq_len``
    tokens), output ``noise_pred``. With ``dynamic`` the batch dimension is symbolic (the first axis of every input
    but the adapter's ``unbatched_inputs``) where the family allows it (``dynamic_batch_export``: not PixArt and
    SANA, which keep the traced batch); latent size and sequence length stay as traced (shape-dependent Python
    branches pin them). Attention matmul inputs of <= 8 bits are Q/DQ pairs too.
    """
    denoiser = get_denoiser(model)
    record = quant_record(denoiser)
    groups = len(record.groups)
    if group is None:
        if groups > 1:
            raise ValueError(f"this model has {groups} timestep groups; export one with --group 0..{groups - 1}")
        group = 0
    if not 0 <= group < groups:
        raise ValueError(f"--group {group} out of range 0..{groups - 1}")
    if not any(isinstance(m, IntLayer) for m in denoiser.modules()):
        raise ValueError("the model is not converted; run diffquant.convert (or `quantize --convert`) before exporting")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = inputs or example_inputs(denoiser, batch=batch, seq_len=seq_len)
    dtype = next(denoiser.parameters()).dtype
    tensors = tuple(v.to(dtype) if v.is_floating_point() else v for v in inputs.values())
    adapter = get_adapter(denoiser, warn=False)
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({} if name in adapter.unbatched_inputs else {0: batch_dim} for name in inputs) \
        if dynamic and adapter.dynamic_batch_export else None
    tmp = path.with_name(f".{path.name}.partial")
    with export_mode(denoiser, group), live_time_layers(denoiser), torch.no_grad():
        program = torch.onnx.export(
            FlatCall(denoiser, list(inputs)).eval(), tensors, input_names=list(inputs), output_names=["noise_pred"],
            opset_version=opset, dynamo=True, dynamic_shapes=(shapes,) if shapes else None,  # forward(*tensors)
        )
    _drop_noop_squeezes(program.model.graph)
    program.save(str(tmp), external_data=_needs_external_data(denoiser))
    for extra in tmp.parent.glob(f"{tmp.name}.data"):
        extra.replace(path.with_name(f"{path.name}.data"))
    tmp.replace(path)
    return path


def _drop_noop_squeezes(graph: Any) -> int:
    """Remove ``Squeeze`` nodes whose axis is not of size 1 in the traced shapes; returns how many.

    torch's ``squeeze(dim)`` is a no-op when that axis is not 1 (diffusers' ``BasicTransformerBlock`` squeezes the token
    axis after adaLN-single: PixArt, 16+ tokens), but the exporter writes an ONNX ``Squeeze``, which ONNX Runtime
    refuses to load ("Dimension of input 1 must be 1"). Axes of unknown size are left alone."""
    import onnx_ir as ir

    dropped = 0
    for node in list(graph):
        if node.op_type != "Squeeze" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        data, axes = node.inputs[0], node.inputs[1]
        shape, value = data.shape if data is not None else None, axes.const_value if axes is not None else None
        if shape is None or value is None or node.outputs[0].is_graph_output():
            continue
        dims = [shape[int(a) % len(shape)] for a in value.numpy().reshape(-1)]
        if dims and all(isinstance(d, int) and d != 1 for d in dims):
            ir.convenience.replace_all_uses_with(node.outputs[0], data)
            graph.remove(node, safe=True)
            dropped += 1
    return dropped


def _needs_external_data(denoiser: nn.Module) -> bool:
    """Protobuf files stop at 2 GiB; larger models keep their weights beside the graph."""
    size = sum(t.numel() * t.element_size() for t in list(denoiser.parameters()) + list(denoiser.buffers()))
    return size > 1.5 * 2**30


__all__ = ["dynamic_qdq", "export_mode", "export_onnx"]
