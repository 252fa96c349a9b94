"""PCR's evaluation protocol (seed 002) beside RTN and Q-Diffusion, through the shared evaluation harness.

For each model and bit width, every method quantizes a copy of the FP pipeline on the first
``--calib-prompts`` calibration prompts; each quantized pipeline is then scored against FP on two
prompt sets with the same seeds and initial noise:

- ``calib``: the calibration prompts themselves (the calibration prompt distribution), with the
  evaluation seeds (not the calibration noise);
- ``heldout``: the mini zoo's held-out prompts, compositions neither training nor calibration saw
  (prompt generalization).

"FID to FP" is the harness's ``fd_fp`` (Fréchet distance in the mini-zoo evaluator's feature space
when no Inception weights are given: not comparable to published FIDs). Writes
``benchmarks/results/pcr.json`` and ``docs/results-pcr.md`` (table + per-step sensitivity plots).

    .venv/bin/python benchmarks/pcr.py                         # mini-sd and mini-sd3, w8a8 and w4a8
    .venv/bin/python benchmarks/pcr.py --models tiny-sd --bits w8a8 --calib-prompts 2 --eval-prompts 2 --steps 4   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

import diffquant
from diffquant import CalibrationConfig, QuantConfig
from diffquant.calibration.sensitivity import sensitivity_figure
from diffquant.evaluation import EvalOptions, Evaluation, GenSettings, PromptItem
from diffquant.evaluation.bench import parse_bits
from diffquant.evaluation.peers import PeakMemory
from diffquant.io import atomic_write_json, atomic_write_text
from diffquant.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
TINY = {"tiny-sd": "tiny_sd_pipeline", "tiny-sd3": "tiny_sd3_pipeline"}
COLUMNS = [  # (row key, header, format)
    ("act_bits", "avg act bits", "{:.2f}"),
    ("fd_fp_calib", "FD to FP, calib prompts ↓", "{:.3f}"),
    ("fd_fp_heldout", "FD to FP, held-out prompts ↓", "{:.3f}"),
    ("psnr_calib", "PSNR calib (dB) ↑", "{:.2f}"),
    ("psnr_heldout", "PSNR held-out (dB) ↑", "{:.2f}"),
    ("attr_heldout", "attributes held-out ↑", "{:.3f}"),
    ("calibration_s", "calibration (s)", "{:.0f}"),
]


def load_checkpoint_pipeline(name: str, folder: Path, vae_dir: Path):
    """A mini-zoo model rebuilt from an interim training checkpoint (its EMA weights), for runs made before
    the final weights are installed; the zoo's own builders give the exact architecture and scheduler."""
    import tempfile

    from diffusers import AutoencoderKL

    from diffquant.zoo import train

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    if name == "mini-sd3":
        vae.register_to_config(shift_factor=0.0)
    tokenizer = train.build_tokenizer(Path(tempfile.mkdtemp()))
    pipe = train.build_sd_pipeline(vae, tokenizer) if name == "mini-sd" else train.build_sd3_pipeline(vae, tokenizer)
    modules = {k: getattr(pipe, k) for k in ("unet", "transformer", "text_encoder", "text_encoder_2") if isinstance(getattr(pipe, k, None), torch.nn.Module)}
    ema = train.EMA(modules)
    step = train.load_checkpoint(folder, modules, None, ema)
    if step == 0:
        raise ValueError(f"no training checkpoint in {folder}; pass a folder holding state.json and ema.safetensors")
    ema.copy_to(modules)
    for module in modules.values():
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, step


def load_fp(name: str, checkpoint: Path | None = None, vae_dir: Path | None = None):
    """A float pipeline and its sampling settings: a mini-zoo model (installed, or from a training checkpoint),
    or a tiny random one for smoke runs."""
    if checkpoint is not None:
        from diffquant import zoo

        pipe, step = load_checkpoint_pipeline(name, checkpoint, vae_dir)
        d = zoo.DEFAULTS[name]
        return pipe, GenSettings(d["num_inference_steps"], d["guidance_scale"], d["height"], d["width"]), f"training checkpoint step {step} ({checkpoint})"
    if name in TINY:
        from diffquant.models import tiny

        pipe = getattr(tiny, TINY[name])()
        pipe.set_progress_bar_config(disable=True)
        return pipe, GenSettings(steps=25, guidance=5.0, height=32, width=32), "random tiny pipeline (smoke run only)"
    from diffquant import zoo

    d = zoo.DEFAULTS[name]
    return zoo.load_pipeline(name), GenSettings(d["num_inference_steps"], d["guidance_scale"], d["height"], d["width"]), "installed zoo weights"


# Ablation rows, to say which part of PCR does the work: name -> (method, QuantConfig overrides, options).
# "rtn-per-step": one activation group per sampling step (uniform groups, as many as steps), calibrated on
# FP trajectories, i.e. PCR without progressive calibration or relaxing; "pcr-no-relax": PCR without relaxing.
ABLATIONS: dict[str, tuple[str, dict, dict]] = {
    "rtn-per-step": ("rtn", {"timestep_groups": None}, {}),
    "pcr-no-relax": ("pcr", {}, {"relax_fraction": 0.0, "sensitivity_prompts": 0}),
}


def quantize(fp_pipe, name: str, wbits: int, abits: int, prompts: list[str], settings: GenSettings, options: dict):
    """Quantize a copy of ``fp_pipe`` with a method or an ablation (``ABLATIONS``); returns pipe, config, seconds, MiB."""
    method, overrides, ablation_options = ABLATIONS.get(name, (name, {}, {}))
    if "timestep_groups" in overrides:
        overrides = {**overrides, "timestep_groups": settings.steps}
    cfg = QuantConfig(
        method=method, wbits=wbits, abits=abits, options={**options, **ablation_options}, **overrides,
        calibration=CalibrationConfig(num_prompts=len(prompts), num_inference_steps=settings.steps,
                                      guidance_scale=settings.guidance, height=settings.height, width=settings.width),
    )
    pipe = copy.deepcopy(fp_pipe)
    start = time.perf_counter()
    with PeakMemory() as mem:
        diffquant.quantize(pipe, cfg, calibration=prompts)
    return pipe, cfg, time.perf_counter() - start, mem.mib


def fmt(key: str, value) -> str:
    if value is None:
        return "—"
    return next(f for k, _, f in COLUMNS if k == key).format(value)


def markdown(results: dict, plots: dict[str, str]) -> str:
    lines = [
        "# PCR vs RTN vs Q-Diffusion (seed 002's protocol)", "",
        f"Command: `{results['command']}`", "",
        f"Feature space of the Fréchet distances: {results['feature_space']}", "",
        f"{results['settings_note']}", "",
        "Models: " + "; ".join(f"{k}: {v}" for k, v in results["model_sources"].items()), "",
        "Method options beyond defaults: " + json.dumps({k: v for k, v in results["method_options"].items() if v}), "",
        "| model | method | bits | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for row in results["rows"]:
        if row.get("unavailable"):
            lines.append(f"| {row['model']} | {row['method']} | {row['bits']} | unavailable: {row['unavailable']} |" + " |" * (len(COLUMNS) - 1))
            continue
        lines.append(f"| {row['model']} | {row['method']} | {row['bits']} | " + " | ".join(fmt(k, row.get(k)) for k, _, _ in COLUMNS) + " |")
    lines += ["", "## Does PCR beat Q-Diffusion in FD to FP at the same bits?", ""]
    lines += results["verdict"] or ["No pair of PCR and Q-Diffusion rows was measured (see unavailable rows)."]
    lines += ["", "## PCR per-step sensitivity", "",
              "Error when only one step is quantized (final image and that step's output, rel. MSE vs FP); "
              "shaded steps were relaxed to the higher activation width.", ""]
    for key, path in plots.items():
        lines.append(f"![{key}]({path})")
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict]) -> list[str]:
    """One line per (model, bits): PCR's FD to FP against Q-Diffusion's (and RTN's) on both prompt sets."""
    out = []
    by_key = {(r["model"], r["bits"], r["method"]): r for r in rows if not r.get("unavailable")}
    for (model, bits, method), pcr in by_key.items():
        if method != "pcr":
            continue
        for other in ("qdiffusion", "rtn"):
            ref = by_key.get((model, bits, other))
            if ref is None:
                continue
            parts = []
            for split in ("calib", "heldout"):
                a, b = pcr.get(f"fd_fp_{split}"), ref.get(f"fd_fp_{split}")
                if a is None or b is None:
                    continue
                parts.append(f"{split}: PCR {a:.3f} vs {other} {b:.3f} ({'PCR better' if a < b else 'PCR not better'})")
            if parts:
                out.append(f"- {model} {bits} (PCR at {pcr['act_bits']:.2f} avg act bits): " + "; ".join(parts))
    return out


def write_results(args, rows: list[dict], sources: dict, method_options: dict, feature_space: str, sensitivities: dict,
                  plots: dict[str, str]) -> str:
    """Write the JSON and markdown (after every row, so a long run that is stopped keeps what it measured)."""
    results = {
        "command": " ".join(["python", "benchmarks/pcr.py", *sys.argv[1:]]),
        "feature_space": feature_space,
        "model_sources": sources,
        "method_options": method_options,
        "settings_note": (f"{args.calib_prompts} calibration prompts (zoo.calibration_prompts); evaluation: those prompts and "
                          f"{args.eval_prompts} held-out prompts (zoo.heldout_prompts), seeds {args.seeds}; sampling steps "
                          f"{args.steps or 'model default'}; machine: 2 shared CPU cores, so times are loaded wall times."),
        "rows": rows,
        "pcr": sensitivities,
        "verdict": verdict(rows),
        "plots": plots,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, results)
    atomic_write_text(args.markdown, markdown(results, plots))
    return markdown(results, plots)


def merge(parts: list[Path], json_path: Path, markdown_path: Path) -> str:
    """One results file (and page) from several runs' files: rows, sensitivities and plots side by side."""
    loaded = [json.loads(p.read_text()) for p in parts]
    results = dict(loaded[0])
    results["command"] = " && ".join(r["command"] for r in loaded)
    results["model_sources"] = {k: v for r in loaded for k, v in r["model_sources"].items()}
    results["rows"] = [row for r in loaded for row in r["rows"]]
    results["pcr"] = {k: v for r in loaded for k, v in r["pcr"].items()}
    results["plots"] = {k: v for r in loaded for k, v in r.get("plots", {}).items()}
    results["verdict"] = verdict(results["rows"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, results)
    atomic_write_text(markdown_path, markdown(results, results["plots"]))
    return markdown(results, results["plots"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mini-sd,mini-sd3")
    parser.add_argument("--bits", default="w8a8,w4a8")
    parser.add_argument("--methods", default="rtn,qdiffusion,pcr",
                        help=f"methods and/or ablations ({', '.join(ABLATIONS)}), comma-separated")
    parser.add_argument("--calib-prompts", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--seeds", default="0,1", help="evaluation seeds, crossed with every prompt")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--pcr-options", default="{}", help='JSON of PCR options, e.g. {"sensitivity_prompts": 2}')
    parser.add_argument("--qdiffusion-options", default="{}", help='JSON of Q-Diffusion options, e.g. {"iterations": 50}')
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=DIR",
                        help="use a mini-zoo training checkpoint (EMA weights) instead of installed weights; repeatable")
    parser.add_argument("--vae", type=Path, default=None, help="VAE folder for --checkpoint models")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/pcr.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs/results-pcr.md")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs/cache")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="only combine result files of earlier runs (e.g. one per model, run in parallel) into --json/--markdown")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, loaded 2-core machine 2 threads ran ~20x slower here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge:
        print(merge(args.merge, args.json, args.markdown))
        return
    from diffquant import zoo

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    method_options = {"pcr": json.loads(args.pcr_options), "qdiffusion": json.loads(args.qdiffusion_options)}
    checkpoints = dict(spec.split("=", 1) for spec in args.checkpoint)
    sources: dict[str, str] = {}
    calib_prompts = zoo.calibration_prompts(args.calib_prompts)
    sets = {
        "calib": [PromptItem(p, s) for p in calib_prompts for s in seeds],
        "heldout": [PromptItem(p, s) for p in zoo.heldout_prompts(args.eval_prompts) for s in seeds],
    }
    options = EvalOptions(metrics=["psnr", "ssim", "fd_fp", "attributes"], cache_dir=args.cache_dir)
    rows: list[dict] = []
    sensitivities: dict[str, dict] = {}
    plots: dict[str, str] = {}
    feature_space = ""
    for model in args.models.split(","):
        checkpoint = Path(checkpoints[model]) if model in checkpoints else None
        fp_pipe, settings, sources[model] = load_fp(model, checkpoint, args.vae)
        if args.steps:
            settings = GenSettings(args.steps, settings.guidance, settings.height, settings.width)
        evals = {split: Evaluation(fp_pipe, model, items, settings, options, prompts_spec=f"{split} ({len(items)} images)")
                 for split, items in sets.items()}
        feature_space = evals["calib"].feature_space
        for wbits, abits in parse_bits(args.bits):
            for method in args.methods.split(","):
                row = {"model": model, "method": method, "bits": f"w{wbits}a{abits}"}
                rows.append(row)
                if ABLATIONS.get(method, (method,))[0] not in METHODS:
                    row["unavailable"] = f"method {method!r} is not installed in this checkout"
                    continue
                pipe, cfg, seconds, mib = quantize(fp_pipe, method, wbits, abits, calib_prompts, settings,
                                                   method_options.get(ABLATIONS.get(method, (method,))[0], {}))
                report = diffquant.quant_record(diffquant.get_denoiser(pipe)).report
                row.update(calibration_s=seconds, peak_memory_mib=mib, act_bits=diffquant.average_bits(diffquant.get_denoiser(pipe))["activation_bits"])
                for split, ev in evals.items():
                    summary = ev.add(f"{method}-{row['bits']} ({split})", pipe, spec=f"diffquant {cfg.label}")["summary"]
                    row[f"fd_fp_{split}"] = summary.get("fd_fp")
                    row[f"psnr_{split}"] = summary.get("psnr")
                    row[f"attr_{split}"] = summary.get("attr_all")
                if method == "pcr":
                    key = f"{model}-{row['bits']}"
                    pcr = report["pcr"]
                    sensitivities[key] = {k: pcr[k] for k in ("sensitivity", "relaxed_steps", "relax_bits", "step_activation_bits", "calibration_timesteps")}
                    if pcr["sensitivity"]:
                        png = args.markdown.parent / "img" / f"pcr-sensitivity-{key}.png"
                        png.parent.mkdir(parents=True, exist_ok=True)
                        fig = sensitivity_figure(pcr["sensitivity"], pcr["relaxed_steps"], title=f"PCR per-step sensitivity: {key}")
                        fig.savefig(png, dpi=90, bbox_inches="tight")
                        plots[key] = str(png.relative_to(args.markdown.parent))
                print({k: v for k, v in row.items()}, flush=True)
                write_results(args, rows, sources, method_options, feature_space, sensitivities, plots)
                del pipe
    print(write_results(args, rows, sources, method_options, feature_space, sensitivities, plots))


if __name__ == "__main__":
    main()
