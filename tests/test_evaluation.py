"""Evaluation harness: metrics against hand computations, the image cache, eval end to end, the report in Chromium, bench."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import diffquant
from diffquant import CalibrationConfig, QuantConfig
from diffquant.evaluation import PromptItem, frechet_distance, generate, load_prompts, model_fingerprint, parse_seeds, psnr, ssim
from diffquant.evaluation.metrics import LPIPS, ClipScorer, InceptionFeatures, MetricUnavailable
from diffquant.models.tiny import tiny_sd_pipeline
from diffquant.sampling import SamplingSettings

CHROMIUM = Path("/usr/bin/chromium")
SETTINGS = SamplingSettings(steps=2, guidance=7.5, height=32, width=32)
PROMPTS = ["a red circle on the left", "a large blue square at the top", "a small green triangle"]


@pytest.fixture(scope="module")
def fp_pipe():
    return tiny_sd_pipeline(0)


@pytest.fixture(scope="module")
def q_pipe(fp_pipe):
    """The real diffquant RTN W8A8 on a copy of the tiny pipeline, calibrated on 2 prompts x 2 steps."""
    calib = CalibrationConfig(num_prompts=2, num_inference_steps=2, height=32, width=32, batch_size=2)
    return diffquant.quantize(copy.deepcopy(fp_pipe), QuantConfig(method="rtn", wbits=8, abits=8, calibration=calib),
                              calibration=["a cyan star", "a yellow circle at the bottom"], progress=False)


# ---------------------------------------------------------------- prompts

def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na red circle\n\na blue square\n")
    assert load_prompts(txt, parse_seeds("0-1")) == [PromptItem("a red circle", 0), PromptItem("a red circle", 1),
                                                     PromptItem("a blue square", 0), PromptItem("a blue square", 1)]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "x", "seed": 7}, "y"]))
    assert load_prompts(js, [3]) == [PromptItem("x", 7), PromptItem("y", 3)]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(empty)
    with pytest.raises(ValueError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("a,b")


# ---------------------------------------------------------------- metrics vs hand computation

def test_psnr_ssim_match_hand_computation():
    a = torch.full((2, 3, 16, 16), 0.5)
    b = a.clone()
    b[0, :, :8] += 0.1  # half the pixels off by 0.1 -> MSE 0.005
    b[1] = 0.3  # constant images: SSIM reduces to the luminance term
    mse0 = 0.5 * 0.1 ** 2
    assert psnr(a, b)[0].item() == pytest.approx(10 * math.log10(1 / mse0), abs=1e-4)
    assert psnr(a, b)[1].item() == pytest.approx(10 * math.log10(1 / 0.2 ** 2), abs=1e-4)
    c1 = 0.01 ** 2
    assert ssim(a, b)[1].item() == pytest.approx((2 * 0.5 * 0.3 + c1) / (0.5 ** 2 + 0.3 ** 2 + c1), abs=1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert math.isinf(psnr(a, a)[0].item())


def test_results_json_is_standard_with_identical_images(tmp_path):
    from diffquant.evaluation.report import write_json

    a = torch.rand(2, 3, 16, 16)
    write_json(tmp_path / "r.json", {"psnr": psnr(a, a).tolist(), "mean": float("inf")})
    assert json.loads((tmp_path / "r.json").read_text()) == {"psnr": ["inf", "inf"], "mean": "inf"}
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file


def test_frechet_distance_hand_values_and_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen, dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-6
    shift = torch.arange(8, dtype=torch.float64) / 4
    assert frechet_distance(x, x + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)  # same covariance
    one = torch.randn(500, 1, generator=gen, dtype=torch.float64) + 1.0
    mu, var = one.mean().item(), one.var().item()
    # y = 2x: mean 2µ, variance 4σ² -> (µ)² + σ² + 4σ² - 2·2σ² = µ² + σ²
    assert frechet_distance(one, 2 * one) == pytest.approx(mu ** 2 + var, rel=1e-6)
    distances = [frechet_distance(x, x + s * torch.randn(x.shape, generator=gen, dtype=torch.float64)) for s in (0.1, 0.5, 2.0)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_lpips_local_backbone(tmp_path):
    from safetensors.torch import save_file

    from diffquant.evaluation.metrics import _alexnet_features

    torch.manual_seed(0)
    save_file({f"features.{k}": v for k, v in _alexnet_features().state_dict().items()}, str(tmp_path / "alexnet.safetensors"))
    lp = LPIPS(tmp_path / "alexnet.safetensors")
    assert all(float(lin.model[-1].weight.abs().sum()) > 0 for lin in lp.lins)  # torchmetrics' bundled heads loaded
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert lp(a, a).abs().max() < 1e-6
    d = lp(a, b)
    assert d.shape == (2,) and (d > 0).all() and torch.allclose(d, lp(b, a), atol=1e-6)
    assert float(lp(a, (a + 0.02).clamp(0, 1)).mean()) < float(d.mean())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(MetricUnavailable, match="AlexNet"):
        LPIPS(tmp_path / "bad.safetensors")


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffquant.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer("a red blue green circle square triangle on the left top small large".split(), folder / "tok", model_max_length=16)
    n = len(tok)
    text = dict(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder / "clip")
    return folder / "clip"


def test_clip_score_matches_hand_computation(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    path = _tiny_clip(tmp_path)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = ClipScorer(path)(images, PROMPTS)
    model, proc = CLIPModel.from_pretrained(str(path)), CLIPProcessor.from_pretrained(str(path))
    with torch.no_grad():
        px = proc(images=[(im * 255).round().to(torch.uint8) for im in images], return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        ids = proc(text=PROMPTS, return_tensors="pt", padding=True)
        txt = model.text_projection(model.text_model(**ids).pooler_output)
    expected = 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).clamp_min(0)
    assert torch.allclose(scores, expected, atol=1e-4)
    with pytest.raises(MetricUnavailable, match="config.json"):
        ClipScorer(tmp_path)


class _StubInception(torch.nn.Module):
    """Stands in for clean-fid's TorchScript Inception: checks the 299 px, 0..255 input contract."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.shape[-2:] == (299, 299) and return_features
        return torch.cat([x.mean(dim=(2, 3)) / 255.0, x.std(dim=(2, 3)) / 255.0], dim=1)


def _stub_inception(path: Path) -> Path:
    torch.jit.save(torch.jit.script(_StubInception()), str(path))
    return path


def test_inception_features_from_torchscript(tmp_path):
    feats = InceptionFeatures(_stub_inception(tmp_path / "inc.pt"))(torch.full((2, 3, 32, 32), 0.25))
    assert feats.shape == (2, 6) and torch.allclose(feats[:, :3], torch.full((2, 3), 0.25), atol=1e-5)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(MetricUnavailable, match="TorchScript"):
        InceptionFeatures(tmp_path / "junk.pt")


def test_zoo_evaluator_metrics(tmp_path, monkeypatch, fp_pipe, q_pipe):
    """Without --inception-weights, Fréchet distances use the zoo evaluator's features and the report says so.

    The evaluator here has random weights (the trained one ships with the zoo); the wiring is what is tested.
    """
    from diffquant.evaluation import EvalOptions, Evaluation
    from diffquant.evaluation import metrics as M
    from diffquant.zoo.evaluator import Evaluator, EvaluatorNet

    torch.manual_seed(0)
    monkeypatch.setattr(M, "zoo_evaluator", lambda: Evaluator(EvaluatorNet()))
    items = load_prompts("zoo:heldout:2", [0, 1])
    assert len(items) == 4 and items[0].prompt == items[1].prompt
    options = EvalOptions(metrics=["psnr", "fd_fp", "fd_ref", "attributes"], cache_dir=tmp_path)
    ev = Evaluation(fp_pipe, "tiny", items, SETTINGS, options)
    ev.add("rtn", q_pipe, "q")
    results = ev.results()
    assert "evaluator" in results["feature_space"] and "not FID" in results["feature_space"]
    ref, (model,) = results["reference"], results["models"]
    assert ref["summary"]["fd_ref"] > 0 and model["summary"]["fd_ref"] > 0 and model["summary"]["fd_fp"] >= 0
    assert set(model["attributes"]) == {"shape", "colour", "size", "position", "background", "count", "all"}
    assert 0 <= model["summary"]["attr_mean"] <= 1 and "attr_all" in ref["summary"]
    for entry in (ref, model):  # per-image correctness (paired intervals) agrees with the share
        assert len(entry["attr_all_per_image"]) == 4
        assert sum(entry["attr_all_per_image"]) / 4 == entry["summary"]["attr_all"]
    assert not {"fd_fp", "fd_ref", "attributes"} & set(results["skipped"])


# ---------------------------------------------------------------- paired generation and cache

def test_cache_reused_and_keyed(tmp_path, fp_pipe, q_pipe):
    items = [PromptItem(p, s) for p in PROMPTS[:2] for s in (0, 1)]
    first, stats = generate(fp_pipe, items, SETTINGS, tmp_path, batch_size=3)
    assert (stats.generated, stats.cached) == (4, 0)
    pipe = copy.deepcopy(fp_pipe)

    def no_generation(*args, **kwargs):
        raise AssertionError("the denoiser ran although every image was cached")

    pipe.unet.forward = no_generation
    again, stats = generate(pipe, items, SETTINGS, tmp_path, batch_size=2)
    assert (stats.generated, stats.cached) == (0, 4) and torch.equal(first, again)
    _, stats = generate(fp_pipe, items[:1], SamplingSettings(3, 7.5, 32, 32), tmp_path)  # other steps: a new key
    assert stats.generated == 1
    assert model_fingerprint(q_pipe) != model_fingerprint(fp_pipe)  # quantized images never come from the FP cache


def _cli(command, args: list[str]):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(command)
    return CliRunner().invoke(app, args)


# ---------------------------------------------------------------- eval end to end + Chromium

@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, fp_pipe, q_pipe):
    from diffquant.evaluation.cli import eval_command

    root = tmp_path_factory.mktemp("eval")
    fp_pipe.save_pretrained(root / "fp")
    diffquant.save(q_pipe, root / "q")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--reference", str(root / "fp"), "--model", str(root / "q"), "--prompts", str(root / "prompts.txt"),
            "--seeds", "0,1", "--steps", "2", "--height", "32", "--width", "32", "--out", str(root / "out"),
            "--cache-dir", str(root / "cache"), "--inception-weights", str(_stub_inception(root / "inc.pt")),
            "--metrics", "psnr,ssim,lpips,fd_fp,timestep,sensitivity", "--sensitivity-max-layers", "8"]
    result = _cli(eval_command, args)
    assert result.exit_code == 0, result.output
    return root, result


def test_eval_writes_results(eval_run):
    root, result = eval_run
    results = json.loads((root / "out" / "results.json").read_text())
    (model,) = results["models"]
    assert results["reference"]["generation"]["generated"] == 6 and model["generation"]["generated"] == 6
    s = model["summary"]
    assert 10 < s["psnr"] < 80 and 0.5 < s["ssim"] < 1 and s["fd_fp"] >= 0
    assert len(model["per_image"]) == 6 and all(p["psnr"] > 0 for p in model["per_image"])
    assert len(model["timestep_error"]["rel_mse"]) == 2 and all(v > 0 for v in model["timestep_error"]["rel_mse"])
    sens = model["sensitivity"]
    assert len(sens["layers"]) == 8 and sens["none_quantized"] == 0.0 and sens["all_quantized"] > 0
    assert "lpips-weights" in results["skipped"]["lpips"] and "Inception" in results["feature_space"]
    assert "PSNR" in result.output  # the markdown table is printed
    assert "reused from --cache-dir" not in result.output  # nothing was cached before


def test_eval_bad_input_is_one_line(tmp_path):
    from diffquant.evaluation.cli import eval_command

    result = _cli(eval_command, ["--reference", str(tmp_path / "nope"), "--model", str(tmp_path), "--prompts", "zoo:heldout:2",
                                      "--metrics", "psnr,fid"])
    assert result.exit_code == 2 and "unknown metric 'fid'" in result.output


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium absent: `make test` installs Debian's chromium package")
def test_report_renders_in_chromium(eval_run, tmp_path):
    root, _ = eval_run
    html = (root / "out" / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    # Count what the browser actually decoded and laid out, then dump the DOM.
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
             "document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
             "document.body.dataset.plots = imgs.filter(i => i.classList.contains('plot') && i.naturalWidth > 200).length;"
             "document.body.dataset.rows = document.querySelectorAll('table.metrics tbody tr').length;"
             "document.body.dataset.cells = document.querySelectorAll('table.grid tbody tr').length; });</script>")
    page = tmp_path / "report.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body))
    assert int(attrs["decoded"]) == 2 * 6 + 2  # FP and quantized image per pair, plus two plots
    assert attrs["plots"] == "2" and attrs["rows"] == "2" and attrs["cells"] == "6"
    assert "Skipped metrics" in dom and "PSNR to FP" in dom
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# ---------------------------------------------------------------- bench

def test_bench_methods_and_peers(eval_run):
    from diffquant.evaluation.cli import bench_command

    root, _ = eval_run
    (root / "calib.txt").write_text("a cyan star\na yellow circle\n")
    result = _cli(bench_command, [
        "--model", str(root / "fp"), "--methods", "rtn,pcr", "--bits", "w8a8", "--peers", "torchao-w8a8,torchao-w4",
        "--prompts", str(root / "prompts.txt"), "--calib-prompts", str(root / "calib.txt"), "--steps", "2", "--height", "32",
        "--width", "32", "--batch-size", "3", "--metrics", "psnr,ssim,timestep", "--out", str(root / "bench"),
        "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    results = json.loads((root / "bench" / "results.json").read_text())
    assert results["reference"]["generation"]["generated"] == 0  # FP images come from eval's cache, and it says so
    assert f"reused from --cache-dir: the images of FP ({len(PROMPTS)} images)" in result.output
    rows = {m["label"]: m for m in results["models"]}
    assert list(rows) == ["rtn-w8a8", "pcr-w8a8", "torchao-w8a8", "torchao-w4"]
    fp_mib = results["reference"]["summary"]["denoiser_mib"]
    for label in ("rtn-w8a8", "pcr-w8a8", "torchao-w8a8"):
        s = rows[label]["summary"]
        assert s["calibration_s"] > 0 and s["peak_memory_mib"] >= 0 and 0 < s["denoiser_mib"] < fp_mib
        assert s["psnr"] > 10 and len(rows[label]["timestep_error"]["rel_mse"]) == 2
    # Distinct models on the same pairs: the two methods' images differ, and the FP images are shared.
    assert rows["rtn-w8a8"]["fingerprint"] != rows["pcr-w8a8"]["fingerprint"]
    # Coverage and bits over the whole denoiser, one computation for diffquant's rows and the peer's.
    rtn, pcr, torchao = (rows[k]["summary"] for k in ("rtn-w8a8", "pcr-w8a8", "torchao-w8a8"))
    assert rtn["mac_coverage"] == 1 and rtn["weight_coverage"] > 0.95 and 8 < rtn["avg_wbits"] < 9 and rtn["avg_abits"] == 8
    assert pcr["avg_abits"] >= 8 and results["reference"]["summary"]["weight_coverage"] == 0
    assert 0 < torchao["weight_coverage"] < rtn["weight_coverage"] and torchao["mac_coverage"] < 1  # Linear layers only
    # torchao's int4 kernels need a GPU or the mslk package; the row must then say so rather than vanish.
    w4 = rows["torchao-w4"]
    assert ("unavailable" in w4) or w4["summary"]["psnr"] > 10
    table = (root / "bench" / "results.md").read_text()
    assert table in result.output and all(label in table for label in rows)
    assert "calibration wall time" in table and "denoiser on disk" in table and "quantized share of MACs" in table


@pytest.mark.slow
def test_bench_sdnq_and_bitsandbytes_peers(eval_run):
    """SDNQ and bitsandbytes through bench on the tiny pipeline: rows with their coverage read from their modules."""
    pytest.importorskip("sdnq")
    pytest.importorskip("bitsandbytes")
    from diffquant.evaluation.cli import bench_command

    root, _ = eval_run
    (root / "calib.txt").write_text("a cyan star\na yellow circle\n")
    result = _cli(bench_command, [
        "--model", str(root / "fp"), "--methods", "none", "--peers", "sdnq-int8,sdnq-uint4-svd,bnb-nf4",
        "--prompts", str(root / "prompts.txt"), "--calib-prompts", str(root / "calib.txt"), "--steps", "2", "--height", "32",
        "--width", "32", "--batch-size", "3", "--metrics", "psnr", "--out", str(root / "bench-sdnq"), "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    rows = {m["label"]: m for m in json.loads((root / "bench-sdnq" / "results.json").read_text())["models"]}
    assert list(rows) == ["sdnq-int8", "sdnq-uint4-svd", "bnb-nf4"] and not any("unavailable" in r for r in rows.values())
    int8, uint4, nf4 = (rows[k]["summary"] for k in rows)
    # SDNQ by default quantizes only Linear layers of >= 16384 weights: two in the tiny UNet, weight-only.
    assert 0 < int8["weight_coverage"] < 0.2 and int8["mac_coverage"] == 0 and int8["avg_abits"] == 32
    assert uint4["weight_coverage"] == int8["weight_coverage"] and uint4["avg_wbits"] < int8["avg_wbits"]
    assert nf4["weight_coverage"] > int8["weight_coverage"] and nf4["mac_coverage"] == 0  # every Linear, 4-bit weights
    assert all(r["psnr"] > 15 for r in (int8, uint4, nf4))


def test_bench_bad_input_is_one_line(tmp_path):
    from diffquant.evaluation.cli import bench_command

    result = _cli(bench_command, ["--model", str(tmp_path), "--bits", "8/8"])
    assert result.exit_code == 2 and "wXaY" in result.output
    from diffquant.evaluation.bench import parse_bits
    assert parse_bits("w8a8, w4,w4af") == [(8, 8), (4, None), (4, None)]  # wX / wXaf: weight-only rows
    result = _cli(bench_command, ["--model", str(tmp_path), "--peers", "tensorrt"])
    assert result.exit_code == 2 and "unknown peer 'tensorrt'" in result.output
