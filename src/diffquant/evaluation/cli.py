"""Typer commands ``eval`` and ``bench`` (registered on the main app by ``diffquant.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .harness import EvalOptions, parse_metrics
from .prompts import load_prompts, parse_seeds

_PROMPTS = typer.Option("zoo:heldout:16", "--prompts", help="Prompt file (.txt one per line, .json [{prompt, seed}]) or zoo:heldout[:N] / zoo:calibration[:N].")
_SEEDS = typer.Option("0", "--seeds", help="Seeds for prompts without their own: '0,1,2' or '0-3'.")
_STEPS = typer.Option(None, "--steps", help="Sampling steps (default: the zoo model's, else 25).")
_GUIDANCE = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the zoo model's, else 7.5).")
_HEIGHT = typer.Option(None, "--height", help="Image height (default: the model's native size).")
_WIDTH = typer.Option(None, "--width", help="Image width (default: the model's native size).")
_BATCH = typer.Option(4, "--batch-size", min=1, help="Images per generation batch.")
_CACHE = typer.Option(Path("runs/cache"), "--cache-dir", help="Image cache, keyed by model fingerprint, prompt, seed, steps, guidance, size.")
_INCEPTION = typer.Option(None, "--inception-weights", help="TorchScript Inception file for FID (e.g. clean-fid's inception-2015-12-05.pt).")
_CLIP = typer.Option(None, "--clip-model", help="Local transformers CLIPModel folder for CLIP score.")
_LPIPS = typer.Option(None, "--lpips-weights", help="torchvision AlexNet weights (.pth/.safetensors) for LPIPS.")
_REF_IMAGES = typer.Option(None, "--reference-images", help="Folder of reference images for Fréchet distance to a reference set (zoo prompts default to their rendered scenes).")
_METRICS = typer.Option("all", "--metrics", help="Comma list of psnr,ssim,lpips,fd_fp,fd_ref,clip,attributes,timestep,sensitivity, or 'all'.")
_DEVICE = typer.Option("cpu", "--device", help="torch device for all models, e.g. cpu or cuda.")
_SENS_LAYERS = typer.Option(None, "--sensitivity-max-layers", min=1, help="Measure only the first N quantized layers (per-layer sensitivity costs a few denoiser calls per layer).")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _options(metrics: str, cache_dir: Path, batch_size: int, inception_weights, clip_model, lpips_weights, reference_images,
             sensitivity_max_layers) -> EvalOptions:
    return EvalOptions(metrics=parse_metrics(metrics), cache_dir=cache_dir, batch_size=batch_size, inception_weights=inception_weights,
                       clip_model=clip_model, lpips_weights=lpips_weights, reference_images=reference_images,
                       sensitivity_max_layers=sensitivity_max_layers)


def eval_command(
    reference: str = typer.Option(..., "--reference", help="FP model: diffusers folder or mini-zoo name."),
    model: str = typer.Option(..., "--model", help="Model to judge: folder written by `diffquant quantize`, diffusers folder or zoo name."),
    prompts: str = _PROMPTS, seeds: str = _SEEDS, steps: Optional[int] = _STEPS, guidance: Optional[float] = _GUIDANCE,
    height: Optional[int] = _HEIGHT, width: Optional[int] = _WIDTH, batch_size: int = _BATCH,
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Folder for results.json, results.md and report.html."),
    cache_dir: Path = _CACHE, inception_weights: Optional[str] = _INCEPTION, clip_model: Optional[str] = _CLIP,
    lpips_weights: Optional[str] = _LPIPS, reference_images: Optional[str] = _REF_IMAGES, metrics: str = _METRICS,
    sensitivity_max_layers: Optional[int] = _SENS_LAYERS,
    label: Optional[str] = typer.Option(None, "--label", help="Name of the model in the report (default: the folder name)."),
    device: str = _DEVICE,
) -> None:
    """Paired evaluation of one model against its FP reference: results.json plus a self-contained report.html.

    Under ``accelerate launch --num_processes N`` the processes share the image generation (batches
    ``b % N == rank`` into the shared --cache-dir); the main process then scores and writes the report.
    """
    from ..distributed import launch_state
    from .harness import Evaluation
    from .loading import load_model, resolve_settings
    from .paired import render

    state = launch_state(device)
    if state is not None:
        device = str(state.device)
    try:
        options = _options(metrics, cache_dir, batch_size, inception_weights, clip_model, lpips_weights, reference_images,
                           sensitivity_max_layers)
        items = load_prompts(prompts, parse_seeds(seeds))
        fp_pipe = load_model(reference, device)
        settings = resolve_settings(fp_pipe, reference, steps, guidance, height, width)
        q_pipe = load_model(model, device)
    except ValueError as e:
        _fail(e)
    if state is not None:
        for pipe, name in ((fp_pipe, "FP"), (q_pipe, label or Path(model).name)):
            render(pipe, items, settings, cache_dir, batch_size, name, shard=(state.process_index, state.num_processes))
        state.wait_for_everyone()
        if not state.is_main_process:
            return
    ev = Evaluation(fp_pipe, reference, items, settings, options, prompts_spec=prompts)
    ev.add(label or Path(model).name, q_pipe, spec=model)
    paths = ev.write(out, f"diffquant eval: {label or Path(model).name} vs {reference}")
    typer.echo(paths["markdown"].read_text())
    for key, path in paths.items():
        typer.echo(f"{key}: {path}")


def bench_command(
    model: str = typer.Option(..., "--model", help="FP model: diffusers folder or mini-zoo name."),
    methods: str = typer.Option("rtn", "--methods", help="Comma list of diffquant methods, e.g. rtn,qdiffusion,pcr,emf ('none' for peers only)."),
    bits: str = typer.Option("w8a8", "--bits", help="Comma list of bit widths, e.g. w8a8,w4a8."),
    peers: str = typer.Option("all", "--peers", help="Comma list of torchao-w8a8,torchao-w4,quanto-w8a8,quanto-w4, 'all' or 'none'."),
    calib_prompts: str = typer.Option("zoo:calibration:16", "--calib-prompts", help="Calibration prompts (same forms as --prompts)."),
    prompts: str = _PROMPTS, seeds: str = _SEEDS, steps: Optional[int] = _STEPS, guidance: Optional[float] = _GUIDANCE,
    height: Optional[int] = _HEIGHT, width: Optional[int] = _WIDTH, batch_size: int = _BATCH,
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for results.json, results.md and report.html."),
    cache_dir: Path = _CACHE, inception_weights: Optional[str] = _INCEPTION, clip_model: Optional[str] = _CLIP,
    lpips_weights: Optional[str] = _LPIPS, reference_images: Optional[str] = _REF_IMAGES,
    metrics: str = typer.Option("psnr,ssim,lpips,fd_fp,fd_ref,clip,attributes,timestep", "--metrics",
                                help="As for eval; per-layer sensitivity is off by default here (add 'sensitivity')."),
    sensitivity_max_layers: Optional[int] = _SENS_LAYERS, device: str = _DEVICE,
) -> None:
    """Several methods, bit widths and peer baselines on the same pairs: one table (markdown + JSON) and an HTML report."""
    from ..distributed import launch_state
    from .bench import parse_bits, run_bench
    from .loading import load_model, resolve_settings
    from .peers import parse_peers

    if launch_state(device) is not None:
        _fail(ValueError("bench runs in one process; under accelerate launch run diffquant eval for each model"))
    try:
        options = _options(metrics, cache_dir, batch_size, inception_weights, clip_model, lpips_weights, reference_images,
                           sensitivity_max_layers)
        method_list = [] if methods.strip() == "none" else [m.strip() for m in methods.split(",") if m.strip()]
        bit_list = parse_bits(bits)
        peer_list = parse_peers(peers)
        items = load_prompts(prompts, parse_seeds(seeds))
        calibration = [it.prompt for it in load_prompts(calib_prompts)]
        fp_pipe = load_model(model, device)
        settings = resolve_settings(fp_pipe, model, steps, guidance, height, width)
        ev = run_bench(fp_pipe, model, items, settings, options, method_list, bit_list, peer_list, calibration, prompts_spec=prompts)
    except ValueError as e:
        _fail(e)
    paths = ev.write(out, f"diffquant bench: {model}")
    typer.echo(paths["markdown"].read_text())
    for key, path in paths.items():
        typer.echo(f"{key}: {path}")


if __name__ == "__main__":
    app = typer.Typer(add_completion=False)
    app.command("eval")(eval_command)
    app.command("bench")(bench_command)
    app()
