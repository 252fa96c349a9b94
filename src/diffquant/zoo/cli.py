"""``diffquant zoo``: train, evaluate and list the mini-zoo models."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import typer

from ..cli_common import fail as _fail
from ..cli_common import CommandGroup, check_device, handled
from ..console import quiet_libraries

app = typer.Typer(help="The mini zoo: small models trained here, the default for demo, tests and benchmarks.",
                  no_args_is_help=True, rich_markup_mode=None, cls=CommandGroup)

TRAINABLE = ("mini-sd", "mini-sd3", "mini-flux", "mini-ddim", "evaluator", "vae")


@app.command("list")
def list_models() -> None:
    """List the bundled models, their folders and sizes."""
    from . import MODEL_NAMES, MODELS_DIR

    for name in (*MODEL_NAMES, "evaluator"):
        folder = MODELS_DIR / name
        files = [p for p in folder.rglob("*.safetensors")] if folder.exists() else []
        size = sum(p.stat().st_size for p in files) / 2**20
        state = f"{size:6.2f} MiB" if files else "   missing (run `diffquant zoo train " + name + "`)"
        typer.echo(f"{name:10s} {state}  {folder}")


@app.command()
@handled
def train(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="mini-sd, mini-sd3, mini-flux, mini-ddim, evaluator or vae"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/zoo/NAME)"),
    steps: Optional[int] = typer.Option(None, help="training steps (default: the recipe's)"),
    seed: int = typer.Option(0, help="seed: data stream, init and noise are functions of it"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue from the run folder's checkpoint"),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda"),
    batch_size: Optional[int] = typer.Option(None, help="batch size (default: the recipe's)"),
    vae: Optional[Path] = typer.Option(None, help="a trained AutoencoderKL folder to reuse (default: train one)"),
    vae_steps: int = typer.Option(1500, help="VAE steps when it is trained here"),
    decoder_steps: int = typer.Option(1500, help="VAE decoder-only steps after that (encoder frozen)"),
    vae_levels: Optional[int] = typer.Option(None, help="VAE levels when it is trained here: 3 (8x8 latents) or 2 "
                                             "(16x16; default: the recipe's, 2 for mini-flux, else 3)"),
    threads: int = typer.Option(0, help="torch CPU threads (0: leave torch's default)"),
    time_budget: Optional[float] = typer.Option(None, help="stop after this many seconds (at a checkpoint) and export"),
    latent_cache: Optional[Path] = typer.Option(None, help="safetensors cache of the encoded latent pool"),
    checkpoint_every: int = typer.Option(250, help="steps between checkpoints"),
    pool_size: int = typer.Option(48000, help="training scenes encoded once into the latent pool"),
    init_from: Optional[Path] = typer.Option(None, help="mini-sd/mini-sd3: start from this pipeline folder's "
                                             "weights (a second phase; fresh optimizer and LR schedule)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default: the recipe's)"),
    high_noise_from: Optional[int] = typer.Option(None, help="mini-sd: step from which the loss is also weighted "
                                                  "by clamp(1/SNR, 1, 20) (default: the recipe's)"),
    install: bool = typer.Option(False, help="copy the result into the package (src/diffquant/zoo/models/NAME)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the run's finished result if it exists"),
) -> None:
    """Train NAME from a seed; checkpoints regularly and resumes a killed run."""
    import torch

    from ..outputs import claim_output
    from . import MODELS_DIR
    from .train import finetune_decoder, pick_device, train_denoiser, train_vae

    if name not in TRAINABLE:
        _fail(f"unknown model {name!r}; choose one of {', '.join(TRAINABLE)}")
    if steps is not None and steps < 1:
        _fail(f"--steps must be >= 1, got {steps}")
    if vae_levels not in (None, 2, 3):
        _fail(f"--vae-levels must be 2 or 3, got {vae_levels}")
    if vae is not None and not (vae / "config.json").exists():
        _fail(f"--vae {vae} holds no AutoencoderKL (config.json missing); pass a folder written by `zoo train vae`")
    device = pick_device(device if device == "auto" else check_device(device))
    if threads > 0:
        torch.set_num_threads(threads)
    out = out or Path("runs/zoo") / name
    out.mkdir(parents=True, exist_ok=True)
    result = out / {"evaluator": "evaluator", "vae": "vae_decoder" if decoder_steps > 0 else "vae"}.get(name, "pipeline")
    ctx.with_resource(claim_output(result, overwrite=overwrite))  # held until the command ends: refused at start
    quiet_libraries()
    t0 = time.time()
    if name == "evaluator":
        from .evaluator import train_evaluator

        metrics = train_evaluator(out, steps=steps or 1500, seed=seed, resume=resume, device=device,
                                  checkpoint_every=checkpoint_every, batch_size=batch_size or 128)
        result = out / "evaluator"
        typer.echo(json.dumps(metrics, indent=2))
    elif name == "mini-ddim":
        from .ddim_training import train_ddim

        result = train_ddim(out, steps=steps, seed=seed, batch_size=batch_size, lr=lr, resume=resume, device=device,
                            checkpoint_every=checkpoint_every, time_budget_s=time_budget)
    elif name == "vae":
        stage1 = train_vae(out, steps=steps or vae_steps, seed=seed, resume=resume, device=device,
                           batch_size=batch_size or 32, checkpoint_every=checkpoint_every, levels=vae_levels or 3)
        result = finetune_decoder(stage1, out, steps=decoder_steps, seed=seed, resume=resume, device=device,
                                  checkpoint_every=checkpoint_every) if decoder_steps > 0 else stage1
    else:
        result = train_denoiser(name, out, steps=steps, seed=seed, batch_size=batch_size, resume=resume, device=device,
                                checkpoint_every=checkpoint_every, vae_dir=vae, vae_steps=vae_steps,
                                decoder_steps=decoder_steps, vae_levels=vae_levels,
                                time_budget_s=time_budget, latent_cache=latent_cache, init_from=init_from, lr=lr, pool_size=pool_size,
                                high_noise_from=high_noise_from)
    typer.echo(f"{name}: wrote {result} ({time.time() - t0:.0f} s this session)")
    if install:
        target = MODELS_DIR / name
        with claim_output(target, overwrite=True) as output:  # --install is the request to replace it
            shutil.copytree(result, output.tmp)
            output.publish()
        typer.echo(f"installed into {target}")


@app.command("eval")
@handled
def eval_cmd(
    name: str = typer.Argument(..., help="mini-sd, mini-sd3, mini-flux, mini-ddim or evaluator"),
    n: int = typer.Option(256, help="number of held-out captions (seeds 0..n-1)"),
    model: Optional[Path] = typer.Option(None, help="evaluate this pipeline folder instead of the installed one"),
    steps: Optional[int] = typer.Option(None, help="override the default number of inference steps"),
    guidance: Optional[float] = typer.Option(None, help="override the default guidance scale"),
    out: Optional[Path] = typer.Option(None, help="write the results as JSON here"),
    grid: Optional[Path] = typer.Option(None, help="save a PNG grid of the first 64 generated images"),
    card: bool = typer.Option(False, help="rewrite the installed model_card.md with these numbers"),
) -> None:
    """Print the quality-floor table: evaluator accuracy per attribute on generated held-out compositions."""
    from . import MODEL_NAMES, MODELS_DIR, model_path
    from .quality import evaluate_evaluator_floor, evaluate_model, format_table, write_model_card

    if name not in (*MODEL_NAMES, "evaluator"):
        _fail(f"unknown model {name!r}; choose one of {', '.join((*MODEL_NAMES, 'evaluator'))}")
    if not 1 <= n <= 512:
        _fail(f"--n must be in 1..512, got {n}")
    quiet_libraries()
    try:
        if name == "evaluator":
            result = evaluate_evaluator_floor(n)
        else:
            pipe = None
            if model is not None:
                from . import load_pipeline_folder

                pipe = load_pipeline_folder(name, model)
            result = evaluate_model(name, pipe=pipe, n=n, num_inference_steps=steps, guidance_scale=guidance,
                                    save_grid=grid)
    except FileNotFoundError as e:
        _fail(str(e))
    typer.echo(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    if card:
        folder = MODELS_DIR / name if name == "evaluator" else model_path(name)
        (folder / "eval.json").write_text(json.dumps(result, indent=2))
        training = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
        typer.echo(f"wrote {write_model_card(name, folder, result, training)}")


if __name__ == "__main__":
    app()
