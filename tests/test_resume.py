"""Resume after SIGKILL (issue 9): each long job is killed midway in a subprocess, rerun on the same
workdir, and must end bit-identical to an uninterrupted run.

The kill is real: the subprocess (this file run as a script) wraps one checkpoint function of the
job so that its N-th call sends SIGKILL to its own process before doing anything. The uninterrupted
and the resumed run happen in this process; both sides use one torch thread, so they compute alike.

    python tests/test_resume.py SCENARIO WORKDIR N   # the killed run (what the tests launch)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import diffquant
from diffquant import QuantConfig
from diffquant.evaluation import PromptItem, generate
from diffquant.sampling import SamplingSettings
from diffquant.evaluation.paired import GenStats
from diffquant.models.tiny import tiny_sd_pipeline

from tinyutil import PROMPTS, calibration_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every weight, quantizer parameter and buffer of the two denoisers is equal, bit for bit."""
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# ---------------------------------------------------------------- scenarios (shared with the killed subprocess)

# conv_in, the time embedding, a ResNet block, a downsampler and a few single layers are reconstructed; one prompt
# per recording batch, so the recording can be killed between its two batches.
QDIFFUSION_CONFIG = QuantConfig(
    method="qdiffusion", wbits=4, abits=8, calibration=calibration_config(num_prompts=2, num_inference_steps=2, batch_size=1),
    quantize_attention=False, options=dict(every_k=1, iterations=3, act_iterations=2, batch_size=4),
    keep_float=["down_blocks.0.attentions.*", "down_blocks.1.*", "mid_block.*", "up_blocks.*", "conv_out"],
)
PCR_CONFIG = QuantConfig(method="pcr", wbits=8, abits=8, calibration=calibration_config(num_prompts=1, num_inference_steps=4),
                         options={"sensitivity_prompts": 1, "relax_fraction": 0.25})


def qdiffusion(pipe, work: Path) -> torch.nn.Module:
    """Q-Diffusion: calibration recording (two batches), then block reconstruction (checkpoint per block)."""
    pipe = copy.deepcopy(pipe)
    return diffquant.quantize(pipe, QDIFFUSION_CONFIG, calibration=PROMPTS, workdir=work, progress=False).unet


def _recording_kill_point():
    from diffquant.calibration import collect

    return collect, "_write_shard"  # one call per saved recording batch


def _reconstruction_kill_point():
    from diffquant.learning import reconstruction

    return reconstruction, "_save_checkpoint"  # one call per reconstructed block


def pcr(pipe, work: Path) -> torch.nn.Module:
    """PCR: two progressive passes (4 steps each) around a per-step sensitivity analysis."""
    pipe = copy.deepcopy(pipe)
    return diffquant.quantize(pipe, PCR_CONFIG, calibration=PROMPTS, workdir=work, progress=False).unet


EMF_CONFIG = QuantConfig(method="emf", wbits=4, abits=8, calibration=calibration_config(height=16, width=16),
                         options=dict(steps_per_prompt=2, iterations=6, batch_size=4, distill_layers=2, sensitivity_rows=2,
                                      checkpoint_every=1, lr_weights=1e-4, freeze_at=[0.5], freeze_threshold=0.2))


def emf(pipe, work: Path) -> torch.nn.Module:
    """EMF: serial dataset, sensitivity, then 6 QAT iterations with a checkpoint after each."""
    pipe = copy.deepcopy(pipe)
    return diffquant.quantize(pipe, EMF_CONFIG, calibration=PROMPTS, workdir=work, progress=False).unet


def _qat_kill_point():
    from diffquant.learning import QATTrainer

    return QATTrainer, "save_checkpoint"  # one call per iteration here (checkpoint_every=1)


GENERATION = SamplingSettings(steps=2, guidance=7.5, height=32, width=32)
ITEMS = [PromptItem(p, seed) for p in PROMPTS[:3] for seed in (0, 1)]  # three batches of two images


def generation(pipe, work: Path) -> GenStats:
    """Evaluation generation: six images in batches of two into the PNG cache under ``work``."""
    return generate(pipe, ITEMS, GENERATION, work, batch_size=2)[1]


def _generation_kill_point():
    from diffquant.evaluation import paired

    return paired, "_write_png"  # one call per image


def _pcr_kill_point():
    from diffquant.calibration import progressive

    return progressive, "atomic_save_tensors"  # one call per fitted step, before its file is written


SCENARIOS: dict[str, tuple[Callable, Callable]] = {
    "recording": (qdiffusion, _recording_kill_point),
    "reconstruction": (qdiffusion, _reconstruction_kill_point),
    "pcr": (pcr, _pcr_kill_point),
    "qat": (emf, _qat_kill_point),
    "generation": (generation, _generation_kill_point),
}


def _kill_on_call(owner, name: str, n: int) -> None:
    """Make the ``n``-th call of ``owner.name`` SIGKILL this process before it runs."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _killed_run(scenario: str, work: Path, n: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, scenario, str(work), str(n)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


class _Counter:
    """Counts calls of ``owner.name`` while active (to prove a resumed run skipped finished work)."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        self.calls = 0
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)


# ---------------------------------------------------------------- tests


@pytest.mark.slow  # subprocess run, 25-60 s: `make test-slow`
def test_calibration_recording_and_reconstruction_resume_after_sigkill(sd, tmp_path, monkeypatch):
    from diffquant.learning import reconstruction

    reference = qdiffusion(sd, tmp_path / "whole")
    blocks = len(list((tmp_path / "whole" / "reconstruction").glob("block-*")))
    work = tmp_path / "killed"
    _killed_run("recording", work, 2)  # killed before the second recording batch was written
    assert sorted(p.parent.name for p in (work / "calibration").glob("batch-*/calibration.json")) == ["batch-00000"]
    _killed_run("reconstruction", work, 4)  # recording resumed and finished; killed after three blocks
    assert (work / "calibration" / "batch-00001" / "calibration.json").is_file()
    assert len(list((work / "reconstruction").glob("block-*"))) == 3 < blocks
    reconstructed = _Counter(monkeypatch, reconstruction, "_reconstruct_block")
    _assert_identical(qdiffusion(sd, work), reference)
    assert reconstructed.calls == blocks - 3


@pytest.mark.slow  # ~30 s; the evaluation and Q-Diffusion SIGKILL tests stay in the default run
def test_pcr_resumes_after_sigkill(sd, tmp_path, monkeypatch):
    from diffquant.calibration import progressive

    reference = pcr(sd, tmp_path / "whole")
    passes = sorted(p.name for p in (tmp_path / "whole" / "pcr").iterdir())
    assert passes == ["pass-1", "pass-2", "sensitivity"]
    work = tmp_path / "killed"
    _killed_run("pcr", work, 3)  # steps 0 and 1 of the first pass saved, step 2 fitted but lost
    assert sorted(p.name for p in (work / "pcr" / "pass-1").glob("step-*")) == ["step-0000.safetensors", "step-0001.safetensors"]
    fits = _Counter(monkeypatch, progressive, "fit_group_from_call")
    _assert_identical(pcr(sd, work), reference)
    pass_two = len(list((work / "pcr" / "pass-2").glob("step-*")))
    assert fits.calls == 2 + pass_two  # the first pass continued at step 2; nothing finished was fitted again
    with pytest.raises(ValueError, match="another model, prompts or config"):
        diffquant.quantize(copy.deepcopy(sd), dataclasses.replace(PCR_CONFIG, act_observer="percentile"),
                           calibration=PROMPTS, workdir=work, progress=False)


@pytest.mark.slow  # subprocess run, 25-60 s: `make test-slow`
def test_emf_qat_resumes_after_sigkill(sd, tmp_path):
    import json

    reference = emf(sd, tmp_path / "whole")
    work = tmp_path / "killed"
    _killed_run("qat", work, 4)  # iterations 1-3 checkpointed, the fourth done but not saved
    (checkpoint,) = (work / "emf" / "qat").glob("*/qat-checkpoint.json")  # one run, one fingerprint folder
    assert json.loads(checkpoint.read_text())["iteration"] == 3
    resumed = emf(sd, work)
    _assert_identical(resumed, reference)
    train, reference_train = (diffquant.quant_record(d).report["emf"]["train"] for d in (resumed, reference))
    assert train["resumed_from_iteration"] == 3 and train["loss"] == reference_train["loss"]


def test_evaluation_generation_resumes_after_sigkill(sd, tmp_path, monkeypatch):
    from diffquant.evaluation import paired

    generation(sd, tmp_path / "whole")
    work = tmp_path / "killed"
    _killed_run("generation", work, 4)  # the first batch written, then killed between the two images of the second
    assert len(list(work.glob("*/*.png"))) == 3
    batches = _Counter(monkeypatch, paired, "paired_noise")  # one call per rendered batch
    stats = generation(sd, work)
    assert batches.calls == 2 and (stats.generated, stats.cached) == (3, 3)  # the second batch whole, then the third
    whole = {p.relative_to(tmp_path / "whole"): p.read_bytes() for p in (tmp_path / "whole").glob("*/*.png")}
    resumed = {p.relative_to(work): p.read_bytes() for p in work.glob("*/*.png")}
    assert len(whole) == 6 and resumed == whole


if __name__ == "__main__":
    torch.set_num_threads(1)
    name, folder, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    run, kill_point = SCENARIOS[name]
    _kill_on_call(*kill_point(), count)
    run(tiny_sd_pipeline(), folder)
    sys.exit(f"{name}: finished without reaching call {count} of the kill point")
