"""``diffquant demo``: the whole loop on the bundled mini model, offline, in a couple of minutes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import diffquant

from .config import CalibrationConfig, QuantConfig
from .inspect import describe
from .sampling import SamplingSettings, default_settings, sample


def _source_pipeline(echo: Callable[[str], None]):
    """mini-sd from the zoo when its weights are installed; otherwise a tiny random SD pipeline."""
    try:
        from . import zoo

        pipe = zoo.load_pipeline("mini-sd")
        settings = default_settings(pipe)
        return pipe, settings, zoo.calibration_prompts(8), zoo.heldout_prompts(4), "mini-sd"
    except (ImportError, AttributeError, FileNotFoundError) as e:
        echo(f"note: mini-sd unavailable ({e}); using a tiny random-weight SD pipeline (images are noise-like)")
        from .models.tiny import tiny_sd_pipeline

        prompts = ["a red circle on the left", "a blue square at the top", "a small green star", "a large yellow triangle"]
        settings = SamplingSettings(steps=10, guidance=5.0, height=32, width=32)
        return tiny_sd_pipeline(), settings, prompts * 2, prompts, "tiny-sd (random weights)"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_demo(out: Path, wbits: int = 8, abits: int = 8, echo: Callable[[str], None] = print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe, settings, calib, prompts, name = _source_pipeline(echo)
    echo(f"model: {name}; calibrating on {len(calib)} prompts, evaluating on {len(prompts)} held-out prompts")
    fp = copy.deepcopy(pipe)
    cfg = QuantConfig(
        method="rtn", wbits=wbits, abits=abits,
        calibration=CalibrationConfig.from_sampling(settings, num_prompts=len(calib)),
    )
    diffquant.quantize(pipe, cfg, calibration=calib)
    folder = out / cfg.label
    diffquant.save(pipe, folder, overwrite=True)
    loaded = diffquant.load(folder)
    loaded.set_progress_bar_config(disable=True)
    fp.set_progress_bar_config(disable=True)
    results = []
    tiles = []
    for i, prompt in enumerate(prompts):
        images = [np.asarray(sample(p, [prompt], settings.replace(seed=i), output_type="pil")[0]) for p in (fp, loaded)]
        results.append(_psnr(images[0], images[1]))
        tiles.append(np.concatenate(images, axis=0))
        echo(f"  {prompt!r}: PSNR to float {results[-1]:.2f} dB")
    grid = Image.fromarray(np.concatenate(tiles, axis=1)).resize((len(prompts) * 128, 256), Image.NEAREST)
    grid.save(out / "grid.png")
    summary = describe(folder)
    echo(summary["text"])
    echo(f"mean PSNR to float: {np.mean(results):.2f} dB; grid (top float, bottom {cfg.label}): {out / 'grid.png'}")
    steps = _deployed_step_times(fp, loaded, echo)
    return {"psnr": results, "folder": str(folder), "step_ms": steps}


def _deployed_step_times(fp, quantized, echo: Callable[[str], None]) -> dict[str, float]:
    """The quantized denoiser on OpenVINO beside torch FP32 and BF16 autocast: one step, same inputs."""
    try:
        from .runtime.openvino import OVDenoiser, pipeline_inputs
    except ImportError as e:  # pragma: no cover - openvino is an install extra
        echo(f"note: OpenVINO step time skipped ({e}); install diffquant[openvino]")
        return {}
    deployed = OVDenoiser.from_denoiser(quantized)
    times = step_times(diffquant.get_denoiser(fp), deployed, pipeline_inputs(quantized))
    echo("one denoiser step, batch 2 (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items())
         + f"; OpenVINO {times['torch FP32'] / times['OpenVINO ' + deployed.graph]:.1f}x torch FP32")
    return times


def step_times(fp_denoiser: torch.nn.Module, deployed: torch.nn.Module, inputs: dict, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds of one call of the float denoiser (FP32, BF16 autocast) and of ``deployed`` (OVDenoiser)."""
    import statistics
    import time

    from .models.adapters import adapter_class, get_adapter

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    torch_call = get_adapter(fp_denoiser).call
    deployed_call = adapter_class(deployed.class_name)(deployed).call
    with torch.no_grad():
        fp32 = median_ms(lambda: torch_call(inputs))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = median_ms(lambda: torch_call(inputs))
        ov = median_ms(lambda: deployed_call(inputs))
    return {"torch FP32": fp32, "torch BF16 autocast": bf16, f"OpenVINO {deployed.graph}": ov}
