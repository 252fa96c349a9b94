"""Unconditional pipelines (DDPM, DDIM, LDM over UNet2DModel): every method through the UNet2DModel adapter,
shortcut splits on the up path, save/load, generation and evaluation from seeds, and the CLI's prompt refusals."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import diffquant
from diffquant import CalibrationConfig, QuantConfig
from diffquant.models.adapters import get_adapter
from diffquant.models.tiny_unconditional import tiny_ddim_pipeline, tiny_ddpm_pipeline, tiny_ldm_pipeline
from diffquant.nn import quantized_layers
from diffquant.sampling import SamplingSettings, denoiser_calls, sample, unconditional_prompts

RUN = SamplingSettings(steps=2)
OPTIONS = {
    "rtn": {},
    "qdiffusion": dict(iterations=2, act_iterations=1, batch_size=4, every_k=1),
    "pcr": dict(sensitivity_prompts=1),
    "emf": dict(steps_per_prompt=2, iterations=2, batch_size=4, distill_layers=2, sensitivity_rows=2),
}


@pytest.fixture(scope="module")
def pipes():
    return {"ddpm": tiny_ddpm_pipeline(), "ddim": tiny_ddim_pipeline(), "ldm": tiny_ldm_pipeline()}


def _images(pipe, seeds=(0, 1)) -> torch.Tensor:
    return sample(pipe, unconditional_prompts(len(seeds)), RUN, seeds=list(seeds), output_type="pt")


def _predictions(pipe) -> torch.Tensor:
    """Every denoiser output along the sampling trajectory of seeds 0 and 1."""
    seen: list[torch.Tensor] = []
    with denoiser_calls(pipe, after=lambda call: seen.append(call.prediction.clone())):
        _images(pipe)
    return torch.stack(seen)


def _quantize(pipe, method: str, caplog, wbits: int = 8, **config):
    cfg = QuantConfig(method=method, wbits=wbits, abits=8, options=OPTIONS[method],
                      calibration=CalibrationConfig(num_prompts=2, num_inference_steps=2, batch_size=2), **config)
    with caplog.at_level(logging.WARNING, logger="diffquant"):
        qpipe = diffquant.quantize(copy.deepcopy(pipe), cfg, progress=False)
    assert not [r for r in caplog.records if "no diffquant adapter" in r.getMessage()]  # the UNet2DModel adapter, no fallback
    return qpipe


@pytest.mark.parametrize("family,method", [  # PCR and EMF (~8 s each) run with the slow tests
    ("ddpm", "rtn"), ("ldm", "rtn"), ("ddim", "qdiffusion"), pytest.param("ddim", "pcr", marks=pytest.mark.slow),
    pytest.param("ddim", "emf", marks=pytest.mark.slow)])
def test_every_method_quantizes_through_the_adapter(pipes, family, method, caplog, tmp_path):
    pipe = pipes[family]
    qpipe = _quantize(pipe, method, caplog, wbits=4 if method != "rtn" else 8)
    unet = qpipe.unet
    record = diffquant.quant_record(unet)
    assert record.family == "unet2d"
    assert diffquant.nn.states(unet) == {"frozen": len(quantized_layers(unet))}
    if method == "emf":  # time layers precalculated through the adapter's time path, none computed live
        assert record.report["emf"]["time_precalculation"]["misses_during_training"] == 0
    ref, out = _images(pipe), _images(qpipe)
    err = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and 0 < err < 0.5, err  # quantized, not broken
    loaded = diffquant.load(diffquant.save(qpipe, tmp_path / "q"))
    assert type(loaded).__name__ == type(pipe).__name__
    # save -> load is bit-exact: the denoiser (and so pixel-space images; diffusers' own reload of a VQ decoder is not)
    assert torch.equal(_predictions(loaded), _predictions(qpipe))
    assert torch.equal(_images(loaded), out) or family == "ldm"


def test_up_path_concatenations_get_split_quantizers_and_convert(pipes, caplog, tmp_path):
    from diffquant.runtime import convert

    splits = get_adapter(pipes["ddim"].unet).skip_splits()
    assert sorted(splits) == [f"up_blocks.{i}.resnets.{j}.conv_shortcut" for i in (0, 1) for j in (0, 1)]
    assert all(deep + skip == pipes["ddim"].unet.get_submodule(n).in_channels for n, (deep, skip) in splits.items())
    qpipe = _quantize(pipes["ddim"], "rtn", caplog, split_shortcut=True)
    assert diffquant.quant_record(qpipe.unet).skip_splits == splits
    for name in splits:
        layer = qpipe.unet.get_submodule(name)
        assert layer.input_quantizer.scale.shape == (1, 2) and layer.weight_quantizer.scale.shape[1] == 2
    fake = _images(qpipe)
    converted = convert(copy.deepcopy(qpipe), progress=False)
    fallback = diffquant.quant_record(converted.unet).report["runtime"]["float_fallback"]
    assert all(name.endswith(".processor") for name in fallback)  # every Linear/Conv2d integer, split layers included
    # Integer kernels give the fake-quant images up to rounding flips that cascade over the steps (docs/runtime.md):
    # the project's whole-model contract is converted-vs-fake-quant below the quantization error itself.
    drift = float((_images(converted) - fake).abs().mean())
    assert drift < float((fake - _images(pipes["ddim"])).abs().mean()) and drift < 0.01
    loaded = diffquant.load(diffquant.save(converted, tmp_path / "c"))
    assert torch.equal(_predictions(loaded), _predictions(converted))


def test_adapter_names_blocks_time_and_io_layers(pipes):
    adapter = get_adapter(pipes["ldm"].unet)
    blocks = adapter.blocks()
    assert {"down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.upsamplers.0", "down_blocks.0.downsamplers.0",
            "up_blocks.1.resnets.1"} <= set(blocks)
    assert adapter.time_layers()[:2] == ["time_embedding.linear_1", "time_embedding.linear_2"]
    assert all(n.startswith("time_embedding.") or n.endswith(".time_emb_proj") for n in adapter.time_layers())
    assert adapter.io_layers() == ["conv_in", "conv_out"]
    inputs = adapter.example_inputs(batch=2)
    assert adapter.call(inputs).shape == inputs["sample"].shape


def test_kl_autoencoder_ldm_samples_and_pairs_by_seed():
    pipe = tiny_ldm_pipeline(autoencoder="kl")
    both = _images(pipe, (3, 4))
    assert both.shape == (2, 3, 16, 16)
    assert torch.allclose(_images(pipe, (4,))[0], both[1], atol=1e-6)  # a sample depends on its own seed only


def test_sampling_refuses_prompts_guidance_and_size(pipes):
    pipe = pipes["ddim"]
    with pytest.raises(ValueError, match="unconditional and takes no prompts"):
        sample(pipe, ["a red circle"], RUN)
    with pytest.raises(ValueError, match="takes no guidance_scale"):
        sample(pipe, [""], RUN.replace(guidance=5.0))
    with pytest.raises(ValueError, match="takes no height, width"):
        sample(pipe, [""], RUN.replace(height=32, width=32))
    with pytest.raises(ValueError, match="calibrate it from seeds"):
        diffquant.quantize(copy.deepcopy(pipe), QuantConfig(), calibration=["a red circle"], progress=False)


# ---------------------------------------------------------------- the CLI from seeds


@pytest.fixture(scope="module")
def folders(tmp_path_factory, pipes):
    from diffquant.models.tiny import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("uncond")
    pipes["ddim"].save_pretrained(root / "ddim")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    (root / "p.txt").write_text("a red circle on the left\n")
    return root


def _cli(*args: str):
    from typer.testing import CliRunner

    from diffquant.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_quantize_generate_eval_from_seeds(folders, tmp_path):
    import json

    q = tmp_path / "q"
    result = _cli("quantize", "--model", folders / "ddim", "--method", "rtn", "--num-samples", "2", "--steps", "2", "--out", q)
    assert result.exit_code == 0, result.output
    assert diffquant.quant_record(diffquant.load(q).unet).report["calibration_samples"] == 4  # 2 samples x 2 steps
    result = _cli("generate", "--model", q, "--num-samples", "2", "--seed", "5", "--steps", "2", "--out", tmp_path / "img.png")
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(tmp_path / "img.png").size == (2 * 16, 16)  # seeds 5 and 6 side by side
    result = _cli("eval", "--reference", folders / "ddim", "--model", q, "--num-samples", "3", "--steps", "2", "--metrics",
                  "psnr,clip,attributes", "--out", tmp_path / "eval", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "eval/results.json").read_text())
    assert results["settings"]["n_images"] == 3 and results["models"][0]["summary"]["psnr"] > 10
    assert "unconditional" in results["skipped"]["clip"] and "unconditional" in results["skipped"]["attributes"]


def test_bench_pairs_an_unconditional_model_by_seed(folders, tmp_path):
    import json

    result = _cli("bench", "--model", folders / "ddim", "--methods", "rtn", "--bits", "w8a8,w4a8", "--peers", "none",
                  "--num-samples", "3", "--calib-samples", "2", "--steps", "2", "--metrics", "psnr,ssim,fd_fp,fd_ref",
                  "--reference-images", "zoo:scenes", "--out", tmp_path / "b", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "b/results.json").read_text())
    assert results["settings"]["n_images"] == 3 and [m["label"] for m in results["models"]] == ["rtn-w8a8", "rtn-w4a8"]
    assert [row["seed"] for row in results["models"][0]["per_image"]] == [0, 1, 2]
    w8, w4 = (m["summary"] for m in results["models"])
    assert w8["psnr"] > w4["psnr"] and all(k in w8 for k in ("ssim", "fd_fp", "fd_ref"))
    assert "fd_ref" in results["reference"]["summary"]  # FP's own distance to the real scenes, beside each row's


def test_calibration_seeds_name_each_sample(pipes, tmp_path, folders):
    from diffquant.calibration.collect import record_denoiser_calls

    def first_inputs(**calibration):
        cfg = CalibrationConfig(num_prompts=2, num_inference_steps=2, batch_size=1, **calibration)
        calls = record_denoiser_calls(pipes["ddim"], unconditional_prompts(2), cfg, progress=False).calls
        return torch.cat([c.inputs["sample"] for c in calls if c.step == 0])

    noise = torch.cat([torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (5, 9)])
    assert torch.equal(first_inputs(seeds=[5, 9]), noise)  # sample i starts from seed i's noise, as generate --seeds
    assert not torch.equal(first_inputs(), noise)
    with pytest.raises(ValueError, match="one per sample"):
        CalibrationConfig(num_prompts=3, seeds=[1, 2])
    q = tmp_path / "q"
    result = _cli("quantize", "--model", folders / "ddim", "--method", "rtn", "--seeds", "100-102", "--steps", "2", "--out", q)
    assert result.exit_code == 0, result.output
    record = diffquant.quant_record(diffquant.load(q).unet)
    assert record.report["calibration_samples"] == 6 and record.config.calibration.seeds == [100, 101, 102]


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--model", "{sd}", "--seeds", "0,1", "--out", "{tmp}/q"], "--seeds picks calibration samples of unconditional"),
    (["quantize", "--model", "{ddim}", "--prompts", "{p}", "--out", "{tmp}/q"], "DDIMPipeline is unconditional and takes no prompts"),
    (["generate", "--model", "{ddim}", "--prompt", "a red circle", "--out", "{tmp}/i.png"], "DDIMPipeline is unconditional"),
    (["eval", "--reference", "{ddim}", "--model", "{ddim}", "--prompts", "{p}", "--out", "{tmp}/e"], "takes no prompts"),
    (["eval", "--reference", "{ddim}", "--model", "{ddim}", "--seeds", "0,1", "--num-samples", "2", "--out", "{tmp}/e"],
     "give --seeds or --num-samples, not both"),
    (["generate", "--model", "{ddim}", "--guidance", "5", "--steps", "2", "--out", "{tmp}/i.png"], "takes no guidance_scale"),
    (["generate", "--model", "{sd}", "--out", "{tmp}/i.png"], "StableDiffusionPipeline is text-conditioned and needs prompts"),
    (["eval", "--reference", "{sd}", "--model", "{sd}", "--num-samples", "2", "--out", "{tmp}/e"],
     "--num-samples is for unconditional models"),
    (["bench", "--model", "{ddim}", "--calib-prompts", "{p}", "--peers", "none", "--out", "{tmp}/b"], "drop --calib-prompts"),
    (["bench", "--model", "{sd}", "--calib-samples", "2", "--peers", "none", "--out", "{tmp}/b"], "--calib-samples is for unconditional"),
])
def test_cli_refuses_prompts_for_unconditional_models(folders, tmp_path, argv, message):
    names = {"ddim": folders / "ddim", "sd": folders / "sd", "p": folders / "p.txt", "tmp": tmp_path}
    result = _cli(*[a.format(**names) for a in argv])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
