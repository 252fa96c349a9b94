"""The low-rank float branch (``QuantConfig.lowrank_rank``, SVDQuant) and W4A4 end to end (issue 19)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffquant
from diffquant import QuantConfig
from diffquant.bits import layer_bits
from diffquant.nn import QuantLinear, quantized_layers, unwrap_layer
from diffquant.nn.lowrank import attach_branch, branch_bits
from diffquant.quant import QuantSpec
from diffquant.runtime import IntConv2d, IntLinear, convert
from diffquant.wrap import get_denoiser

from tinyutil import calibration_config, quantized_copy, rel_err, sample_latents, unet_inputs


def quantized(tiny_pipes, family: str = "sd", **cfg):
    """A copy of a tiny pipeline quantized with RTN (W4A8, a rank-4 branch by default) under ``cfg`` (each configuration once per run)."""
    return quantized_copy(tiny_pipes, family, dict(wbits=4, abits=8, lowrank_rank=4, act_group_size=16,
                                                       calibration=calibration_config(num_prompts=2, num_inference_steps=3)), **cfg)


def outlier_layer(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """A Linear whose weight is noise plus a strong rank-2 part, and inputs with a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(0.05 * torch.randn(48, 64, generator=g) + torch.randn(48, 2, generator=g) @ torch.randn(2, 64, generator=g))
    x = torch.randn(256, 64, generator=g)
    x[:, :3] *= 30.0  # outlier channels
    return layer, x


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel_smooth"])
def test_branch_reduces_a_layers_error_at_the_same_bits(granularity):
    layer, x = outlier_layer()
    reference = layer(x).detach()
    errors = {}
    for rank in (0, 4):
        q = QuantLinear.from_float(copy.deepcopy(layer), QuantSpec(bits=4), QuantSpec(bits=4, symmetric=False, granularity=granularity),
                                   None)
        if rank:
            attach_branch(q, rank)
            assert q.lowrank.rank == rank and branch_bits(q) == 16 * rank * (64 + 48) / (64 * 48)
        q.set_state("calibrating")
        q(x)
        q.set_state("frozen")
        with torch.no_grad():
            errors[rank] = rel_err(q(x), reference)
    assert errors[4] < 0.5 * errors[0], errors


def test_branch_is_exact_in_float_and_unwraps_to_the_float_weight(tiny_pipes):
    unet = copy.deepcopy(tiny_pipes["sd"].unet)
    reference = copy.deepcopy(unet)
    diffquant.wrap.wrap_denoiser(unet, QuantConfig(wbits=4, lowrank_rank=4))
    branched = {n: m for n, m in quantized_layers(unet).items() if getattr(m, "lowrank", None) is not None}
    assert len(branched) > 20
    name, layer = next(iter(branched.items()))
    original = reference.get_submodule(name).weight
    assert not torch.allclose(layer.weight, original)  # the weight is the residual now
    with torch.no_grad():  # wrapped, nothing quantized yet: residual + branch is the float layer
        out, ref = unet(**unet_inputs())[0], reference(**unet_inputs())[0]
    assert rel_err(out, ref) < 1e-5
    assert torch.allclose(unwrap_layer(unet, name).weight, original, atol=1e-5)


def test_save_load_is_bit_exact_with_the_branch(tiny_pipes, tmp_path):
    pipe = quantized(tiny_pipes, lowrank_layers=["down_blocks.*", "mid_block.*"])
    branched = [n for n, m in quantized_layers(pipe.unet).items() if getattr(m, "lowrank", None) is not None]
    assert branched and all(n.startswith(("down_blocks.", "mid_block.")) for n in branched)
    diffquant.save(pipe, tmp_path / "q")
    loaded = diffquant.load(tmp_path / "q")
    inputs = unet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.unet(**inputs)[0], pipe.unet(**inputs)[0])
    assert torch.equal(loaded.unet.get_submodule(branched[0]).lowrank.up, pipe.unet.get_submodule(branched[0]).lowrank.up)
    # The branch's 16-bit parameters count in the average weight bits, in the saved figure and the bench's.
    bits = diffquant.average_bits(loaded.unet)["weight_bits"]
    assert 4.0 < bits < 16.0
    assert layer_bits(loaded.unet)[branched[0]][0] == pytest.approx(4.0 + branch_bits(pipe.unet.get_submodule(branched[0])))


def test_converted_layers_match_fake_quant_with_the_branch(tiny_pipes, tmp_path):
    """The torch runtime runs the float branch beside the integer GEMM: per layer, fake quant's output (tolerance of
    tests/test_runtime.py); the converted model saves and reloads bit-exactly."""
    pipe = quantized(tiny_pipes, quantize_attention=False)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n, m in pipe.unet.named_modules() if getattr(m, "lowrank", None) is not None]
    with torch.no_grad():
        pipe.unet(**unet_inputs())
    for h in hooks:
        h.remove()
    converted = convert(copy.deepcopy(pipe), backend="int_mm", progress=False)
    assert len(seen) > 20
    for name, (x, ref) in seen.items():
        layer = converted.unet.get_submodule(name)
        assert isinstance(layer, (IntLinear, IntConv2d)) and layer.lowrank is not None, name
        with torch.no_grad():
            assert rel_err(layer(x), ref) < 1e-3, name
    diffquant.save(converted, tmp_path / "c")
    loaded = diffquant.load(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(loaded.unet(**unet_inputs())[0], converted.unet(**unet_inputs())[0])


def test_openvino_layer_form_adds_the_branch(tiny_pipes):
    """The OpenVINO int graph's form of a converted layer with a branch, run in torch, gives the converted layer's output."""
    from diffquant.runtime.modules import IntLayer
    from diffquant.runtime.ovgraph import _int_layer_forward, _State, plan_groups

    work = convert(quantized(tiny_pipes), backend="float", progress=False).unet
    st = _State(plan_groups(work), "int")
    errors = []
    hooks = [m.register_forward_hook(lambda layer, args, out: errors.append(rel_err(_int_layer_forward(layer, st)(args[0]), out)))
             for m in work.modules() if isinstance(m, IntLayer) and m.lowrank is not None]
    with torch.no_grad():
        work(**unet_inputs())
    for h in hooks:
        h.remove()
    assert len(errors) > 20 and max(errors) < 1e-3


@pytest.mark.parametrize("family", [pytest.param("sd", marks=pytest.mark.slow), "sd3"])  # sd: ~25 s
def test_w4a4_end_to_end(tiny_pipes, family):
    """W4A4 quantizes, samples and converts on the tiny SD and SD3 models, with the branch, dynamic per-group
    activations and timestep groups; the branch and the finer scales each bring it closer to float."""
    reference = sample_latents(tiny_pipes[family])
    errors = {}
    for rank, granularity in ((0, "per_tensor"), (8, "per_tensor"), (8, "per_group")):
        pipe = quantized(tiny_pipes, family, abits=4, lowrank_rank=rank, act_granularity=granularity, timestep_groups=2)
        latents = sample_latents(pipe)
        assert torch.isfinite(latents).all()
        errors[(rank, granularity)] = rel_err(latents, reference)
    assert errors[(8, "per_tensor")] < errors[(0, "per_tensor")] and errors[(8, "per_group")] < errors[(8, "per_tensor")], errors
    assert diffquant.quant_record(get_denoiser(pipe)).config.label == "rtn-w4a4-per_group-r8"
    converted = convert(pipe, progress=False)
    latents = sample_latents(converted)
    assert torch.isfinite(latents).all() and rel_err(latents, reference) < 2 * errors[(8, "per_group")] + 0.05


def test_config_refuses_a_negative_rank():
    with pytest.raises(ValueError, match="lowrank_rank must be >= 0"):
        QuantConfig(lowrank_rank=-1)
    assert QuantConfig(lowrank_rank=16, wbits=4).label == "rtn-w4a8-r16"


def test_bench_refuses_a_bad_rank_list():
    from diffquant.evaluation.bench import parse_ranks

    assert parse_ranks("0, 8,16") == [0, 8, 16]
    for bad in ("8,x", "-1", ""):
        with pytest.raises(ValueError, match="bad --lowrank-rank"):
            parse_ranks(bad)
