"""Half-precision calibration (``torch_dtype``) and the one-weight-copy frozen model (issue 15 items 1, 2)."""

from __future__ import annotations

import copy

import pytest
import torch
from tinyutil import PROMPTS, calibration_config, sample_latents

import diffquant
from diffquant import QuantConfig, quantized_layers
from diffquant.models.tiny import tiny_unet
from diffquant.quant.affine import fake_quantize
from diffquant.wrap import wrap_denoiser

SMALL = dict(num_inference_steps=2, height=16, width=16)
OPTIONS = {
    "rtn": {},
    "qdiffusion": dict(every_k=2, iterations=1, act_iterations=1, batch_size=2),
    "pcr": dict(sensitivity_prompts=1),
    "emf": dict(steps_per_prompt=1, iterations=2, batch_size=2, feature_weight=0.0, weight_training="full"),
}
SENSITIVE = {"sd": ["down_blocks.0.resnets.0.conv1"], "sd3": ["transformer_blocks.0.ff.net.2"]}


SLOW = {("sd", "qdiffusion"), ("sd", "pcr")}  # 12-15 s each at one thread; their SD3 runs stay in the fast set


@pytest.mark.parametrize("family,method", [
    pytest.param(f, m, marks=[pytest.mark.slow] if (f, m) in SLOW else []) for f in ("sd", "sd3") for m in OPTIONS
])
def test_bfloat16_calibration_end_to_end(tiny_pipes, family, method, tmp_path):
    pipe = copy.deepcopy(tiny_pipes[family])
    cfg = QuantConfig(method=method, wbits=8, abits=8, quantize_attention=family == "sd3",
                      calibration=calibration_config(num_prompts=1, num_inference_steps=2, height=16, width=16, batch_size=1),
                      options={**OPTIONS[method], **({"sensitive_layers": SENSITIVE[family]} if method == "emf" else {})})
    diffquant.quantize(pipe, cfg, calibration=PROMPTS[:1], progress=False, torch_dtype=torch.bfloat16)
    denoiser = diffquant.get_denoiser(pipe)
    layers = quantized_layers(denoiser)
    assert diffquant.nn.states(denoiser) == {"frozen": len(layers)}
    assert all(p.dtype == torch.bfloat16 for n, p in denoiser.named_parameters() if not n.endswith("scale"))
    scales = [p for n, p in denoiser.named_parameters() if n.endswith("scale")]
    assert scales and all(p.dtype == torch.float32 for p in scales)  # quantizer parameters stay float32
    out = sample_latents(pipe, PROMPTS[:1], **SMALL)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    if method == "rtn":  # integer codes of bfloat16 grid values reload bit-exactly
        loaded = diffquant.load(diffquant.save(pipe, tmp_path / "q"))
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(sample_latents(loaded, PROMPTS[:1], **SMALL), out)


def test_bad_dtype_is_one_line_error(tiny_pipes):
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        diffquant.quantize(copy.deepcopy(tiny_pipes["sd"]), QuantConfig(abits=None), torch_dtype=torch.int8)


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_frozen_model_holds_one_weight_copy_and_outputs_explicit_fake_quant():
    torch.manual_seed(0)
    unet = tiny_unet()
    unet.__init__(**{**unet.config, "block_out_channels": (64, 128), "layers_per_block": 2})  # mid-sized: ~5M parameters
    float_bytes = _bytes(unet)
    floats = {n: p.detach().clone() for n, p in unet.named_parameters()}
    wrap_denoiser(unet, QuantConfig(wbits=4, abits=None, weight_granularity="per_channel"))
    layers = quantized_layers(unet)
    expected = {}
    for name, m in layers.items():
        q = m.weight_quantizer
        scale, zero_point = q.expanded_scale(), q.zero_point[:, q.seg_index]
        w2 = floats[f"{name}.weight"].reshape(q.weight_shape[0], -1)
        expected[name] = fake_quantize(w2, scale, zero_point, q.qmin, q.qmax).reshape(q.weight_shape)
    diffquant.set_state(unet, "frozen")

    assert _bytes(unet) <= 1.1 * float_bytes, (_bytes(unet), float_bytes)
    for name, m in layers.items():
        assert torch.equal(m.weight, expected[name]), name
        hidden = [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]  # no cache outside params/buffers
        assert not hidden, (name, hidden)
    plain = tiny_unet()
    plain.__init__(**{**plain.config, "block_out_channels": (64, 128), "layers_per_block": 2})
    plain.load_state_dict({**floats, **{f"{n}.weight": w for n, w in expected.items()}})
    x, t, e = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 6, 32)
    with torch.no_grad():
        assert torch.equal(unet(x, t, e).sample, plain(x, t, e).sample)
    diffquant.set_state(unet, "frozen")  # re-freezing is the identity
    assert all(torch.equal(m.weight, expected[n]) for n, m in layers.items())
