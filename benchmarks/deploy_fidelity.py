"""Fidelity of the deployed form: diffquant's models on OpenVINO vs their fake-quant images and vs FP, NNCF INT8 beside them.

    .venv/bin/python benchmarks/deploy_fidelity.py --models mini-sd,mini-sd3 --methods rtn,qdiffusion,pcr,emf \
        --bits w8a8,w4a8 --prompts zoo:heldout:64

For each model this is ``diffquant bench`` (evaluation/bench.py, the paired harness) with one more row
per method and bit width: the quantized pipeline's denoiser traced into OpenVINO with diffquant's own
scales (``OVDenoiser.from_denoiser``, f32 precision hint so only the integer arithmetic differs), scored
against FP like every row and against the fake-quant images of the same model (``PSNR to fake quant``).
The ``nncf-int8`` peer (NNCF's own INT8 of the float denoiser on the same calibration prompts, same
engine and hint) answers: does diffquant's calibration beat OpenVINO's own? Per model the harness writes
results.json, results.md and report.html under ``--out``; the summary goes to ``--markdown``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from diffquant.evaluation.bench import parse_bits, run_bench
from diffquant.evaluation.harness import EvalOptions
from diffquant.evaluation.loading import load_model, resolve_settings
from diffquant.evaluation.peers import parse_peers
from diffquant.evaluation.prompts import load_prompts
from diffquant.evaluation.report import markdown_table
from diffquant.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def deploy_openvino(graph: str):
    """pipeline -> the same pipeline with its quantized denoiser on OpenVINO (diffquant's scales, ``graph``, f32 hint):
    the openvino engine's ``deploy`` with the graph chosen."""
    from diffquant.runtime.openvino import OVDenoiser
    from diffquant.serialization import with_denoiser

    def deploy(pipe):
        return with_denoiser(pipe, OVDenoiser.from_denoiser(pipe, graph=graph, precision="f32"))
    return deploy


def targets(results: dict) -> list[str]:
    """The issue's fidelity targets, each met or missed with the numbers."""
    rows = {m["label"]: m.get("summary", {}) for m in results["models"] if "unavailable" not in m}
    lines = []
    for label, s in rows.items():
        if label.endswith("-openvino") and "psnr_to_fake_quant" in s:
            v = float(s["psnr_to_fake_quant"])
            lines.append(f"{label}: {v:.2f} dB to its fake-quant images ({'meets' if v >= 40 else f'misses by {40 - v:.2f} dB'} the 40 dB target)")
    nncf = rows.get("nncf-int8")
    for method in ("qdiffusion", "emf"):
        ours = rows.get(f"{method}-w8a8-openvino")
        if ours is None or nncf is None:
            continue
        for key, better in (("psnr", max), ("fd_fp", min)):
            if ours.get(key) is None or nncf.get(key) is None:
                continue
            a, b = float(ours[key]), float(nncf[key])
            verdict = "closer to FP" if better(a, b) == a and a != b else "not closer to FP"
            lines.append(f"{method}-w8a8 on OpenVINO vs nncf-int8, {key}: {a:.3f} vs {b:.3f} ({verdict})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mini-sd,mini-sd3")
    parser.add_argument("--methods", default="rtn,qdiffusion,pcr,emf")
    parser.add_argument("--bits", default="w8a8,w4a8")
    parser.add_argument("--peers", default="nncf-int8")
    parser.add_argument("--act-granularity", default="per_tensor",
                        help="activation granularities, comma-separated (per_tensor, per_token, per_group): a row each")
    parser.add_argument("--prompts", default="zoo:heldout:64")
    parser.add_argument("--calib-prompts", default="zoo:calibration:16", help="the same prompts for every method and NNCF")
    parser.add_argument("--metrics", default="psnr,ssim,fd_fp")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--graph", default="auto", choices=("auto", "int", "float"),
                        help="OVDenoiser graph: int8 kernels, exact float, or auto (int where the CPU has VNNI/AMX)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "cache")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "deploy-fidelity")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results-deploy-fidelity.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = EvalOptions(metrics=args.metrics.split(","), cache_dir=args.cache_dir, batch_size=args.batch_size)
    calibration = [it.prompt for it in load_prompts(args.calib_prompts)]
    lines = ["# Fidelity of the deployed form (issue 14)", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             f"{os.cpu_count()} cores (shared machine), {args.threads} thread(s), OpenVINO graph `{args.graph}`. Each table is one `diffquant bench` run "
             "(same prompts, seeds and initial noise for every row); `-openvino` rows are the row above deployed on "
             "OpenVINO with diffquant's own scales (f32 precision hint); `nncf-int8` is NNCF's INT8 of the float "
             f"denoiser calibrated on the same {len(calibration)} prompts, on the same engine and hint.", ""]
    for name in args.models.split(","):
        start = time.perf_counter()
        fp_pipe = load_model(name)
        settings = resolve_settings(fp_pipe, name, None, None, None, None)
        items = load_prompts(args.prompts)
        ev = run_bench(fp_pipe, name, items, settings, options, [m for m in args.methods.split(",") if m and m != "none"],
                       parse_bits(args.bits), parse_peers(args.peers), calibration, prompts_spec=args.prompts,
                       deploy=deploy_openvino(args.graph), granularities=args.act_granularity.split(","))
        paths = ev.write(args.out / name, f"deployed fidelity: {name}")
        results = ev.results()
        lines += [f"## {name}", "", f"{len(items)} prompts from `{args.prompts}`, {settings.steps} steps, guidance "
                  f"{settings.guidance}, {settings.height}x{settings.width}; {time.perf_counter() - start:.0f} s; report: "
                  f"`{paths['html'].relative_to(ROOT) if paths['html'].is_relative_to(ROOT) else paths['html']}`.", "",
                  markdown_table(results), "Targets:", ""] + [f"- {t}" for t in targets(results)] + [""]
        atomic_write_text(args.markdown, "\n".join(lines))
        print("\n".join(lines[-12:]), flush=True)


if __name__ == "__main__":
    main()
