"""The checked lifecycle, the named quantizer operations, and the LSQ policy block reconstruction and QAT share."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import diffquant
from diffquant.learning.loop import optimizer_step
from diffquant.nn import QuantLinear, QuantState, set_state, states, unwrap_layer
from diffquant.quant import QuantSpec, TimestepContext, TimestepGroups
from diffquant.quant.lsq import SCALE_FLOOR, StepSizes, step_size_parameters
from diffquant.serialization import QUANT_CONFIG
from tinyutil import PROMPTS, calibration_config


class _Tiny(nn.Module):
    def __init__(self, abits: int | None = 8, groups: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.context = TimestepContext(TimestepGroups.uniform(groups, 1000))
        act = QuantSpec(bits=abits, symmetric=False) if abits else None
        self.fc = QuantLinear.from_float(nn.Linear(8, 4), QuantSpec(bits=4, granularity="per_channel"), act, self.context, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_states_are_ordered():
    assert QuantState.WRAPPED < QuantState.CALIBRATING < QuantState.LEARNING < QuantState.FROZEN < QuantState.CONVERTED
    assert not QuantState.CONVERTED.can_move_to(QuantState.FROZEN)
    with pytest.raises(ValueError, match="convert with diffquant.convert"):
        set_state(_Tiny(), "converted")


def test_freezing_uncalibrated_activations_is_refused_with_the_fix():
    model = _Tiny()
    with pytest.raises(ValueError, match="never calibrated.*'calibrating'"):
        set_state(model, QuantState.FROZEN)
    assert states(model) == {"wrapped": 1}  # nothing moved
    set_state(model, "calibrating")
    model(torch.randn(16, 8))
    set_state(model, "frozen")
    assert model.fc.input_quantizer.scale.item() != 1.0
    set_state(model, "learning")  # back from frozen: training a frozen model further
    with pytest.raises(ValueError, match="learning -> calibrating is not a lifecycle move.*wrap the float model again"):
        set_state(model, "calibrating")


def test_weight_only_model_freezes_without_calibration():
    model = _Tiny(abits=None)
    set_state(model, "frozen")
    assert states(model) == {"frozen": 1}


def test_refit_group_changes_only_that_group():
    model = _Tiny(groups=3)
    set_state(model, "calibrating")
    for g in range(3):
        model.context.force(g)
        model(torch.randn(16, 8) * (g + 1))
    set_state(model, "frozen")
    q = model.fc.input_quantizer
    before = q.scale.detach().clone()
    q.start_observing()
    model.context.force(1)
    model(torch.randn(16, 8) * 10)
    q.refit_group(1)
    assert torch.equal(q.scale[[0, 2]], before[[0, 2]]) and not torch.equal(q.scale[1], before[1])
    q.set_group_bits(2, 10)
    assert q.group_bits(2) == 10 and q.group_bits(0) == 8
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 16"):
        q.set_group_bits(0, 20)


def test_unwrap_layer_gives_the_float_layer_over_the_same_parameters():
    model = _Tiny()
    weight = model.fc.weight
    plain = unwrap_layer(model, "fc")
    assert type(plain) is nn.Linear and plain.weight is weight


def test_step_sizes_clamp_at_the_observer_floor_and_revert():
    model = _Tiny()
    params = step_size_parameters(model)
    assert sorted(params) == ["fc.input_quantizer.scale", "fc.weight_quantizer.scale"]
    sizes = StepSizes(params.values())
    start = [p.detach().clone() for p in sizes.params]
    optimizer = torch.optim.SGD(sizes.start(1.0), lr=1.0)

    def backward() -> None:  # pushes every step size far below zero
        sum(p.sum() * 1e6 for p in sizes.params).backward()

    optimizer_step(optimizer, backward, step_sizes=sizes)
    assert all(float(p.detach().min()) == SCALE_FLOOR for p in sizes.params)
    sizes.revert()
    sizes.stop()
    assert all(torch.equal(p, s) and not p.requires_grad for p, s in zip(sizes.params, start))


def test_saved_model_keeps_its_lifecycle_states(tiny_pipes, tmp_path):
    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = diffquant.QuantConfig(method="rtn", wbits=8, abits=8, calibration=calibration_config(num_prompts=1))
    diffquant.quantize(pipe.unet, cfg, calibration=diffquant.record_denoiser_calls(pipe, PROMPTS[:1], cfg.calibration, progress=False),
                       progress=False)
    diffquant.save(pipe.unet, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / QUANT_CONFIG).read_text())["states"]
    assert set(saved.values()) == {"frozen"} and len(saved) == len(diffquant.quantized_layers(pipe.unet))
    loaded = diffquant.load(tmp_path / "q")
    assert states(loaded) == {"frozen": len(saved)}
    set_state(loaded, "learning")  # loaded activation scales count as calibrated
