"""mini-sd deployed on OpenVINO: denoiser step against torch, where a whole image's time goes, and fidelity.

    .venv/bin/python benchmarks/openvino_mini_sd.py --model q/ --prompts 4 --threads 1

``--model``: a folder written by ``diffquant quantize`` from mini-sd (default: RTN W8A8 quantized here).
Reports, in one process on the same inputs: the median ms of one denoiser call (batch 2) for torch FP32,
torch BF16 autocast, the torch fake-quant model and each OpenVINO graph (``float``: exact fake-quant
arithmetic; ``int``: int8 kernels, exact only on CPUs with VNNI); the split of one image between text
encoding, denoiser steps and VAE decoding on the OpenVINO pipeline; and the PSNR of the OpenVINO images
to the fake-quant images of the same model (same prompts, seeds) and of both to FP.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict

import numpy as np
import torch

import diffquant
from diffquant import zoo
from diffquant.demo import step_times
from diffquant.evaluation.metrics import psnr
from diffquant.runtime.openvino import OVDenoiser, cpu_has_vnni, pipeline_inputs


def _psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two HxWx3 uint8 images (the evaluation's metric)."""
    as_batch = [torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float() / 255.0 for x in (a, b)]
    return float(psnr(*as_batch)[0])


def timed_parts(pipe) -> dict[str, list[float]]:
    """Wrap the text encoder, denoiser and VAE decoder of ``pipe`` with wall-clock timers."""
    spent: dict[str, list[float]] = defaultdict(list)

    def wrap(owner, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            spent[label].append(time.perf_counter() - start)
            return out

        setattr(owner, attr, timed)

    wrap(pipe.text_encoder, "forward", "text encoder")
    wrap(pipe.unet, "forward", "denoiser")
    wrap(pipe.vae, "decode", "VAE decode")
    return spent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--graphs", default="float,int")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fp = zoo.load_pipeline("mini-sd")
    fp.set_progress_bar_config(disable=True)
    defaults = zoo.DEFAULTS["mini-sd"]
    if args.model:
        quant = diffquant.load(args.model)
    else:
        quant = copy.deepcopy(fp)
        diffquant.quantize(quant, diffquant.QuantConfig(method="rtn", wbits=8, abits=8), calibration=zoo.calibration_prompts(8))
    quant.set_progress_bar_config(disable=True)
    label = diffquant.quant_record(quant.unet).config.label
    inputs = pipeline_inputs(quant)
    report: dict = {"model": args.model or "mini-sd RTN (in process)", "label": label, "threads": args.threads,
                    "vnni": cpu_has_vnni(), "step_ms": {}, "psnr": {}, "image_split_ms": {}}
    prompts = zoo.heldout_prompts(args.prompts)
    images: dict[str, list[np.ndarray]] = {}
    for name, pipe in (("fp", fp), ("fake-quant", quant)):
        images[name] = [np.asarray(pipe(q, generator=torch.Generator().manual_seed(i), **defaults).images[0])
                        for i, q in enumerate(prompts)]
    start = time.perf_counter()
    deployed = {}
    for graph in args.graphs.split(","):
        t0 = time.perf_counter()
        deployed[graph] = OVDenoiser.from_denoiser(quant, graph=graph, threads=args.threads)
        report.setdefault("trace_and_compile_s", {})[graph] = round(time.perf_counter() - t0, 1)
    for graph, den in deployed.items():
        times = step_times(fp.unet, den, inputs, repeats=args.repeats)
        report["step_ms"].update({k: round(v, 2) for k, v in times.items()})
        ov_pipe = copy.copy(quant)
        ov_pipe.unet = den
        spent = timed_parts(ov_pipe)
        key = f"openvino {graph}"
        images[key] = [np.asarray(ov_pipe(q, generator=torch.Generator().manual_seed(i), **defaults).images[0])
                       for i, q in enumerate(prompts)]
        report["image_split_ms"][key] = {k: round(1e3 * sum(v) / len(prompts), 1) for k, v in spent.items()}
        report["psnr"][f"{key} vs fake-quant"] = [round(_psnr_u8(a, b), 2) for a, b in zip(images[key], images["fake-quant"])]
        report["psnr"][f"{key} vs fp"] = [round(_psnr_u8(a, b), 2) for a, b in zip(images[key], images["fp"])]
    with torch.no_grad():
        from diffquant.models.adapters import get_adapter

        call = get_adapter(quant.unet).call
        call(inputs)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            call(inputs)
        report["step_ms"]["torch fake-quant"] = round(1e3 * (time.perf_counter() - t0) / args.repeats, 2)
    report["psnr"]["fake-quant vs fp"] = [round(_psnr_u8(a, b), 2) for a, b in zip(images["fake-quant"], images["fp"])]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
