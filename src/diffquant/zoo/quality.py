"""The quality floor: generate the held-out captions (an unconditional model: seeds alone) with fixed seeds and score
them with the evaluator."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..sampling import SamplingSettings, default_settings, is_unconditional, sample
from . import DEFAULTS, MODEL_NAMES, data
from .evaluator import ATTRIBUTES, CONFIDENCE, TOLERANCE, Evaluator, evaluate_evaluator, load_evaluator

# evaluator: every attribute on real data; text models: shape and colour; unconditional: valid scenes
FLOOR = {"evaluator": 0.95, "model": 0.80, "unconditional": 0.90}


def generate(pipe, prompts: list[str], seeds: list[int], settings: SamplingSettings, batch_size: int = 64) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], one fixed-seed generator per prompt (same noise whatever the batching)."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
        images = sample(pipe, prompts[i:i + batch_size], settings, seeds=seeds[i:i + batch_size], output_type="pt")
        out.append(images.float().cpu())
    return torch.cat(out)


def evaluate_model(name: str, pipe=None, n: int = 256, evaluator: Evaluator | None = None, batch_size: int = 64,
                   save_grid: Path | None = None, **overrides) -> dict:
    """Quality-floor numbers for one mini model (held-out captions, seeds 0..n-1, default settings)."""
    from . import load_pipeline

    if name not in MODEL_NAMES:
        raise ValueError(f"unknown mini-zoo model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    pipe = pipe if pipe is not None else load_pipeline(name)
    ev = evaluator or load_evaluator()
    if is_unconditional(pipe):  # no captions: judged by valid scenes and FD to real scenes
        return evaluate_unconditional(name, pipe, n, ev, batch_size, save_grid, **overrides)
    settings = {**DEFAULTS[name], **{k: v for k, v in overrides.items() if v is not None}}
    sampling = default_settings(pipe, settings)
    prompts = data.heldout_prompts(n)
    t0 = time.time()
    images = generate(pipe, prompts, list(range(n)), sampling, batch_size=batch_size)
    wall = time.time() - t0
    acc = ev.attribute_accuracy(images, prompts)
    calib = data.calibration_prompts(min(n, 64))
    acc_train = ev.attribute_accuracy(generate(pipe, calib, list(range(len(calib))), sampling, batch_size), calib)
    recon = ev.attribute_accuracy(vae_round_trip(pipe, prompts), prompts)
    if save_grid is not None:
        save_image_grid(images[:64], save_grid)
    passed = acc["shape"] >= FLOOR["model"] and acc["colour"] >= FLOOR["model"]
    return {"model": name, "n": n, "settings": settings, "heldout": acc, "train_captions": acc_train,
            "vae_round_trip": recon,
            "generation_s": wall, "floor": {"shape_and_colour": FLOOR["model"]}, "passed": passed}


def evaluate_unconditional(name: str, pipe, n: int = 256, evaluator: Evaluator | None = None, batch_size: int = 64,
                           save_grid: Path | None = None, **overrides) -> dict:
    """Quality floor of an unconditional model: seeds 0..n-1 at its default settings; the fraction of samples the
    evaluator reads as a valid scene with confidence (``Evaluator.valid_scenes``), and the Fréchet distance of
    their evaluator features to ``n`` real scenes. Beside them, for scale: the same numbers for a second real set."""
    from ..stats import frechet_distance

    ev = evaluator or load_evaluator()
    settings = {**DEFAULTS[name], **{k: v for k, v in overrides.items() if v is not None and k != "guidance_scale"}}
    t0 = time.time()
    images = generate(pipe, [""] * n, list(range(n)), default_settings(pipe, settings), batch_size=batch_size)
    wall = time.time() - t0
    real, other = (torch.from_numpy(data.real_scenes(n, seed)) for seed in (data.REAL_SEED, data.REAL_SEED + 1))
    valid, real_valid = np.mean(ev.valid_scenes(images)), np.mean(ev.valid_scenes(other))
    if save_grid is not None:
        save_image_grid(images[:64], save_grid)
    features = ev.features(real)
    return {"model": name, "n": n, "settings": settings, "confidence": CONFIDENCE, "tolerance": TOLERANCE, "valid_scenes": float(valid),
            "fd_real": frechet_distance(ev.features(images), features),
            "real_valid_scenes": float(real_valid), "real_fd_real": frechet_distance(ev.features(other), features),
            "generation_s": wall, "floor": {"valid_scenes": FLOOR["unconditional"]},
            "passed": bool(valid >= FLOOR["unconditional"])}


@torch.no_grad()
def vae_round_trip(pipe, prompts: list[str], seed: int = 12345) -> torch.Tensor:
    """Real renders of ``prompts`` encoded and decoded by the pipeline's VAE: the ceiling any denoiser can reach."""
    rng = np.random.default_rng(seed)
    scenes = [data.parse_caption(p) for p in prompts]
    scenes = [data.Scene(s.objects, s.background, tuple((float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
                                                        for _ in s.objects)) for s in scenes]
    x = torch.from_numpy(np.stack([data.render(s) for s in scenes]).transpose(0, 3, 1, 2))
    vae = pipe.vae
    out = []
    for i in range(0, len(x), 128):
        xb = (x[i:i + 128] * 2 - 1).to(vae.device, vae.dtype)
        out.append(((vae.decode(vae.encode(xb).latent_dist.mean).sample.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def evaluate_evaluator_floor(n: int = 256) -> dict:
    acc = evaluate_evaluator(load_evaluator(), n=n)
    return {"model": "evaluator", "n": n, "heldout_real": acc, "floor": {"every_attribute": FLOOR["evaluator"]},
            "passed": all(acc[a] >= FLOOR["evaluator"] for a in ATTRIBUTES if a != "all")}


def save_image_grid(images: torch.Tensor, path: Path, cols: int = 8, scale: int = 4) -> None:
    from PIL import Image

    x = (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    n, h, w, _ = x.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = x[i]
    Image.fromarray(grid).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def format_table(result: dict) -> str:
    """The quality-floor table printed by ``diffquant zoo eval``."""
    lines = []
    if "valid_scenes" in result:
        s = result["settings"]
        return "\n".join([
            f"{result['model']} on seeds 0..{result['n'] - 1}, {s['num_inference_steps']} DDIM steps (floor "
            f"{result['floor']['valid_scenes']:.0%} valid scenes: each object's shape and colour at p >= {result['confidence']:g}, "
            f"re-rendered within {result['tolerance']:g} of the image)",
            f"{'':20s}{'valid scenes':>14s}{'FD to real':>12s}",
            f"{'generated':20s}{result['valid_scenes']:>14.1%}{result['fd_real']:>12.2f}",
            f"{'real (other seed)':20s}{result['real_valid_scenes']:>14.1%}{result['real_fd_real']:>12.2f}",
            f"(FD in the evaluator's 256-d features against {result['n']} real scenes; the second row is real scenes "
            "of another stream: the ceiling, and the FD two real sets of this size differ by)",
            "PASS" if result["passed"] else "BELOW FLOOR"])
    if result["model"] == "evaluator":
        lines.append(f"evaluator on {result['n']} real held-out scenes (floor {result['floor']['every_attribute']:.0%} per attribute)")
        rows = {"real held-out": result["heldout_real"]}
    else:
        s = result["settings"]
        lines.append(f"{result['model']} on {result['n']} held-out captions, seeds 0..{result['n'] - 1}, "
                     f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']}, {s['height']}x{s['width']} "
                     f"(floor {result['floor']['shape_and_colour']:.0%} on shape and colour)")
        rows = {"held-out captions": result["heldout"], "training captions": result["train_captions"],
                "VAE round trip": result["vae_round_trip"]}
    lines.append(f"{'':20s}" + "".join(f"{a:>12s}" for a in ATTRIBUTES))
    for label, acc in rows.items():
        lines.append(f"{label:20s}" + "".join(f"{acc[a]:>12.1%}" for a in ATTRIBUTES))
    if result["model"] != "evaluator":
        lines.append("(rows: generated from held-out captions; generated from training-distribution captions; "
                     "real held-out renders through the VAE only, the ceiling for any denoiser)")
    lines.append("PASS" if result["passed"] else "BELOW FLOOR")
    return "\n".join(lines)


def write_model_card(name: str, folder: Path, result: dict, training: dict) -> Path:
    """model_card.md from measured numbers (``zoo eval``) and the training record (training.json)."""
    lines = [f"# {name}", "", _DESCRIPTIONS.get(name, ""), "",
             "## Data", "",
             "Procedural 32x32 scenes (`diffquant.zoo.data`): one or two flat shapes (circle, square, triangle, cross), "
             "6 colours, 2 sizes, 5 positions, 3 backgrounds; captions from templates with synonyms. "
             f"{len(data.HELDOUT_TRIPLES)} (shape, colour, background) triples are held out; evaluation captions all "
             "contain at least one. " + _SPLIT_NOTE.get(name, ""), "",
             "## Training", "", "```json", json.dumps(training, indent=2), "```", "",
             "## Measured quality (`diffquant zoo eval " + name + "`)", "", "```", format_table(result), "```", ""]
    path = Path(folder) / "model_card.md"
    path.write_text("\n".join(lines))
    return path


_SPLIT_NOTE = {
    "evaluator": "The evaluator is the judge, so it is trained on every composition (held-out ones included).",
    "mini-sd": "No component (VAE, text encoder, UNet) saw a held-out composition in training.",
    "mini-sd3": "No component (VAE, text encoders, transformer) saw a held-out composition in training.",
    "mini-flux": "No component (VAE, text encoder, transformer) saw a held-out composition in training.",
    "mini-ddim": "mini-ddim trains on the training split's images with their captions ignored (unconditional); it is "
                 "judged on whether its samples are valid scenes and how far they are from real ones (below).",
}

_DESCRIPTIONS = {
    "mini-sd": "SD 1.x-style latent diffusion: AutoencoderKL (32x32x3 <-> 8x8x4), CLIPTextModel over a word-level "
               "vocabulary of the caption grammar, UNet2DConditionModel with cross-attention down/up blocks and skip "
               "concatenations, epsilon prediction, DDIM. Load with `StableDiffusionPipeline.from_pretrained(folder)`.",
    "mini-sd3": "SD3-style: the same AutoencoderKL (shift_factor 0), two CLIPTextModelWithProjection, no T5 "
                "(text_encoder_3=None: the pipeline appends zero tokens), SD3Transformer2DModel (MMDiT joint attention, "
                "patch size 1), flow matching with FlowMatchEulerDiscreteScheduler. Load with "
                "`StableDiffusion3Pipeline.from_pretrained(folder)`.",
    "mini-flux": "Flux-style: its own two-level AutoencoderKL (32x32x3 <-> 16x16x4, shift_factor 0; FluxPipeline packs "
                 "the latents 2x2 into 64 tokens of 16 channels, as many image tokens as mini-sd3's MMDiT sees), "
                 "CLIPTextModel (pooled output into the time embedding and every adaLN modulation), "
                 "a 3-layer T5EncoderModel (token sequence into joint attention; sample with max_sequence_length=24, "
                 "as zoo.DEFAULTS does), "
                 "FluxTransformer2DModel (double-stream and single-stream blocks, RoPE, guidance embedding learned online "
                 "as model guidance: `guidance_scale` works as in FLUX.1-dev), flow matching with "
                 "FlowMatchEulerDiscreteScheduler. Load with `FluxPipeline.from_pretrained(folder)`.",
    "mini-ddim": "Unconditional pixel-space diffusion, Q-Diffusion's CIFAR-10 setting in miniature: UNet2DModel on 32x32x3 "
                 "images (three levels of 32/64/64 channels, one ResNet each, self-attention at 8x8, skip concatenations "
                 "feeding 1x1 conv_shortcuts on the up path), linear betas, epsilon prediction, DDIM (100 steps by default, as Q-Diffusion samples CIFAR-10; "
                 "x0 clipped). No text encoder, no VAE. Load with `DDIMPipeline.from_pretrained(folder)`.",
    "evaluator": "A small CNN predicting, per position slot, empty/shape/colour/size and the background.",
}
