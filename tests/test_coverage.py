"""Coverage and average bits (diffquant.bits, the one convention): hand-computed answers, the same function on
diffquant and peer models, ``diffquant.average_bits`` on fake-quant and converted models, and ``--layers`` selecting
what is quantized."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffquant
from diffquant import CalibrationConfig, QuantConfig
from diffquant.bits import count_table, coverage, layer_bits, own_table
from diffquant.models.adapters import get_adapter
from diffquant.models.tiny import tiny_sd_pipeline
from diffquant.wrap import wrap_denoiser


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(8, 8, bias=False))


# Layer 0: 128 weights, 16*8 = 128 MACs per row; layer 1: 64 weights, 64 MACs. Quantizing layer 0 alone at W8A8:
# quantized weights 128/192, quantized MACs 128/192, bits (128*8 + 64*32)/192 = 16 for weights and for activations.
HAND = {"weight_coverage": 2 / 3, "mac_coverage": 2 / 3, "avg_wbits": 16.0, "avg_abits": 16.0}


def _check(denoiser, table):
    got = coverage(table, denoiser)
    assert got == pytest.approx(HAND), got


def test_half_the_layers_quantized_gives_the_hand_fractions_for_diffquant():
    from diffquant.nn import QuantLinear
    from diffquant.quant import TimestepContext, TimestepGroups

    x = torch.randn(3, 16)
    model = _toy()
    table = count_table(model, lambda: model(x))
    assert table.weight_numel == {"0": 128, "1": 64} and table.macs == {"0": 3 * 128, "1": 3 * 64}
    cfg = QuantConfig(wbits=8, abits=8)
    model[0] = QuantLinear.from_float(model[0], cfg.weight_spec(), cfg.act_spec(), TimestepContext(TimestepGroups.uniform(1, 1000)), 1)
    assert layer_bits(model) == {"0": (8.0, 8.0)}
    _check(model, table)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_scales_count_in_the_weight_bits(symmetric):
    """A 16x8 Linear at W4 in groups of 4 inputs: 4 groups per row, each a 16-bit scale (and zero point)."""
    from diffquant.nn import QuantLinear
    from diffquant.quant import TimestepContext, TimestepGroups

    cfg = QuantConfig(wbits=4, abits=8, weight_granularity="per_group", group_size=4, weight_symmetric=symmetric)
    model = _toy()
    model[0] = QuantLinear.from_float(model[0], cfg.weight_spec(), cfg.act_spec(), TimestepContext(TimestepGroups.uniform(1, 1000)), 1)
    assert layer_bits(model)["0"][0] == 4.0 + 16 / 4 * (1 if symmetric else 2)


def test_same_function_on_peer_quantized_models():
    """optimum-quanto W8A8 and torchao int8 dynamic on layer 0 only: the same hand answer as diffquant's."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import freeze, qint8, quantize

    x = torch.randn(3, 16)
    model = _toy()
    table = count_table(model, lambda: model(x))
    quantize(model, weights=qint8, activations=qint8, include="0")
    freeze(model)
    _check(model, table)

    pytest.importorskip("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = _toy()
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, name: name == "0")
    _check(model, table)
    # Weight-only: the weights count, the MACs do not (they run in float on dequantized weights).
    model = _toy()
    quantize(model, weights=qint8, include="0")
    got = coverage(table, model)
    assert got["weight_coverage"] == pytest.approx(2 / 3) and got["mac_coverage"] == 0 and got["avg_abits"] == 32


def test_bitsandbytes_int8_on_cpu_counts_as_weight_only():
    """bnb LLM.int8 runs the input in float through the dequantized weight on a CPU: its MACs are not quantized."""
    pytest.importorskip("bitsandbytes")
    from diffquant.evaluation.peers import _bitsandbytes

    x = torch.randn(3, 16) * 3
    model = _toy()
    table = count_table(model, lambda: model(x))
    _bitsandbytes(model, four_bit=False)
    y, w = model[0](x), model[0].weight
    scales = w.SCB if w.SCB is not None else model[0].state.SCB  # where it lives depends on the bitsandbytes version
    assert torch.allclose(y, x @ (w.float() * scales.view(-1, 1) / 127).t(), atol=1e-5)
    got = coverage(table, model)
    assert got["weight_coverage"] == 1 and got["mac_coverage"] == 0 and got["avg_wbits"] == 8 and got["avg_abits"] == 32


def test_average_bits_counts_the_float_models_table_on_fake_quant_and_converted_models():
    """A quantized denoiser (wrapped, frozen or converted) has the float one's parameters and MACs, and
    ``average_bits`` is :func:`coverage` with that table: W8A8 with every MAC quantized at 8 bits."""
    pipe = tiny_sd_pipeline(0)
    float_unet = copy.deepcopy(pipe.unet)
    adapter = get_adapter(float_unet)
    table = count_table(float_unet, lambda: adapter.call(adapter.example_inputs(batch=1)))
    assert table.attention and all(table.macs[k] > 0 for k in table.attention)
    cfg = QuantConfig(wbits=8, abits=8, calibration=CalibrationConfig(num_prompts=1, num_inference_steps=2, height=32, width=32))
    wrapped = copy.deepcopy(float_unet)
    wrap_denoiser(wrapped, cfg)
    diffquant.set_state(wrapped, "calibrating")
    with pytest.raises(ValueError, match="after diffquant.quantize"):  # its call would be observed
        own_table(wrapped)
    diffquant.quantize(pipe, cfg, calibration=["a red circle"], progress=False)
    converted = diffquant.convert(copy.deepcopy(pipe)).unet
    for unet in (pipe.unet, converted):
        assert own_table(unet) == table
        got, c = diffquant.average_bits(unet), coverage(table, unet)
        assert got == {"weight_bits": c["avg_wbits"], "activation_bits": c["avg_abits"],
                       "weight_coverage": c["weight_coverage"], "mac_coverage": c["mac_coverage"]}
        quantized = sum(n for name, n in table.weight_numel.items() if name in diffquant.quantized_layers(unet))
        assert got["weight_bits"] == pytest.approx((8 * quantized + 32 * (table.total_numel - quantized)) / table.total_numel)
        assert got["mac_coverage"] == 1 and got["activation_bits"] == 8


def test_layers_linear_leaves_convs_and_attention_float_with_the_reason(tmp_path):
    pipe = tiny_sd_pipeline(0)
    calib = CalibrationConfig(num_prompts=1, num_inference_steps=2, height=32, width=32)
    cfg = QuantConfig(wbits=8, abits=8, layers="linear", calibration=calib)
    assert QuantConfig.from_json(cfg.to_json()).layers == "linear"  # serialised with the config
    assert cfg.label == "rtn-w8a8-linear" and QuantConfig(wbits=8, abits=8).label == "rtn-w8a8"  # bench rows say it
    names = QuantConfig(wbits=8, abits=None, layers="down_blocks.0.resnets.0.conv1,down_blocks.0.resnets.0.conv2").label
    assert names.startswith("rtn-w8af-layers") and len(names) == len("rtn-w8af-layers") + 6  # a name list: a digest
    diffquant.quantize(pipe, cfg, calibration=["a red circle"], progress=False)
    unet = pipe.unet
    reasons = diffquant.quant_record(unet).float_layers
    convs = [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(reasons[n] == "outside --layers" for n in convs)
    assert all(isinstance(m, nn.Linear) for n, m in diffquant.quantized_layers(unet).items())  # no processors either
    attention = [n for n in reasons if reasons[n].startswith("attention matmuls")]
    assert attention and all(not hasattr(unet.get_submodule(n).processor, "activation_quantizers") for n in attention)
    linear = sum(m.weight.numel() for m in unet.modules() if type(m).__name__ == "QuantLinear")
    total = sum(p.numel() for n, p in unet.named_parameters() if "quantizer" not in n)
    from diffquant.evaluation.coverage import layer_table
    from diffquant.sampling import SamplingSettings

    table = layer_table(tiny_sd_pipeline(0), SamplingSettings(steps=2, guidance=5.0, height=32, width=32))
    got = coverage(table, unet)
    assert got["weight_coverage"] == pytest.approx(linear / total)
    assert got["avg_wbits"] == pytest.approx((8 * linear + 32 * (total - linear)) / total)
    assert 0 < got["mac_coverage"] < 1
    diffquant.save(pipe, tmp_path / "q")  # the selection is saved with the model and restored by load
    loaded = diffquant.load(tmp_path / "q").unet
    assert diffquant.quant_record(loaded).config.layers == "linear" and layer_bits(loaded) == layer_bits(unet)
    with pytest.raises(ValueError, match="--layers"):
        QuantConfig(layers=" , ")


def test_layer_patterns_and_keywords_select_the_union():
    from diffquant.models.adapters import get_adapter
    from diffquant.wrap import selected_layers

    adapter = get_adapter(copy.deepcopy(tiny_sd_pipeline(0).unet))
    layers, attention = selected_layers(adapter, ["conv", "mid_block.*"])
    assert "conv_in" in layers and "mid_block.attentions.0.proj_in" in layers
    assert any(n.startswith("mid_block") for n in attention) and not any(n.startswith("down") for n in attention)
    layers, attention = selected_layers(adapter, ["attention"])
    assert layers and all(".attn" in n for n in layers) and len(attention) == len(adapter.attention_modules())
    with pytest.raises(ValueError, match="'dwn_blocks.*' matches no layer"):
        selected_layers(adapter, ["linear", "dwn_blocks.*"])


def test_quanto_norms_without_weights_fingerprint_and_size():
    """quanto's frozen LayerNorm without affine weights puts None in the state dict (mini-sd3's peer row failed on
    it): the image-cache fingerprint and the shipped size skip the missing part, and weights still count."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import freeze, qint8, quantize

    from diffquant.evaluation.paired import model_fingerprint
    from diffquant.evaluation.peers import saved_size_bytes

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = torch.nn.LayerNorm(16, elementwise_affine=False), torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(self.norm(x))

    class Pipe:  # the part of a pipeline model_fingerprint reads
        def __init__(self, unet):
            self.components = {"unet": unet}

    model = Block()
    before = model_fingerprint(Pipe(model))
    quantize(model, weights=qint8, activations=qint8)
    freeze(model)
    assert any(v is None for v in model.state_dict().values())
    assert model_fingerprint(Pipe(model)) != before
    assert saved_size_bytes(model) >= 16 * 16  # the int8 weight codes are in the file
