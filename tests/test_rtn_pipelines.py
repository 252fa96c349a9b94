"""RTN end to end on tiny SD-, SDXL- and SD3-style pipelines built from configs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import diffquant
from diffquant import CalibrationSet, QuantConfig, QuantState
from diffquant.models.adapters import get_adapter
from diffquant.nn import QuantConv2d, QuantLinear, states

from tinyutil import PROMPTS, calibration_config, sample_latents

FAMILIES = ("sd", "sdxl", "sd3")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_wrapped_or_listed_float(rtn_results, family):
    for wbits in (8, 4):
        denoiser = diffquant.get_denoiser(rtn_results[(family, wbits)]["pipe"])
        record = diffquant.quant_record(denoiser)
        plain = [n for n, m in denoiser.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
        assert sorted(plain) == sorted(record.float_layers)
        wrapped = [n for n, m in denoiser.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
        assert len(wrapped) > 10
        assert states(denoiser) == {"frozen": len(diffquant.quantized_layers(denoiser))}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_the_same_layers_and_blocks_float_wrapped_and_converted(tiny_pipes, rtn_results, family):
    from diffquant.models.adapters import get_adapter

    float_adapter = get_adapter(diffquant.get_denoiser(tiny_pipes[family]), warn=False)
    quantized = copy.deepcopy(diffquant.get_denoiser(rtn_results[(family, 8)]["pipe"]))
    wrapped_adapter = get_adapter(quantized, warn=False)
    assert list(wrapped_adapter.layers()) == list(float_adapter.layers())
    assert wrapped_adapter.blocks() == float_adapter.blocks()
    diffquant.convert(quantized)
    assert list(get_adapter(quantized, warn=False).layers()) == list(float_adapter.layers())


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_close_to_float_and_w4a8_further(rtn_results, family):
    e8 = rel_err(rtn_results[(family, 8)]["out"], rtn_results[(family, 8)]["ref"])
    e4 = rel_err(rtn_results[(family, 4)]["out"], rtn_results[(family, 4)]["ref"])
    assert 0 < e8 < 0.12, e8
    assert e8 < e4 < 0.6, (e8, e4)


def test_attention_matmuls_quantized(rtn_results):
    for family, kind in (("sd", "QuantAttnProcessor"), ("sd3", "QuantJointAttnProcessor")):
        denoiser = diffquant.get_denoiser(rtn_results[(family, 8)]["pipe"])
        processors = [m for m in denoiser.modules() if type(m).__name__ == kind]
        assert processors
        for proc in processors:
            assert proc.softmax_quantizer.spec.unsigned and proc.softmax_quantizer.zero_point.abs().sum() == 0
            assert proc.q_quantizer.mode == "quantize"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_reproduces_outputs_bit_for_bit(rtn_results, family, tmp_path):
    for wbits in (8, 4):
        result = rtn_results[(family, wbits)]
        folder = diffquant.save(result["pipe"], tmp_path / f"q{wbits}")
        loaded = diffquant.load(folder)
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(sample_latents(loaded), result["out"])
        codes = (folder / ("transformer" if family == "sd3" else "unet") / "diffquant_model.safetensors").stat().st_size
        assert codes > 0


def test_save_refuses_existing_folder_and_unfrozen_model(rtn_results, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        diffquant.save(rtn_results[("sd", 8)]["pipe"], tmp_path / "taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "user data"
    pipe = copy.deepcopy(rtn_results[("sd", 8)]["pipe"])
    diffquant.set_state(pipe.unet, QuantState.LEARNING)
    with pytest.raises(ValueError, match="only frozen models"):
        diffquant.save(pipe, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_corrupted_file_and_pickle_are_refused(rtn_results, tmp_path):
    folder = diffquant.save(rtn_results[("sd", 8)]["pipe"], tmp_path / "q")
    weights = folder / "unet" / "diffquant_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="diffquant_model.safetensors is corrupted"):
        diffquant.load(folder)
    folder2 = diffquant.save(rtn_results[("sd", 8)]["pipe"], tmp_path / "q2")
    (folder2 / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="pickle"):
        diffquant.load(folder2)


def test_timestep_groups_hold_different_scales_and_the_right_one_is_used(tiny_pipes):
    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = QuantConfig(wbits=8, abits=8, timestep_groups=4, calibration=calibration_config(num_inference_steps=8))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS, progress=False)
    unet = pipe.unet
    record = diffquant.quant_record(unet)
    quantizers = [q for m in diffquant.quantized_layers(unet).values() for q in m.activation_quantizers()]
    distinct = sum(len(torch.unique(q.scale[:, 0])) == 4 for q in quantizers)
    assert distinct > len(quantizers) // 2

    seen = []
    layer = unet.get_submodule("conv_out")
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append((float(record.context.timestep.flatten()[0]), record.context.group)))
    sample_latents(pipe, num_inference_steps=6)  # another schedule than calibration: nearest group
    handle.remove()
    assert [g for _, g in seen] == [int(record.groups.index(t)) for t, _ in seen]
    assert len({g for _, g in seen}) == 4

    # Perturbing group 3's scale changes outputs only at timesteps that map to group 3.
    inputs = dict(sample=torch.randn(2, 4, 16, 16), encoder_hidden_states=torch.randn(2, 16, 32), return_dict=False)
    with torch.no_grad():
        before = {t: unet(timestep=torch.tensor(t), **inputs)[0] for t in (100, 900)}
        layer.input_quantizer.scale[3] *= 4
        after = {t: unet(timestep=torch.tensor(t), **inputs)[0] for t in (100, 900)}
    assert torch.equal(before[100], after[100])
    assert not torch.equal(before[900], after[900])


def test_bare_denoiser_needs_recorded_calibration(tiny_pipes):
    pipe = copy.deepcopy(tiny_pipes["sd"])
    with pytest.raises(ValueError, match="calibration data needed"):
        diffquant.quantize(copy.deepcopy(pipe.unet), QuantConfig(), progress=False)
    calib = diffquant.record_denoiser_calls(pipe, PROMPTS[:2], calibration_config(num_inference_steps=3), progress=False)
    assert len(calib) == 3 and calib.num_samples() == 12  # 3 steps x (2 cond + 2 uncond)
    unet = diffquant.quantize(copy.deepcopy(pipe.unet), QuantConfig(), calibration=calib, progress=False)
    assert states(unet) == {"frozen": len(diffquant.quantized_layers(unet))}


def test_calibration_set_roundtrip_and_every_k(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sdxl"]
    calib = diffquant.record_denoiser_calls(
        pipe, PROMPTS[:2], calibration_config(num_inference_steps=6, every_k=2, samples_per_step=3), progress=False
    )
    assert [c.step for c in calib] == [0, 2, 4]
    assert all(c.batch_size == 3 for c in calib)
    assert "added_cond_kwargs.time_ids" in calib.calls[0].inputs
    calib.save(tmp_path / "calib")
    again = CalibrationSet.load(tmp_path / "calib")
    for a, b in zip(calib, again):
        assert a.step == b.step and all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)


def test_float_time_layers_and_keep_float(tiny_pipes):
    pipe = copy.deepcopy(tiny_pipes["sd3"])
    cfg = QuantConfig(float_time_layers=True, keep_float=["proj_out"], calibration=calibration_config())
    diffquant.quantize(pipe, cfg, calibration=PROMPTS, progress=False)
    record = diffquant.quant_record(pipe.transformer)
    time_layers = get_adapter(copy.deepcopy(tiny_pipes["sd3"].transformer)).time_layers()
    assert set(time_layers) <= set(record.float_layers)
    assert record.float_layers["proj_out"] == "keep_float pattern"
    assert "transformer_blocks.0.norm1.linear" in record.float_layers


class _ToyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 4)

    def forward(self, sample, timestep, return_dict=False):
        h = self.conv(sample).mean(dim=(2, 3))
        return (self.proj(h),)


def test_unknown_denoiser_falls_back_with_warning(caplog):
    calib = CalibrationSet([diffquant.calibration.DenoiserCall({"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor(10)}, 0, 1)])
    with caplog.at_level(logging.WARNING):
        model = diffquant.quantize(_ToyDenoiser(), QuantConfig(), calibration=calib, progress=False)
    assert "_ToyDenoiser" in caplog.text
    assert isinstance(model.conv, QuantConv2d) and isinstance(model.proj, QuantLinear)


def test_config_json_roundtrip_and_errors():
    cfg = QuantConfig(method="rtn", wbits=4, abits=8, timestep_groups=2, keep_float=["conv_in"])
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert cfg.label == "rtn-w4a8"
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        QuantConfig(method="foo")
    with pytest.raises(ValueError, match="weights: bits must be"):
        QuantConfig(wbits=1)
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"wbitz": 4})


def test_deepcopy_of_quantized_model_tracks_its_own_timestep(tiny_pipes):
    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = QuantConfig(timestep_groups=2, calibration=calibration_config(num_inference_steps=2))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
    clone = copy.deepcopy(pipe.unet)
    inputs = dict(sample=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 16, 32), return_dict=False)
    with torch.no_grad():
        pipe.unet(timestep=torch.tensor(100), **inputs)
        clone(timestep=torch.tensor(900), **inputs)
    assert diffquant.quant_record(pipe.unet).context.group == 0
    assert diffquant.quant_record(clone).context.group == 1
