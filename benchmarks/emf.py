"""EMF beside the PTQ methods at W4A8, plus the serial-vs-parallel ablation (issue 7).

For each model: the FP pipeline renders the held-out prompts once (paired generation, same seeds and
noise); every installed method among rtn / qdiffusion / pcr and EMF (parallel) and EMF (serial, same
budget) quantizes a copy with the same calibration prompts and sampling settings; each is scored by
the evaluation harness (PSNR, SSIM, Fréchet distance to FP, attribute accuracy when the zoo evaluator
is installed) and its quantization wall time and peak memory (RSS above the start, sampled) recorded.
EMF's loss and weight-flip curves of both orders are plotted.

    .venv/bin/python benchmarks/emf.py                       # mini-sd, mini-sd3 (needs the zoo weights)
    .venv/bin/python benchmarks/emf.py --models tiny-sd --images 4 --calib-prompts 4 --iterations 20   # smoke run

Writes benchmarks/results/emf.json, docs/results-emf.md and docs/emf-ablation-<model>.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, checkpoint: str | None, vae: str | None):
    """A zoo model (installed, or from an interim training checkpoint through the PCR benchmark's loader),
    or a random-weight tiny pipeline ('tiny-sd', 'tiny-sd3') for smoke runs. Returns (pipe, settings, source)."""
    from diffquant import zoo
    from diffquant.models import tiny

    small = dict(num_inference_steps=8, guidance_scale=5.0, height=32, width=32)
    if name == "tiny-sd":
        return tiny.tiny_sd_pipeline(), small, "random tiny pipeline (smoke run only)"
    if name == "tiny-sd3":
        return tiny.tiny_sd3_pipeline(), small, "random tiny pipeline (smoke run only)"
    if checkpoint:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from pcr import load_checkpoint_pipeline

        pipe, step = load_checkpoint_pipeline(name, Path(checkpoint), Path(vae))
        return pipe, dict(zoo.DEFAULTS[name]), f"training checkpoint step {step} ({checkpoint})"
    return zoo.load_pipeline(name), dict(zoo.DEFAULTS[name]), "installed zoo weights"


def ablation_plot(model: str, curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for order, history in curves.items():
        axes[0].plot(history["loss"], label=order, alpha=0.85)
        axes[1].plot(history["flip_rate"], label=order, alpha=0.85)
    axes[0].set_title(f"{model}: training loss")
    axes[0].set_yscale("log")
    axes[1].set_title(f"{model}: weight oscillation (fraction of codes flipped per step)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve_stats(history: dict) -> dict:
    loss, flips = history["loss"], history["flip_rate"]
    tail = max(1, len(loss) // 4)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    var = mean([(x - mean(loss[-tail:])) ** 2 for x in loss[-tail:]])
    return {"loss_first_quarter": mean(loss[:tail]), "loss_last_quarter": mean(loss[-tail:]), "loss_last_quarter_std": var ** 0.5,
            "flip_rate_mean": mean(flips), "flip_rate_last_quarter": mean(flips[-tail:]),
            "frozen_weights": history.get("frozen_weights"), "train_seconds": history["seconds"]}


def run_model(name: str, args) -> dict:
    import diffquant
    from diffquant import CalibrationConfig, QuantConfig, zoo
    from diffquant.evaluation import EvalOptions, Evaluation, GenSettings, PromptItem
    from diffquant.evaluation.peers import PeakMemory
    from diffquant.methods import METHODS

    fp, defaults, source = load(name, args.checkpoints.get(name), args.vae)
    if args.steps:
        defaults["num_inference_steps"] = args.steps
    settings = GenSettings(steps=defaults["num_inference_steps"], guidance=defaults["guidance_scale"],
                           height=defaults["height"], width=defaults["width"])
    items = [PromptItem(p, 1000 + i) for i, p in enumerate(zoo.heldout_prompts(args.images))]
    options = EvalOptions(metrics=["psnr", "ssim", "fd_fp", "attributes", "timestep"], cache_dir=Path(args.cache), batch_size=8,
                          curve_items=min(4, args.images))
    ev = Evaluation(fp, name, items, settings, options, prompts_spec=f"zoo:heldout:{args.images}")
    calib_prompts = zoo.calibration_prompts(args.calib_prompts)
    calib = CalibrationConfig(num_prompts=len(calib_prompts), num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                              height=settings.height, width=settings.width, batch_size=8)
    emf_options = dict(iterations=args.iterations, batch_size=args.batch_size, steps_per_prompt=args.steps_per_prompt)
    runs = [(m, m, {}) for m in args.methods.split(",") if m in METHODS and m != "emf"]
    runs += [("emf", "emf (parallel)", dict(emf_options, order="parallel")), ("emf", "emf (serial)", dict(emf_options, order="serial"))]
    curves, reports = {}, {}
    # Both EMF orders share one workdir: the parallel run (first, cold) pays for the serial dataset and the
    # sensitivity measurement; the serial run reuses them, so compare the two by train_s.
    emf_work = tempfile.TemporaryDirectory()
    for method, label, opts in runs:
        cfg = QuantConfig(method=method, wbits=4, abits=8, calibration=calib, options=opts)
        pipe = copy.deepcopy(fp)
        print(f"[{name}] quantizing {label}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as work, PeakMemory() as mem:
            start = time.perf_counter()
            diffquant.quantize(pipe, cfg, calibration=calib_prompts, workdir=emf_work.name if method == "emf" else work)
            seconds = time.perf_counter() - start
        report = diffquant.quant_record(diffquant.get_denoiser(pipe)).report
        extra = {"quantize_s": seconds, "peak_memory_mib": mem.mib}
        if method == "emf":
            emf = report["emf"]
            extra.update(train_s=emf["train"]["seconds"], dataset_s=emf["dataset"]["seconds"],
                         weight_bits=emf["average_bits"]["weight_bits"], frozen_weights=emf["train"]["frozen_weights"])
            curves[opts["order"]] = {**emf["train"], "frozen_weights": emf["train"]["frozen_weights"]}
            reports[label] = {k: v for k, v in emf.items() if k != "train"}
        ev.add(label, pipe, spec=f"diffquant {cfg.label} {json.dumps(opts)}", extra=extra)
        del pipe
    emf_work.cleanup()
    plot = ROOT / "docs" / f"emf-ablation-{name}.png"
    ablation_plot(name, curves, plot)
    results = ev.results()
    results["ablation"] = {order: _curve_stats(h) for order, h in curves.items()}
    results["ablation_curves"] = {order: {"loss": h["loss"], "flip_rate": h["flip_rate"], "freeze_events": h["freeze_events"]}
                                  for order, h in curves.items()}
    results["emf_reports"] = reports
    results["plot"] = str(plot.relative_to(ROOT))
    results["source"] = source
    return results


def verdict(res: dict) -> list[str]:
    """The paper's two claims checked against this run's rows, with the numbers."""
    rows = {m["label"]: m["summary"] for m in res["models"] if "summary" in m and "psnr" in m["summary"]}
    emf = rows.get("emf (parallel)")
    if emf is None:
        return []
    out = []
    for label, s in rows.items():
        if label.startswith("emf"):
            continue
        better = [k for k, hi in (("psnr", True), ("ssim", True), ("fd_fp", False)) if k in s and k in emf
                  and ((emf[k] > s[k]) if hi else (emf[k] < s[k]))]
        nums = ", ".join(f"{k} {emf[k]:.4g} vs {s[k]:.4g}" for k in ("psnr", "ssim", "fd_fp") if k in s and k in emf)
        holds = "holds" if len(better) == 3 or (len(better) == 2 and "fd_fp" not in emf) else "does not hold" if not better else "holds partly"
        out.append(f"- Closer to FP than {label}: **{holds}** ({nums}).")
    qd = rows.get("qdiffusion")
    if qd is not None:
        faster = emf["quantize_s"] < qd["quantize_s"]
        out.append(f"- Shorter than Q-Diffusion's reconstruction-based calibration: **{'holds' if faster else 'does not hold'}** "
                   f"(EMF {emf['quantize_s']:.0f} s in all, of which training {emf['train_s']:.0f} s; Q-Diffusion {qd['quantize_s']:.0f} s).")
    ser = res["ablation"].get("serial")
    par = res["ablation"].get("parallel")
    if ser and par:
        steadier = par["loss_last_quarter_std"] < ser["loss_last_quarter_std"] and par["flip_rate_mean"] <= ser["flip_rate_mean"]
        out.append(f"- Parallel steadier than serial (loss spread and weight flips): **{'holds' if steadier else 'does not hold'}** "
                   f"(std of loss, last quarter {par['loss_last_quarter_std']:.3g} vs {ser['loss_last_quarter_std']:.3g}; "
                   f"mean flip rate {par['flip_rate_mean']:.3g} vs {ser['flip_rate_mean']:.3g}).")
    return out


def markdown(all_results: dict, args) -> str:
    lines = ["# EMF (seed 000) at W4A8 — measured", "",
             f"Command: `.venv/bin/python benchmarks/emf.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             "Same held-out prompts, seeds and initial noise for every row; Fréchet distance in the mini-zoo evaluator's",
             "feature space (not FID). `quantize_s` is the whole quantization wall time (EMF: dataset + sensitivity + training;",
             "Q-Diffusion: recording + reconstruction), `peak_memory_mib` the RSS peak above the start, on this shared 2-core CPU.",
             "The serial EMF run reuses the parallel run's dataset and sensitivity (same workdir), so compare the two by `train_s`.", ""]
    cols = ["psnr", "ssim", "fd_fp", "attr_all", "attr_mean", "quantize_s", "train_s", "peak_memory_mib"]
    for model, res in all_results.items():
        lines += [f"## {model}", "", f"Weights: {res['source']}. Images: {res['settings']['n_images']}, steps {res['settings']['steps']}, "
                  f"guidance {res['settings']['guidance']}.", "",
                  "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        rows = [res["reference"]] + res["models"]
        for entry in rows:
            s = entry.get("summary", {})
            cells = [f"{s[c]:.4g}" if isinstance(s.get(c), (int, float)) else "–" for c in cols]
            lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
        lines += ["", "Serial vs parallel (same data, iterations, batch size, learning rates):", "",
                  "| order | loss, first ¼ | loss, last ¼ | std of loss, last ¼ | mean flip rate | flip rate, last ¼ | frozen weights | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for order, st in res["ablation"].items():
            lines.append(f"| {order} | {st['loss_first_quarter']:.4g} | {st['loss_last_quarter']:.4g} | {st['loss_last_quarter_std']:.3g} | "
                         f"{st['flip_rate_mean']:.3g} | {st['flip_rate_last_quarter']:.3g} | {st['frozen_weights']} | {st['train_seconds']:.1f} |")
        lines += ["", f"![ablation]({Path(res['plot']).name})", "", "Claims:", "", *verdict(res), ""]
        if res.get("skipped"):
            lines += ["Skipped metrics: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mini-sd,mini-sd3")
    parser.add_argument("--methods", default="rtn,qdiffusion,pcr", help="PTQ methods beside EMF (those installed run)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--calib-prompts", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps-per-prompt", type=int, default=4)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=DIR",
                        help="a mini-zoo training checkpoint (EMA weights) instead of installed weights; repeatable")
    parser.add_argument("--vae", default=None, help="VAE folder for --checkpoint models")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "emf-bench-cache"))
    parser.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results" / "emf.json"))
    parser.add_argument("--out-md", default=str(ROOT / "docs" / "results-emf.md"))
    args = parser.parse_args()
    args.checkpoints = dict(spec.split("=", 1) for spec in args.checkpoint)
    torch.manual_seed(0)
    from diffquant.evaluation.report import atomic_write, write_json

    all_results = {name: run_model(name, args) for name in args.models.split(",")}
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out_json, {"command": " ".join(sys.argv), "results": all_results})
    atomic_write(args.out_md, markdown(all_results, args))
    print(Path(args.out_md).read_text())


if __name__ == "__main__":
    main()
