"""Every CLI command with a table of bad inputs: exit code 2, exactly one ``error:`` line, no traceback.

Each row is a row of docs/errors.md. Commands run in-process (typer's CliRunner); rows that need a
fault (full disk, read-only folder as root) patch the one call that would meet it.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from diffquant.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_pipes):
    """Folders the rows point at: float, NaN-weight, other-architecture, quantized (SD and SD3), read-only."""
    import diffquant
    from diffquant import QuantConfig
    from diffquant.io import file_table
    from tinyutil import PROMPTS, calibration_config

    root = tmp_path_factory.mktemp("bad")
    fp = root / "fp"
    tiny_pipes["sd"].save_pretrained(fp)
    nan = copy.deepcopy(tiny_pipes["sd"])
    with torch.no_grad():
        nan.unet.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    nan.save_pretrained(root / "nan")
    shutil.copytree(fp, root / "other")
    config = json.loads((root / "other/unet/config.json").read_text())
    (root / "other/unet/config.json").write_text(json.dumps({**config, "sample_size": config["sample_size"] * 2}))
    for family in ("sd", "sd3"):
        pipe = copy.deepcopy(tiny_pipes[family])
        diffquant.quantize(pipe, QuantConfig(calibration=calibration_config(num_prompts=1, num_inference_steps=2)),
                           calibration=PROMPTS[:1], progress=False)
        diffquant.save(pipe, root / f"q-{family}")
    future = root / "future-manifest"
    shutil.copytree(root / "q-sd", future)
    manifest = json.loads((future / "diffquant_manifest.json").read_text())
    (future / "diffquant_manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    future = root / "future-config"
    shutil.copytree(root / "q-sd", future)
    meta = json.loads((future / "unet/diffquant_config.json").read_text())
    (future / "unet/diffquant_config.json").write_text(json.dumps({**meta, "format_version": 99}))
    (future / "diffquant_manifest.json").write_text(json.dumps({**manifest, "files": file_table(future, ("diffquant_manifest.json",))}))
    (root / "p.txt").write_text("a red circle on the left\n")
    (root / "readonly").mkdir()
    os.chmod(root / "readonly", 0o555)
    return root


def _readonly(monkeypatch, env) -> None:
    """As root a 0555 folder is still writable: make os.access tell the truth a user would meet."""
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(env / "readonly")) else real(p, mode, **kw))


def _full_disk(monkeypatch, env) -> None:
    import diffquant

    def no_space(pipe, folder, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(diffquant, "quantize", lambda pipe, *a, **k: pipe)
    monkeypatch.setattr(diffquant, "save", no_space)


Q = ["quantize", "--model", "{fp}", "--prompts", "{fp}/../p.txt", "--out", "{tmp}/q", "--num-prompts", "1", "--steps", "2"]
G = ["generate", "--model", "{fp}", "--prompt", "a red circle", "--steps", "2", "--out", "{tmp}/img.png"]
E = ["eval", "--reference", "{fp}", "--model", "{fp}", "--prompts", "{fp}/../p.txt", "--steps", "2", "--metrics", "psnr",
     "--out", "{tmp}/eval", "--cache-dir", "{tmp}/cache"]
B = ["bench", "--model", "{fp}", "--prompts", "{fp}/../p.txt", "--steps", "2", "--out", "{tmp}/bench", "--peers", "none"]


def _set(base: list[str], **flags: str) -> list[str]:
    args = list(base)
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


ROWS = [
    # (id, argv, expected text in the error line, fault)
    ("option-bool", _set(Q, method="qdiffusion", option="reconstruct_weights=maybe"),
     "--option reconstruct_weights='maybe': qdiffusion expects true/false", None),
    ("option-int-float", _set(Q, method="qdiffusion", option="iterations=1.5"), "expects an integer or none for iterations", None),
    ("option-int-text", _set(Q, method="qdiffusion", option="iterations=abc"), "iterations='abc'", None),
    ("option-float", _set(Q, method="pcr", option="relax_fraction=lots"), "pcr expects a number for relax_fraction", None),
    ("parse-wbits-text", _set(Q, wbits="abc"), "Invalid value for '--wbits'", None),
    ("quantize-steps-0", _set(Q, steps="0"), "--steps must be >= 1, got 0", None),
    ("quantize-device-tpu", _set(Q, device="tpu"), "unknown --device 'tpu'", None),
    ("quantize-device-absent", _set(Q, device="cuda:99"), "--device cuda:99", None),
    ("quantize-dtype-int8", _set(Q, dtype="int8"), "unsupported dtype 'int8' for calibration; pass --dtype", None),
    ("quantize-readonly-out", _set(Q, out="{env}/readonly/q"), "is not writable", "readonly"),
    ("quantize-full-disk", Q, "no space left on device", "full_disk"),
    ("quantize-config-missing", _set(Q, config="{tmp}/nope.json"), "config file", None),
    ("generate-steps-0", _set(G, steps="0"), "--steps must be >= 1", None),
    ("generate-backend-float", _set(G, backend="openvino"), "--backend openvino runs a quantized model", None),
    ("generate-backend-unknown", _set(G, backend="tensorrt"), "unknown backend 'tensorrt'; choose one of openvino, torch", None),
    ("generate-backend-onnx", _set(G, backend="onnx"), "unknown backend 'onnx' (onnx is an export format only)", None),
    ("generate-height-negative", _set(G, height="-8"), "--height must be >= 1, got -8", None),
    ("generate-device-tpu", _set(G, device="tpu"), "unknown --device 'tpu'", None),
    ("generate-readonly-out", _set(G, out="{env}/readonly/img.png"), "is not writable", "readonly"),
    ("generate-nan", _set(G, model="{env}/nan"), "NaN/Inf in the denoiser output at sampling step 1 (timestep", None),
    ("generate-future-config", _set(G, model="{env}/future-config"), "newer than this diffquant reads", None),
    ("eval-seeds-empty", _set(E, seeds="3-1"), "empty --seeds range '3-1'", None),
    ("eval-steps-0", _set(E, steps="0"), "--steps must be >= 1", None),
    ("eval-device-tpu", _set(E, device="tpu"), "unknown --device 'tpu'", None),
    ("eval-readonly-out", _set(E, out="{env}/readonly/eval"), "is not writable", "readonly"),
    ("eval-backend-unknown", _set(E, backend="tensorrt"), "unknown backend 'tensorrt'", None),
    ("eval-other-architecture", _set(E, model="{env}/other"), "differ in denoiser sample_size", None),
    ("eval-nan", _set(E, model="{env}/nan"), "NaN/Inf in the denoiser output at 'nan' sampling step 1", None),
    ("bench-seeds-empty", _set(B, seeds="3-1"), "empty --seeds range", None),
    ("bench-bits", _set(B, bits="w8x8"), "bad bit width 'w8x8'", None),
    ("info-future-manifest", ["info", "--model", "{env}/future-manifest"], "format version 99, newer than this diffquant", None),
    ("info-future-config", ["info", "--model", "{env}/future-config"], "format version 99, newer than this diffquant", None),
    ("export-not-converted", ["export", "--model", "{env}/q-sd3", "--out", "{tmp}/m.onnx"], "the model is not converted", None),
    ("export-format", ["export", "--model", "{env}/q-sd", "--out", "{tmp}/m.trt", "--format", "tensorrt"],
     "unknown export format 'tensorrt'", None),
    ("export-readonly-out", ["export", "--model", "{env}/q-sd", "--out", "{env}/readonly/m.onnx"], "is not writable", "readonly"),
    ("zoo-train-steps-0", ["zoo", "train", "mini-sd", "--steps", "0", "--out", "{tmp}/z"], "--steps must be >= 1", None),
    ("zoo-train-device", ["zoo", "train", "mini-sd", "--device", "tpu", "--out", "{tmp}/z"], "unknown --device 'tpu'", None),
    ("zoo-eval-unknown", ["zoo", "eval", "nope"], "unknown model 'nope'", None),
]


@pytest.mark.parametrize("argv, expected, fault", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_exit_2_and_one_error_line(env, tmp_path, monkeypatch, argv, expected, fault):
    if fault == "readonly":
        _readonly(monkeypatch, env)
    elif fault == "full_disk":
        _full_disk(monkeypatch, env)
    args = [a.format(fp=env / "fp", env=env, tmp=tmp_path) for a in argv]
    result = runner.invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert expected in errors[0], errors[0]


def test_every_row_is_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    missing = [r[0] for r in ROWS if f"`{r[0]}`" not in doc]
    assert not missing, f"docs/errors.md has no row naming {missing}"


def test_calibration_record_app_shares_the_handler(tmp_path):
    from diffquant.calibration.record import app as record_app

    result = runner.invoke(record_app, ["--model", str(tmp_path / "nope"), "--prompts", "zoo:calibration:2", "--out", str(tmp_path / "c")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "model folder" in errors[0] and "not found" in errors[0], result.output
