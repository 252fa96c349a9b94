"""Training of the mini zoo: VAE, mini-sd (UNet + CLIP), mini-sd3 (MMDiT + two CLIPs), from a seed.

Every batch and every noise draw is a pure function of (seed, step), and checkpoints hold the
weights, their EMA and the AdamW moments (safetensors) plus the step (JSON), so a killed run
resumes to the same result. bf16 autocast is used on CPU and GPU: on this kind of CPU it is
1.2-2.2x faster than fp32 and the small models train fine with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..outputs import claim_output
from . import data, float32_text_encoders
from .architectures import (
    ZeroTokenJointAttnProcessor, build_flux_pipeline, build_sd3_pipeline, build_sd_pipeline, build_tokenizer, build_vae,
    zero_t5_stub,
)
from .checkpoint import EMA, load_checkpoint, save_checkpoint
from .flux_training import FluxStep

# ---------------------------------------------------------------- helpers


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no GPU is present; use --device cpu")
    return device


def autocast(device: str | torch.device):
    """bf16 autocast on the device's type (CPU: AMX bf16 matmuls)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def lr_at(step: int, total: int, lr: float, warmup: int = 200) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _images(seed: int, step: int, batch_size: int, device: str) -> tuple[torch.Tensor, list[str]]:
    images, captions, _ = data.make_batch(seed, step, batch_size, split="train")
    return torch.from_numpy(images).to(device) * 2 - 1, captions


# ---------------------------------------------------------------- VAE


def train_vae(out: Path, steps: int = 2500, seed: int = 0, batch_size: int = 64, lr: float = 1e-3,
              resume: bool = True, device: str = "cpu", checkpoint_every: int = 250, kl_weight: float = 1e-4,
              levels: int = 3) -> Path:
    """Train the autoencoder (L1 + MSE + small KL); writes ``out/vae`` with the latent scaling factor set.

    ``levels``: 3 (8x8 latents, mini-sd and mini-sd3) or 2 (16x16 latents, mini-flux); see ``build_vae``.
    """
    out = Path(out)
    final = out / "vae"
    if resume and (final / "config.json").exists():
        return final
    torch.manual_seed(seed)
    vae = build_vae(levels=levels).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ema = EMA({"vae": vae}, 0.995)
    step = load_checkpoint(out / "vae_checkpoint", {"vae": vae}, opt, ema) if resume else 0
    bar = tqdm(range(step, steps), desc="vae", initial=step, total=steps)
    for step in bar:
        x, _ = _images(seed, step, batch_size, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        with autocast(device):
            post = vae.encode(x).latent_dist
            gen = torch.Generator(device).manual_seed(seed * 7919 + step)
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=device)
            rec = vae.decode(z).sample.float()
        kl = post.kl().float().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema.update(step)
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(out / "vae_checkpoint", step + 1, {"vae": vae}, opt, {"loss": loss.item()}, ema)
    ema.copy_to({"vae": vae})
    vae = vae.float().cpu().eval()
    # Latent statistics on fresh data set the scaling factor so scaled latents have unit variance, as in SD.
    with torch.no_grad():
        x, _ = _images(seed + 1, 0, 512, "cpu")
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
    std = float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    with claim_output(final, overwrite=True) as output:  # `final` appears only complete (resume tests for it)
        vae.save_pretrained(str(output.tmp), safe_serialization=True)
        (output.tmp / "metrics.json").write_text(json.dumps({"latent_std": std, "latent_mean": float(z.mean()),
                                                              "recon_mse_[-1,1]": float(F.mse_loss(rec, x)), "steps": steps,
                                                              "batch_size": batch_size, "seed": seed}, indent=2))
        output.publish()
    return final


def finetune_decoder(vae_dir: Path, out: Path, steps: int = 1500, seed: int = 0, batch_size: int = 32,
                     lr: float = 5e-4, resume: bool = True, device: str = "cpu", checkpoint_every: int = 250) -> Path:
    """Second VAE phase: train only the decoder (encoder frozen) for sharper small shapes.

    The encoder, hence every latent a denoiser is trained on, is unchanged, so this phase can run
    while the denoisers train and its decoder replaces theirs at export. Decodes noisy posterior
    samples (mean + std * eps) so it stays robust to imperfect generated latents.
    """
    from diffusers import AutoencoderKL

    out = Path(out)
    final = out / "vae_decoder"
    if resume and (final / "config.json").exists():
        return final
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).float().to(device)
    vae.requires_grad_(False)
    decoder = nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    decoder.requires_grad_(True)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    ema = EMA({"dec": decoder}, 0.995)
    step = load_checkpoint(out / "decoder_checkpoint", {"dec": decoder}, opt, ema) if resume else 0
    bar = tqdm(range(step, steps), desc="vae decoder", initial=step, total=steps)
    for step in bar:
        x, _ = _images(seed + 17, step, batch_size, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=50)
        with torch.no_grad(), autocast(device):
            post = vae.encode(x).latent_dist
        gen = torch.Generator(device).manual_seed(seed * 7919 + 13 + step)
        z = post.mean.float() + post.std.float() * torch.randn(post.mean.shape, generator=gen, device=device)
        with autocast(device):
            rec = vae.decode(z).sample.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        ema.update(step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(out / "decoder_checkpoint", step + 1, {"dec": decoder}, opt, {"loss": loss.item()}, ema)
    ema.copy_to({"dec": decoder})
    vae = vae.cpu().eval()
    with torch.no_grad():
        x, _ = _images(seed + 1, 0, 512, "cpu")
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    prev = json.loads((Path(vae_dir) / "metrics.json").read_text()) if (Path(vae_dir) / "metrics.json").exists() else {}
    prev.update({"decoder_steps": steps, "decoder_batch_size": batch_size, "recon_mse_[-1,1]": float(F.mse_loss(rec, x))})
    with claim_output(final, overwrite=True) as output:
        vae.save_pretrained(str(output.tmp), safe_serialization=True)
        (output.tmp / "metrics.json").write_text(json.dumps(prev, indent=2))
        output.publish()
    return final


def _drop_captions(captions: list[str], gen: torch.Generator, p: float) -> list[str]:
    """Replace a fraction ``p`` of captions by "" (the unconditional prompt classifier-free guidance uses)."""
    keep = torch.rand(len(captions), generator=gen) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def latent_pool(vae, seed: int, n: int, cache: Path | None = None) -> tuple[torch.Tensor, list[data.Scene]]:
    """A fixed pool of ``n`` training scenes and their VAE latent means (unscaled).

    Encoding every batch on the fly cost ~20% of a denoiser step; the pool is encoded once (and
    cached as safetensors) and each step draws a random subset, re-captioned with fresh paraphrases.
    """
    rng = np.random.default_rng([seed, 99])
    scenes = [data.sample_scene(rng, "train") for _ in range(n)]
    if cache is not None and cache.exists():
        z = load_file(str(cache))["latents"]
        if z.shape[0] == n:
            return z, scenes
    chunks = []
    for i in tqdm(range(0, n, 256), desc="encode latent pool"):
        x = torch.from_numpy(np.stack([data.render(s) for s in scenes[i:i + 256]]).transpose(0, 3, 1, 2)) * 2 - 1
        with torch.no_grad():
            chunks.append(vae.encode(x.to(vae.device)).latent_dist.mean.float().cpu())
    z = torch.cat(chunks)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": z.contiguous()}, str(cache))
    return z, scenes


MIN_SNR_GAMMA = 5.0
HIGH_NOISE_CAP = 20.0

DENOISER_DEFAULTS = {
    "mini-sd": dict(steps=3300, batch_size=64, lr=1e-3, high_noise_from=1750),
    "mini-sd3": dict(steps=4500, batch_size=64, lr=6e-4, high_noise_from=0),
    "mini-flux": dict(steps=4000, batch_size=64, lr=6e-4, high_noise_from=0, vae_levels=2),
}
GUIDE_FROM = 0.5  # mini-flux: fraction of the steps after which guidance is trained into its embedding


def train_denoiser(name: str, out: Path, steps: int | None = None, seed: int = 0, batch_size: int | None = None,
                   lr: float | None = None, resume: bool = True, device: str = "cpu", checkpoint_every: int = 250,
                   vae_dir: Path | None = None, vae_steps: int = 1500, decoder_steps: int = 1500, vae_levels: int | None = None,
                   text_dropout: float = 0.1,
                   ema_decay: float = 0.995, time_budget_s: float | None = None, pool_size: int = 48000,
                   latent_cache: Path | None = None, export: bool = True, high_noise_from: int | None = None,
                   init_from: Path | None = None) -> Path:
    """Train mini-sd or mini-sd3 (denoiser and its text encoders jointly) on the frozen VAE's latents.

    Writes ``out/pipeline`` (fp16 diffusers folder, EMA weights). ``time_budget_s`` stops early at a
    checkpoint boundary and still writes the pipeline (the cosine schedule is kept as planned).
    ``init_from`` (a pipeline folder of the same model) starts a fresh run -- new AdamW state, new
    warm-up and cosine -- from that folder's weights: a second training phase on top of an earlier one.
    """
    from diffusers import AutoencoderKL

    if name not in DENOISER_DEFAULTS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(DENOISER_DEFAULTS)}")
    cfg = DENOISER_DEFAULTS[name]
    steps = steps or cfg["steps"]
    batch_size = batch_size or cfg["batch_size"]
    lr = lr or cfg["lr"]
    high_noise_from = cfg["high_noise_from"] if high_noise_from is None else high_noise_from
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if vae_dir is None:
        stage1 = train_vae(out / "vae_run", steps=vae_steps, seed=seed, resume=resume, device=device, batch_size=32,
                           levels=vae_levels or cfg.get("vae_levels", 3))
        vae_dir = finetune_decoder(stage1, out / "vae_run", steps=decoder_steps, seed=seed, resume=resume, device=device)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).float().eval().requires_grad_(False)
    if name != "mini-sd":
        vae.register_to_config(shift_factor=0.0)
    vae = vae.to(device)
    tokenizer = build_tokenizer(out / "tokenizer_src")
    torch.manual_seed(seed)
    # mini-sd3 trains without the zero T5 stub (the attention processor stands in for its tokens).
    if name == "mini-sd":
        pipe = build_sd_pipeline(vae, tokenizer)
        modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    elif name == "mini-flux":
        pipe = build_flux_pipeline(vae, tokenizer)
        modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
                   "text_encoder_2": pipe.text_encoder_2}
        flux_step = FluxStep(pipe, modules, guide_from=int(GUIDE_FROM * steps) // 50 * 50)
    else:
        pipe = build_sd3_pipeline(vae, tokenizer, t5_stub=False)
        modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        pipe.transformer.set_attn_processor(ZeroTokenJointAttnProcessor(256))
    for m in modules.values():
        m.to(device).train().requires_grad_(True)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA(modules, ema_decay)
    step = load_checkpoint(out / "checkpoint", modules, opt, ema) if resume else 0
    if init_from is not None and step == 0:
        # mini-flux's first phase had a zero-output T5 stub; its trained T5 then starts fresh.
        init_weights(modules, Path(init_from), fresh_if_other=("text_encoder_2",) if name == "mini-flux" else ())
        ema = EMA(modules, ema_decay)
    pool, scenes = latent_pool(vae, seed, pool_size, Path(latent_cache) if latent_cache else out / "latent_pool.safetensors")
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(device) if name == "mini-sd" else None
    scale, shift = vae.config.scaling_factor, (vae.config.shift_factor or 0.0)
    start, t0 = step, time.time()
    log = open(out / "train_log.jsonl", "a")
    bar = tqdm(range(step, steps), desc=name, initial=step, total=steps)
    loss_avg = None
    for step in bar:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, pool.shape[0], (batch_size,), generator=gen)
        crng = np.random.default_rng([seed, step, 5])
        captions = _drop_captions([data.caption(scenes[i], crng) for i in idx.tolist()], gen, text_dropout)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=300)
        z = ((pool[idx] - shift) * scale).to(device)
        noise = torch.randn(z.shape, generator=gen).to(device)
        with autocast(device) if name != "mini-flux" else contextlib.nullcontext():  # mini-flux: fp32
            if name == "mini-flux":
                pred, target = flux_step(step, gen, z, noise, captions, ema)
                weight = torch.ones(z.shape[0], device=device)
            elif name == "mini-sd":
                t = torch.randint(0, 1000, (z.shape[0],), generator=gen).to(device)
                a = alphas_cumprod[t].view(-1, 1, 1, 1)
                zt = a.sqrt() * z + (1 - a).sqrt() * noise
                emb, _ = pipe.encode_prompt(captions, device, 1, False)
                pred = pipe.unet(zt, t, encoder_hidden_states=emb).sample
                target = noise
                snr = a.view(-1) / (1 - a.view(-1))
                weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # min-SNR-5 weighting (Hang et al. 2023)
                if step >= high_noise_from:
                    # Layout and caption binding are decided at high noise, where the epsilon loss is tiny
                    # (eps ~ x_t there): weight it up by 1/SNR, capped.
                    weight = weight * (1 / snr).clamp(1.0, HIGH_NOISE_CAP)
            else:
                sigma = torch.sigmoid(torch.randn(z.shape[0], generator=gen)).to(device)  # logit-normal, as SD3
                s = sigma.view(-1, 1, 1, 1)
                zt = (1 - s) * z + s * noise
                emb, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device=device,
                                                       do_classifier_free_guidance=False, max_sequence_length=1)
                pred = pipe.transformer(hidden_states=zt, encoder_hidden_states=emb, pooled_projections=pooled,
                                        timestep=sigma * 1000).sample
                target = noise - z
                weight = torch.ones(z.shape[0], device=device)
        loss = (weight * (pred.float() - target).pow(2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % 50 == 0:
            log.write(json.dumps({"step": step + 1, "loss": loss_avg, "lr": opt.param_groups[0]["lr"],
                                  "time": time.time()}) + "\n")
            log.flush()
        done = step + 1 == steps
        over = time_budget_s is not None and time.time() - t0 > time_budget_s
        if (step + 1) % checkpoint_every == 0 or done or over:
            save_checkpoint(out / "checkpoint", step + 1, modules, opt,
                            {"loss": loss_avg, "wall_s": _wall(out, start, t0, step + 1)}, ema)
        if over:
            break
    log.close()
    if not export:
        return out / "checkpoint"
    wall = json.loads((out / "wall.json").read_text()) if (out / "wall.json").exists() else {}
    vae_metrics = Path(vae_dir) / "metrics.json"
    record = {
        "model": name, "seed": seed, "steps_done": int(json.loads((out / "checkpoint" / "state.json").read_text())["step"]),
        "steps_planned": steps, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW(betas=(0.9, 0.99), wd=0.01)",
        "schedule": "linear warm-up 300 steps, cosine to 10%",
        "loss": (f"epsilon MSE, min-SNR-5 weighting; from step {high_noise_from} also x clamp(1/SNR, 1, {HIGH_NOISE_CAP:g})"
                 if name == "mini-sd" else "flow-matching velocity MSE, logit-normal sigma"
                 + (f"; from step {flux_step.guide_from} half of each batch at guidance w ~ U[1, {flux_step.w_max:g}] "
                    "with target + (w-1)(v_c - v_u) of the EMA model" if name == "mini-flux" else "")),
        "ema_decay": ema_decay, "text_dropout": text_dropout,
        "latent_pool": pool_size, "autocast": "none (float32)" if name == "mini-flux" else "bfloat16", "device": device, "torch_threads": torch.get_num_threads(),
        "final_loss_ema": loss_avg, "train_wall_s": round(sum(wall.get("sessions", {}).values()), 1),
        "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()},
        "vae": json.loads(vae_metrics.read_text()) if vae_metrics.exists() else None,
    }
    if init_from is not None:
        record["init_from"] = str(init_from)
    return export_pipeline(name, pipe, modules, ema, out, record)


def init_weights(modules: dict[str, nn.Module], folder: Path, fresh_if_other: tuple[str, ...] = ()) -> None:
    """Load each module's weights from the same-named component folder of a saved pipeline; a module named in
    ``fresh_if_other`` whose saved config differs (another architecture) keeps its fresh initialisation."""
    for name, module in modules.items():
        if name in fresh_if_other and _config_differs(module, folder / name):
            continue
        files = sorted((folder / name).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder / name} holds no safetensors weights; --init-from needs a saved "
                                    f"pipeline folder of the same model")
        tensors = {k: v.float() for f in files for k, v in load_file(str(f)).items()}
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids") and not _tied(module, k, tensors)]:
            raise ValueError(f"{folder / name} does not match this model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")


def _tied(module: nn.Module, key: str, loaded: dict[str, torch.Tensor]) -> bool:
    """Whether parameter ``key`` shares its storage with a loaded one (T5's ``encoder.embed_tokens`` is
    ``shared``: saved once, under the other name)."""
    state = module.state_dict(keep_vars=True)
    return any(k != key and k in loaded and state[k].data_ptr() == state[key].data_ptr() for k in state)


def _config_differs(module: nn.Module, folder: Path) -> bool:
    saved = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    ours = module.config.to_dict()
    return any(saved.get(k) != v for k, v in ours.items() if k in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv"))


def _wall(out: Path, start_step: int, t0: float, step: int) -> float:
    """Total training wall time over resumed sessions (previous sessions' time + this one's)."""
    f = out / "wall.json"
    prev = json.loads(f.read_text()) if f.exists() else {}
    sessions = prev.get("sessions", {})
    sessions[str(int(t0))] = time.time() - t0
    f.write_text(json.dumps({"sessions": sessions, "step": step}))
    return sum(sessions.values())


def export_pipeline(name: str, pipe, modules: dict[str, nn.Module], ema: EMA, out: Path, record: dict | None = None) -> Path:
    """Copy EMA weights in, restore stock attention processors, save the fp16 diffusers folder."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    ema.copy_to(modules)
    if name == "mini-sd3":
        pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
        pipe.register_modules(text_encoder_3=zero_t5_stub(len(pipe.tokenizer), pipe.transformer.config.joint_attention_dim),
                              tokenizer_3=pipe.tokenizer)
    pipe.to("cpu", torch.float16)
    for m in modules.values():
        m.eval()
    with claim_output(out / "pipeline", overwrite=True) as output:
        pipe.save_pretrained(str(output.tmp), safe_serialization=True)
        float32_text_encoders(output.tmp)  # one dtype under plain from_pretrained
        if record is not None:
            (output.tmp / "training.json").write_text(json.dumps(record, indent=2))
        return output.publish()


def replace_vae_weights(pipeline_dir: Path, vae_dir: Path) -> None:
    """Put ``vae_dir``'s weights (fp16) into a pipeline folder, keeping the pipeline's VAE config.

    Used after :func:`finetune_decoder` ran alongside denoiser training: the encoder and scaling
    are unchanged, only the decoder is better.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    target = Path(pipeline_dir) / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(target))
