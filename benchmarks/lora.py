"""LoRA on a quantized model: does quantized+LoRA stay as close to FP+LoRA as quantized stays to FP?

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/lora.py --model mini-sd --prompts zoo:heldout:16 \
        --train-steps 300

1. Train a LoRA on the float model (fp32, peft ``LoraConfig``: rank 4 on the UNet attention projections
   to_q/to_k/to_v/to_out.0) for ``--train-steps`` steps on the zoo's procedural scenes with their red and
   blue channels swapped (a "style" the base never saw: "a red circle" should come out blue), with the zoo
   training's epsilon loss, its captions and 10 % caption dropout (classifier-free guidance). Saved with
   diffusers' ``save_lora_weights`` and loaded back with ``pipe.load_lora_weights`` everywhere below.
2. Quantize the float model with RTN W8A8 (``--calib-prompts``), convert a copy to integer kernels.
3. Render the same prompts, seeds and initial noise with: FP, FP+LoRA, fake-quant, fake-quant+LoRA,
   converted, converted+LoRA, and fake-quant with the LoRA fused (``fuse_lora``: re-quantized onto the grid).
4. PSNR / SSIM of each quantized image to its float counterpart (without LoRA to FP, with LoRA to FP+LoRA),
   and FP+LoRA to FP (how much the LoRA changes the images). The table is printed; JSON goes to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import diffquant
from diffquant import QuantConfig
from diffquant.evaluation import metrics
from diffquant.evaluation.loading import load_model, resolve_settings
from diffquant.evaluation.paired import generate
from diffquant.evaluation.prompts import load_prompts
from diffquant.io import atomic_write_json
from diffquant.zoo import data
from diffquant.zoo.train import _drop_captions

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def swapped_latents(vae, n: int, seed: int) -> tuple[torch.Tensor, list[data.Scene]]:
    """``n`` training scenes rendered with red and blue swapped, and their scaled VAE latent means."""
    rng = np.random.default_rng([seed, 7])
    scenes = [data.sample_scene(rng, "train") for _ in range(n)]
    images = torch.from_numpy(np.stack([data.render(s) for s in scenes]).transpose(0, 3, 1, 2))[:, [2, 1, 0]] * 2 - 1
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, n, 256)])
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor, scenes


def train_lora(pipe, steps: int, rank: int, batch_size: int, lr: float, seed: int, pool: int) -> tuple[dict, dict]:
    """A LoRA state dict trained on a copy of ``pipe``'s UNet (fp32), and a record of the run."""
    start = time.perf_counter()
    unet = copy.deepcopy(pipe.unet).train()
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    z_pool, scenes = swapped_latents(pipe.vae, pool, seed)
    alphas = pipe.scheduler.alphas_cumprod
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, pool, (batch_size,), generator=gen)
        crng = np.random.default_rng([seed, step, 5])
        captions = _drop_captions([data.caption(scenes[i], crng) for i in idx.tolist()], gen, 0.1)
        z = z_pool[idx]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            emb, _ = pipe.encode_prompt(captions, "cpu", 1, False)
        pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"lora step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f}", flush=True)
    record = {"steps": steps, "rank": rank, "alpha": rank, "targets": TARGETS, "batch_size": batch_size, "lr": lr,
              "optimizer": "AdamW", "dtype": "float32", "data": f"{pool} zoo train scenes, red/blue swapped",
              "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
              "train_s": round(time.perf_counter() - start, 1),
              "parameters": sum(p.numel() for p in params)}
    return get_peft_model_state_dict(unet), record


def with_unet(pipe, unet):
    return type(pipe)(**{**pipe.components, "unet": unet})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini-sd")
    parser.add_argument("--prompts", default="zoo:heldout:16")
    parser.add_argument("--calib-prompts", default="zoo:calibration:16")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 25 for the zoo)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "lora")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "lora-mini-sd.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    fp = load_model(args.model)
    settings = resolve_settings(fp, args.model, args.steps, None, None, None)
    items = load_prompts(args.prompts)
    lora_dir = args.workdir / "lora"
    state, train_record = train_lora(fp, args.train_steps, args.rank, args.train_batch, args.lr, args.seed, args.pool)
    StableDiffusionPipeline.save_lora_weights(lora_dir, unet_lora_layers=state)

    fake = with_unet(fp, copy.deepcopy(fp.unet))
    calibration = [it.prompt for it in load_prompts(args.calib_prompts)]
    diffquant.quantize(fake, QuantConfig(method="rtn", wbits=8, abits=8), calibration=calibration, progress=False)
    converted = diffquant.convert(with_unet(fake, copy.deepcopy(fake.unet)), progress=False)

    cache = args.workdir / "images"
    images: dict[str, torch.Tensor] = {}

    def render(label: str, pipe) -> None:
        images[label], _ = generate(pipe, items, settings, cache, args.batch_size, label)

    for label, pipe in (("fp", fp), ("rtn-w8a8", fake), ("rtn-w8a8-converted", converted)):
        render(label, pipe)
        pipe.load_lora_weights(lora_dir, adapter_name="swap")
        render(f"{label}+lora", pipe)
    fake.fuse_lora()
    render("rtn-w8a8+lora-fused", fake)

    pairs = [("fp+lora", "fp", "the LoRA's own effect (FP+LoRA to FP)"),
             ("rtn-w8a8", "fp", "fake-quant to FP"), ("rtn-w8a8+lora", "fp+lora", "fake-quant+LoRA to FP+LoRA"),
             ("rtn-w8a8-converted", "fp", "converted to FP"),
             ("rtn-w8a8-converted+lora", "fp+lora", "converted+LoRA to FP+LoRA"),
             ("rtn-w8a8+lora-fused", "fp+lora", "fake-quant, LoRA fused (re-quantized), to FP+LoRA")]
    rows = []
    for model, ref, what in pairs:
        psnr = metrics.psnr(images[model], images[ref])
        ssim = metrics.ssim(images[model], images[ref])
        rows.append({"model": model, "reference": ref, "what": what, "psnr": round(float(psnr.mean()), 2),
                     "psnr_min": round(float(psnr.min()), 2), "ssim": round(float(ssim.mean()), 4)})
    header = f"| {'model':<26} | {'reference':<9} | PSNR dB (min) | SSIM   |"
    print("\n" + header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['model']:<26} | {r['reference']:<9} | {r['psnr']:6.2f} ({r['psnr_min']:5.2f}) | {r['ssim']:.4f} |")
    result = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python {' '.join(sys.argv)}",
        "model": args.model, "prompts": args.prompts, "n_images": len(items), "sampling": settings.to_dict(),
        "quantization": "rtn w8a8 (fake-quant and diffquant.convert), calibration " + args.calib_prompts,
        "lora": train_record, "rows": rows, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(args.json, result)
    print(f"\nwrote {args.json} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
