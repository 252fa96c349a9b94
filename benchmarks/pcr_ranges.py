"""How far held-out prompts leave per-step activation ranges (issue 19, PCR's robust ranges): a float diagnostic.

Fits one activation group per sampling step (RTN with ``timestep_groups`` = steps, FP trajectories) once on the
calibration prompts and once on the held-out prompts, then reports, per (activation quantizer, step), how far the
held-out range leaves the calibration range (relative to its width) when the calibration range is set literally
(min/max of the step), widened toward the range pooled over all steps (``pooled_shrink`` with weight w), or pooled
over neighbouring steps. Writes JSON with ``--json``.

    .venv/bin/python benchmarks/pcr_ranges.py --model mini-sd --calib-prompts 32 --heldout 64
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import diffquant
from diffquant import CalibrationConfig, QuantConfig, zoo
from diffquant.calibration.progressive import activation_quantizers


def step_ranges(pipe, prompts: list[str], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) [quantizers, steps] of every per-tensor activation quantizer, one group per step, fitted on ``prompts``."""
    pipe = copy.deepcopy(pipe)
    cfg = QuantConfig(method="rtn", wbits=8, abits=8, timestep_groups=steps,
                      calibration=CalibrationConfig(num_prompts=len(prompts), num_inference_steps=steps, batch_size=32))
    diffquant.quantize(pipe, cfg, calibration=prompts, progress=False)
    quantizers = activation_quantizers(diffquant.get_denoiser(pipe))
    ranges = [[q.group_range(g) for g in range(q.num_groups)] for q in quantizers]
    return (torch.stack([torch.stack([lo[0] for lo, _ in r]) for r in ranges]),
            torch.stack([torch.stack([hi[0] for _, hi in r]) for r in ranges]))


def excess(lo: torch.Tensor, hi: torch.Tensor, held_lo: torch.Tensor, held_hi: torch.Tensor, literal_width: torch.Tensor) -> dict:
    e = torch.maximum(held_hi - hi, lo - held_lo).clamp(min=0) / (hi - lo)
    return {"pairs_exceeded": round(float((e > 0).float().mean()), 3), "mean_excess": round(float(e.mean()), 4),
            "max_excess": round(float(e.max()), 3), "width_vs_literal": round(float(((hi - lo) / literal_width).mean()), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mini-sd")
    p.add_argument("--calib-prompts", type=int, default=32)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = zoo.load_pipeline(args.model)
    lo, hi = step_ranges(pipe, zoo.calibration_prompts(args.calib_prompts), args.steps)
    held_lo, held_hi = step_ranges(pipe, zoo.heldout_prompts(args.heldout), args.steps)
    width, pooled_lo, pooled_hi = hi - lo, lo.amin(1, keepdim=True), hi.amax(1, keepdim=True)
    rows = {"literal": excess(lo, hi, held_lo, held_hi, width)}
    for w in (0.2, 0.5, 1.0):
        rows[f"pooled_shrink w={w}"] = excess(lo + w * (pooled_lo - lo).clamp(max=0), hi + w * (pooled_hi - hi).clamp(min=0),
                                               held_lo, held_hi, width)
    for k in (1, 3):
        for name, ahead in ((f"past {k} steps", 0), (f"±{k} steps", k)):
            window = [slice(max(0, g - k), g + ahead + 1) for g in range(args.steps)]
            rows[name] = excess(torch.stack([lo[:, s].amin(1) for s in window], 1), torch.stack([hi[:, s].amax(1) for s in window], 1),
                                held_lo, held_hi, width)
    out = {"model": args.model, "calib_prompts": args.calib_prompts, "heldout": args.heldout, "quantizers": lo.shape[0], "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
