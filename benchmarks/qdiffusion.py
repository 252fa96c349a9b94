"""Q-Diffusion against RTN on the mini zoo: paired images to FP, costs, and the paper's two claims checked.

    .venv/bin/python benchmarks/qdiffusion.py                      # mini-sd and mini-sd3, 256 held-out prompts
    .venv/bin/python benchmarks/qdiffusion.py --models mini-sd --prompts 64 --option iterations=400

For each model: the FP pipeline generates one image per held-out prompt (prompt i uses seed i), then
RTN and Q-Diffusion at each bit width quantize a copy (same calibration prompts and sampling settings)
and generate the same pairs. Metrics come from ``diffquant.evaluation`` (PSNR/SSIM to FP, Fréchet
distance to FP in the mini-zoo evaluator's features, attribute accuracy); each row also carries the
calibration wall time and peak RSS above the starting level during quantization.
Writes ``benchmarks/results/qdiffusion.json`` and ``docs/results-qdiffusion.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIDELITY = (("psnr", 1), ("ssim", 1), ("fd_fp", -1), ("attr_all", 1))  # (metric, +1 higher is better / -1 lower)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mini-sd,mini-sd3")
    p.add_argument("--model-path", action="append", default=[],
                   help="NAME=FOLDER: load NAME from this diffusers folder (e.g. an interim checkpoint) with NAME's zoo settings")
    p.add_argument("--bits", default="w8a8,w4a8")
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts (one image each, seed = index)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps for generation and calibration (default: the model's)")
    p.add_argument("--calib-prompts", type=int, default=8, help="calibration prompts (zoo calibration split)")
    p.add_argument("--option", action="append", default=[], help="qdiffusion option key=value (repeatable)")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "bench-qdiffusion")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "qdiffusion.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results-qdiffusion.md")
    return p.parse_args(argv)


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def bench_model(name: str, args: argparse.Namespace, qd_options: dict, folder: str | None) -> dict:
    import diffquant
    from diffquant import CalibrationConfig, QuantConfig, zoo
    from diffquant.evaluation import EvalOptions, Evaluation, PromptItem
    from diffquant.evaluation.bench import parse_bits
    from diffquant.evaluation.loading import load_model, resolve_settings
    from diffquant.evaluation.peers import PeakMemory

    fp = load_model(folder) if folder else zoo.load_pipeline(name)
    settings = resolve_settings(fp, name, args.steps, None, None, None)
    items = [PromptItem(p, i) for i, p in enumerate(zoo.heldout_prompts(args.prompts))]
    options = EvalOptions(metrics=["psnr", "ssim", "fd_fp", "attributes"], cache_dir=args.cache_dir / name, batch_size=args.batch_size)
    ev = Evaluation(fp, name, items, settings, options, prompts_spec=f"zoo:heldout:{args.prompts}")
    calibration = zoo.calibration_prompts(args.calib_prompts)
    reports = {}
    for wbits, abits in parse_bits(args.bits):
        for method in ("rtn", "qdiffusion"):
            calib_cfg = CalibrationConfig(num_prompts=len(calibration), num_inference_steps=settings.steps,
                                          guidance_scale=settings.guidance, height=settings.height, width=settings.width,
                                          batch_size=args.batch_size)
            cfg = QuantConfig(method=method, wbits=wbits, abits=abits, calibration=calib_cfg,
                              options=qd_options if method == "qdiffusion" else {})
            pipe = copy.deepcopy(fp)
            print(f"[{name}] quantizing {cfg.label}", flush=True)
            start = time.perf_counter()
            with PeakMemory() as mem:
                diffquant.quantize(pipe, cfg, calibration=calibration)
            seconds = time.perf_counter() - start
            report = diffquant.quant_record(diffquant.get_denoiser(pipe)).report
            reports[cfg.label] = report.get("qdiffusion", {})
            print(f"[{name}] {cfg.label}: {seconds:.1f} s, generating {len(items)} images", flush=True)
            entry = ev.add(cfg.label, pipe, spec=f"diffquant {cfg.label}",
                           extra={"calibration_s": seconds, "peak_memory_mib": mem.mib})
            print(f"[{name}] {cfg.label}: {json.dumps(entry['summary'])}", flush=True)
            del pipe
    results = ev.results()
    for m in results["models"]:
        m.pop("per_image", None)  # the JSON keeps summaries; per-image scores are in the cache folder's report
    results["qdiffusion_reports"] = reports
    results["model_source"] = folder or f"zoo:{name}"
    results["claims"] = check_claims(results)
    return results


def check_claims(results: dict) -> list[dict]:
    """The issue's expectations, evaluated on the numbers (no claim is assumed to hold)."""
    rows = {m["label"]: m["summary"] for m in results["models"]}
    fp = results["reference"]["summary"]
    claims = []
    for label in rows:
        if not label.startswith("qdiffusion-"):
            continue
        bits = label.removeprefix("qdiffusion-")
        rtn = rows.get(f"rtn-{bits}")
        q = rows[label]
        if bits == "w4a8" and rtn is not None:
            detail = {}
            for metric, sign in FIDELITY:
                if q.get(metric) is None or rtn.get(metric) is None:
                    continue
                detail[metric] = {"qdiffusion": q[metric], "rtn": rtn[metric], "closer": sign * (q[metric] - rtn[metric]) > 0}
            claims.append({"claim": "W4A8: Q-Diffusion closer to FP than RTN on every fidelity metric",
                           "holds": bool(detail) and all(d["closer"] for d in detail.values()), "detail": detail})
        if bits == "w8a8" and fp.get("attr_all") is not None and q.get("attr_all") is not None:
            gap = 100 * (fp["attr_all"] - q["attr_all"])
            claims.append({"claim": "W8A8: Q-Diffusion attribute accuracy within 2 points of FP",
                           "holds": abs(gap) <= 2.0, "detail": {"fp": fp["attr_all"], "qdiffusion": q["attr_all"], "gap_points": gap}})
    return claims


def markdown(all_results: dict, command: str) -> str:
    from diffquant.evaluation.report import markdown_table

    lines = ["# Q-Diffusion vs RTN on the mini zoo", "", f"Command: `{command}`", "",
             f"Machine: {all_results['machine']}. Generated {all_results['created']}.", ""]
    for name, results in all_results["models"].items():
        s = results["settings"]
        lines += [f"## {name}", "", f"Model: `{results['model_source']}`.", "",
                  f"{s['n_images']} held-out prompts (seed = prompt index), {s['steps']} steps, guidance {s['guidance']}, "
                  f"{s['height']}x{s['width']}. Fréchet distances use {results['feature_space']}.", "",
                  markdown_table(results), "", "Claims:", ""]
        for c in results["claims"]:
            lines.append(f"- {'holds' if c['holds'] else '**does not hold**'}: {c['claim']} — `{json.dumps(c['detail'])}`")
        for label, rep in results["qdiffusion_reports"].items():
            if rep:
                lines.append(f"- {label}: {rep['calibration_samples']} calibration samples from steps {rep['calibration_steps']}, "
                             f"recording {rep['record_seconds']:.0f} s, activation ranges {rep['activation_range_seconds']:.0f} s, "
                             f"reconstruction {rep['reconstruction_seconds']:.0f} s over {len(rep['blocks'])} blocks")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffquant.evaluation.report import jsonable
    from diffquant.io import atomic_write_json, atomic_write_text

    qd_options = _options(args.option)
    all_results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
        "qdiffusion_options": qd_options,
        "models": {},
    }
    folders = dict(pair.split("=", 1) for pair in args.model_path)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        all_results["models"][name] = bench_model(name, args, qd_options, folders.get(name))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, jsonable(all_results))  # after each model, so a long run keeps what it finished
        atomic_write_text(args.markdown, markdown(all_results, f"python benchmarks/{all_results['command']}"))
    print(markdown(all_results, all_results["command"]))


if __name__ == "__main__":
    main()
