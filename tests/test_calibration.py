"""Calibration recording: resumable shards, settings check, determinism."""

from __future__ import annotations

import pytest
import torch

import diffquant
from diffquant import CalibrationSet
from tinyutil import PROMPTS, calibration_config


def _same(a: CalibrationSet, b: CalibrationSet) -> bool:
    return len(a) == len(b) and all(
        x.step == y.step and x.inputs.keys() == y.inputs.keys() and all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
        for x, y in zip(a, b)
    )


def test_interrupted_recording_resumes_to_the_same_data(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sd"]
    cfg = calibration_config(num_inference_steps=3, batch_size=2, samples_per_step=3)
    full = diffquant.record_denoiser_calls(pipe, PROMPTS, cfg, progress=False)

    calls = {"n": 0}

    def crash_in_second_batch(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # first call of the second batch (3 steps per batch)
            raise KeyboardInterrupt

    handle = pipe.unet.register_forward_pre_hook(crash_in_second_batch, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            diffquant.record_denoiser_calls(pipe, PROMPTS, cfg, progress=False, cache_dir=tmp_path / "c")
    finally:
        handle.remove()
    assert sorted(p.name for p in (tmp_path / "c").glob("batch-*")) == ["batch-00000.safetensors"]

    sampled = {"n": 0}
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: sampled.__setitem__("n", sampled["n"] + 1), with_kwargs=True)
    try:
        resumed = diffquant.record_denoiser_calls(pipe, PROMPTS, cfg, progress=False, cache_dir=tmp_path / "c")
    finally:
        handle.remove()
    assert sampled["n"] == 3  # only the unfinished batch was sampled again
    assert _same(full, resumed)
    assert _same(full, CalibrationSet.load(tmp_path / "c"))


def test_cache_with_other_settings_is_refused(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sd"]
    diffquant.record_denoiser_calls(pipe, PROMPTS[:2], calibration_config(num_inference_steps=2), progress=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="other settings"):
        diffquant.record_denoiser_calls(pipe, PROMPTS[:2], calibration_config(num_inference_steps=3), progress=False, cache_dir=tmp_path)


def test_same_config_and_seed_give_identical_quantized_weights(tiny_pipes):
    import copy

    from diffquant import QuantConfig
    from diffquant.serialization import denoiser_tensors

    results = []
    for _ in range(2):
        pipe = copy.deepcopy(tiny_pipes["sd"])
        cfg = QuantConfig(wbits=4, abits=8, act_observer="percentile", calibration=calibration_config(num_inference_steps=2))
        diffquant.quantize(pipe, cfg, calibration=PROMPTS[:2], progress=False)
        results.append(denoiser_tensors(pipe.unet))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.slow  # multi-process run, 25-60 s: `make test-slow`
def test_two_process_recording_equals_one_process(tiny_pipes, tmp_path):
    """Two CPU processes (gloo, launched by accelerate) shard the prompt batches; the merge is identical."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "fp"
    tiny_pipes["sd"].save_pretrained(folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    args = ["--model", str(folder), "--prompts", str(prompts), "--num-prompts", "4", "--steps", "2", "--guidance", "5",
            "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "-m", "diffquant.calibration.record",
                          *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "diffquant.calibration.record", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = CalibrationSet.load(tmp_path / "one"), CalibrationSet.load(tmp_path / "two")
    assert len(a) == 8 and _same(a, b)


def test_calibration_carries_the_sampling_extras_and_keeps_older_json_without_them():
    from diffquant import CalibrationConfig, QuantConfig
    from diffquant.models.tiny import tiny_flux_pipeline
    from diffquant.sampling import SamplingSettings

    assert "extras" not in QuantConfig().to_dict()["calibration"]  # configs saved before extras existed keep their JSON
    cfg = CalibrationConfig.from_sampling(SamplingSettings(2, 3.5, 32, 32, extras={"max_sequence_length": 7}), num_prompts=1)
    config = QuantConfig(calibration=cfg)
    assert QuantConfig.from_json(config.to_json()).calibration.sampling.extras == {"max_sequence_length": 7}
    pipe = tiny_flux_pipeline()
    calls = diffquant.record_denoiser_calls(pipe, PROMPTS[:1], cfg, progress=False)
    assert next(iter(calls)).inputs["encoder_hidden_states"].shape[1] == 7  # the T5 sequence length the extras asked for
