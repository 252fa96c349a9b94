"""Deployment engines are registered (diffquant.registry.ENGINES) and every command finds them there: a fake engine
registered here exports, loads, generates, evaluates and benches through the same paths as OpenVINO."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import diffquant
from diffquant import QuantConfig
from diffquant.cli import app
from diffquant.registry import ENGINES, Engine, register_engine

from tinyutil import PROMPTS, calibration_config

runner = CliRunner()
MARK = "fake_engine.json"


@pytest.fixture(scope="module")
def folders(tiny_pipes, tmp_path_factory):
    """The float tiny SD pipeline, its RTN W8A8 save folder and a prompt file."""
    root = tmp_path_factory.mktemp("engines")
    tiny_pipes["sd"].save_pretrained(root / "fp")
    pipe = copy.deepcopy(tiny_pipes["sd"])
    cfg = QuantConfig(method="rtn", wbits=8, abits=8, calibration=calibration_config(num_prompts=1, num_inference_steps=2))
    diffquant.quantize(pipe, cfg, calibration=PROMPTS[:1], progress=False)
    diffquant.save(pipe, root / "q")
    (root / "p.txt").write_text("a red circle on the left\n")
    return root


@pytest.fixture
def fake():
    """A registered engine that keeps the torch form and logs what the commands asked of it (and every denoiser step)."""
    log: list[tuple] = []

    def counting(model):
        diffquant.get_denoiser(model).register_forward_pre_hook(lambda module, args: log.append(("step",)))
        return model

    def export(model, out, *, overwrite=False, group=None, batch=2):
        log.append(("export", group, batch))
        path = diffquant.save(model, out, overwrite=overwrite)
        (path / MARK).write_text(json.dumps({"engine": "fake"}))
        return path

    def load(folder, *, device=None, torch_dtype=None):
        log.append(("load", Path(folder).name))
        from diffquant.serialization import load as load_saved

        return counting(load_saved(folder, device=device))

    def deploy(model):
        log.append(("deploy",))
        return counting(copy.deepcopy(model))

    register_engine(Engine("fake", export=export, load=load, is_folder=lambda p: (Path(p) / MARK).is_file(), deploy=deploy))
    yield log
    del ENGINES["fake"]


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_export_load_and_generate_go_through_the_registry(fake, folders, tmp_path):
    out = invoke("export", "--model", folders / "q", "--format", "fake", "--out", tmp_path / "f", "--batch-size", "3")
    assert fake == [("export", None, 3)] and "run it with --backend fake" in out
    invoke("generate", "--model", tmp_path / "f", "--prompt", "a red circle", "--steps", "2", "--out", tmp_path / "img.png")
    assert fake[1] == ("load", "f") and fake.count(("step",)) >= 2  # an exported folder runs on its engine
    assert (tmp_path / "img.png").is_file()
    fake.clear()
    pipe = diffquant.load(folders / "q", backend="fake")  # a torch save folder, put on the engine in memory
    assert fake == [("deploy",)] and diffquant.get_denoiser(pipe)._forward_pre_hooks
    with pytest.raises(ValueError, match="was exported for fake; load it with backend='fake'"):
        diffquant.load(tmp_path / "f", backend="openvino")


def test_unknown_names_list_the_registered_engines(fake, folders):
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; choose one of fake, openvino, torch"):
        diffquant.load(folders / "q", backend="nope")
    with pytest.raises(ValueError, match=r"unknown export format 'nope'; choose one of fake, onnx, openvino, torch"):
        diffquant.deployment.export(None, "x", format="nope")


def test_eval_and_bench_run_the_deployed_model(fake, folders, tmp_path):
    """``eval --backend`` scores the model as the engine runs it; ``bench --backend`` adds a deployed row per method."""
    common = ["--prompts", folders / "p.txt", "--steps", "2", "--metrics", "psnr", "--cache-dir", tmp_path / "cache"]
    invoke("eval", "--reference", folders / "fp", "--model", folders / "q", "--backend", "fake", "--out", tmp_path / "e", *common)
    model = json.loads((tmp_path / "e/results.json").read_text())["models"][0]
    assert fake[0] == ("deploy",) and fake.count(("step",)) >= 2
    assert model["label"] == "q-fake" and model["spec"].endswith("on fake") and model["summary"]["psnr"] > 20
    fake.clear()
    invoke("bench", "--model", folders / "fp", "--methods", "rtn", "--bits", "w8a8", "--peers", "none", "--backend", "fake",
           "--calib-prompts", folders / "p.txt", "--out", tmp_path / "b", *common)
    rows = {m["label"]: m["summary"] for m in json.loads((tmp_path / "b/results.json").read_text())["models"]}
    deployed = [label for label in rows if label.endswith("-fake")]
    assert fake[0] == ("deploy",) and len(deployed) == 1
    assert float(rows[deployed[0]]["psnr_to_fake_quant"]) == float("inf")  # the fake engine runs the very same model


def test_torch_engine_exports_integer_kernels(folders, tmp_path):
    """``export --format torch``: the torch runtime's deployed form, converted, saved, loading on torch."""
    from diffquant.runtime import is_converted

    invoke("export", "--model", folders / "q", "--format", "torch", "--out", tmp_path / "t")
    assert is_converted(diffquant.load(tmp_path / "t"))
    assert not is_converted(diffquant.load(folders / "q"))  # the source is left as it was
