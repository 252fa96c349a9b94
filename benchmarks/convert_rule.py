"""Fixed kernel rule vs per-layer timing (autotune) for ``diffquant.convert`` on mini-sd: denoiser-call latency.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/convert_rule.py [--repeats 30] [--autotunes 2]

Quantizes mini-sd (RTN W8A8, 4 prompts), converts one copy with the fixed rule (as ``quantize --convert``),
one with the device's kernel on every layer and ``--autotunes`` copies with timing, then times one denoiser call of each, interleaved, and prints medians and how
many layers each autotuned copy placed differently from the fixed rule.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import diffquant
from diffquant import CalibrationConfig, QuantConfig
from diffquant.runtime import convert
from diffquant.runtime.convert import default_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--autotunes", type=int, default=2)
    args = parser.parse_args()
    from diffquant import zoo

    pipe = zoo.load_pipeline("mini-sd")
    cfg = QuantConfig(method="rtn", wbits=8, abits=8, calibration=CalibrationConfig(num_prompts=4, num_inference_steps=4))
    diffquant.quantize(pipe, cfg, calibration="zoo:calibration:4", progress=False)
    calib = diffquant.record_denoiser_calls(zoo.load_pipeline("mini-sd"), ["a red circle"],
                                            CalibrationConfig(num_prompts=1, num_inference_steps=2), progress=False)
    inputs = calib.calls[0].kwargs(device="cpu", dtype=torch.float32)
    models = {"fixed": convert(copy.deepcopy(pipe.unet), example_inputs=inputs, progress=False),
              "kernel-only": convert(copy.deepcopy(pipe.unet), backend=default_backend(), progress=False)}
    for i in range(args.autotunes):
        models[f"autotune-{i}"] = convert(copy.deepcopy(pipe.unet), example_inputs=inputs, autotune=True, progress=False)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(**inputs)
        for _ in range(args.repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(**inputs)
                times[name].append(1e3 * (time.perf_counter() - start))
    fixed = diffquant.quant_record(models["fixed"]).report["runtime"]["backends"]
    for name, m in models.items():
        backends = diffquant.quant_record(m).report["runtime"]["backends"]
        differ = sum(backends[n] != fixed[n] for n in fixed)
        counts = {b: sum(v == b for v in backends.values()) for b in sorted(set(backends.values()))}
        print(f"{name:12s} median {statistics.median(times[name]):7.2f} ms/call  min {min(times[name]):7.2f}  "
              f"layers {counts}  differ from fixed: {differ}/{len(fixed)}")


if __name__ == "__main__":
    main()
