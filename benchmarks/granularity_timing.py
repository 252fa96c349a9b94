"""Static vs dynamic per-token W8A8 on OpenVINO, timed in alternation: issue 22's step-time target on a shared machine.

    .venv/bin/python benchmarks/granularity_timing.py --model sd15 --rounds 6 --threads 1

``runtime.py`` times its variants one after another, so on a shared machine a ratio between two of them mixes the
variants with whatever else ran meanwhile (three SD 1.5 runs of the same per-token-Linear variant gave 0.98x, 1.12x
and 1.33x static). Here every variant is quantized (RTN, the same two recorded calls as ``runtime.py``) and its int
graph traced to disk, one at a time (three SD 1.5 traces beside compiled graphs exceed 24 GB); all are then compiled,
and each round times one denoiser call of every variant, in an order that rotates from round to round, so load
changes hit all of them alike. Reported: each variant's median step time, and the
median (and range) over rounds of its ratio to the static graph **of the same round**. Variants (``runtime.py``'s
tags): ``w8a8`` static per-tensor; ``w8a8_tok`` dynamic per-token everywhere; ``w8a8_tokfc`` per-token on Linear
inputs, static per-tensor on convolutions; ``w8a8_toksm`` the same with the convolutions' inputs smoothed per channel
(static); ``w4a8``, ``w8a8_sym`` (symmetric activations), ``w8a8_qk`` / ``w8a8_symqk`` (the attention's q and k
quantized too, symmetric, its fused op kept) and ``nncf_int8`` (NNCF's INT8 of the float UNet on the same
calls, ``runtime_engines.nncf_int8``) for issue 14's engine targets:

    .venv/bin/python benchmarks/granularity_timing.py --model sd15 --tags w8a8,nncf_int8,w4a8 --rounds 8 --threads 2 \
        --json benchmarks/results/openvino-vs-nncf-timing-sd15.json

Int graph, bf16 hint (what ``runtime.py``'s ``openvino_*`` rows compile). ``--op-profile`` compiles with OpenVINO's
``PERF_COUNT`` and, after the rounds, adds each variant's milliseconds per (op type, kernel) over one call: where a
gap between two graphs comes from.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffquant
from diffquant.io import atomic_write_json
from diffquant.runtime.openvino import OVDenoiser, graph_writer, ir_bytes, pipeline_inputs
from diffquant.runtime.ovgraph import quantized_models
from diffquant.store import return_freed_memory
from runtime import ROOT, build, quantize  # sibling scripts (benchmarks/ is not a package)
from runtime_engines import kernel_precisions, nncf_int8

TAGS = ("w8a8", "w8a8_tok", "w8a8_tokfc", "w8a8_toksm", "w4a8", "w8a8_sym", "w8a8_qk", "w8a8_symqk", "nncf_int8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", choices=("sd15", "mini-sd"))
    p.add_argument("--tags", default=",".join(TAGS), help=f"comma-separated, from {', '.join(TAGS)}; the first is the baseline")
    p.add_argument("--rounds", type=int, default=6, help="timed calls per variant, one per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ir-dir", default=None, help="where the traced graphs wait to be compiled (default: the temp dir)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "granularity-timing-sd15.json")
    p.add_argument("--op-profile", action="store_true", help="compile with OpenVINO's PERF_COUNT and, after the rounds, "
                   "add each variant's time per (op type, kernel) over one call")
    args = p.parse_args()
    tags = [t for t in args.tags.split(",") if t]
    if not set(tags) <= set(TAGS):
        raise SystemExit(f"--tags: unknown {sorted(set(tags) - set(TAGS))}; choose from {', '.join(TAGS)}")
    torch.set_num_threads(args.threads)

    unet, inputs, calib, label = build(args.model)
    out = {"model": label, "threads": args.threads, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
           "graph": "int, bf16 hint", "variants": {}, "order": [], "load_avg_1m": []}
    with tempfile.TemporaryDirectory(dir=args.ir_dir) as tmp:
        # Trace every variant to disk first, then compile all from their files: three SD 1.5 traces side by side with
        # the compiled graphs do not fit in 24 GB (the first try was killed at the third).
        saved = {tag: save_graph(unet, calib, tag, Path(tmp) / tag, out) for tag in tags}
        del unet
        gc.collect()
        return_freed_memory()
        calls, denoisers = {}, {}
        for tag in tags:
            start = time.perf_counter()
            denoiser = OVDenoiser({"int": saved[tag].pop("path")}, **saved[tag], graph="int", precision="bf16", threads=args.threads,
                                  properties={"PERF_COUNT": True} if args.op_profile else None)
            denoisers[tag] = denoiser
            calls[tag] = lambda d=denoiser: d(**inputs)[0]
            calls[tag]()  # warm-up: first inference allocates and packs
            out["variants"][tag].update(compile_s=time.perf_counter() - start, kernels=kernel_precisions(denoiser))
            print(f"{tag}: compiled in {out['variants'][tag]['compile_s']:.0f} s", flush=True)
    with torch.no_grad():
        for r in range(args.rounds):
            order = tags[r % len(tags):] + tags[:r % len(tags)]
            out["order"].append(order)
            for tag in order:
                start = time.perf_counter()
                calls[tag]()
                out["variants"][tag]["times_s"].append(time.perf_counter() - start)
            out["load_avg_1m"].append(os.getloadavg()[0])
            line = ", ".join(f"{t} {out['variants'][t]['times_s'][-1]:.2f} s" for t in tags)
            print(f"round {r + 1}/{args.rounds} (load {out['load_avg_1m'][-1]:.1f}): {line}", flush=True)
            summarize(out, tags)
            atomic_write_json(args.json, out)
    print_table(out, tags)
    if args.op_profile:
        op_profile(out, denoisers, inputs, tags)
        atomic_write_json(args.json, out)


def op_profile(out: dict, denoisers: dict, inputs: dict, tags: list[str], top: int = 12) -> None:
    """Each variant's milliseconds per (op type, kernel) over one call, from OpenVINO's own counters; prints the ops
    that take the most time in any variant."""
    for tag in tags:
        denoiser = denoisers[tag]
        request = denoiser.compiled["int"].create_infer_request()
        request.infer(denoiser.graph_feeds("int", denoiser.feeds(**inputs)))
        times: dict[str, float] = {}
        for info in request.profiling_info:
            key = f"{info.node_type} [{info.exec_type}]"
            times[key] = times.get(key, 0.0) + info.real_time.total_seconds() * 1e3
        out["variants"][tag]["op_ms"] = dict(sorted(times.items(), key=lambda kv: -kv[1]))
    keys = sorted({k for t in tags for k in list(out["variants"][t]["op_ms"])[:top]},
                  key=lambda k: -max(out["variants"][t]["op_ms"].get(k, 0.0) for t in tags))
    print("\n| op [kernel] | " + " | ".join(f"{t} ms" for t in tags) + " |")
    print("|---|" + "---|" * len(tags))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{out['variants'][t]['op_ms'].get(key, 0.0):.0f}" for t in tags) + " |")
    print("| total | " + " | ".join(f"{sum(out['variants'][t]['op_ms'].values()):.0f}" for t in tags) + " |")


def save_graph(unet, calib, tag: str, folder: Path, out: dict) -> dict:
    """Quantize ``unet`` as ``tag`` (diffquant RTN, or NNCF's INT8 for ``nncf_int8``: the ``openvino_nncf_int8`` row's
    recipe), write its int graph into ``folder`` (diffquant: ``OVDenoiser.from_denoiser``'s trace) and free the rest;
    returns ``OVDenoiser``'s arguments for the saved graph."""
    start = time.perf_counter()
    if tag == "nncf_int8":
        kwargs = {"path": graph_writer(folder)("int", nncf_int8(unet, calib)), "config": dict(unet.config),
                  "class_name": type(unet).__name__}
    else:
        model = quantize(unet, calib, tag)
        models, plan = quantized_models(model, pipeline_inputs(model), graphs=("int",), sink=graph_writer(folder))
        if plan.float_groups:
            raise SystemExit(f"{tag}: timestep groups {plan.float_groups} need the float graph; this benchmark times the int graph")
        record = diffquant.quant_record(model)
        kwargs = {"path": models["int"], "config": dict(model.config), "class_name": type(model).__name__,
                  "groups": record.groups, "report": record.report}
        del model, models
    out["variants"][tag] = {"trace_s": time.perf_counter() - start, "ir_mb": ir_bytes(kwargs["path"]) / 2**20, "times_s": []}
    gc.collect()
    return_freed_memory()
    print(f"{tag}: written in {out['variants'][tag]['trace_s']:.0f} s", flush=True)
    return kwargs


def summarize(out: dict, tags: list[str]) -> None:
    """Median step time per variant and its per-round ratio to the first tag (the same round's static call)."""
    base = out["variants"][tags[0]]["times_s"]
    for tag in tags:
        row = out["variants"][tag]
        ratios = [t / b for t, b in zip(row["times_s"], base)]
        row.update(median_s=statistics.median(row["times_s"]), ratio_median=statistics.median(ratios),
                   ratio_min=min(ratios), ratio_max=max(ratios))


def print_table(out: dict, tags: list[str]) -> None:
    print(f"\n{out['model']}, {out['threads']} thread(s), {out['rounds']} alternating rounds, {out['graph']}")
    print(f"| variant | median step (s) | ratio to {tags[0]}, same round: median (range) | IR MiB |")
    print("|---|---|---|---|")
    for tag in tags:
        row = out["variants"][tag]
        print(f"| {tag} | {row['median_s']:.3f} | {row['ratio_median']:.2f}x ({row['ratio_min']:.2f}–{row['ratio_max']:.2f}) "
              f"| {row['ir_mb']:.0f} |")


if __name__ == "__main__":
    main()
