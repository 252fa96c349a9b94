"""Quantizer math: grids, granularity, observers, STE, timestep groups, split inputs."""

from __future__ import annotations

import pytest
import torch

from diffquant.quant import ActivationQuantizer, QuantSpec, TimestepContext, TimestepGroups, WeightQuantizer, fake_quantize
from diffquant.quant.affine import qparams_from_range, qrange
from diffquant.quant.observers import estimate_qparams


def test_fake_quantize_matches_hand_computation():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.5, 2.0])
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), 3, symmetric=True)
    assert scale.item() == pytest.approx(1.0 / 3)  # 3 bits signed: levels -4..3, amax/3
    out = fake_quantize(x, scale, zp, *qrange(3, True))
    expected = torch.tensor([-1.0, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0])  # 2.0 clips to 3 * scale
    assert torch.allclose(out, expected)


def test_asymmetric_grid_represents_zero_and_range():
    lo, hi = torch.tensor(-0.5), torch.tensor(1.5)
    scale, zp = qparams_from_range(lo, hi, 8, symmetric=False)
    assert zp.item() == round(0.5 / scale.item())
    x = torch.linspace(-0.5, 1.5, 101)
    err = (fake_quantize(x, scale, zp, *qrange(8, False)) - x).abs().max()
    assert err <= scale / 2 + 1e-6
    assert fake_quantize(torch.zeros(1), scale, zp, *qrange(8, False)).item() == 0.0


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_bits_out_of_range_rejected(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 16"):
        QuantSpec(bits=bits)


def test_ste_passes_gradients_inside_range_only():
    x = torch.tensor([0.1, 0.4, 5.0], requires_grad=True)
    scale = torch.tensor(0.25, requires_grad=True)
    out = fake_quantize(x, scale, torch.tensor(0.0), *qrange(4, True))
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]
    assert scale.grad is not None and scale.grad.item() != 0.0


def test_weight_granularities_error_ordering():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.logspace(-2, 0, 16)[:, None]
    errors = {}
    for gran in ("per_tensor", "per_channel", "per_group"):
        q = WeightQuantizer(QuantSpec(bits=4, granularity=gran, group_size=32), w.shape)
        q.calibrate(w)
        errors[gran] = (q(w) - w).pow(2).mean().item()
    assert errors["per_group"] < errors["per_channel"] < errors["per_tensor"]
    q = WeightQuantizer(QuantSpec(bits=4, granularity="per_group", group_size=32), w.shape)
    assert q.scale.shape == (16, 8)


def test_mse_and_percentile_observers_beat_minmax_on_outliers():
    torch.manual_seed(0)
    x = torch.randn(1, 20000)
    x[0, :5] = 40.0  # a few outliers stretch the min/max range
    errors = {}
    for obs in ("minmax", "percentile", "mse"):
        spec = QuantSpec(bits=4, symmetric=True, observer=obs, percentile=99.9)
        scale, zp = estimate_qparams(x, spec)
        errors[obs] = (fake_quantize(x, scale[:, None], zp[:, None], *qrange(4, True)) - x).pow(2).mean().item()
    assert errors["mse"] < errors["minmax"]
    assert errors["percentile"] < errors["minmax"]


def test_integer_codes_roundtrip_is_exact():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    for spec in (QuantSpec(bits=4), QuantSpec(bits=8, symmetric=False), QuantSpec(bits=12)):
        q = WeightQuantizer(spec, w.shape)
        q.calibrate(w)
        codes = q.integer_codes(w)
        assert not codes.is_floating_point()
        assert torch.equal(q.dequantize(codes), q(w))
        assert torch.equal(q(q.dequantize(codes)), q(w))  # re-quantizing the dequantized weight is a fixed point


def test_split_input_quantizer_gives_halves_their_own_scales():
    ctx = TimestepContext(TimestepGroups.uniform(1))
    q = ActivationQuantizer(QuantSpec(bits=8, symmetric=False), ctx, channel_splits=[3, 5], channel_axis=1)
    x = torch.cat([torch.rand(2, 3, 4, 4) * 100, torch.rand(2, 5, 4, 4) * 0.1], dim=1)  # bimodal concat
    q.start_observing()
    q(x)
    q.finish_observing()
    s = q.scale[0]
    assert s[0] / s[1] > 100
    out = q(x)
    rel_err_small_half = ((out[:, 3:] - x[:, 3:]).abs().max() / x[:, 3:].abs().max()).item()
    assert rel_err_small_half < 0.01  # a shared scale would flatten the small half to 0
    w = torch.cat([torch.randn(6, 3, 1, 1), torch.randn(6, 5, 1, 1) * 0.01], dim=1)
    wq = WeightQuantizer(QuantSpec(bits=4, granularity="per_channel"), w.shape, input_splits=[3, 5])
    wq.calibrate(w)
    assert wq.scale.shape == (6, 2) and bool((wq.scale[:, 0] > 10 * wq.scale[:, 1]).all())


def test_timestep_groups_nearest_centre_and_per_sample_selection():
    groups = TimestepGroups.uniform(4, 1000)  # centres 125, 375, 625, 875
    assert groups.index(torch.tensor([0, 249, 251, 999])).tolist() == [0, 0, 1, 3]
    steps = TimestepGroups.per_step([981, 741, 501, 261, 21])
    assert steps.index(torch.tensor(700)).item() == steps.centers.index(741.0)  # another schedule: nearest step

    ctx = TimestepContext(groups)
    q = ActivationQuantizer(QuantSpec(bits=8, symmetric=True), ctx, num_groups=4)
    q.start_observing()
    for t, amp in ((100, 1.0), (400, 4.0), (600, 16.0), (900, 64.0)):
        ctx.set_timestep(torch.tensor([t, t]))
        q(torch.randn(2, 64) * amp)
    q.finish_observing()
    scales = q.scale[:, 0]
    assert bool((scales[1:] > 2 * scales[:-1]).all())  # each group kept its own range
    x = torch.full((2, 8), 3.0)
    ctx.set_timestep(torch.tensor([100, 900]))  # a batch mixing timesteps uses each sample's group
    out = q(x)
    assert out[0, 0].item() == pytest.approx(min(3.0, 127 * scales[0].item()), rel=1e-5)
    assert out[1, 0].item() == pytest.approx(round(3.0 / scales[3].item()) * scales[3].item(), rel=1e-5)


def test_unobserved_group_borrows_nearest_and_per_group_bits():
    ctx = TimestepContext(TimestepGroups.uniform(3, 900))  # centres 150, 450, 750
    q = ActivationQuantizer(QuantSpec(bits=8, symmetric=True), ctx, num_groups=3)
    q.bits[2] = 4  # a group may use its own bit width
    q.start_observing()
    for t in (100, 800):
        ctx.set_timestep(t)
        q(torch.linspace(-1, 1, 100)[None])
    q.finish_observing()
    assert q.scale[1, 0] == q.scale[0, 0]  # group 1 saw no data: nearest observed group's params
    assert q.scale[2, 0].item() == pytest.approx(1 / 7)  # 4-bit signed grid
    assert q.average_bits() == pytest.approx((8 + 8 + 4) / 3)


def test_nan_activation_names_layer_and_step():
    ctx = TimestepContext(TimestepGroups.uniform(1))
    q = ActivationQuantizer(QuantSpec(bits=8), ctx)
    q.name = "down_blocks.0.resnets.0.conv1"
    q.start_observing()
    ctx.set_timestep(torch.tensor(981))
    with pytest.raises(FloatingPointError, match=r"down_blocks.0.resnets.0.conv1 at timestep 981"):
        q(torch.tensor([[1.0, float("nan")]]))


def test_inference_fake_quantize_is_bit_identical_to_the_autograd_path():
    """Without autograd fake_quantize runs in place; its result must equal the STE path's to the bit."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6) * 3
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 1e6])  # ties and a clamped outlier
    cases = [
        (torch.tensor(0.037), torch.tensor(3.0), -128, 127),
        (torch.rand(1, 8, 1, 1) * 0.1 + 1e-3, torch.randint(0, 255, (1, 8, 1, 1)).float(), 0, 255),
        (torch.rand(4, 1, 1, 1) * 0.1 + 1e-3, torch.zeros(4, 1, 1, 1),
         torch.tensor([0, 0, -8, -128]).reshape(4, 1, 1, 1), torch.tensor([255, 15, 7, 127]).reshape(4, 1, 1, 1)),
    ]
    for scale, zero_point, qmin, qmax in cases:
        with torch.no_grad():
            fast = fake_quantize(x, scale, zero_point, qmin, qmax)
        slow = fake_quantize(x.clone().requires_grad_(), scale, zero_point, qmin, qmax).detach()
        assert torch.equal(fast, slow)
        assert fast.data_ptr() != x.data_ptr() and x[0, 0, 0, 3] == 1e6  # the input is untouched
