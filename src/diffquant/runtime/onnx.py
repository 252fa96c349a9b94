"""ONNX export of a converted denoiser: QuantizeLinear/DequantizeLinear (Q/DQ) around every integer layer.

Each integer layer becomes ``QuantizeLinear(x, s_x, z_x) -> DequantizeLinear`` on its input,
``DequantizeLinear(int8 codes, per-channel s_w)`` on its weight, then the float Conv/MatMul: the
standard QDQ form that ONNX Runtime fuses into integer kernels where it can. The timestep group is
fixed at export (``group``); a model with several groups exports one file per group. Layers that
run in float (and timestep groups wider than 8 bits) export their fake-quant arithmetic as float ops.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant import ActivationQuantizer
from ..quant.affine import fake_quantize, qrange
from ..wrap import get_denoiser, quant_record
from .modules import _IntLayer


class _UNetCall(nn.Module):
    """``unet(sample, timestep, encoder_hidden_states)`` as a plain positional module for the exporter."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


@contextlib.contextmanager
def export_mode(denoiser: nn.Module, group: int):
    """Integer layers emit Q/DQ ops and every quantizer uses timestep group ``group``."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    record = quant_record(denoiser)
    layers = [m for m in denoiser.modules() if isinstance(m, _IntLayer)]
    quantizers = [q for q in denoiser.modules() if isinstance(q, ActivationQuantizer) and q.mode == "quantize"]
    record.context.force(group)
    for m in layers:
        m.begin_export(group)
    for q in quantizers:  # constants instead of buffer lookups: the exporter cannot branch on tensor values
        q.forward = _constant_fake_quant(q, group)
    try:
        yield
    finally:
        for q in quantizers:
            del q.forward
        for m in layers:
            m.end_export()
        record.context.force(None)


def _constant_fake_quant(q: ActivationQuantizer, group: int):
    """``q``'s fake quantization for one timestep group with its parameters as Python numbers."""
    bits = int(q.bits[group])
    qmin, qmax = (int(v) for v in qrange(bits, q.spec.symmetric, q.spec.unsigned))
    scale = q.scale[group].detach().clone()
    zero_point = q.zero_point[group].detach().clone()

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        s, z = scale[0], zero_point[0]
        if q.seg_index is not None:
            shape[q.channel_axis] = x.shape[q.channel_axis]
            s, z = scale[q.seg_index].reshape(shape), zero_point[q.seg_index].reshape(shape)
        return fake_quantize(x.float(), s, z, qmin, qmax).to(x.dtype)

    return forward


def example_unet_inputs(denoiser: nn.Module, batch: int = 2, seq_len: int = 77, size: int | None = None) -> tuple:
    """(sample, timestep, encoder_hidden_states) for a UNet2DConditionModel from its config."""
    cfg = denoiser.config
    size = size or cfg.sample_size
    dtype = next(denoiser.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(dtype)
    context = torch.randn(batch, seq_len, cfg.cross_attention_dim, generator=g).to(dtype)
    return sample, torch.tensor(500.0), context


def export_onnx(
    model: Any, path: str | Path, *, group: int | None = None, inputs: tuple | None = None, opset: int = 18
) -> Path:
    """Write the (converted) denoiser of ``model`` to ``path`` as ONNX with Q/DQ nodes; returns the path.

    ``inputs`` = (sample, timestep, encoder_hidden_states) fixes the traced shapes (default: batch 2,
    77 tokens, the config's sample size). Only ``UNet2DConditionModel`` (SD 1.x/2.x) is supported.
    """
    denoiser = get_denoiser(model)
    record = quant_record(denoiser)
    if type(denoiser).__name__ != "UNet2DConditionModel" or getattr(denoiser.config, "addition_embed_type", None):
        raise ValueError(f"ONNX export supports SD 1.x/2.x UNets; {type(denoiser).__name__} with added conditioning is not supported yet")
    groups = len(record.groups)
    if group is None:
        if groups > 1:
            raise ValueError(f"this model has {groups} timestep groups; export one with --group 0..{groups - 1}")
        group = 0
    if not 0 <= group < groups:
        raise ValueError(f"--group {group} out of range 0..{groups - 1}")
    if not any(isinstance(m, _IntLayer) for m in denoiser.modules()):
        raise ValueError("the model is not converted; run diffquant.convert (or `quantize --convert`) before exporting")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = inputs or example_unet_inputs(denoiser)
    tmp = path.with_name(f".{path.name}.partial")
    with export_mode(denoiser, group), torch.no_grad():
        program = torch.onnx.export(
            _UNetCall(denoiser).eval(), inputs, input_names=["sample", "timestep", "encoder_hidden_states"],
            output_names=["noise_pred"], opset_version=opset, dynamo=True,
        )
    program.save(str(tmp), external_data=_needs_external_data(denoiser))
    for extra in tmp.parent.glob(f"{tmp.name}.data"):
        extra.replace(path.with_name(f"{path.name}.data"))
    tmp.replace(path)
    return path


def _needs_external_data(denoiser: nn.Module) -> bool:
    """Protobuf files stop at 2 GiB; larger models keep their weights beside the graph."""
    size = sum(t.numel() * t.element_size() for t in list(denoiser.parameters()) + list(denoiser.buffers()))
    return size > 1.5 * 2**30


__all__ = ["example_unet_inputs", "export_mode", "export_onnx"]
