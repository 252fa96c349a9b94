"""One model's rows: the FP reference once, then every (method, bits) row quantized, scored and diagnosed.

An unconditional model (mini-ddim, tiny-ddim) is paired by seed instead of prompt (sample i from seed i), calibrates
from ``calibration_seeds`` (apart from the evaluation's) and adds the Fréchet distance to real scenes (``fd_ref``:
the zoo's, ``zoo:scenes``) beside FD to FP; their features are kept for the claims' paired intervals.

Quantizing goes through ``diffquant.evaluation.bench`` (the row's config and a quantized copy with its cost),
images and metrics through the paired harness (``Evaluation``: same prompts, seeds and initial noise, PNG cache
keyed by model fingerprint); finished rows come back from the store by key and are not run again.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from diffquant.recipes import RECIPES, recipe_fields

from . import claims, report
from .probes import activation_clipping, error_dynamics
from .store import Store, put_row, short



def _recipe(name: str, options: dict | None = None, **changes) -> tuple[str, dict, dict]:
    """A recipe's row: its method, its fields with ``changes``, its options with ``options`` on top."""
    fields = recipe_fields(name)
    method, recipe_options = fields.pop("method"), fields.pop("options")
    return method, {**fields, **changes}, {**recipe_options, **(options or {})}


# Row name -> (method, QuantConfig overrides, options added on top of the method's options). Recipe rows (names
# starting with a recipe's) take their recipe's options alone: the budget options below would replace its preset.
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "rtn": ("rtn", {}, {}),
    "qdiffusion": ("qdiffusion", {}, {}),
    "pcr": ("pcr", {}, {}),
    "emf": ("emf", {}, {}),
    "emf-serial": ("emf", {}, {"order": "serial"}),
    # EMF at equal bits: its time-dependent layers quantized like the others (their outputs still precalculated).
    "emf-quantized-time": ("emf", {}, {"time_layers": "quantized"}),
    # PCR ablations: one activation group per sampling step from FP trajectories (PCR without progressive
    # calibration or relaxing), and PCR without relaxing.
    "rtn-per-step": ("rtn", {"timestep_groups": "steps"}, {}),
    "pcr-no-relax": ("pcr", {}, {"relax_fraction": 0.0, "sensitivity_prompts": 0}),
    # PCR with robust per-step ranges (step_ranges="pooled_shrink", docs/pcr.md) beside the default, the paper's literal ones.
    "pcr-robust": ("pcr", {}, {"step_ranges": "pooled_shrink"}),
    # RTN with the time-dependent layers (time embedding, adaLN modulation / time_emb_proj) left float, as EMF's
    # time precalculation leaves them: separates that choice from EMF's training.
    "rtn-float-time": ("rtn", {"float_time_layers": True}, {}),
    # Q-Diffusion without LSQ activation step-size learning (calibrated min/max ranges kept): isolates LSQ.
    "qdiffusion-nolsq": ("qdiffusion", {}, {"learn_act_scales": False}),
    # The faithful recipe (diffquant.recipes) and its ablation, each ingredient removed once: min/max weight ranges,
    # static per-tensor activations, the default preset's 200 AdaRound iterations at batch 8.
    "faithful": _recipe("faithful"),
    "faithful-minmax": _recipe("faithful", weight_observer="minmax"),
    "faithful-static": _recipe("faithful", act_granularity="per_tensor"),
    "faithful-short": _recipe("faithful", options={"preset": "default"}),
    # 4-bit activations: the recipe with SVDQuant's low-rank float branch (rank 2: +0.36-0.39 weight bits on the mini
    # zoo's 64-128-channel layers, docs/lowrank.md)
    "faithful-lowrank2": _recipe("faithful", lowrank_rank=2),
}

# Method options for the mini models on one CPU thread, sized so one model's whole run (FP, 7 rows x 256
# images, all calibrations) takes about an hour on a free core; the library defaults are in each method's
# Options. Q-Diffusion: 5 of 25 steps x 8 prompts x cond/uncond = 80 samples (the default preset's every_k=5).
BUDGET_OPTIONS: dict[str, dict] = {
    "qdiffusion": {"iterations": 100, "act_iterations": 50},
    "pcr": {},
    "emf": {"iterations": 100},
}

TINY = {"tiny-sd": "tiny_sd_pipeline", "tiny-sd3": "tiny_sd3_pipeline", "tiny-ddim": "tiny_ddim_pipeline"}


def tune_allocator() -> None:
    """Keep freed heap memory for reuse (glibc): on this VM page faults made large elementwise ops several
    times slower. Applies to every row alike; PeakMemory still trims the heap before each measurement."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 256 << 20)  # M_TOP_PAD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum)


def load_fp(name: str, folder: str | None):
    """(pipeline, SamplingSettings, source) for a mini-zoo model, a diffusers folder, or a tiny random pipeline."""
    from diffquant.sampling import SamplingSettings

    if name in TINY:
        from diffquant.models import tiny, tiny_unconditional

        pipe = getattr(tiny_unconditional if name == "tiny-ddim" else tiny, TINY[name])()
        pipe.set_progress_bar_config(disable=True)
        settings = SamplingSettings(steps=8) if name == "tiny-ddim" else SamplingSettings(steps=8, guidance=5.0, height=32, width=32)
        return pipe, settings, "random tiny pipeline (smoke run only)"
    from diffquant import zoo
    from diffquant.evaluation.loading import load_model, resolve_settings

    pipe = load_model(folder) if folder else zoo.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe, resolve_settings(pipe, name, None, None, None, None), folder or "installed zoo weights"


def make_config(variant: str, wbits: int, abits: int, settings, calib_prompts: list[str], method_options: dict, batch_size: int,
                unconditional: bool = False, calib_draw: int = 0):
    """The row's QuantConfig: the variant's method and overrides, calibrating with the benchmark's sampling settings
    (an unconditional model: on ``calibration_seeds`` of draw ``calib_draw``, never on the evaluation's)."""
    from diffquant import CalibrationConfig, QuantConfig
    from diffquant.evaluation.prompts import calibration_seeds

    method, overrides, extra = VARIANTS[variant]
    overrides = {k: (settings.steps if v == "steps" else v) for k, v in overrides.items()}
    calib = CalibrationConfig.from_sampling(settings, num_prompts=len(calib_prompts), batch_size=batch_size,
                                            seeds=calibration_seeds(len(calib_prompts), calib_draw) if unconditional else None)
    budget = {} if variant.split("-")[0] in RECIPES else method_options.get(method, {})
    return QuantConfig(method=method, wbits=wbits, abits=abits, calibration=calib, options={**budget, **extra}, **overrides)


def row_key(fp_fingerprint: str, variant: str, cfg, settings, n_prompts: int, calib_eval: int, calib_prompts: list[str]) -> str:
    """Hash of everything that decides a row's numbers: a stored row with the same key is reused as finished."""
    payload = json.dumps({"fp": fp_fingerprint, "variant": variant, "config": cfg.to_dict(), "settings": {k: v for k, v in settings.to_dict().items() if k != "seed"},
                          "prompts": n_prompts, "calib_eval": calib_eval, "calib": calib_prompts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def method_details(variant: str, quant_report: dict) -> dict:
    """The parts of a method's report the page and the claims need (JSON-sized)."""
    method = VARIANTS[variant][0]
    out: dict = {}
    if method == "qdiffusion" and "qdiffusion" in quant_report:
        q = quant_report["qdiffusion"]
        out = {k: q[k] for k in ("calibration_samples", "calibration_steps", "record_seconds", "activation_range_seconds",
                                 "reconstruction_seconds")}
        out["options"] = {k: q["options"][k] for k in ("iterations", "act_iterations", "batch_size", "weight_lr", "act_lr")}
        out["blocks"] = [{k: b[k] for k in ("name", "rtn_loss", "weight_loss", "act_init_loss", "act_loss", "binary_fraction",
                                             "act_reverted", "seconds")} for b in q["blocks"]]
    elif method == "pcr" and "pcr" in quant_report:
        p = quant_report["pcr"]
        out = {k: p.get(k) for k in ("relaxed_steps", "relax_bits", "step_activation_bits", "average_step_activation_bits",
                                     "calibration_timesteps", "progressive_passes", "pcr_seconds", "sensitivity", "step_ranges")}
    elif method == "emf" and "emf" in quant_report:
        e = quant_report["emf"]
        train = e["train"]
        out = {"dataset": e["dataset"], "timestep_groups": e["timestep_groups"], "sensitive_layers": e["sensitive_layers"],
               "mixed_precision_layers": e["mixed_precision_layers"], "average_bits": e["average_bits"],
               "train": {k: train.get(k) for k in ("order", "iterations", "batch_size", "weight_training", "seconds",
                                                   "frozen_weights", "resumed_from_iteration", "freeze_events")},
               "curves": {"loss": train.get("loss", []), "flip_rate": train.get("flip_rate", [])}}
    return out


def quantize_row(fp_pipe, cfg, calib_prompts: list[str], workdir: Path, shared: bool = False):
    """A quantized copy of ``fp_pipe`` (resuming from ``workdir``'s checkpoints) and the row's cost fields."""
    from diffquant.evaluation.bench import quantize_copy

    resumed = not shared and workdir.exists() and any(workdir.iterdir())
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    pipe, seconds, mib = quantize_copy(fp_pipe, cfg, calib_prompts, workdir=workdir, progress=False)
    return pipe, {"quantize_s": seconds, "peak_memory_mib": mib, "load_before": load, "load_after": os.getloadavg()[0],
                  "resumed_from_workdir": resumed}


def cached_attr_all(ev, fingerprint: str, expected: float | None) -> list[int] | None:
    """Per-image attribute correctness of a model whose images are in the PNG cache (rows finished before it was
    stored); None when images are missing or the judged share differs from the stored ``expected``."""
    from diffquant.evaluation.paired import cache_paths, load_images

    paths = cache_paths(ev.options.cache_dir, fingerprint, ev.items, ev.settings)
    if ev.evaluator is None or expected is None or not all(p.is_file() for p in paths):
        return None
    correct = [int(ok) for ok in ev.evaluator.judge(load_images(paths), ev.prompts)[1]]
    return correct if abs(sum(correct) / len(correct) - expected) < 1e-9 else None


def score_row(evals: dict, label: str, pipe, spec: str, extra: dict, features_path: Path) -> dict:
    """Generate and score one quantized pipeline on every prompt set; returns the row's metric fields."""
    out: dict = {}
    for split, ev in evals.items():
        start = time.perf_counter()
        entry = ev.add(label if split == "heldout" else f"{label} ({split})", pipe, spec=spec, extra=extra if split == "heldout" else None)
        seconds = time.perf_counter() - start
        s = entry["summary"]
        if split == "heldout":
            out["summary"] = {k: v for k, v in s.items() if k not in extra}
            out["eval_s"] = seconds
            out["fingerprint"] = entry["fingerprint"]
            out["per_image"] = {"psnr": [round(p["psnr"], 4) for p in entry["per_image"]],
                                "ssim": [round(p["ssim"], 5) for p in entry["per_image"]]}
            if "attr_all_per_image" in entry:
                out["per_image"]["attr_all"] = [int(ok) for ok in entry["attr_all_per_image"]]
            if "timestep_error" in entry:
                out["timestep_error"] = short(entry["timestep_error"], 4)
            if "sensitivity" in entry:
                sens = entry["sensitivity"]
                out["layer_sensitivity"] = {"all_quantized": sens["all_quantized"], "none_quantized": sens["none_quantized"],
                                            "layers": short(dict(sorted(sens["layers"].items(), key=lambda kv: -kv[1])), 4)}
            if ev.features is not None:
                features_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(ev.features(ev.images[label]).cpu(), features_path)
        else:
            out[f"summary_{split}"] = {k: s.get(k) for k in ("psnr", "ssim", "fd_fp", "attr_all")}
        del ev.images[entry["label"]]  # keep memory flat; images stay cached on disk
    out["avg_wbits"], out["avg_abits"] = out["summary"].get("avg_wbits"), out["summary"].get("avg_abits")  # the harness's
    return out


def diagnose(row: dict, fp, pipe, items, settings) -> None:
    """Add the error-dynamics and activation-clipping diagnostics to ``row`` (on one batch of prompts)."""
    if "dynamics" not in row:
        row["dynamics"] = error_dynamics(fp, pipe, items, settings)
    row["activation_clipping"] = activation_clipping(pipe, items, settings)


def run_model(name: str, args, store: Store, method_options: dict) -> None:
    """Every row of one model: reused from the store when finished with the same settings, else quantized and scored."""
    import diffquant
    from diffquant import zoo
    from diffquant.evaluation import EvalOptions, Evaluation, PromptItem, model_fingerprint
    from diffquant.evaluation.bench import parse_bits
    from diffquant.evaluation.metrics import ZOO_SCENES
    from diffquant.sampling import is_unconditional, unconditional_prompts

    started = time.time()
    load_start = os.getloadavg()[0]
    fp, settings, source = load_fp(name, args.model_paths.get(name))
    if args.steps:
        settings = type(settings)(args.steps, settings.guidance, settings.height, settings.width)
    unconditional = is_unconditional(fp)
    if unconditional and args.calib_eval:
        raise SystemExit(f"{name} is unconditional: --calib-eval (prompt generalization) does not apply; drop it")
    prompts = unconditional_prompts(args.prompts) if unconditional else zoo.heldout_prompts(args.prompts)
    items = [PromptItem(p, i) for i, p in enumerate(prompts)]
    metrics = ["psnr", "ssim", "fd_fp", "fd_ref" if unconditional else "attributes"] + ([] if args.no_curves else ["timestep", "sensitivity"])
    options = EvalOptions(metrics=metrics, cache_dir=Path(args.cache_dir) / name, batch_size=args.batch_size,
                          curve_items=min(8, len(items)), sensitivity_items=2, sensitivity_steps=3,
                          reference_images=ZOO_SCENES if unconditional else None)
    n_calib, draw = args.calib_prompts, args.calib_draw  # draw K: the K-th disjoint calibration set (seeds or prompts)
    calib_prompts = unconditional_prompts(n_calib) if unconditional else zoo.calibration_prompts(n_calib * (draw + 1))[n_calib * draw:]
    print(f"[{name}] FP: {len(items)} images", flush=True)
    t0 = time.perf_counter()
    spec = f"{args.prompts} unconditional samples, seeds 0..{args.prompts - 1}" if unconditional else f"zoo:heldout:{args.prompts}"
    evals = {"heldout": Evaluation(fp, name, items, settings, options, prompts_spec=spec)}
    fp_s = time.perf_counter() - t0
    if args.calib_eval:
        calib_items = [PromptItem(p, i) for i, p in enumerate(zoo.calibration_prompts(args.calib_eval))]
        evals["calib"] = Evaluation(fp, name, calib_items, settings, options, prompts_spec=f"zoo:calibration:{args.calib_eval}")
    ev = evals["heldout"]
    fp_fingerprint = ev.reference["fingerprint"]
    work = Path(args.work_dir) / name
    features_dir = work / "features"
    if ev.features is not None:
        features_dir.mkdir(parents=True, exist_ok=True)
        torch.save(ev.fp_feats.cpu(), features_dir / "FP.pt")
        if ev.ref_feats is not None:
            torch.save(ev.ref_feats.cpu(), features_dir / "real.pt")  # FD to real scenes: its paired intervals

    bits_list = [f"w{w}a{a}" for w, a in parse_bits(args.bits)]
    emf_bits = bits_list if args.emf_bits == "all" else [f"w{w}a{a}" for w, a in parse_bits(args.emf_bits)]
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    if args.emf_ablation and "emf-serial" not in variants:
        variants.append("emf-serial")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    ref_summary = {**ev.reference["summary"], "generate_s": fp_s}
    if args.calib_eval:
        ref_summary["calib"] = dict(evals["calib"].reference["summary"])
    result = {
        "command": f".venv/bin/python benchmarks/methods.py {args.line}".strip(),
        "source": source, "settings": ev.settings_record, "feature_space": ev.feature_space,
        "calib_prompts": len(calib_prompts), "calib_draw": draw, "unconditional": unconditional, "method_options": method_options, "bits": bits_list,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "load_start": load_start,
        "reference": {"fingerprint": fp_fingerprint, "summary": ref_summary,
                      "generation": ev.reference["generation"],
                      "per_image": {"attr_all": [int(ok) for ok in ev.reference.get("attr_all_per_image", [])]}},
        "rows": [], "skipped": ev.skipped,
        "sessions": [],
    }
    session, previous = store.begin_model(name, result, args.fresh)
    order = list(VARIANTS)
    batch = items[: args.batch_size]

    emf_workdirs: dict[str, Path] = {}
    ran: list[str] = []  # labels quantized and scored in this session
    for bits in bits_list:
        wbits, abits = (int(x) for x in bits[1:].split("a"))
        for variant in variants:
            method = VARIANTS[variant][0]
            if (method == "emf" or variant == "rtn-float-time") and bits not in emf_bits:
                continue
            label = f"{variant}-{bits}"
            cfg = make_config(variant, wbits, abits, settings, calib_prompts, method_options, args.calib_batch_size, unconditional, draw)
            key = row_key(fp_fingerprint, variant, cfg, settings, args.prompts, args.calib_eval, calib_prompts)
            if key in previous and "summary" in previous[key] and variant not in args.redo:
                print(f"[{name}] {label}: finished in an earlier run, reused", flush=True)
                row = previous[key]
                put_row(result, row, order)
                if "attr_all" not in row.get("per_image", {}) and row.get("fingerprint"):
                    correct = cached_attr_all(ev, row["fingerprint"], row["summary"].get("attr_all"))
                    if correct is not None:
                        row["per_image"]["attr_all"] = correct
                if args.diagnose and not args.no_curves and ("dynamics" not in row or "activation_clipping" not in row):
                    # Quantize again (the methods are seeded) only for the error-dynamics diagnostics.
                    print(f"[{name}] {label}: quantizing again for the diagnostics", flush=True)
                    pipe, _ = quantize_row(fp, cfg, calib_prompts, work / key)
                    again = model_fingerprint(pipe)
                    row["requantized_identical"] = again == row["fingerprint"] if row.get("fingerprint") else \
                        (Path(args.cache_dir) / name / again).is_dir()
                    diagnose(row, fp, pipe, batch, settings)
                    del pipe
                    shutil.rmtree(work / key, ignore_errors=True)
                store.save()
                continue
            # The serial EMF ablation and EMF with quantized time layers share the parallel row's workdir: its dataset
            # (and, for the serial one, layer sensitivity) are reused (QAT checkpoints are keyed by the training
            # settings), so compare them by training time.
            shared = variant in ("emf-serial", "emf-quantized-time") and bits in emf_workdirs
            workdir = emf_workdirs[bits] if shared else work / key
            print(f"[{name}] {label}: quantizing", flush=True)
            pipe, cost = quantize_row(fp, cfg, calib_prompts, workdir, shared)
            cost["shared_emf_workdir"] = shared
            if variant == "emf":
                emf_workdirs[bits] = workdir
            quant_report = diffquant.quant_record(diffquant.get_denoiser(pipe)).report
            row = {"label": label, "variant": variant, "method": method, "bits": bits, "key": key, "config": cfg.to_dict(), **cost,
                   "details": method_details(variant, quant_report)}
            print(f"[{name}] {label}: quantized in {cost['quantize_s']:.0f} s; generating {len(items)} images", flush=True)
            row.update(score_row(evals, label, pipe, f"diffquant {cfg.label} {json.dumps(cfg.options, sort_keys=True)}",
                                 {k: cost[k] for k in ("quantize_s", "peak_memory_mib")}, features_dir / f"{key}.pt"))
            if not args.no_curves:
                diagnose(row, fp, pipe, batch, settings)
            del pipe
            print(f"[{name}] {label}: " + json.dumps(short(row["summary"], 4)) + f" (eval {row['eval_s']:.0f} s)", flush=True)
            put_row(result, row, order)
            ran.append(label)
            result["claims"] = claims.check_claims(result, features_dir, name)
            store.save()
            if variant != "emf":
                shutil.rmtree(workdir, ignore_errors=True)
    for path in emf_workdirs.values():
        shutil.rmtree(path, ignore_errors=True)
    result["claims"] = claims.check_claims(result, features_dir, name)
    result["figures"] = report.figures(name, result, store.md_path.parent / "img", store.md_path.parent)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC")
    result["wall_s"] = time.time() - started
    result["load_end"] = os.getloadavg()[0]
    session.update(finished=result["finished"], wall_s=result["wall_s"], load_end=result["load_end"], rows_run=ran)
    store.save()
    print(f"[{name}] done in {result['wall_s'] / 60:.1f} min", flush=True)
