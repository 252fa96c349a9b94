"""Bounded memory for calibration data: the spilling store, block reconstruction and EMF's serial dataset
under a budget smaller than their data end bit-identical to runs without one."""

from __future__ import annotations

import copy

import pytest
import torch

import diffquant
from diffquant import QuantConfig
from diffquant.calibration import replay
from diffquant.learning.dataset import SerialDatasetConfig, generate_serial_dataset
from diffquant.learning.reconstruction import ReconstructionOptions, reconstruct_blocks
from diffquant.methods.base import QuantJob
from diffquant.sampling import SamplingSettings
from diffquant.store import MemoryBudget, TensorStore, parse_bytes
from diffquant.wrap import wrap_denoiser

from tinyutil import PROMPTS, calibration_config


def test_parse_bytes_reads_units_and_refuses_nonsense():
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes(4096) == 4096
    for bad in ("lots", "-1GiB", "4 parsecs"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="memory size"):
        QuantConfig(max_memory="lots")


def test_store_spills_beyond_its_budget_and_reads_the_same_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    chunks = [{"x": torch.randn(n, 3, 5, generator=g), "t": torch.arange(n)} for n in (4, 3, 5, 2)]
    budget = MemoryBudget(400, spill_root=tmp_path)  # one chunk of 4 rows (4*15*4 + 4*8 = 272 bytes) fits
    store = TensorStore(budget)
    for chunk in chunks:
        store.append(chunk)
    whole = {k: torch.cat([c[k] for c in chunks]) for k in ("x", "t")}
    rows = torch.tensor([13, 0, 5, 6, 7, 3, 9, 13, 1])
    got = store.rows(rows)
    assert all(torch.equal(got[k], whole[k][rows]) for k in whole)
    assert torch.equal(store.column("x")[:], whole["x"]) and store.column("x").shape == whole["x"].shape
    spilled = list(tmp_path.rglob("*.safetensors"))
    assert len(spilled) == 3 and budget.peak <= budget.limit and store.resident_bytes <= budget.limit
    store.close()
    assert budget.resident == 0 and not list(tmp_path.rglob("*.safetensors"))
    budget.close()
    assert not list(tmp_path.iterdir())


def _reconstructed(pipe, calib, memory):
    fp = copy.deepcopy(pipe.unet)
    model = copy.deepcopy(pipe.unet)
    wrap_denoiser(model, QuantConfig(method="qdiffusion", wbits=4, abits=8, quantize_attention=False,
                                     keep_float=["*.attentions.*", "up_blocks.*", "mid_block.*"]))
    diffquant.set_state(model, "calibrating")
    replay(model, calib, progress=False)
    diffquant.set_state(model, "learning")
    opts = ReconstructionOptions(iterations=3, act_iterations=2, batch_size=3)
    reconstruct_blocks(model, fp, calib, opts, progress=False, memory=memory)
    return model.state_dict()


def test_reconstruction_under_a_small_budget_spills_and_ends_bit_identical(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sd"]
    calib = diffquant.record_denoiser_calls(pipe, PROMPTS[:2], calibration_config(num_prompts=2, num_inference_steps=2,
                                                                                  batch_size=2), progress=False)
    unbounded = _reconstructed(pipe, calib, None)
    budget = MemoryBudget(20_000, spill_root=tmp_path)  # a block cache here is ~50-200 kB
    bounded = _reconstructed(pipe, calib, budget)
    assert budget.files > 0 and budget.spilled > budget.limit and budget.peak <= budget.limit
    assert budget.resident == 0  # every block's cache released
    assert bounded.keys() == unbounded.keys()
    assert all(torch.equal(bounded[k], unbounded[k]) for k in bounded)


def test_serial_dataset_under_a_small_budget_reads_the_same_rows(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sd"]
    config = SerialDatasetConfig(SamplingSettings(3, 4.0, 32, 32, 0), steps_per_prompt=2, batch_size=1)
    whole = generate_serial_dataset(pipe, PROMPTS[:3], config, progress=False, memory=MemoryBudget("1GiB"))
    budget = MemoryBudget(30_000, spill_root=tmp_path / "spill")
    bounded = generate_serial_dataset(pipe, PROMPTS[:3], config, progress=False, memory=budget)
    assert budget.files > 0 and budget.peak <= budget.limit
    # with a shard folder, rows beyond the budget are read from the shards themselves (no spill copy)
    adopted = MemoryBudget(30_000, spill_root=tmp_path / "spill2")
    resumed = generate_serial_dataset(pipe, PROMPTS[:3], config, folder=tmp_path / "ds", progress=False, memory=adopted)
    assert adopted.files == 0 and adopted.peak <= adopted.limit
    rows = torch.randperm(len(whole), generator=torch.Generator().manual_seed(0))
    for other in (bounded, resumed):
        assert len(other) == len(whole) and torch.equal(other.step, whole.step) and torch.equal(other.prompt, whole.prompt)
        assert torch.equal(other.output[rows], whole.output[rows])
        a, b = other.kwargs(rows, "cpu", torch.float32), whole.kwargs(rows, "cpu", torch.float32)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_calibration_set_under_a_small_budget_holds_the_same_calls(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sd"]
    config = calibration_config(num_prompts=2, num_inference_steps=2, batch_size=1)
    whole = diffquant.record_denoiser_calls(pipe, PROMPTS[:2], config, progress=False)
    budget = MemoryBudget(5_000, spill_root=tmp_path)
    bounded = diffquant.record_denoiser_calls(pipe, PROMPTS[:2], config, progress=False, memory=budget)
    assert budget.files > 0 and budget.peak <= budget.limit
    assert len(bounded) == len(whole) == 4
    for a, b in zip(bounded, whole):
        assert list(a.inputs) == list(b.inputs) and a.step == b.step
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in b.inputs)


def _mapping_of(tensor: torch.Tensor) -> str:
    """The /proc/self/maps line whose address range holds ``tensor``'s data ('' for anonymous memory)."""
    pointer = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(v, 16) for v in fields[0].split("-"))
            if low <= pointer < high:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def test_float_reference_is_file_mapped_equal_tied_and_leaves_no_file(tiny_pipes, tmp_path):
    denoiser = copy.deepcopy(tiny_pipes["sd"].unet)
    denoiser.register_buffer("tied", denoiser.conv_in.weight, persistent=False)  # one tensor under two names
    job = QuantJob(denoiser, QuantConfig(), workdir=tmp_path)
    reference = job.float_reference()
    original, mapped = dict(denoiser.named_parameters()), dict(reference.named_parameters())
    assert original.keys() == mapped.keys() and all(torch.equal(original[k], mapped[k]) for k in original)
    weight = reference.conv_in.weight
    assert "diffquant-spill-" in _mapping_of(weight) and "(deleted)" in _mapping_of(weight)  # page cache, not heap
    assert reference.tied is weight
    assert not any(tmp_path.rglob("*.safetensors"))
    with torch.no_grad():
        weight.add_(1.0)  # private mapping: the original and the file's other readers never see it
    assert not torch.equal(weight, denoiser.conv_in.weight)
