"""Scale-out under ``accelerate launch`` (issue 9): two CPU processes over gloo against one process.

Evaluation generation must give the same PNGs as one process, bit for bit. EMF training is data
parallel: the serial dataset must equal one process's, the loss must go down, and the trained
model must equal, bit for bit, one process's that computes each batch in the same two halves
(``micro_batches=2``; fake quantization makes outputs depend a little on how rows are batched).
Calibration recording across processes is tested in tests/test_calibration.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffquant
from diffquant import CalibrationConfig, QuantConfig
from diffquant.models.tiny import tiny_sd_pipeline
from diffquant.pipelines import load_pipeline

from tinyutil import PROMPTS

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as each launched process gets (OMP_NUM_THREADS=1): both sides compute alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scale") / "fp"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def _launch(module: str, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``module`` on two CPU processes, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "-m", module, *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _launch_two(module: str, *args: str) -> None:
    proc = _launch(module, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # multi-process run, 25-60 s: `make test-slow`
def test_two_process_evaluation_generates_the_same_images(fp_folder, tmp_path):
    from typer.testing import CliRunner

    from diffquant.cli import app

    qpipe = diffquant.quantize(load_pipeline(str(fp_folder)), QuantConfig(
        method="rtn", wbits=8, abits=8, calibration=CalibrationConfig(num_prompts=2, num_inference_steps=2, batch_size=2)),
        calibration=PROMPTS[:2], progress=False)
    diffquant.save(qpipe, tmp_path / "q")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:3]) + "\n")
    common = ["--reference", str(fp_folder), "--model", str(tmp_path / "q"), "--prompts", str(tmp_path / "prompts.txt"),
              "--seeds", "0,1", "--steps", "2", "--batch-size", "2", "--metrics", "psnr,ssim"]

    def run(name: str) -> list[str]:
        return [*common, "--cache-dir", str(tmp_path / name / "cache"), "--out", str(tmp_path / name / "out")]

    _launch_two("diffquant.cli", "eval", *run("two"))
    result = CliRunner().invoke(app, ["eval", *run("one")])
    assert result.exit_code == 0, result.output
    images = {name: {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name / "cache").glob("*/*.png")}
              for name in ("one", "two")}
    assert len(images["one"]) == 12 and images["two"] == images["one"]  # 6 FP + 6 quantized, three batches each
    one, two = (json.loads((tmp_path / name / "out" / "results.json").read_text())["models"][0] for name in ("one", "two"))
    assert two["per_image"] == one["per_image"]
    assert two["generation"] == {"generated": 0, "cached": 6}  # the main process found every image rendered


# Every batch is the whole serial dataset (4 prompts x 2 steps x 2 guidance rows), so the loss curve is the dataset loss.
EMF = QuantConfig(method="emf", wbits=4, abits=8,
                  calibration=CalibrationConfig(num_prompts=4, num_inference_steps=4, guidance_scale=5.0, batch_size=2,
                                                height=16, width=16),
                  options=dict(steps_per_prompt=2, iterations=8, batch_size=16, distill_layers=2, sensitivity_rows=2))


@pytest.mark.slow  # multi-process run, 25-60 s: `make test-slow`
def test_two_process_emf_training_matches_one_process_and_converges(fp_folder, tmp_path):
    (tmp_path / "config.json").write_text(EMF.to_json())
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _launch_two("diffquant.cli", "quantize", "--model", str(fp_folder), "--config", str(tmp_path / "config.json"),
                "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "two"), "--keep-work")
    # One process computing each batch in the same two halves (micro-batches) as the two processes.
    config = copy.deepcopy(EMF)
    config.options["micro_batches"] = 2
    one = diffquant.quantize(load_pipeline(str(fp_folder)), config, calibration=PROMPTS, workdir=tmp_path / "one", progress=False)
    diffquant.save(one, tmp_path / "one-saved")

    (two_dataset,) = (tmp_path / ".two.work").glob("*/emf/dataset")  # the work folder keyed by the settings, kept
    shards = sorted((tmp_path / "one" / "emf" / "dataset").glob("serial-*.safetensors"))
    assert len(shards) == 2  # one per process
    for shard in shards:  # the serial dataset sampled by two processes equals one process's
        a, b = load_file(shard), load_file(two_dataset / shard.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    one, two = (diffquant.load(tmp_path / name).unet for name in ("one-saved", "two"))
    loss_one, loss_two = (diffquant.quant_record(d).report["emf"]["train"]["loss"] for d in (one, two))
    assert len(loss_two) == 8 and loss_two == loss_one  # bit for bit: gradients g0 + g1 either way
    assert loss_two[-1] < 0.8 * loss_two[0]  # converges
    a, b = one.state_dict(), two.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _launch_two_refused(*args: str) -> str:
    proc = _launch("diffquant.cli", *args)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow  # multi-process run, 25-60 s: `make test-slow`
def test_one_process_commands_refuse_a_launch_before_any_work(fp_folder, tmp_path):
    """docs/errors.md: quantize with a method other than EMF, and bench, under ``accelerate launch``."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    output = _launch_two_refused("quantize", "--model", str(fp_folder), "--method", "pcr", "--prompts", str(tmp_path / "prompts.txt"),
                                 "--out", str(tmp_path / "q"))
    assert "only --method emf runs across processes; run --method pcr without accelerate launch" in output
    output = _launch_two_refused("bench", "--model", str(fp_folder), "--out", str(tmp_path / "bench"))
    assert "bench runs in one process; under accelerate launch run diffquant eval for each model" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]  # nothing written


def test_emf_batch_smaller_than_its_split_is_refused_before_any_work(fp_folder, tmp_path):
    """docs/errors.md: an EMF batch that cannot give every process and micro-batch a row (checked in one process
    with micro_batches=2; under a launch the processes multiply in)."""
    config = copy.deepcopy(EMF)
    config.options.update(batch_size=1, micro_batches=2)
    with pytest.raises(ValueError, match=r"batch_size 1 is smaller than 1 process\(es\) x 2 micro-batches; raise batch_size"):
        diffquant.quantize(load_pipeline(str(fp_folder)), config, calibration=PROMPTS, workdir=tmp_path / "work", progress=False)
    assert not (tmp_path / "work" / "emf").exists()
