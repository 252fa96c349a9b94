"""Typer commands ``eval`` and ``bench`` (registered on the main app by ``diffquant.cli``).

Module level stays torch-free (option defaults come from :mod:`.options`); the bodies import the harness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_common import BACKEND as _BACKEND
from ..cli_common import DEVICE as _DEVICE
from ..cli_common import GUIDANCE as _GUIDANCE
from ..cli_common import HEIGHT as _HEIGHT
from ..cli_common import STEPS as _STEPS
from ..cli_common import WIDTH as _WIDTH
from ..cli_common import check_device, check_positive, check_writable, field_option, parse_method_options, run_writing
from ..console import quiet_libraries
from .options import EvalOptions, parse_metrics

_PROMPTS = typer.Option(None, "--prompts", help="Prompt file (.txt one per line, .json [{prompt, seed}]) or zoo:heldout[:N] / "
                        "zoo:calibration[:N] (default zoo:heldout:16; none for an unconditional model).")
_SEEDS = typer.Option(None, "--seeds", help="Seeds for prompts without their own, or of an unconditional model's samples: '0,1,2' or '0-3' (default 0).")
_NUM_SAMPLES = typer.Option(None, "--num-samples", min=1, help="Unconditional models: samples from seeds 0..N-1 (default 16).")
_BATCH = field_option(EvalOptions, "batch_size", "--batch-size", min=1, help="Images per generation batch.")
_CACHE = field_option(EvalOptions, "cache_dir", "--cache-dir",
                      help="Image cache, keyed by model fingerprint, prompt, seed, steps, guidance, size.")
_INCEPTION = typer.Option(None, "--inception-weights", help="TorchScript Inception file for FID (e.g. clean-fid's inception-2015-12-05.pt).")
_CLIP = typer.Option(None, "--clip-model", help="Local transformers CLIPModel folder for CLIP score.")
_LPIPS = typer.Option(None, "--lpips-weights", help="torchvision AlexNet weights (.pth/.safetensors) for LPIPS.")
_REF_IMAGES = typer.Option(None, "--reference-images", help="Folder of reference images for Fréchet distance to a reference set, "
                           "or zoo:scenes (the mini zoo's real scenes; zoo prompts default to their renders, mini-ddim to zoo:scenes).")
_METRICS = typer.Option("all", "--metrics", help="Comma list of psnr,ssim,lpips,fd_fp,fd_ref,clip,attributes,timestep,sensitivity, or 'all'.")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace --out if it exists (otherwise refuse).")
_SENS_LAYERS = typer.Option(None, "--sensitivity-max-layers", min=1, help="Measure only the first N quantized layers (per-layer sensitivity costs a few denoiser calls per layer).")


def _options(metrics: str, cache_dir: Path, batch_size: int, inception_weights, clip_model, lpips_weights, reference_images,
             sensitivity_max_layers) -> EvalOptions:
    return EvalOptions(metrics=parse_metrics(metrics), cache_dir=cache_dir, batch_size=batch_size, inception_weights=inception_weights,
                       clip_model=clip_model, lpips_weights=lpips_weights, reference_images=reference_images,
                       sensitivity_max_layers=sensitivity_max_layers)


def eval_command(
    reference: str = typer.Option(..., "--reference", help="FP model: diffusers folder or mini-zoo name."),
    model: str = typer.Option(..., "--model", help="Model to judge: folder written by `diffquant quantize`, diffusers folder or zoo name."),
    prompts: Optional[str] = _PROMPTS, seeds: Optional[str] = _SEEDS, num_samples: Optional[int] = _NUM_SAMPLES,
    steps: Optional[int] = _STEPS, guidance: Optional[float] = _GUIDANCE,
    height: Optional[int] = _HEIGHT, width: Optional[int] = _WIDTH, batch_size: int = _BATCH,
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Folder for results.json, results.md and report.html."),
    cache_dir: Path = _CACHE, inception_weights: Optional[str] = _INCEPTION, clip_model: Optional[str] = _CLIP,
    lpips_weights: Optional[str] = _LPIPS, reference_images: Optional[str] = _REF_IMAGES, metrics: str = _METRICS,
    sensitivity_max_layers: Optional[int] = _SENS_LAYERS,
    label: Optional[str] = typer.Option(None, "--label", help="Name of the model in the report (default: the folder name)."),
    device: str = _DEVICE, backend: str = _BACKEND, overwrite: bool = _OVERWRITE,
) -> None:
    """Paired evaluation of one model against its FP reference: results.json plus a self-contained report.html.

    Under ``accelerate launch --num_processes N`` the processes share the image generation (batches
    ``b % N == rank`` into the shared --cache-dir); the main process then scores and writes the report.
    """
    run_writing(out, overwrite, lambda output: _eval(
        reference, model, prompts, seeds, num_samples, steps, guidance, height, width, batch_size, out, label, device, backend,
        _options(metrics, cache_dir, batch_size, inception_weights, clip_model, lpips_weights, reference_images,
                 sensitivity_max_layers), output))


def _eval(reference: str, model: str, prompts: str | None, seeds: str | None, num_samples: int | None, steps, guidance, height,
          width, batch_size: int, out: Path, label: str | None, device: str, backend: str, options: EvalOptions,
          output) -> None:
    from ..checkpoint import resume_log
    from ..distributed import launch_state
    from ..prompts import warn_truncated
    from ..registry import engine
    from .harness import Evaluation
    from .loading import check_same_architecture, load_model, resolve_settings
    from .paired import render
    from .prompts import DEFAULT_PROMPTS, load_prompts, parse_seeds, sample_items

    check_positive(steps=steps, height=height, width=width)
    check_writable(out)
    engine(backend, loads=True)  # an unknown engine fails before any model loads
    state = launch_state(check_device(device))
    if state is not None:
        device = str(state.device)
    if prompts is not None:
        load_prompts(prompts)  # a bad prompt file fails before any model loads
    parse_seeds(seeds)
    quiet_libraries()
    fp_pipe = load_model(reference, device)
    items = sample_items(fp_pipe, prompts, seeds, num_samples)
    settings = resolve_settings(fp_pipe, reference, steps, guidance, height, width)
    q_pipe = load_model(model, device, backend)
    label = label or Path(model).name + (f"-{backend}" if backend != "torch" else "")
    check_same_architecture(fp_pipe, q_pipe)
    if any(it.prompt for it in items):
        warn_truncated(fp_pipe, sorted({it.prompt for it in items}))
    if state is not None:
        for pipe, name in ((fp_pipe, "FP"), (q_pipe, label)):
            render(pipe, items, settings, options.cache_dir, batch_size, name, shard=(state.process_index, state.num_processes))
        state.wait_for_everyone()
        if not state.is_main_process:
            return
    spec = prompts or (DEFAULT_PROMPTS if any(it.prompt for it in items) else f"{len(items)} unconditional samples")
    with resume_log() as reused:
        ev = Evaluation(fp_pipe, reference, items, settings, options, prompts_spec=spec)
        ev.add(label, q_pipe, spec=model if backend == "torch" else f"{model} on {backend}")
    _write(ev, output, reused, f"diffquant eval: {label} vs {reference}")


def _write(ev, output, reused: list[str], title: str) -> None:
    """Write the report at the claimed output's temporary folder, publish it (``diffquant.outputs``), then print
    what the image cache gave back, the table and the paths."""
    paths = {key: output.path / path.relative_to(output.tmp) for key, path in ev.write(output.tmp, title).items()}
    output.publish()
    if reused:
        typer.echo(f"reused from --cache-dir: {', '.join(reused)}")
    typer.echo(paths["markdown"].read_text())
    for key, path in paths.items():
        typer.echo(f"{key}: {path}")


def bench_command(
    model: str = typer.Option(..., "--model", help="FP model: diffusers folder or mini-zoo name."),
    methods: str = typer.Option("rtn", "--methods", help="Comma list of diffquant methods, e.g. rtn,qdiffusion,pcr,emf ('none' for peers only)."),
    bits: str = typer.Option("w8a8", "--bits", help="Comma list of bit widths, e.g. w8a8,w4a8 (w4: weight-only)."),
    act_granularity: str = typer.Option("per_tensor", "--act-granularity",
                                        help="Comma list of activation granularities: per_tensor, per_channel_smooth, per_token, per_group."),
    conv_act_granularity: Optional[str] = typer.Option(None, "--conv-act-granularity", help="Convolution inputs' granularity "
                                                       "in every row, where it differs (e.g. per_tensor beside per_token)."),
    lowrank_rank: str = typer.Option("0", "--lowrank-rank", help="Comma list of low-rank float branch ranks (0: none), "
                                     "one row each, e.g. 0,8,16."),
    timestep_groups: int = typer.Option(1, "--timestep-groups", min=1, help="Activation parameter sets over the timestep range."),
    layers: str = typer.Option("all", "--layers", help="What every method row quantizes: all, linear (torchao's coverage), "
                               "conv, attention or name patterns, comma separated (as for quantize)."),
    option: list[str] = typer.Option([], "--option", help="Method option key=value (repeatable), for every method in --methods; rows carry them in their label, e.g. qdiffusion-w4a8[iterations=1000]."),
    peers: str = typer.Option("all", "--peers", help="Comma list of torchao-w8a8,torchao-w4,quanto-w8a8,quanto-w4,nncf-int8,openvino-fp32,openvino-bf16, 'all' or 'none'."),
    calib_prompts: Optional[str] = typer.Option(None, "--calib-prompts", help="Calibration prompts (same forms as --prompts; "
                                                "default zoo:calibration:16)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", min=1, help="Unconditional models: calibration "
                                                "samples, from seeds 1000000.. (apart from the evaluation's; default 16)."),
    prompts: Optional[str] = _PROMPTS, seeds: Optional[str] = _SEEDS, num_samples: Optional[int] = _NUM_SAMPLES,
    steps: Optional[int] = _STEPS, guidance: Optional[float] = _GUIDANCE,
    height: Optional[int] = _HEIGHT, width: Optional[int] = _WIDTH, batch_size: int = _BATCH,
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Folder for results.json, results.md and report.html."),
    cache_dir: Path = _CACHE, inception_weights: Optional[str] = _INCEPTION, clip_model: Optional[str] = _CLIP,
    lpips_weights: Optional[str] = _LPIPS, reference_images: Optional[str] = _REF_IMAGES,
    metrics: str = typer.Option("psnr,ssim,lpips,fd_fp,fd_ref,clip,attributes,timestep", "--metrics",
                                help="As for eval; per-layer sensitivity is off by default here (add 'sensitivity')."),
    sensitivity_max_layers: Optional[int] = _SENS_LAYERS, device: str = _DEVICE,
    backend: Optional[str] = typer.Option(None, "--backend", help="Also score each method's model deployed on this "
                                          "registered engine (openvino; torch: integer kernels): a <label>-<engine> row."),
    overwrite: bool = _OVERWRITE,
) -> None:
    """Several methods, bit widths and peer baselines on the same pairs: one table (markdown + JSON) and an HTML report.

    An unconditional model (DDPM, DDIM, LDM) is paired by seed (--num-samples or --seeds) and scored by PSNR/SSIM and
    Fréchet distance to FP and Fréchet distance to real images (--reference-images; mini-ddim: the zoo's scenes)."""
    def body(output) -> None:
        from ..checkpoint import resume_log
        from ..distributed import launch_state
        from ..registry import engine
        from ..sampling import is_unconditional, unconditional_prompts
        from .bench import parse_bits, parse_ranks, run_bench
        from .loading import load_model, resolve_settings
        from .peers import parse_peers
        from .prompts import DEFAULT_PROMPTS, DEFAULT_SAMPLES, load_prompts, parse_seeds, sample_items

        if launch_state(check_device(device)) is not None:
            raise ValueError("bench runs in one process; under accelerate launch run diffquant eval for each model")
        check_positive(steps=steps, height=height, width=width)
        check_writable(out)
        deploy = engine(backend, loads=True).deploy if backend else None
        if backend and deploy is None:
            raise ValueError(f"engine {backend} runs only its own exports; bench needs one that deploys in memory")
        options = _options(metrics, cache_dir, batch_size, inception_weights, clip_model, lpips_weights, reference_images,
                           sensitivity_max_layers)
        method_list = [] if methods.strip() == "none" else [m.strip() for m in methods.split(",") if m.strip()]
        bit_list = parse_bits(bits)
        ranks = parse_ranks(lowrank_rank)
        method_options = {m: parse_method_options(m, option) for m in method_list}
        peer_list = parse_peers(peers)
        for spec in (prompts, calib_prompts):
            if spec is not None:
                load_prompts(spec)  # a bad prompt file fails before any model loads
        parse_seeds(seeds)
        quiet_libraries()
        fp_pipe = load_model(model, device)
        items = sample_items(fp_pipe, prompts, seeds, num_samples)
        if is_unconditional(fp_pipe):
            if calib_prompts is not None:
                raise ValueError(f"{type(fp_pipe).__name__} is unconditional and takes no prompts; drop --calib-prompts "
                                 "and pass --calib-samples N")
            calibration = unconditional_prompts(calib_samples or DEFAULT_SAMPLES)
        elif calib_samples is not None:
            raise ValueError(f"--calib-samples is for unconditional models; {type(fp_pipe).__name__} is text-conditioned: "
                             "pass --calib-prompts")
        else:
            calibration = [it.prompt for it in load_prompts(calib_prompts or "zoo:calibration:16")]
        settings = resolve_settings(fp_pipe, model, steps, guidance, height, width)
        with resume_log() as reused:
            spec = f"{len(items)} unconditional samples" if is_unconditional(fp_pipe) else prompts or DEFAULT_PROMPTS
            ev = run_bench(fp_pipe, model, items, settings, options, method_list, bit_list, peer_list, calibration,
                           prompts_spec=spec, deploy=deploy, deploy_label=backend or "",
                           granularities=[g.strip() for g in act_granularity.split(",") if g.strip()], ranks=ranks,
                           config={"timestep_groups": timestep_groups, "layers": layers, "conv_act_granularity": conv_act_granularity}, method_options=method_options)
        _write(ev, output, reused, f"diffquant bench: {model}")

    run_writing(out, overwrite, body)


if __name__ == "__main__":
    app = typer.Typer(add_completion=False)
    app.command("eval")(eval_command)
    app.command("bench")(bench_command)
    app()
