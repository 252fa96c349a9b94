"""Two identical ``quantize --convert`` runs give byte-identical folders (issue 20, item 4)."""

from __future__ import annotations

import json

import torch

from typer.testing import CliRunner

from diffquant.cli import app
from diffquant.determinism import TIMINGS, canonical_safetensors_header, merge_timings, split_timings


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_identical_convert_runs_give_identical_folders(tiny_pipes, tmp_path):
    fp = tmp_path / "fp"
    tiny_pipes["sd"].save_pretrained(fp)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\na blue square\n")
    outs = [tmp_path / "q1", tmp_path / "q2"]
    for out in outs:
        result = CliRunner().invoke(app, ["quantize", "--model", str(fp), "--prompts", str(prompts), "--out", str(out),
                                          "--num-prompts", "2", "--steps", "2", "--convert"])
        assert result.exit_code == 0, result.output
    first, second = _files(outs[0]), _files(outs[1])
    assert "unet/diffquant_model.safetensors" in first and json.loads(first["unet/diffquant_config.json"])["converted"]
    hashed = {k for k in first if not k.endswith(TIMINGS)}
    assert hashed == {k for k in second if not k.endswith(TIMINGS)}
    assert [k for k in sorted(hashed) if first[k] != second[k]] == []
    manifest = json.loads(first["diffquant_manifest.json"])
    assert f"unet/{TIMINGS}" not in manifest["files"] and "calibration_seconds" in json.loads(first[f"unet/{TIMINGS}"])


def test_safetensors_header_sorted_in_place(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path / "t.safetensors"
    save_file({"b": torch.zeros(2), "a": torch.ones(3)}, str(path), metadata={"version": "1", "format": "x", "c": "y"})
    size = path.stat().st_size
    canonical_safetensors_header(path)
    assert path.stat().st_size == size and torch.equal(load_file(str(path))["a"], torch.ones(3))
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == ["c", "format", "version"]


def test_timings_split_and_merge_back():
    report = {"calibration_seconds": 1.5, "runtime": {"backends": {"x": "onednn"}, "timings_ms": {"x": {"onednn": 0.1}}},
              "pcr": {"relaxed_steps": [1], "pcr_seconds": 2.0}}
    stable, timings = split_timings(report)
    assert stable == {"runtime": {"backends": {"x": "onednn"}}, "pcr": {"relaxed_steps": [1]}}
    assert merge_timings(stable, timings) == report


def test_fixed_rule_sizes_int_mm_on_cpu(tiny_pipes, monkeypatch):
    """int_mm on a CPU: layers below the multiply-add threshold stay float, the others take int_mm, every time."""
    import copy

    import diffquant
    from diffquant import QuantConfig
    import importlib

    convert_module = importlib.import_module("diffquant.runtime.convert")
    from tinyutil import PROMPTS, calibration_config

    pipe = copy.deepcopy(tiny_pipes["sd"])
    diffquant.quantize(pipe, QuantConfig(calibration=calibration_config(num_prompts=1, num_inference_steps=2)),
                       calibration=PROMPTS[:1], progress=False)
    calib = diffquant.record_denoiser_calls(pipe, PROMPTS[:1], calibration_config(num_prompts=1, num_inference_steps=2),
                                            progress=False)
    inputs = calib.calls[0].kwargs(device="cpu", dtype=torch.float32)
    monkeypatch.setattr(convert_module, "default_backend", lambda device="cpu": "int_mm")
    choices = []
    for threshold in (10**12, 0, 200_000):
        monkeypatch.setattr(convert_module, "INT_MM_CPU_MIN_MACS", threshold)
        unet = convert_module.convert(copy.deepcopy(pipe.unet), example_inputs=inputs, progress=False)
        choices.append(diffquant.quant_record(unet).report["runtime"]["backends"])
    assert set(choices[0].values()) == {"float"} and "int_mm" in set(choices[1].values())
    assert {"float", "int_mm"} <= set(choices[2].values())  # a threshold inside the tiny UNet's range splits it
