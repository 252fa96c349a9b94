"""The ``diffquant`` command line: quantize, generate, info, export, demo (and zoo, eval, bench when present).

Importing this module loads no torch, diffusers or torchmetrics (each command imports what it runs), so
``diffquant --help`` and every command's ``--help`` answer at once; tests/test_cli_fast.py keeps it so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import cli_common
from .cli_common import check_device, check_positive, check_writable, field_option, given_fields, parse_method_options
from .cli_common import run as _run
from .cli_common import run_writing as _run_writing
from .config import CalibrationConfig, QuantConfig
from .console import quiet, quiet_libraries

app = typer.Typer(
    cls=cli_common.CommandGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: importing rich's formatter costs more CPU than the rest of --help
    help="Quantize text-to-image diffusion models (Stable Diffusion via diffusers) and run them.",
)


@app.callback()
def _options(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the libraries' own warnings, log lines and loading bars (hidden by default)."),
) -> None:
    ctx.with_resource(quiet(verbose))  # for the whole command, before it imports torch or diffusers


@app.command()
def quantize(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="Diffusers pipeline folder or bundled model name (mini-sd, mini-sd3)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the quantized pipeline to."),
    method: str = field_option(QuantConfig, "method", help="Quantization method: rtn, qdiffusion, pcr, emf (those installed)."),
    wbits: int = field_option(QuantConfig, "wbits", help="Weight bits (2-16)."),
    abits: Optional[int] = field_option(QuantConfig, "abits", help="Activation bits (2-16); 0 for weight-only."),
    prompts: Optional[str] = typer.Option(None, help="Calibration prompts: .txt (one per line) or .json; zoo:calibration for the bundled set."),
    num_prompts: int = field_option(CalibrationConfig, "num_prompts", "--num-prompts", "--num-samples",
                                    help="How many calibration prompts to sample (an unconditional model: how many samples)."),
    steps: Optional[int] = field_option(CalibrationConfig, "num_inference_steps", "--steps",
                                        help="Sampling steps while recording calibration data (default: the model's)."),
    guidance: Optional[float] = field_option(CalibrationConfig, "guidance_scale", "--guidance",
                                             help="Guidance scale while recording (default: the model's)."),
    batch_size: int = field_option(CalibrationConfig, "batch_size", help="Prompts per calibration sampling batch."),
    height: Optional[int] = field_option(CalibrationConfig, "height", help="Image height while recording, in pixels "
                                         "(default: the model's native size; smaller is cheaper on full-size models)."),
    width: Optional[int] = field_option(CalibrationConfig, "width", help="Image width while recording, in pixels."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="An unconditional model's calibration samples by seed: "
                                        "'0,1,2' or '100-163' (instead of --num-samples; keep them apart from eval seeds)."),
    timestep_groups: int = field_option(QuantConfig, "timestep_groups", help="Activation parameter sets over the timestep range."),
    granularity: str = field_option(QuantConfig, "weight_granularity", "--granularity",
                                    help="Weight granularity: per_tensor, per_channel, per_group."),
    group_size: int = field_option(QuantConfig, "group_size", help="Input elements per group with --granularity per_group."),
    weight_observer: str = field_option(QuantConfig, "weight_observer", help="Weight range: minmax, percentile, mse."),
    act_observer: str = field_option(QuantConfig, "act_observer", help="Activation range: minmax, percentile, mse."),
    act_granularity: str = field_option(QuantConfig, "act_granularity", help="Activation scales: per_tensor (static), "
                                        "per_channel_smooth (SmoothQuant migration), per_token or per_group (dynamic; "
                                        "the softmax output then per query row)."),
    conv_act_granularity: Optional[str] = field_option(QuantConfig, "conv_act_granularity", help="Convolution inputs' "
                                                       "granularity when it differs from --act-granularity (e.g. per_tensor "
                                                       "beside per_token: int8 convolution kernels take no per-pixel scale)."),
    act_symmetric: bool = field_option(QuantConfig, "act_symmetric", "--act-symmetric/--act-asymmetric",
                                       help="Activation grid: symmetric (zero point 0: OpenVINO's fastest int8 kernels) "
                                       "or asymmetric (the default: finer for one-sided ranges)."),
    attention_quantizers: str = field_option(QuantConfig, "attention_quantizers", help="Attention inputs quantized: "
                                             "qkv_softmax (the papers') or qk (q and k, symmetric; the fused attention "
                                             "op kept: OpenVINO's int8 attention kernel)."),
    act_group_size: int = field_option(QuantConfig, "act_group_size", help="Input channels per group with --act-granularity per_group."),
    keep_float: list[str] = field_option(QuantConfig, "keep_float", help="Layer-name pattern to keep float (repeatable), e.g. 'conv_in'."),
    layers: str = field_option(QuantConfig, "layers", help="What to quantize: all, linear, conv, attention or name patterns, "
                               "comma separated (e.g. 'linear': torchao's coverage); the rest stays float."),
    lowrank_rank: int = field_option(QuantConfig, "lowrank_rank", min=0, help="Rank of a 16-bit float low-rank branch beside "
                                     "each quantized layer (SVDQuant; 0: none); it counts in the average weight bits."),
    lowrank_layers: list[str] = field_option(QuantConfig, "lowrank_layers", help="Layer-name pattern given the branch "
                                             "(repeatable; default: every quantized layer)."),
    option: list[str] = typer.Option([], "--option", help="Method option key=value (repeatable)."),
    preset: Optional[str] = typer.Option(None, help="Method preset, e.g. 'paper' (Q-Diffusion's paper-sized calibration)."),
    recipe: Optional[str] = typer.Option(None, help="Named recipe: its method and settings for every flag not given, e.g. "
                                         "'faithful' (4-bit weights near 8-bit fidelity; docs/recipes.md)."),
    config: Optional[Path] = typer.Option(None, help="A QuantConfig JSON file; other flags are ignored when given."),
    device: str = cli_common.DEVICE,
    dtype: str = typer.Option("float32", "--dtype", help="Calibrate in float32, bfloat16 or float16 (the saved model keeps it)."),
    seed: int = field_option(QuantConfig, "seed", help="Seed for calibration sampling."),
    max_memory: Optional[str] = field_option(QuantConfig, "max_memory", "--max-memory",
                                             help="Calibration data held in RAM, e.g. 4GiB; beyond it read from disk (default: half the free RAM)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists (otherwise refuse)."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep the resumable work folder (.<out>.work/<settings>) after success."),
    convert: bool = typer.Option(False, "--convert", help="Convert to integer kernels (int8/int4 weights) before saving (oneDNN on CPU, int_mm on CUDA)."),
):
    """Quantize a pipeline's denoiser and save the quantized pipeline."""

    def body(output):
        import diffquant
        from diffquant.checkpoint import finish_work_folder, folder_identity, resume_log, work_folder
        from diffquant.distributed import launch_state
        from diffquant.pipelines import load_pipeline
        from diffquant.prompts import prompt_list
        from diffquant.sampling import check_prompts, is_unconditional

        check_writable(out)
        check_positive(steps=steps, num_prompts=num_prompts, batch_size=batch_size, height=height, width=width)
        check_device(device)
        torch_dtype = diffquant.api.check_dtype(dtype)
        seed_list = None
        if seeds is not None:
            from diffquant.evaluation.prompts import parse_seeds

            seed_list = parse_seeds(seeds)
            if prompts is not None or config is not None:
                raise ValueError("--seeds names an unconditional model's calibration samples; drop --prompts/--config or --seeds")
        if config is not None:
            if not config.is_file():
                raise FileNotFoundError(f"config file {config} not found")
            cfg = QuantConfig.from_json(config.read_text())
        else:
            explicit = given_fields(ctx, {"granularity": "weight_granularity"})
            if recipe is not None and "method" not in explicit:
                from diffquant.recipes import recipe_fields

                method_name = recipe_fields(recipe)["method"]
            else:
                method_name = method
            fields = dict(
                method=method_name, wbits=wbits, abits=abits or None, weight_granularity=granularity, group_size=group_size,
                weight_observer=weight_observer, act_observer=act_observer, act_granularity=act_granularity,
                conv_act_granularity=conv_act_granularity, act_group_size=act_group_size, timestep_groups=timestep_groups,
                attention_quantizers=attention_quantizers, act_symmetric=act_symmetric,
                keep_float=keep_float, layers=layers, seed=seed, max_memory=max_memory, lowrank_rank=lowrank_rank,
                lowrank_layers=lowrank_layers,
                options={**({"preset": preset} if preset else {}), **parse_method_options(method_name, option)},
                calibration=CalibrationConfig(num_prompts=len(seed_list) if seed_list else num_prompts,
                                              num_inference_steps=steps, guidance_scale=guidance, height=height,
                                              width=width, batch_size=batch_size, seed=seed, seeds=seed_list),
            )
            if recipe is not None:
                from diffquant.recipes import apply_recipe

                fields = apply_recipe(recipe, fields, explicit)
            cfg = QuantConfig(**fields)
        calib = prompt_list(prompts) if prompts else None
        state = launch_state(device)  # under `accelerate launch`: EMF trains data-parallel (docs/scale-out.md)
        if state is not None and cfg.method != "emf":
            raise ValueError(f"only --method emf runs across processes; run --method {cfg.method} without accelerate launch")
        quiet_libraries()
        typer.echo(f"loading {model}")
        pipe = load_pipeline(model, device=str(state.device) if state is not None else device, torch_dtype=torch_dtype)
        if is_unconditional(pipe):
            check_prompts(pipe, calib)  # calibrated from --num-samples or --seeds seeds
        elif seed_list is not None:
            raise ValueError(f"--seeds picks calibration samples of unconditional models; {type(pipe).__name__} is "
                             "text-conditioned: pass --prompts FILE")
        elif calib is None and not diffquant.api.sampling_defaults(pipe):
            raise ValueError("calibration prompts needed: pass --prompts FILE (one prompt per line)")
        typer.echo(f"quantizing with {cfg.label}")
        settings = {k: v for k, v in cfg.to_dict().items() if k != "max_memory"}  # the budget does not change the result
        work = work_folder(out, {"model": folder_identity(model), "config": settings, "prompts": calib})
        with resume_log() as reused:
            diffquant.quantize(pipe, cfg, calibration=calib, workdir=work)
        if state is not None and not state.is_main_process:
            return
        if reused:
            typer.echo(f"resumed from {work}: reused {', '.join(reused)}")
        if convert:
            _convert_pipeline(pipe, calib)
        diffquant.save(pipe, out, overwrite=overwrite)
        report = diffquant.quant_record(diffquant.get_denoiser(pipe)).report
        typer.echo(f"saved {out} ({cfg.label}, calibration {report.get('calibration_seconds', 0):.1f} s)")
        note = finish_work_folder(work, keep=keep_work)
        if note:
            typer.echo(note)

    _run_writing(out, overwrite, body)


@app.command()
def generate(
    model: str = typer.Option(..., "--model", "-m", help="Quantized folder, diffusers pipeline folder, or bundled model name."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text prompt (none for an unconditional model)."),
    out: Path = typer.Option(Path("image.png"), "--out", "-o", help="Image file to write (PNG); several seeds: one row of images."),
    seed: int = typer.Option(0, help="Seed of the initial noise."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Images from seeds --seed, --seed+1, ... (default 1)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds of the images: '0,1,2' or '0-3' (instead of --seed/--num-samples)."),
    steps: Optional[int] = cli_common.STEPS, guidance: Optional[float] = cli_common.GUIDANCE,
    height: Optional[int] = cli_common.HEIGHT, width: Optional[int] = cli_common.WIDTH, device: str = cli_common.DEVICE,
    backend: str = cli_common.BACKEND,
    overwrite: bool = typer.Option(False, help="Replace --out if it exists (otherwise refuse)."),
):
    """Generate an image (or one per seed); an unconditional model (DDPM, DDIM, LDM) takes seeds and no prompt."""

    def body(output):
        import numpy as np
        from PIL import Image

        from diffquant.evaluation.prompts import parse_seeds
        from diffquant.guard import guard_pipeline
        from diffquant.pipelines import load_pipeline
        from diffquant.prompts import warn_truncated
        from diffquant.sampling import SamplingSettings, check_prompts, is_unconditional, sample

        if prompt is not None and not prompt.strip():
            raise ValueError("the prompt is empty; pass --prompt \"a red circle on the left\"")
        if seeds is not None and num_samples is not None:
            raise ValueError("give --seeds or --num-samples, not both")
        check_positive(steps=steps, height=height, width=width, num_samples=num_samples)
        seed_list = parse_seeds(seeds) if seeds is not None else [seed + i for i in range(num_samples or 1)]
        check_writable(out)
        check_device(device)
        quiet_libraries()
        pipe = load_pipeline(model, device=device, backend=backend)
        check_prompts(pipe, [prompt] if prompt else None)
        if not is_unconditional(pipe):
            warn_truncated(pipe, [prompt])
        settings = SamplingSettings(steps, guidance, height, width, seed).resolve(pipe)
        pipe.set_progress_bar_config(disable=False, desc="sampling")
        images = []
        for s in seed_list:
            with guard_pipeline(pipe, "sampling"):
                images.append(np.asarray(sample(pipe, [prompt or ""], settings.replace(seed=s), output_type="pil")[0]))
        image = Image.fromarray(np.concatenate(images, axis=1))  # several seeds: one row, in seed order
        image.save(output.tmp, format=out.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
        output.publish()
        typer.echo(f"wrote {out}" + (f" ({len(images)} images in a row, seeds {seed_list})" if len(images) > 1 else ""))

    _run_writing(out, overwrite, body)


def _convert_pipeline(pipe, prompts: list[str] | None) -> None:
    """Convert to integer layers with the fixed kernel rule, as the torch engine exports (deployment/torch.py)."""
    from diffquant.deployment.torch import convert_pipeline

    runtime = convert_pipeline(pipe, prompts)
    typer.echo(f"converted {sum(b != 'float' for b in runtime['backends'].values())} layers to integer kernels; "
               f"{len(runtime['float_fallback'])} stay float (see `diffquant info`)")


@app.command()
def export(
    model: Path = typer.Option(..., "--model", "-m", help="A folder written by `diffquant quantize` (onnx: with --convert)."),
    out: Path = typer.Option(..., "--out", "-o", help="ONNX file, or folder (openvino, torch; loads with --backend), to write."),
    fmt: str = cli_common.EXPORT_FORMAT,
    group: Optional[int] = typer.Option(None, help="Timestep group to export (onnx: needed when the model has several)."),
    batch_size: int = typer.Option(2, help="Batch size the graph is traced with."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
):
    """Export a quantized model for a deployment engine: ONNX with QuantizeLinear/DequantizeLinear nodes, an OpenVINO
    IR folder, or a torch folder converted to integer kernels."""

    def body(output):
        from diffquant.deployment import export as export_to
        from diffquant.pipelines import load_pipeline
        from diffquant.registry import engine

        target = engine(fmt)  # an unknown format fails before the model loads
        check_writable(out)
        quiet_libraries()
        path = export_to(load_pipeline(model), out, format=fmt, overwrite=overwrite, group=group, batch=batch_size)
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        run = f"; run it with --backend {fmt}" if target.load is not None and fmt != "torch" else ""
        typer.echo(f"wrote {path} ({fmt}, {sum(f.stat().st_size for f in files) / 1e6:.2f} MB){run}")

    _run_writing(out, overwrite, body)


@app.command()
def info(
    model: Path = typer.Option(..., "--model", "-m", help="A folder written by `diffquant quantize`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
):
    """What is quantized, at which bits, what stays float and why, and the sizes on disk."""

    def body():
        from diffquant.inspect import describe

        quiet_libraries()
        summary = describe(model)
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        typer.echo(summary["text"])

    _run(body)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its models and images."),
    wbits: int = field_option(QuantConfig, "wbits", help="Weight bits."),
    abits: int = field_option(QuantConfig, "abits", help="Activation bits."),
):
    """Quantize the bundled mini model, save, reload, generate, and compare with float: no download."""

    def body():
        from diffquant.demo import run_demo

        quiet_libraries()
        run_demo(out, wbits=wbits, abits=abits, echo=typer.echo)

    _run(body)


def _register_optional() -> None:
    """Sub-commands that live with their subsystems (mini zoo, evaluation) join when installed."""
    try:
        from diffquant.zoo.cli import app as zoo_app
    except ImportError:
        zoo_app = None
    if zoo_app is not None:
        app.add_typer(zoo_app, name="zoo", help="The bundled mini models: list, train, eval.")
    try:
        from diffquant.evaluation.cli import bench_command, eval_command
    except ImportError:
        return
    app.command("eval")(eval_command)
    app.command("bench")(bench_command)


_register_optional()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
