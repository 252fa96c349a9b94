"""Which error limits mini-sd3 at W8A8? RTN variants on the first held-out prompts, paired with FP (issue 22).

    python benchmarks/granularity_probe.py noattn      # per-token layers, attention matmuls left float
    python benchmarks/granularity_probe.py wonly       # W8 weights only
    python benchmarks/granularity_probe.py softmax16 [N] # per-token layers and q/k/v, softmax output at 16 bits; N prompts (4)

Prints the per-image PSNR to FP and the mean; FP images come from the same ``--cache-dir`` as the
granularity bench (runs/gran-cache), so the numbers pair with benchmarks/results/granularity.json's rows.
"""

from __future__ import annotations

import json
import sys

from diffquant import QuantConfig
from diffquant.config import CalibrationConfig
from diffquant.evaluation.bench import quantize_copy
from diffquant.evaluation.harness import EvalOptions, Evaluation
from diffquant.evaluation.loading import load_model, resolve_settings
from diffquant.evaluation.prompts import load_prompts


def main(kind: str, model: str = "mini-sd3", prompts: int = 4) -> None:
    fp = load_model(model, "cpu")
    settings = resolve_settings(fp, model, None, None, None, None)
    items = load_prompts(f"zoo:heldout:{prompts}")
    calibration = [it.prompt for it in load_prompts("zoo:calibration:8")]
    ev = Evaluation(fp, model, items, settings, EvalOptions(metrics=["psnr"], cache_dir="runs/gran-cache", batch_size=32))
    cc = CalibrationConfig.from_sampling(settings, num_prompts=8, batch_size=32)
    cfg = {
        "noattn": QuantConfig(wbits=8, abits=8, act_granularity="per_token", quantize_attention=False, calibration=cc),
        "wonly": QuantConfig(wbits=8, abits=None, calibration=cc),
        "softmax16": QuantConfig(wbits=8, abits=8, act_granularity="per_token", softmax_bits=16, calibration=cc),
    }[kind]
    pipe, _, _ = quantize_copy(fp, cfg, calibration, progress=False)
    entry = ev.add(kind, pipe, spec=kind)
    print(kind, json.dumps([round(r["psnr"], 2) for r in entry["per_image"]]), round(entry["summary"]["psnr"], 2))


if __name__ == "__main__":
    main(sys.argv[1], prompts=int(sys.argv[2]) if len(sys.argv) > 2 else 4)
