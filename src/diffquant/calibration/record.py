"""Record a calibration set from the command line, on one process or many.

    python -m diffquant.calibration.record --model mini-sd --prompts zoo:calibration --out calib/
    accelerate launch --multi_gpu --num_processes 2 -m diffquant.calibration.record --model ... --out calib/

Each process samples the prompt batches ``b % N == rank`` into ``--out`` (shared storage); after a
barrier the main process merges all batches in batch order, so the result equals a one-process
run bit for bit. On CPU-only machines the processes talk over gloo. A killed run resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer

from ..cli_common import field_option, handled
from ..config import CalibrationConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
@handled
def record(
    model: str = typer.Option(..., help="Diffusers pipeline folder or bundled model name."),
    out: Path = typer.Option(..., help="Folder for the calibration shards (shared by all processes)."),
    prompts: str = typer.Option("zoo:calibration", help="Prompt file (.txt/.json) or zoo:calibration."),
    num_prompts: int = field_option(CalibrationConfig, "num_prompts", help="How many prompts to sample."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance scale (default: the model's)."),
    batch_size: int = typer.Option(4, help="Prompts per sampling batch (the unit of sharding and resume)."),
    every_k: int = field_option(CalibrationConfig, "every_k", help="Keep every k-th step."),
    samples_per_step: Optional[int] = field_option(CalibrationConfig, "samples_per_step", help="Rows kept per step (default: all)."),
    keep_outputs: bool = typer.Option(False, help="Also store the float denoiser outputs."),
    seed: int = field_option(CalibrationConfig, "seed", help="Sampling seed."),
) -> None:
    """Record float-model denoiser inputs along real sampling trajectories."""
    from accelerate import PartialState

    from ..pipelines import load_pipeline
    from ..prompts import prompt_list
    from ..registry import sampling_defaults
    from .collect import CalibrationSet, record_denoiser_calls

    state = PartialState(cpu=not torch.cuda.is_available())
    config = CalibrationConfig(num_prompts=num_prompts, num_inference_steps=steps, guidance_scale=guidance,
                               batch_size=batch_size, every_k=every_k, samples_per_step=samples_per_step, seed=seed)
    texts = prompt_list(prompts)[:num_prompts]
    pipe = load_pipeline(model, device=str(state.device))
    defaults = sampling_defaults(pipe)
    record_denoiser_calls(pipe, texts, config, keep_outputs=keep_outputs, defaults=defaults, cache_dir=out,
                          shard=(state.process_index, state.num_processes), progress=state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        merged = record_denoiser_calls(pipe, texts, config, keep_outputs=keep_outputs, defaults=defaults, cache_dir=out,
                                       progress=False)
        typer.echo(f"recorded {len(merged)} calls ({merged.num_samples()} samples) into {out}")
        CalibrationSet.load(out)  # the merged index reads back
    state.wait_for_everyone()


if __name__ == "__main__":
    app()
