"""diffquant.guard: NaN/Inf caught at the denoiser call where it appears, with its first layer and cause."""

from __future__ import annotations

import pytest
import torch

from diffquant.guard import NonFiniteError, diagnose, nonfinite_guard
from diffquant.models.tiny import tiny_unet


def _inputs(unet, t: float = 500.0) -> dict:
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return dict(sample=torch.randn(2, unet.config.in_channels, size, size, generator=g), timestep=torch.tensor(t),
                encoder_hidden_states=torch.randn(2, 4, unet.config.cross_attention_dim, generator=g))


def test_second_call_overflowing_names_step_layer_and_float32_cause():
    unet = tiny_unet()
    layer = unet.down_blocks[0].resnets[0].conv2
    calls = []

    def overflow_on_second_call(module, args, output):
        calls.append(1)
        return output * float("inf") if len(calls) >= 2 else output

    layer.register_forward_hook(overflow_on_second_call)
    with nonfinite_guard(unet, "sampling"), torch.no_grad():
        unet(**_inputs(unet, 900.0))
        with pytest.raises(NonFiniteError) as e:
            unet(**_inputs(unet, 450.0))
    message = str(e.value)
    assert "sampling step 2 (timestep 450.0)" in message and "first in the output of down_blocks.0.resnets.0.conv2" in message
    assert "float32 model's activations overflow" in message and "weights hold" not in message
    unet(**_inputs(unet))  # the guard is gone after the block: no raise, output non-finite


def test_causes_weights_half_and_quantized():
    unet = tiny_unet()
    assert "overflows; run in float32" in diagnose(unet.half())
    assert "quantized model diverges" in diagnose(unet.float(), layer="conv_in", quantized=True)
    assert "--keep-float 'conv_in'" in diagnose(unet, layer="conv_in", quantized=True)
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    assert "weights hold NaN/Inf (conv_in.weight)" in diagnose(unet, quantized=True)


def test_error_raised_inside_gets_the_diagnosis():
    unet = tiny_unet().half()
    with pytest.raises(NonFiniteError, match=r"NaN/Inf in the input of x at timestep 3: the float16 model overflows"):
        with nonfinite_guard(unet, "calibration", quantized=False):
            raise NonFiniteError("the input of x at timestep 3")
