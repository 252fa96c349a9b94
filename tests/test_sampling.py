"""The sampling core: every denoiser call seen with its step and timestep, outputs equal to a plain pipeline call,
settings as plain JSON, one defaults policy."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from diffquant import CalibrationConfig, QuantConfig
from diffquant.sampling import SamplingSettings, default_settings, denoiser_calls, initial_noise, native_size, sample
from diffquant.wrap import get_denoiser

from tinyutil import PROMPTS

SETTINGS = SamplingSettings(steps=3, guidance=5.0, height=32, width=32, seed=7)


def _plain(pipe, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="latent", **kwargs).images


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_denoiser_calls_see_every_step_and_sample_equals_a_plain_call(tiny_pipes, family):
    pipe = tiny_pipes[family]
    denoiser = get_denoiser(pipe)
    hooks_before = (len(denoiser._forward_pre_hooks), len(denoiser._forward_hooks))
    seen: list[tuple[int, float, bool]] = []
    outputs: list[torch.Tensor] = []

    def before(call):
        seen.append((call.step, call.timestep, call.output is None))

    def after(call):
        outputs.append(call.prediction.clone())
        latent_input = call.args[0] if call.args else call.kwargs["hidden_states"]
        assert call.prediction.shape == latent_input.shape

    with denoiser_calls(pipe, before, after) as count:
        latents = sample(pipe, PROMPTS[:2], SETTINGS)
    assert (len(denoiser._forward_pre_hooks), len(denoiser._forward_hooks)) == hooks_before  # hooks removed
    assert count.calls == 3 and [s for s, _, _ in seen] == [0, 1, 2] and all(pending for _, _, pending in seen)
    assert [t for _, t, _ in seen] == [float(t) for t in pipe.scheduler.timesteps]
    assert len(outputs) == 3 and outputs[0].shape[0] == 4  # both guidance halves of 2 prompts
    assert torch.equal(latents, _plain(pipe, generator=torch.Generator().manual_seed(7)))

    noise = initial_noise(pipe, [3, 4], SETTINGS)
    assert torch.equal(noise[1:], initial_noise(pipe, [4], SETTINGS))  # each row from its own seed
    assert torch.equal(sample(pipe, PROMPTS[:2], SETTINGS, latents=noise), _plain(pipe, latents=noise))
    per_prompt = sample(pipe, PROMPTS[:2], SETTINGS, seeds=[1, 2])
    assert torch.equal(per_prompt, _plain(pipe, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]))
    assert not torch.equal(per_prompt, latents)


def test_settings_round_trip_json_and_validate():
    settings = SamplingSettings(4, 5.0, 32, 48, seed=3, extras={"max_sequence_length": 77, "original_size": [64, 64]})
    assert SamplingSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert SamplingSettings(4).to_dict() == {"steps": 4, "guidance": None, "height": None, "width": None, "seed": 0}
    assert settings.pipeline_kwargs() == {"num_inference_steps": 4, "guidance_scale": 5.0, "height": 32, "width": 48,
                                          "max_sequence_length": 77, "original_size": [64, 64]}
    assert SamplingSettings().pipeline_kwargs() == {}
    with pytest.raises(ValueError, match="unknown sampling settings"):
        SamplingSettings.from_dict({"num_inference_steps": 4})
    with pytest.raises(ValueError, match="steps"):
        SamplingSettings(steps=0)
    with pytest.raises(ValueError, match="guidance"):
        SamplingSettings(extras={"guidance_scale": 3.0})


def test_one_defaults_policy(tiny_pipes):
    sd, sd3 = tiny_pipes["sd"], tiny_pipes["sd3"]
    side = native_size(sd)
    assert side == sd.unet.config.sample_size * sd.vae_scale_factor
    # The pipeline's own __call__ defaults, then the registered (mini zoo) ones, then explicit values.
    assert default_settings(sd) == SamplingSettings(50, 7.5, side, side)
    assert default_settings(sd3).steps == 28 and default_settings(sd3).guidance == 7.0
    registered = {"num_inference_steps": 25, "guidance_scale": 5.0, "height": 16, "width": 16}
    assert default_settings(sd, registered) == SamplingSettings(25, 5.0, 16, 16)
    assert SamplingSettings(steps=4, seed=2).resolve(sd, registered) == SamplingSettings(4, 5.0, 16, 16, seed=2)
    # A quantized model samples like its source did: the defaults recorded at quantization time.
    quantized = copy.copy(sd)
    quantized.unet = copy.copy(sd.unet)
    quantized.unet.diffquant = SimpleNamespace(report={"sampling_defaults": registered})
    assert default_settings(quantized) == SamplingSettings(25, 5.0, 16, 16)
    # Other registered keys are pipeline extras (mini-flux registers max_sequence_length); given extras win.
    long = {**registered, "max_sequence_length": 24}
    assert default_settings(sd3, long).extras == {"max_sequence_length": 24}
    assert SamplingSettings(extras={"max_sequence_length": 8}).resolve(sd3, long).extras == {"max_sequence_length": 8}


def test_calibration_config_reads_as_sampling_settings_and_old_json_loads():
    calib = CalibrationConfig(num_prompts=2, num_inference_steps=6, guidance_scale=4.0, seed=5)
    assert calib.sampling == SamplingSettings(6, 4.0, None, None, seed=5)
    again = CalibrationConfig.from_sampling(calib.sampling, num_prompts=2)
    assert again == calib
    carried = CalibrationConfig.from_sampling(SamplingSettings(extras={"max_sequence_length": 77}))
    assert carried.sampling.extras == {"max_sequence_length": 77}
    with pytest.raises(ValueError, match="extras"):  # the settings' own fields cannot come in as extras
        CalibrationConfig(extras={"num_inference_steps": 4})
    with pytest.raises(ValueError, match="steps"):
        CalibrationConfig(num_inference_steps=0)
    # A config saved by an earlier version (flat calibration part) loads unchanged and writes the same JSON.
    saved = {"method": "rtn", "wbits": 8, "abits": 8, "version": 1,
             "calibration": {"num_prompts": 4, "num_inference_steps": 25, "guidance_scale": 5.0, "every_k": 1,
                             "samples_per_step": None, "batch_size": 8, "height": 32, "width": 32, "seed": 0}}
    cfg = QuantConfig.from_dict(json.loads(json.dumps(saved)))
    assert cfg.calibration.sampling == SamplingSettings(25, 5.0, 32, 32)
    assert json.loads(cfg.to_json())["calibration"] == saved["calibration"]


def test_initial_noise_of_a_flux_pipeline_is_packed_as_its_own_per_prompt_generators_draw_it():
    from diffquant.models.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(2, 3.5, 32, 32).resolve(pipe)
    noise = initial_noise(pipe, [5, 6], settings)
    assert noise.dim() == 3  # [B, tokens, 4C]: FluxPipeline's packed latents
    assert torch.equal(noise[1:], initial_noise(pipe, [6], settings))
    own = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=3.5, height=32, width=32, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    assert torch.equal(sample(pipe, PROMPTS[:2], settings, latents=noise, output_type="pt"), own)
