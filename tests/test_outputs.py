"""Outputs never lost (issue 20): one writer per output, no output replaced unasked, atomic folder swaps, the
user's umask; and quantize's work folder keyed by the settings (issue 17), with a line when a run resumed."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import diffquant
from diffquant import QuantConfig
from diffquant.checkpoint import Checkpoint
from diffquant.cli import app
from diffquant import outputs
from diffquant.outputs import claim_output, recover_output

from tinyutil import PROMPTS

runner = CliRunner()

def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def _slow_writer(out: Path, ready: Path, go: Path) -> int:
    """Fork a process that claims ``out``, writes it, touches ``ready`` and publishes once ``go`` exists: a long
    quantize in miniature (forked, so it needs no second import of torch and diffusers)."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        with claim_output(out) as output:
            output.tmp.mkdir()
            (output.tmp / "weights.txt").write_text("first writer")
            ready.write_text("")
            while not go.exists():
                time.sleep(0.02)
            output.publish()
        status = 0
    finally:
        os._exit(status)


def test_a_second_concurrent_writer_fails_at_start_naming_the_first(tmp_path):
    out, ready, go = tmp_path / "q", tmp_path / "ready", tmp_path / "go"
    first = _slow_writer(out, ready, go)
    try:
        deadline = time.time() + 30
        while not ready.exists():
            assert time.time() < deadline, "the first writer did not start"
            time.sleep(0.02)
        result = invoke("quantize", "--model", "mini-sd", "--out", out)  # refused before any model loads
        assert result.exit_code == 2
        line = _one_error_line(result.output)
        assert f"{out} is being written by another diffquant process (pid {first})" in line
        with pytest.raises(FileExistsError, match=f"pid {first}"):  # the Python API refuses the same way
            with claim_output(out, overwrite=True):
                pass
    finally:
        go.write_text("")
        assert os.waitpid(first, 0)[1] == 0
    assert (out / "weights.txt").read_text() == "first writer"  # the first writer's output, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "q", "ready"]  # no lock or partial left


def test_replacing_a_folder_swaps_it_whole_and_a_half_done_swap_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "report"
    with claim_output(out) as output:
        output.tmp.mkdir()
        (output.tmp / "old.txt").write_text("old")
        output.publish()
    with claim_output(out, overwrite=True) as output:
        output.tmp.mkdir()
        (output.tmp / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # the old output stays until the new one is complete
        output.publish()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError), claim_output(out, overwrite=True) as output:  # a failed write changes nothing
        output.tmp.mkdir()
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    # Without renameat2: the old output is renamed aside, the new one in, the old one deleted.
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    with claim_output(out, overwrite=True) as output:
        output.tmp.mkdir()
        (output.tmp / "newer.txt").write_text("newer")
        output.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"] and (out / "newer.txt").is_file()
    # A writer killed between those two renames: the next claim puts the old output back.
    os.rename(out, tmp_path / ".old-999999999-report")
    recover_output(out)
    assert (out / "newer.txt").read_text() == "newer"


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory, tiny_pipes):
    folder = tmp_path_factory.mktemp("fp") / "tiny-sd"
    tiny_pipes["sd"].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["quantize", "generate", "export", "eval", "bench", "zoo-train"])
def test_every_command_refuses_an_existing_output_without_overwrite(command, fp_folder, tmp_path):
    out = tmp_path / ("run" if command == "zoo-train" else "out")
    existing = out / "evaluator" if command == "zoo-train" else out
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("mine")
    args = {
        "quantize": ["quantize", "--model", fp_folder, "--out", out],
        "generate": ["generate", "--model", fp_folder, "--prompt", "a red circle", "--out", out],
        "export": ["export", "--model", fp_folder, "--out", out],
        "eval": ["eval", "--reference", fp_folder, "--model", fp_folder, "--out", out],
        "bench": ["bench", "--model", fp_folder, "--out", out],
        "zoo-train": ["zoo", "train", "evaluator", "--out", out, "--device", "cpu"],
    }[command]
    result = invoke(*args)
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert f"{existing} already exists" in line and "--overwrite" in line
    assert (existing / "keep.txt").read_text() == "mine"


def test_outputs_get_the_users_umask(tmp_path, tiny_pipes):
    import copy

    from diffquant.io import atomic_save_tensors, atomic_write

    pipe = diffquant.quantize(copy.deepcopy(tiny_pipes["sd"]), QuantConfig(wbits=8, abits=None), progress=False)
    before = os.umask(0o027)
    try:
        diffquant.save(pipe, tmp_path / "q")
        atomic_write(tmp_path / "a.json", "{}")
        atomic_save_tensors({"x": torch.zeros(1)}, tmp_path / "t.safetensors")
    finally:
        os.umask(before)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert "q/vae/diffusion_pytorch_model.safetensors" in modes  # written by safetensors, 0600 by itself
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert not wrong


QUANTIZE = ["quantize", "--num-prompts", 1, "--batch-size", 1, "--guidance", 5.0, "--abits", 8]


def test_quantize_work_folder_is_keyed_by_the_settings_resumes_and_goes_away(fp_folder, tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    base = [*QUANTIZE, "--model", fp_folder, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "q"]
    result = invoke(*base, "--steps", 2, "--keep-work")
    assert result.exit_code == 0, result.output
    assert "resumed" not in result.output and "kept the work folder" in result.output
    (work,) = (tmp_path / ".q.work").iterdir()
    # The same settings resume from the kept state (and say so); other settings start fresh beside it.
    result = invoke(*base, "--steps", 2, "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"resumed from {work}: reused calibration data (1 batch)" in result.output
    assert not (tmp_path / ".q.work").exists()  # removed after success
    (tmp_path / ".q.work" / "other").mkdir(parents=True)  # an interrupted run with other settings
    result = invoke(*base, "--steps", 3, "--overwrite")
    assert result.exit_code == 0, result.output  # not refused by the other run's state
    assert f"{tmp_path / '.q.work'} still holds 1 interrupted run(s) with other settings" in result.output
    assert sorted(p.name for p in (tmp_path / ".q.work").iterdir()) == ["other"]


def test_a_checkpoint_refuses_another_runs_state_and_keyed_ones_sit_side_by_side(tmp_path):
    Checkpoint(tmp_path / "c", "aaaa", "a reconstruction").open().mark_done("block-0000", {"loss": 1.0})
    assert Checkpoint(tmp_path / "c", "aaaa", "a reconstruction").open().done() == {"block-0000": {"loss": 1.0}}
    with pytest.raises(ValueError, match=r"c holds a reconstruction made with other settings \(another model, prompts or "
                                         r"config\); delete it or pass a fresh workdir"):
        Checkpoint(tmp_path / "c", "bbbb", "a reconstruction").open()
    one, two = (Checkpoint.keyed(tmp_path / "k", {"steps": s}, "x").open() for s in (2, 3))
    assert one.folder != two.folder and one.folder.parent == two.folder.parent
    assert Checkpoint.keyed(tmp_path / "k", {"steps": 2}, "x").folder == one.folder




def test_full_disk_while_saving_tensors_is_enospc(tmp_path):
    """A really full disk (a tiny tmpfs), not a patched call: safetensors' own error becomes OSError(ENOSPC)."""
    import errno
    import subprocess

    from diffquant.io import atomic_save_tensors

    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OSError) as failure:
            atomic_save_tensors({"w": torch.zeros(1 << 16)}, small / "x.safetensors")
        assert failure.value.errno == errno.ENOSPC
        assert not (small / "x.safetensors").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)
