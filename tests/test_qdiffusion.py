"""Q-Diffusion: AdaRound, BRECQ block reconstruction, shortcut splitting, resume, SD and SD3 end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffquant
from diffquant import CalibrationConfig, CalibrationSet, QuantConfig
from diffquant.calibration import DenoiserCall
from diffquant.methods import qdiffusion as qd_module
from diffquant.models.adapters import get_adapter
from diffquant.nn import states
from diffquant.quant.adaround import AdaRound, BetaSchedule
from diffquant.learning.reconstruction import ReconstructionOptions, reconstruct_blocks
from diffquant.wrap import wrap_denoiser

from tinyutil import PROMPTS, calibration_config, sample_latents

# Small enough for a loaded 2-core machine: 2 prompts x 2 steps x (cond + uncond) = 8 samples, few iterations.
FAST = dict(every_k=1, iterations=4, act_iterations=2, batch_size=4)
ONE_BLOCK = "down_blocks.0.resnets.0"
# Every tiny-UNet layer outside down_blocks.0.resnets.0 stays float: one block to reconstruct, for focused tests.
ONLY_ONE_BLOCK = ["time_embedding.*", "conv_in", "conv_out", "down_blocks.0.attentions.*", "down_blocks.0.downsamplers.*",
                  "down_blocks.1.*", "mid_block.*", "up_blocks.*"]


def tiny_calibration(**overrides) -> CalibrationConfig:
    return calibration_config(**{"num_prompts": 2, "num_inference_steps": 2, "batch_size": 2, **overrides})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def quantize(pipe, method: str, wbits: int = 4, abits: int | None = 8, workdir=None, keep_float=(), quantize_attention=True,
             calibration_batch: int = 2, **options):
    cfg = QuantConfig(method=method, wbits=wbits, abits=abits, calibration=tiny_calibration(batch_size=calibration_batch),
                      keep_float=list(keep_float),
                      quantize_attention=quantize_attention, options={**FAST, **options} if method == "qdiffusion" else {})
    return diffquant.quantize(copy.deepcopy(pipe), cfg, calibration=PROMPTS, workdir=workdir, progress=False)


@pytest.fixture(scope="module")
def sd_runs(tiny_pipes):
    pipe = tiny_pipes["sd"]
    # Attention blocks stay float here to keep the run short; SD3 covers quantized attention.
    return {"fp": pipe, "qdiffusion": quantize(pipe, "qdiffusion", keep_float=["*.attentions.*"], quantize_attention=False)}


# ---------------------------------------------------------------- AdaRound on its own


class _OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, sample, timestep, return_dict=False):
        return (self.proj(sample),)


def test_adaround_starts_at_the_float_weight_and_ends_at_hard_rounding():
    torch.manual_seed(0)
    fp = _OneLayer()
    calib = CalibrationSet([DenoiserCall({"sample": torch.randn(16, 16), "timestep": torch.tensor(500)}, 0, 1)])
    model = copy.deepcopy(fp)
    wrap_denoiser(model, QuantConfig(method="qdiffusion", wbits=3, abits=None))
    layer = model.proj
    w2, scale = layer.weight.detach().clone(), layer.weight_quantizer._expanded()[0]
    rounding = AdaRound(w2, scale)
    assert torch.allclose(rounding(w2, scale) * scale, w2, atol=1e-5)  # soft start = no rounding error
    assert rounding.binary_fraction() < 0.2
    opts = ReconstructionOptions(iterations=400, warmup=0.2, weight_lr=5e-2, batch_size=16, round_weight=0.01)
    stats = reconstruct_blocks(model, fp, calib, opts, progress=False)
    assert [s.name for s in stats] == ["proj"]
    assert stats[0].binary_fraction > 0.98, stats[0]  # the regulariser drove h(V) to 0/1
    assert 0 < stats[0].flipped_fraction < 0.5  # some elements learned to round against nearest
    assert stats[0].weight_loss < stats[0].rtn_loss
    x = w2 / scale
    q = layer.weight.detach() / scale  # the baked weight sits on the grid at floor or floor + 1
    assert torch.allclose(q, torch.round(q), atol=1e-4)
    offset = torch.round(q) - torch.floor(x)
    assert set(offset.unique().tolist()) <= {0.0, 1.0}
    assert states(model) == {"frozen": 1}


def _lsq_on_one_layer(magnitude: float, act_iterations: int, act_lr: float):
    """One 4-bit-input layer on data with an outlier (its min/max range is too wide), LSQ only; returns the
    block statistics, the step size before and after."""
    torch.manual_seed(0)
    fp = _OneLayer()
    sample = torch.randn(64, 16)
    sample[0, 0] = 12.0  # one outlier stretches the min/max range: a shorter step size is better
    calib = CalibrationSet([DenoiserCall({"sample": sample * magnitude, "timestep": torch.tensor(500)}, 0, 1)])
    model = copy.deepcopy(fp)
    wrap_denoiser(model, QuantConfig(method="qdiffusion", wbits=8, abits=4))
    diffquant.set_state(model, "calibrating")
    with torch.no_grad():
        model(**calib.calls[0].kwargs())
    diffquant.set_state(model, "learning")
    start = model.proj.input_quantizer.scale.detach().clone()
    opts = ReconstructionOptions(iterations=1, learn_weights=False, act_iterations=act_iterations, act_lr=act_lr, batch_size=32)
    [stats] = reconstruct_blocks(model, fp, calib, opts, progress=False)
    return stats, start, model.proj.input_quantizer.scale.detach()


def test_lsq_learns_a_better_activation_step_size():
    stats, start, end = _lsq_on_one_layer(1.0, act_iterations=150, act_lr=1e-2)
    assert stats.act_loss < 0.9 * stats.act_init_loss and not stats.act_reverted, stats
    assert (end < start).all()


@pytest.mark.parametrize("magnitude", [1e-3, 1e3])
def test_lsq_learning_rate_is_relative_to_each_step_size(magnitude):
    """The same data at 1e-3 and 1e3 moves the step size by the same share, at most act_lr per iteration
    (an absolute rate would blow up the small step size and leave the large one where it was)."""
    _, start, end = _lsq_on_one_layer(magnitude, act_iterations=20, act_lr=1e-2)
    change = ((start - end) / start).abs().max().item()
    assert 0.1 < change <= 20 * 1e-2 * 1.05, change


def test_beta_schedule_warms_up_then_anneals():
    schedule = BetaSchedule(100, warmup=0.2, start=20.0, end=2.0)
    assert not schedule.active(19) and schedule.active(20)
    assert schedule.beta(0) == schedule.beta(20) == 20.0
    assert schedule.beta(99) == pytest.approx(2.0)
    assert 2.0 < schedule.beta(60) < 20.0


# ---------------------------------------------------------------- tiny SD pipeline


def _block_io(unet: nn.Module, name: str, calls: CalibrationSet):
    """Float inputs and outputs of block ``name`` over the calibration calls."""
    inputs, outputs = [], []
    block = unet.get_submodule(name)
    h1 = block.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
    h2 = block.register_forward_hook(lambda m, a, o: outputs.append(o))
    with torch.no_grad():
        for call in calls:
            unet(**call.kwargs())
    h1.remove(), h2.remove()
    return inputs, outputs


def test_reconstruction_lowers_block_error_versus_rtn(tiny_pipes):
    pipe = tiny_pipes["sd"]
    runs = {m: quantize(pipe, m, abits=None, keep_float=ONLY_ONE_BLOCK, iterations=60) for m in ("rtn", "qdiffusion")}
    report = diffquant.quant_record(runs["qdiffusion"].unet).report["qdiffusion"]
    [block] = report["blocks"]
    assert block["name"] == ONE_BLOCK and block["weight_loss"] < block["rtn_loss"], block
    assert 0 < block["flipped_fraction"] < 0.5
    # Independent check on prompts the reconstruction never saw: same weight scales, learned vs nearest rounding.
    calib = diffquant.record_denoiser_calls(pipe, PROMPTS[2:], tiny_calibration(), progress=False)
    inputs, targets = _block_io(pipe.unet, ONE_BLOCK, calib)
    errors = {}
    for method, qpipe in runs.items():
        block_q = qpipe.unet.get_submodule(ONE_BLOCK)
        with torch.no_grad():
            errors[method] = sum(((block_q(*a, **k) - t) ** 2).sum().item() for (a, k), t in zip(inputs, targets))
    assert errors["qdiffusion"] < 0.9 * errors["rtn"], errors


def test_split_shortcut_on_by_default_and_gives_two_scales(sd_runs, tiny_pipes):
    unet = sd_runs["qdiffusion"].unet
    splits = get_adapter(tiny_pipes["sd"].unet).skip_splits()
    assert splits and diffquant.quant_record(unet).skip_splits == splits
    ratios = []
    for name, (deep, skip) in splits.items():
        layer = unet.get_submodule(name)
        act = layer.input_quantizer.scale[0]
        assert act.shape == (2,) and act[0] != act[1], (name, act)  # each half calibrated on its own data
        ratios.append(float(act.max() / act.min()))
        wscale = layer.weight_quantizer.scale
        assert wscale.shape[1] == 2 and not torch.allclose(wscale[:, 0], wscale[:, 1])
    assert max(ratios) > 1.05, ratios  # random weights: most, not all, halves differ clearly
    off = copy.deepcopy(tiny_pipes["sd"].unet)
    record = wrap_denoiser(off, QuantConfig(method="qdiffusion", split_shortcut=False))
    assert record.skip_splits == {}
    assert off.get_submodule(next(iter(splits))).input_quantizer.scale.shape == (1, 1)


def test_softmax_bits_follow_the_preset():
    opts = qd_module.Options(preset="paper")
    assert opts.softmax_bits_for(QuantConfig()) == 16
    assert opts.softmax_bits_for(QuantConfig(softmax_bits=10)) == 10
    assert qd_module.Options().softmax_bits_for(QuantConfig()) == 8


def test_quantized_sd_samples_close_and_reloads_bit_for_bit(sd_runs, tmp_path):
    ref = sample_latents(sd_runs["fp"])
    out = sample_latents(sd_runs["qdiffusion"])
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.6
    unet = sd_runs["qdiffusion"].unet
    assert states(unet) == {"frozen": len(diffquant.quantized_layers(unet))}
    folder = diffquant.save(sd_runs["qdiffusion"], tmp_path / "q")
    loaded = diffquant.load(folder)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample_latents(loaded), out)


def test_killed_run_resumes_to_identical_weights(tiny_pipes, tmp_path, monkeypatch):
    pipe = tiny_pipes["sd"]
    # conv_in, the time embedding, a ResNet block and a downsampler: enough blocks to kill the run after three.
    # One prompt per recording batch, so the recording can be killed between its two batches.
    options = dict(iterations=3, act_iterations=2, quantize_attention=False, calibration_batch=1,
                   keep_float=["down_blocks.0.attentions.*", "down_blocks.1.*", "mid_block.*", "up_blocks.*", "conv_out"])
    reference = quantize(pipe, "qdiffusion", workdir=tmp_path / "whole", **options).unet.state_dict()

    class Killed(Exception):
        pass

    def dies_after(n, fn):
        calls = {"n": 0}

        def wrapped(*args, **kwargs):
            if calls["n"] == n:
                raise Killed
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapped

    work = tmp_path / "killed"
    import diffquant.learning.reconstruction as recon

    with monkeypatch.context() as m:  # killed while recording the second prompt batch
        m.setattr(qd_module, "record_denoiser_calls", dies_after(1, qd_module.record_denoiser_calls))
        with pytest.raises(Killed):
            quantize(pipe, "qdiffusion", workdir=work, **options)
    assert (work / "calibration" / "batch-00000" / "calibration.json").is_file()
    assert not (work / "calibration" / "batch-00001").exists()
    with monkeypatch.context() as m:  # killed after three finished blocks
        m.setattr(recon, "_save_checkpoint", dies_after(3, recon._save_checkpoint))
        with pytest.raises(Killed):
            quantize(pipe, "qdiffusion", workdir=work, **options)
    assert len(list((work / "reconstruction").glob("block-*.safetensors"))) == 3
    resumed = quantize(pipe, "qdiffusion", workdir=work, **options).unet
    state = resumed.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    blocks = diffquant.quant_record(resumed).report["qdiffusion"]["blocks"]
    assert len(blocks) == len({b["name"] for b in blocks}) > 3
    with pytest.raises(ValueError, match="another model, prompts or config"):
        quantize(pipe, "qdiffusion", workdir=work, **{**options, "iterations": 4})


# ---------------------------------------------------------------- SD3 and options


def test_end_to_end_on_tiny_sd3(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sd3"]
    qpipe = quantize(pipe, "qdiffusion")
    transformer = qpipe.transformer
    record = diffquant.quant_record(transformer)
    assert record.skip_splits == {}
    report = record.report["qdiffusion"]
    names = [b["name"] for b in report["blocks"]]
    assert "transformer_blocks.0" in names and "transformer_blocks.1" in names
    processors = [m for m in transformer.modules() if type(m).__name__ == "QuantJointAttnProcessor"]
    assert processors and all(p.q_quantizer.mode == "quantize" and p.softmax_quantizer.spec.unsigned for p in processors)
    assert report["calibration_samples"] == 8 and report["reconstruction_seconds"] > 0
    assert states(transformer) == {"frozen": len(diffquant.quantized_layers(transformer))}
    out, ref = sample_latents(qpipe), sample_latents(pipe)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.6
    folder = diffquant.save(qpipe, tmp_path / "q3")
    loaded = diffquant.load(folder)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample_latents(loaded), out)


def test_end_to_end_on_tiny_sdxl(tiny_pipes):
    """SDXL-style UNet (added text/time embeddings, transformer depth > 1): shortcut splits, blocks and attention."""
    pipe = tiny_pipes["sdxl"]
    qpipe = quantize(pipe, "qdiffusion")
    unet = qpipe.unet
    record = diffquant.quant_record(unet)
    splits = get_adapter(pipe.unet).skip_splits()
    assert splits and record.skip_splits == splits
    names = [b["name"] for b in record.report["qdiffusion"]["blocks"]]
    assert any(n.startswith("up_blocks.") and ".resnets." in n for n in names)
    assert any(n.endswith(".transformer_blocks.0") for n in names)
    processors = [m for m in unet.modules() if type(m).__name__ == "QuantAttnProcessor"]
    assert processors and all(p.softmax_quantizer.mode == "quantize" for p in processors)
    assert states(unet) == {"frozen": len(diffquant.quantized_layers(unet))}
    out, ref = sample_latents(qpipe), sample_latents(pipe)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.6


def test_presets_and_option_errors():
    paper = qd_module.Options(preset="paper")
    recon = paper.reconstruction()
    assert (recon.iterations, recon.act_iterations, recon.batch_size, recon.round_weight) == (20000, 5000, 32, 0.01)
    assert (recon.beta_start, recon.beta_end, recon.warmup) == (20.0, 2.0, 0.2)
    assert paper.calibration_overrides(CalibrationConfig()) == {"num_prompts": 64, "num_inference_steps": 50, "every_k": 2}
    # values the user set in the config or as options win over the preset
    assert "num_prompts" not in paper.calibration_overrides(CalibrationConfig(num_prompts=16))
    assert qd_module.Options(preset="paper", iterations=100).reconstruction().iterations == 100
    assert qd_module.Options().calibration_overrides(CalibrationConfig()) == {"every_k": 5}
    with pytest.raises(ValueError, match="unknown qdiffusion preset 'fast'"):
        QuantConfig(method="qdiffusion", options={"preset": "fast"})
    with pytest.raises(ValueError, match="unknown qdiffusion options"):
        QuantConfig(method="qdiffusion", options={"iters": 5})
    with pytest.raises(ValueError, match="warmup"):
        QuantConfig(method="qdiffusion", options={"warmup": 1.5})
    assert QuantConfig(method="qdiffusion").use_split_shortcut


def test_bare_denoiser_needs_calibration(tiny_pipes):
    with pytest.raises(ValueError, match="qdiffusion needs calibration data"):
        diffquant.quantize(copy.deepcopy(tiny_pipes["sd"].unet), QuantConfig(method="qdiffusion"), progress=False)
