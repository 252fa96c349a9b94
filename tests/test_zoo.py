"""Mini zoo: data determinism, offline loading of the bundled pipelines, evaluator scoring, resumable training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffquant import zoo
from diffquant.zoo import data


def test_generator_is_deterministic():
    a_img, a_cap, a_sc = data.make_batch(3, 5, 16)
    b_img, b_cap, b_sc = data.make_batch(3, 5, 16)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    c_img, _, _ = data.make_batch(3, 6, 16)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (16, 3, 32, 32) and 0.0 <= a_img.min() and a_img.max() <= 1.0
    assert zoo.heldout_prompts(8) == zoo.heldout_prompts()[:8]
    assert zoo.calibration_prompts(4) == data.calibration_prompts(4)


def test_split_is_compositional_and_captions_parse():
    held = zoo.heldout_prompts()
    calib = zoo.calibration_prompts()
    assert len(held) >= 256 and len(set(held)) == len(held)
    assert all(data.parse_caption(p).heldout for p in held)
    assert not any(data.parse_caption(p).heldout for p in calib)
    _, caps, scenes = data.make_batch(0, 0, 64)
    for c, s in zip(caps, scenes):
        parsed = data.parse_caption(c)
        assert not s.heldout
        assert set(parsed.objects) == set(s.objects) and parsed.background == s.background
    with pytest.raises(ValueError):
        data.parse_caption("a photo of a cat")


def test_every_caption_word_is_one_token(tmp_path):
    from diffquant.zoo.architectures import MAX_TOKENS, build_tokenizer

    tok = build_tokenizer(tmp_path)
    for w in data.vocabulary():
        assert len(tok(w).input_ids) == 3, w
    assert max(len(tok(p).input_ids) for p in zoo.heldout_prompts()) <= MAX_TOKENS


def _installed(name: str) -> bool:
    try:
        zoo.model_path(name)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_pipeline_loads_offline_and_generates(name):
    if not _installed(name):
        pytest.skip(f"{name} weights not installed")
    from diffusers import DDIMPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    cls = {"mini-sd": StableDiffusionPipeline, "mini-flux": FluxPipeline,
           "mini-ddim": DDIMPipeline}.get(name, StableDiffusion3Pipeline)
    plain = cls.from_pretrained(str(zoo.model_path(name)), local_files_only=True)  # no extra arguments needed
    assert plain is not None
    pipe = zoo.load_pipeline(name)
    settings = {**zoo.DEFAULTS[name], "num_inference_steps": 4}
    generator = [torch.Generator().manual_seed(i) for i in range(2)]
    if name == "mini-ddim":  # unconditional: a batch size, no prompt; DDIMPipeline returns numpy [B, H, W, C]
        out = torch.from_numpy(pipe(batch_size=2, generator=generator, output_type="np", **settings).images)
        assert out.shape == (2, 32, 32, 3) and torch.isfinite(out).all()
        return
    out = pipe(prompt=zoo.heldout_prompts(2), generator=generator, output_type="pt", **settings).images
    assert out.shape == (2, 3, settings["height"], settings["width"]) and torch.isfinite(out).all()


def test_evaluator_scores_a_batch():
    from diffquant.zoo.evaluator import ATTRIBUTES, EVALUATOR_DIR, load_evaluator

    if not (EVALUATOR_DIR / "model.safetensors").exists():
        pytest.skip("evaluator weights not installed")
    ev = load_evaluator()
    prompts = zoo.heldout_prompts(16)
    real = np.stack([data.render(data.parse_caption(p)) for p in prompts])
    acc = ev.attribute_accuracy((real * 255).round().astype(np.uint8), prompts)
    assert set(acc) == set(ATTRIBUTES) and acc["shape"] >= 0.8 and acc["colour"] >= 0.8
    again, correct = ev.judge((real * 255).round().astype(np.uint8), prompts)
    assert again == acc and len(correct) == 16 and sum(correct) / 16 == acc["all"]
    _, shifted = ev.judge((real * 255).round().astype(np.uint8), prompts[1:] + prompts[:1])  # each caption on another image
    assert sum(shifted) < sum(correct)
    feats = ev.features(torch.from_numpy(real).permute(0, 3, 1, 2))
    assert feats.shape[0] == 16 and feats.dim() == 2
    if _installed("mini-sd"):
        pipe = zoo.load_pipeline("mini-sd")
        imgs = pipe(prompt=prompts[:4], num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                    output_type="pil").images
        scores = ev.attribute_accuracy(imgs, prompts[:4])
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    with pytest.raises(ValueError):
        ev.attribute_accuracy(torch.rand(2, 3, 32, 32), prompts[:3])


def test_model_path_errors_clearly():
    with pytest.raises(ValueError, match="choose one of"):
        zoo.model_path("sd-xxl")


@pytest.mark.parametrize("name", ["mini-sd", "mini-sd3", "mini-flux"])
def test_few_step_training_checkpoints_and_resumes(tmp_path: Path, name):
    from safetensors.torch import load_file

    from diffquant.zoo.architectures import build_vae
    from diffquant.zoo.train import train_denoiser

    torch.manual_seed(0)
    build_vae().save_pretrained(str(tmp_path / "vae"))
    kw = dict(batch_size=2, vae_dir=tmp_path / "vae", pool_size=8, checkpoint_every=2, device="cpu", export=False)
    ckpt = train_denoiser(name, tmp_path / "run", steps=2, **kw)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and (ckpt / "optimizer.safetensors").exists() and (ckpt / "ema.safetensors").exists()
    # Resumed 2 -> 3 equals an uninterrupted 0 -> 3 run (batches and noise are functions of the step).
    resumed = load_file(str(train_denoiser(name, tmp_path / "run", steps=3, **kw) / "model.safetensors"))
    straight = load_file(str(train_denoiser(name, tmp_path / "straight", steps=3, **kw) / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for k in resumed:
        assert torch.allclose(resumed[k], straight[k], atol=1e-4), k


def test_init_from_starts_a_phase_from_saved_weights(tmp_path: Path):
    from safetensors.torch import load_file

    from diffquant import zoo
    from diffquant.zoo.architectures import build_vae
    from diffquant.zoo.train import train_denoiser

    build_vae().save_pretrained(str(tmp_path / "vae"))
    kw = dict(batch_size=2, vae_dir=tmp_path / "vae", pool_size=8, device="cpu", export=False, lr=1e-12)
    ckpt = train_denoiser("mini-sd", tmp_path / "p2", steps=1, init_from=zoo.model_path("mini-sd"), **kw)
    trained = load_file(str(ckpt / "model.safetensors"))
    installed = load_file(str(zoo.model_path("mini-sd") / "unet" / "diffusion_pytorch_model.safetensors"))
    # One step at a negligible learning rate: the weights are still the installed ones.
    for k, v in installed.items():
        assert torch.allclose(trained["unet." + k], v.float(), atol=1e-3), k
    with pytest.raises(FileNotFoundError, match="init-from"):
        train_denoiser("mini-sd", tmp_path / "p3", steps=1, init_from=tmp_path / "vae", **kw)


def test_mini_flux_trains_as_the_pipeline_samples(tmp_path: Path):
    """mini-flux's training call (T5 tokens + CLIP pooled, packed latents) equals FluxPipeline's own encoding at the
    zoo's max_sequence_length: what is trained is what the pipeline samples."""

    from diffquant.zoo.architectures import FLUX_T5_TOKENS, build_flux_pipeline, build_tokenizer, build_vae
    from diffquant.zoo.flux_training import FluxStep

    torch.manual_seed(0)
    vae = build_vae(shift_factor=0.0, levels=2)
    pipe = build_flux_pipeline(vae, build_tokenizer(tmp_path / "tok"), width=64, double=1, single=1)
    assert zoo.DEFAULTS["mini-flux"]["max_sequence_length"] == FLUX_T5_TOKENS
    captions = zoo.heldout_prompts(2)
    size = zoo.DEFAULTS["mini-flux"]["height"]
    zt, img_ids = pipe.prepare_latents(2, 4, size, size, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert zt.shape[1] == 64  # two-level VAE: 16x16 latents, packed 2x2
    sigma, w = torch.tensor([0.3, 0.9]), torch.tensor([1.0, 3.0])
    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    step = FluxStep(pipe, modules, guide_from=0)
    assert torch.equal(step.image_ids(size // 2, size // 2, "cpu"), img_ids)
    with torch.no_grad():
        trained = step._call(step.modules, zt, sigma, w, captions, "cpu", img_ids)
        embeds, pooled, txt_ids = pipe.encode_prompt(captions, None, device="cpu", max_sequence_length=FLUX_T5_TOKENS)
        sampled = pipe.transformer(hidden_states=zt, timestep=sigma, guidance=w, pooled_projections=pooled,
                                   encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids).sample
    assert torch.equal(trained, sampled)


def test_quantize_cli_runs_on_mini_flux(tmp_path: Path):
    if not _installed("mini-flux"):
        pytest.skip("mini-flux weights not installed")
    from typer.testing import CliRunner

    from diffquant.cli import app

    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", "--model", "mini-flux", "--method", "rtn", "--out", str(out),
                                      "--num-prompts", "2", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert (out / "diffquant_manifest.json").is_file()


def test_init_weights_accepts_a_t5_saved_with_its_tied_embedding_once(tmp_path: Path):
    from transformers import T5Config, T5EncoderModel

    from diffquant.zoo.train import init_weights

    cfg = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(tmp_path / "pipe" / "text_encoder_2")  # embed_tokens saved as `shared` only
    saved = T5EncoderModel.from_pretrained(tmp_path / "pipe" / "text_encoder_2")
    torch.manual_seed(1)
    fresh = T5EncoderModel(cfg)
    init_weights({"text_encoder_2": fresh}, tmp_path / "pipe")
    for (name, a), b in zip(fresh.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = tmp_path / "other" / "text_encoder_2"
    T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2)).save_pretrained(other)
    with pytest.raises(ValueError, match="does not match"):
        init_weights({"text_encoder_2": fresh}, tmp_path / "other")
