"""RTN, Q-Diffusion, PCR and EMF on the same pairs: one table per model and the three papers' claims checked (issues 5-7).

For each model the FP pipeline renders ``--prompts`` held-out prompts (``zoo.heldout_prompts``, prompt i
with seed i, same initial noise for every row); then every (method, bits) row quantizes a copy of the FP
pipeline on the same calibration prompts and sampling settings and renders the same pairs. Metrics come
from the shared harness (``diffquant.evaluation``): PSNR/SSIM to the FP images, Fréchet distance to FP in
the mini-zoo evaluator's features, attribute accuracy, the per-timestep denoiser error along the FP
trajectory and the per-layer sensitivity. Each row also carries the quantization wall time and peak RSS
above its starting level. The verdict lines for each paper's claims are computed from the rows, with
paired 95 % intervals (per-image differences for PSNR/SSIM, a paired bootstrap over images for the
Fréchet distance) so "clearly closer" means the interval excludes zero.

    .venv/bin/python benchmarks/methods.py --models mini-sd3                  # the issues' setting, one model
    .venv/bin/python benchmarks/methods.py --models tiny-sd3 --prompts 8 --calib-prompts 2 \\
        --qdiffusion-options '{"iterations": 4, "act_iterations": 2}' --emf-options '{"iterations": 4}'   # smoke

Rows: rtn, qdiffusion, pcr at every ``--bits``; emf at ``--emf-bits`` (W4A8); ``--emf-ablation`` adds
``emf-serial`` (EMF with serial instead of parallel batches, same data and budget: seed 000's ablation)
and plots both training curves. ``--methods`` also takes the PCR ablations ``rtn-per-step`` and
``pcr-no-relax``; ``--calib-eval N`` additionally scores every row on N calibration prompts (PCR's
prompt-generalization protocol).

Persistence: ``benchmarks/results/methods.json`` and ``docs/results-methods.md`` are rewritten after every
row (other models already in the JSON are kept, and so are a model's rows this run does not reach: other
methods or bit widths, when the FP weights and settings match), so a killed run loses only the row in
progress; rerunning the same command reuses finished rows whose settings match (``--fresh`` to redo them,
``--redo VARIANTS`` for some), the FP and quantized
images cached under ``--cache-dir`` (keyed by model fingerprint), and Q-Diffusion's per-block / EMF's
checkpoints under ``--work-dir``. Text under the page's "## Analysis" heading is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS_HEADING = "## Analysis"

# Row name -> (method, QuantConfig overrides, options added on top of the method's options).
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "rtn": ("rtn", {}, {}),
    "qdiffusion": ("qdiffusion", {}, {}),
    "pcr": ("pcr", {}, {}),
    "emf": ("emf", {}, {}),
    "emf-serial": ("emf", {}, {"order": "serial"}),
    # PCR ablations: one activation group per sampling step from FP trajectories (PCR without progressive
    # calibration or relaxing), and PCR without relaxing.
    "rtn-per-step": ("rtn", {"timestep_groups": "steps"}, {}),
    "pcr-no-relax": ("pcr", {}, {"relax_fraction": 0.0, "sensitivity_prompts": 0}),
    # RTN with the time-dependent layers (time embedding, adaLN modulation / time_emb_proj) left float, as EMF's
    # time precalculation leaves them: separates that choice from EMF's training.
    "rtn-float-time": ("rtn", {"float_time_layers": True}, {}),
    # Q-Diffusion without LSQ activation step-size learning (calibrated min/max ranges kept): isolates LSQ.
    "qdiffusion-nolsq": ("qdiffusion", {}, {"learn_act_scales": False}),
}

# Method options for the mini models on one CPU thread, sized so one model's whole run (FP, 7 rows x 256
# images, all calibrations) takes about an hour on a free core; the library defaults are in each method's
# Options. Q-Diffusion: 5 of 25 steps x 8 prompts x cond/uncond = 80 samples (the default preset's every_k=5).
BUDGET_OPTIONS: dict[str, dict] = {
    "qdiffusion": {"iterations": 100, "act_iterations": 50},
    "pcr": {},
    "emf": {"iterations": 100},
}

TINY = {"tiny-sd": "tiny_sd_pipeline", "tiny-sd3": "tiny_sd3_pipeline"}
FIDELITY = (("psnr", 1), ("ssim", 1), ("fd_fp", -1))  # closeness to the FP images; +1: higher is better


# ----------------------------------------------------------------------------------------- setup
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
        from diffquant.models import tiny

        pipe = getattr(tiny, TINY[name])()
        pipe.set_progress_bar_config(disable=True)
        return pipe, SamplingSettings(steps=8, guidance=5.0, height=32, width=32), "random tiny pipeline (smoke run only)"
    from diffquant import zoo
    from diffquant.evaluation.loading import load_model, resolve_settings

    pipe = load_model(folder) if folder else zoo.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe, resolve_settings(pipe, name, None, None, None, None), folder or "installed zoo weights"


def parse_json(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{what} must be a JSON object, e.g. '{{\"iterations\": 100}}': {e}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{what} must be a JSON object")
    return value


def _short(value, digits: int = 5):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _short(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v, digits) for v in value]
    return value


# ----------------------------------------------------------------------------------------- one row
def make_config(variant: str, wbits: int, abits: int, settings, calib_prompts: list[str], method_options: dict, batch_size: int):
    from diffquant import CalibrationConfig, QuantConfig

    method, overrides, extra = VARIANTS[variant]
    overrides = {k: (settings.steps if v == "steps" else v) for k, v in overrides.items()}
    calib = CalibrationConfig.from_sampling(settings, num_prompts=len(calib_prompts), batch_size=batch_size)
    return QuantConfig(method=method, wbits=wbits, abits=abits, calibration=calib,
                       options={**method_options.get(method, {}), **extra}, **overrides)


def row_key(fp_fingerprint: str, variant: str, cfg, settings, n_prompts: int, calib_eval: int, calib_prompts: list[str]) -> str:
    payload = json.dumps({"fp": fp_fingerprint, "variant": variant, "config": cfg.to_dict(), "settings": {k: v for k, v in settings.to_dict().items() if k != "seed"},
                          "prompts": n_prompts, "calib_eval": calib_eval, "calib": calib_prompts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def method_details(variant: str, report: dict) -> dict:
    """The parts of a method's report the page and the claims need (JSON-sized)."""
    method = VARIANTS[variant][0]
    out: dict = {}
    if method == "qdiffusion" and "qdiffusion" in report:
        q = report["qdiffusion"]
        out = {k: q[k] for k in ("calibration_samples", "calibration_steps", "record_seconds", "activation_range_seconds",
                                 "reconstruction_seconds")}
        out["options"] = {k: q["options"][k] for k in ("iterations", "act_iterations", "batch_size", "weight_lr", "act_lr")}
        out["blocks"] = [{k: b[k] for k in ("name", "rtn_loss", "weight_loss", "act_init_loss", "act_loss", "binary_fraction",
                                             "act_reverted", "seconds")} for b in q["blocks"]]
    elif method == "pcr" and "pcr" in report:
        p = report["pcr"]
        out = {k: p.get(k) for k in ("relaxed_steps", "relax_bits", "step_activation_bits", "average_step_activation_bits",
                                     "calibration_timesteps", "progressive_passes", "pcr_seconds", "sensitivity")}
    elif method == "emf" and "emf" in report:
        e = report["emf"]
        train = e["train"]
        out = {"dataset": e["dataset"], "timestep_groups": e["timestep_groups"], "sensitive_layers": e["sensitive_layers"],
               "mixed_precision_layers": e["mixed_precision_layers"], "average_bits": e["average_bits"],
               "train": {k: train.get(k) for k in ("order", "iterations", "batch_size", "weight_training", "seconds",
                                                   "frozen_weights", "resumed_from_iteration", "freeze_events")},
               "curves": {"loss": train.get("loss", []), "flip_rate": train.get("flip_rate", [])}}
    return out


def quantize_row(fp_pipe, cfg, calib_prompts: list[str], workdir: Path, shared: bool = False):
    import diffquant
    from diffquant.evaluation.peers import PeakMemory

    pipe = copy.deepcopy(fp_pipe)
    resumed = not shared and workdir.exists() and any(workdir.iterdir())
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with PeakMemory() as mem:
        diffquant.quantize(pipe, cfg, calibration=calib_prompts, workdir=workdir, progress=False)
    seconds = time.perf_counter() - start
    return pipe, {"quantize_s": seconds, "peak_memory_mib": mem.mib, "load_before": load, "load_after": os.getloadavg()[0],
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
    import diffquant

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
                out["timestep_error"] = _short(entry["timestep_error"], 4)
            if "sensitivity" in entry:
                sens = entry["sensitivity"]
                out["layer_sensitivity"] = {"all_quantized": sens["all_quantized"], "none_quantized": sens["none_quantized"],
                                            "layers": _short(dict(sorted(sens["layers"].items(), key=lambda kv: -kv[1])), 4)}
            if ev.features is not None:
                features_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(ev.features(ev.images[label]).cpu(), features_path)
        else:
            out[f"summary_{split}"] = {k: s.get(k) for k in ("psnr", "ssim", "fd_fp", "attr_all")}
        del ev.images[entry["label"]]  # keep memory flat; images stay cached on disk
    bits = diffquant.average_bits(diffquant.get_denoiser(pipe))
    out["avg_wbits"] = bits["weight_bits"]
    out["avg_abits"] = bits["activation_bits"] if math.isfinite(bits["activation_bits"]) else None
    return out


@torch.no_grad()
def error_dynamics(fp_pipe, q_pipe, items, settings) -> dict:
    """How one row's per-step denoiser errors turn into image error, on one batch of prompts.

    ``drift``: rel. MSE of the latents after each step, the quantized sampler against the FP sampler from the same
    noise (the error accumulated along the model's own trajectory). Along the FP trajectory, with the guided
    output (uncond + g * (cond - uncond), what the sampler uses): ``guided_rel_mse`` per step, ``dc_fraction``
    (share of the error energy that is a constant offset per image and channel) and ``coherence`` per image,
    |sum_i e_i|^2 / sum_i |e_i|^2 over the steps, averaged (1: the steps' errors are uncorrelated; up to the
    number of steps: the same error at every step, which adds up instead of averaging out).
    """
    from diffquant.sampling import denoiser_calls, initial_noise, prediction, sample
    from diffquant.wrap import get_denoiser

    def trajectory(pipe, after=None):
        lat: list[torch.Tensor] = []

        def keep(p, i, t, kw):
            lat.append(kw["latents"].detach().float().clone())
            return {}

        with denoiser_calls(pipe, after=after):
            sample(pipe, [it.prompt for it in items], settings, latents=initial_noise(pipe, [it.seed for it in items], settings),
                   callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        return lat

    def rel(a, b):
        return float(((a - b) ** 2).sum() / (b ** 2).sum().clamp_min(1e-20))

    def guided(x):
        if settings.guidance > 1 and x.shape[0] == 2 * len(items):
            u, c = x.chunk(2)
            return u + settings.guidance * (c - u)
        return x

    q_denoiser = get_denoiser(q_pipe)
    errors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compare(call):
        ref = guided(call.prediction.float())
        errors.append((guided(prediction(q_denoiser(*call.args, **call.kwargs)).float()) - ref, ref))

    fp_lat = trajectory(fp_pipe, compare)
    q_lat = trajectory(q_pipe)
    e = torch.stack([err for err, _ in errors])  # [steps, B, C, H, W]
    energy = (e ** 2).sum(dim=(2, 3, 4))  # [steps, B]
    dc = (e.mean(dim=(3, 4)) ** 2).sum(dim=2) * e.shape[3] * e.shape[4]
    coherence = (e.sum(0) ** 2).sum(dim=(1, 2, 3)) / energy.sum(0).clamp_min(1e-20)
    return {"n_images": len(items), "drift": [rel(q, f) for q, f in zip(q_lat, fp_lat)],
            "guided_rel_mse": [rel(err + ref, ref) for err, ref in errors],
            "dc_fraction": (dc.sum(1) / energy.sum(1).clamp_min(1e-20)).tolist(), "coherence": float(coherence.mean())}


@torch.no_grad()
def activation_clipping(q_pipe, items, settings, top: int = 12) -> dict:
    """Per activation quantizer, on the quantized model's own sampling of ``items``: its range in use, the share of
    entries outside it, and its error split into clipping and rounding (each relative to the input's energy).
    Returns the ``top`` quantizers by total relative error (which quantizers dominate, and whether by clipping)."""
    from diffquant.quant.affine import qrange
    from diffquant.quant.quantizers import ActivationQuantizer
    from diffquant.sampling import initial_noise, sample
    from diffquant.wrap import get_denoiser

    stats: dict[str, dict] = {}

    def hook(mod, args, output, name):
        if mod.mode != "quantize":
            return
        x = args[0].float()
        g = mod.current_group()
        g = int(g.flatten()[0]) if torch.is_tensor(g) else g
        scale, zp = mod.broadcast_param(mod.scale[g], x, False), mod.broadcast_param(mod.zero_point[g], x, False)
        qmin, qmax = qrange(int(mod.bits[g]), mod.spec.symmetric, mod.spec.unsigned)
        lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
        xc = torch.maximum(torch.minimum(x, hi), lo)
        st = stats.setdefault(name, {"n": 0, "clipped": 0, "clip": 0.0, "round": 0.0, "energy": 0.0, "lo": float("inf"), "hi": -float("inf")})
        st["n"] += x.numel()
        st["clipped"] += int((x != xc).sum())
        st["clip"] += float(((x - xc) ** 2).sum())
        st["round"] += float(((output.float() - xc) ** 2).sum())
        st["energy"] += float((x ** 2).sum())
        st["lo"], st["hi"] = min(st["lo"], float(lo.min())), max(st["hi"], float(hi.max()))

    denoiser = get_denoiser(q_pipe)
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in denoiser.named_modules()
               if isinstance(m, ActivationQuantizer)]
    try:
        sample(q_pipe, [it.prompt for it in items], settings, latents=initial_noise(q_pipe, [it.seed for it in items], settings))
    finally:
        for h in handles:
            h.remove()
    rows = {n: {"range": [st["lo"], st["hi"]], "clipped_share": st["clipped"] / st["n"],
                "clip_rel_err": st["clip"] / max(st["energy"], 1e-20), "round_rel_err": st["round"] / max(st["energy"], 1e-20)}
            for n, st in stats.items() if st["n"]}
    ranked = sorted(rows, key=lambda n: -(rows[n]["clip_rel_err"] + rows[n]["round_rel_err"]))
    return {"n_images": len(items), "quantizers": _short({n: rows[n] for n in ranked[:top]}, 4)}


# ----------------------------------------------------------------------------------------- claims
def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a-b and its normal 95 % interval over paired per-image values."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    d = d[torch.isfinite(d)]
    mean = float(d.mean())
    half = 1.96 * float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return mean, mean - half, mean + half


def fd_interval(fp: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor, n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap (same resampled images for FP, A and B) 95 % interval of FD(A, FP) - FD(B, FP)."""
    from diffquant.evaluation.metrics import frechet_distance

    g = torch.Generator().manual_seed(seed)
    diffs = []
    n = fp.shape[0]
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=g)
        diffs.append(frechet_distance(fa[idx], fp[idx]) - frechet_distance(fb[idx], fp[idx]))
    diffs.sort()
    return diffs[int(0.025 * n_boot)], diffs[int(0.975 * n_boot) - 1]


_FD_INTERVALS: dict[tuple[str, str], tuple[float, float]] = {}  # (key A, key B) -> interval; the bootstrap takes ~15 s


class Comparator:
    """'Is row A closer to FP than row B on metric m', with the paired interval, for one model's rows."""

    def __init__(self, result: dict, features_dir: Path | None):
        self.rows = {r["label"]: r for r in result["rows"] if "summary" in r}
        self.features_dir = features_dir
        self._feats: dict[str, torch.Tensor | None] = {}

    def features(self, key: str) -> torch.Tensor | None:
        if key not in self._feats:
            path = self.features_dir / f"{key}.pt" if self.features_dir else None
            self._feats[key] = torch.load(path, weights_only=True) if path is not None and path.is_file() else None
        return self._feats[key]

    def compare(self, a: str, b: str, metric: str, sign: int) -> dict | None:
        ra, rb = self.rows.get(a), self.rows.get(b)
        if ra is None or rb is None or ra["summary"].get(metric) is None or rb["summary"].get(metric) is None:
            return None
        va, vb = ra["summary"][metric], rb["summary"][metric]
        out = {"metric": metric, "a": va, "b": vb, "better": sign * (va - vb) > 0}
        interval = None
        if metric in ("psnr", "ssim"):
            _, lo, hi = paired_interval(ra["per_image"][metric], rb["per_image"][metric])
            interval = (lo, hi)
        elif metric == "fd_fp":
            memo = (ra["key"], rb["key"])
            if memo not in _FD_INTERVALS:
                fp, fa, fb = self.features("FP"), self.features(ra["key"]), self.features(rb["key"])
                if fp is not None and fa is not None and fb is not None:
                    _FD_INTERVALS[memo] = fd_interval(fp, fa, fb)
            interval = _FD_INTERVALS.get(memo)
        if interval is not None:
            out["interval_a_minus_b"] = list(interval)
            out["clearly"] = out["better"] and (interval[0] > 0 if sign > 0 else interval[1] < 0)
        return out


def _fmt_cmp(c: dict, a: str, b: str) -> str:
    digits = {"psnr": ".2f", "ssim": ".4f", "fd_fp": ".2f", "attr_all": ".3f"}.get(c["metric"], ".4g")
    text = f"{c['metric']} {a} {c['a']:{digits}} vs {b} {c['b']:{digits}}"
    if "interval_a_minus_b" in c:
        lo, hi = c["interval_a_minus_b"]
        text += f" (diff 95 % CI [{lo:+{digits}}, {hi:+{digits}}]{', clear' if c['clearly'] else ', not clear' if c['better'] else ''})"
    return text


def _verdict(flags: list[bool]) -> str:
    return "holds" if flags and all(flags) else "does not hold" if not any(flags) else "holds partly"


def attr_gap_interval(result: dict, label: str) -> tuple[float, float] | None:
    """Paired 95 % interval, in points, of a row's all-attributes accuracy minus FP's (same prompts and seeds)."""
    fp = result["reference"].get("per_image", {}).get("attr_all")
    row = next((r for r in result["rows"] if r["label"] == label), {}).get("per_image", {}).get("attr_all")
    if not fp or not row or len(fp) != len(row):
        return None
    _, lo, hi = paired_interval([float(x) for x in row], [float(x) for x in fp])
    return 100 * lo, 100 * hi


def check_claims(result: dict, features_dir: Path | None) -> dict[str, list[dict]]:
    """Every paper claim the issues name, evaluated on this model's rows (nothing is assumed to hold)."""
    cmp = Comparator(result, features_dir)
    rows, fp = cmp.rows, result["reference"]["summary"]
    bits_list = result["bits"]
    claims: dict[str, list[dict]] = {"qdiffusion": [], "pcr": [], "emf": []}

    # Issue 5 (Q-Diffusion, seed 001); the LSQ-off ablation row, when run, gets the same checks marked as such
    for bits in bits_list:
        r = f"rtn-{bits}"
        for variant, name, tag in (("qdiffusion", "Q-Diffusion", "QD"), ("qdiffusion-nolsq", "Q-Diffusion without LSQ (ablation)", "QD-noLSQ")):
            q = f"{variant}-{bits}"
            if bits == "w4a8" and q in rows and r in rows:
                comps = [c for m, s in FIDELITY if (c := cmp.compare(q, r, m, s))]
                attr = cmp.compare(q, r, "attr_all", 1)
                clear = [c.get("clearly", c["better"]) for c in comps]
                text = "; ".join(_fmt_cmp(c, tag, "RTN") for c in comps)
                if attr:
                    text += f"; attributes (for reference) {tag} {attr['a']:.3f} vs RTN {attr['b']:.3f}"
                claims["qdiffusion"].append({"claim": f"W4A8: {name} clearly closer to FP than RTN on every fidelity metric (PSNR, SSIM, FD to FP)",
                                             "verdict": _verdict(clear), "text": text, "detail": comps})
            if bits == "w8a8" and q in rows and fp.get("attr_all") is not None and rows[q]["summary"].get("attr_all") is not None:
                gap = 100 * (rows[q]["summary"]["attr_all"] - fp["attr_all"])
                rtn_gap = 100 * (rows[r]["summary"]["attr_all"] - fp["attr_all"]) if r in rows else None
                interval = attr_gap_interval(result, q)
                text = (f"FP {fp['attr_all']:.3f}, {tag} {rows[q]['summary']['attr_all']:.3f} ({gap:+.1f} points"
                        + (f", paired 95 % CI [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "") + ")"
                        + (f"; RTN {rows[r]['summary']['attr_all']:.3f} ({rtn_gap:+.1f} points)" if rtn_gap is not None else ""))
                if interval and (interval[0] < -2.0 < interval[1] or interval[0] < 2.0 < interval[1]):
                    text += "; the interval reaches both sides of a 2-point gap: these prompts cannot settle the claim"
                claims["qdiffusion"].append({
                    "claim": f"W8A8: {name} attribute accuracy within 2 points of FP", "verdict": "holds" if abs(gap) <= 2.0 else "does not hold",
                    "text": text,
                    "detail": {"fp": fp["attr_all"], variant: rows[q]["summary"]["attr_all"], "gap_points": gap, "interval_points": interval}})

    # Issue 6 (PCR, seed 002): FID to FP, PCR vs Q-Diffusion (and RTN) at the same bits
    for bits in bits_list:
        p = f"pcr-{bits}"
        if p not in rows:
            continue
        act = rows[p].get("avg_abits")
        for other, name, short in ((f"qdiffusion-{bits}", "Q-Diffusion", "QD"), (f"rtn-{bits}", "RTN", "RTN")):
            c = cmp.compare(p, other, "fd_fp", -1)
            if c is None:
                continue
            extra = ""
            if rows[p].get("summary_calib") and rows[other].get("summary_calib"):
                a, b = rows[p]["summary_calib"]["fd_fp"], rows[other]["summary_calib"]["fd_fp"]
                extra = f"; on the calibration prompts {a:.2f} vs {b:.2f}"
            claims["pcr"].append({"claim": f"{bits}: PCR beats {name} in FD to FP", "verdict": "holds" if c.get("clearly", c["better"]) else
                                  ("holds partly" if c["better"] else "does not hold"),
                                  "text": _fmt_cmp(c, "PCR", short) + f" (PCR at {act:.2f} average activation bits){extra}",
                                  "detail": c})

    # Issue 7 (EMF, seed 000)
    for bits in bits_list:
        e = f"emf-{bits}"
        if e not in rows:
            continue
        for other in ("rtn", "qdiffusion", "pcr", "rtn-float-time"):
            o = f"{other}-{bits}"
            if o not in rows:
                continue
            comps = [c for m, s in FIDELITY if (c := cmp.compare(e, o, m, s))]
            clear = [c.get("clearly", c["better"]) for c in comps]
            claim = f"{bits}: EMF closer to FP than {other}" + (" (control: RTN with EMF's float time layers)" if other == "rtn-float-time" else "")
            claims["emf"].append({"claim": claim, "verdict": _verdict(clear),
                                  "text": "; ".join(_fmt_cmp(c, "EMF", other) for c in comps), "detail": comps})
        q = f"qdiffusion-{bits}"
        if q in rows:
            et, qt = rows[e]["quantize_s"], rows[q]["quantize_s"]
            train = rows[e]["details"].get("train", {}).get("seconds")
            recon = rows[q]["details"].get("reconstruction_seconds")
            text = f"EMF {et:.0f} s in all vs Q-Diffusion {qt:.0f} s"
            if train is not None and recon is not None:
                text += f"; EMF training alone {train:.0f} s vs Q-Diffusion reconstruction alone {recon:.0f} s"
            claims["emf"].append({"claim": f"{bits}: EMF takes less time than Q-Diffusion's reconstruction-based calibration",
                                  "verdict": "holds" if et < qt else "does not hold", "text": text,
                                  "detail": {"emf_s": et, "qdiffusion_s": qt, "emf_train_s": train, "qdiffusion_reconstruction_s": recon}})
        s = f"emf-serial-{bits}"
        if s in rows:
            par, ser = curve_stats(rows[e]["details"]["curves"]), curve_stats(rows[s]["details"]["curves"])
            steadier = par["loss_last_quarter_std"] < ser["loss_last_quarter_std"] and par["flip_rate_mean"] <= ser["flip_rate_mean"]
            comps = [c for m, sg in FIDELITY if (c := cmp.compare(e, s, m, sg))]
            claims["emf"].append({"claim": f"{bits}: parallel training steadier than serial (ablation)", "verdict": "holds" if steadier else "does not hold",
                                  "text": f"std of loss over the last quarter {par['loss_last_quarter_std']:.3g} vs {ser['loss_last_quarter_std']:.3g}; "
                                          f"mean weight flip rate {par['flip_rate_mean']:.3g} vs {ser['flip_rate_mean']:.3g}; "
                                          + "; ".join(_fmt_cmp(c, "parallel", "serial") for c in comps),
                                  "detail": {"parallel": par, "serial": ser, "fidelity": comps}})
    return claims


def curve_stats(curves: dict) -> dict:
    loss, flips = curves.get("loss", []), curves.get("flip_rate", [])
    if not loss:
        return {"loss_first_quarter": None, "loss_last_quarter": None, "loss_last_quarter_std": float("inf"), "flip_rate_mean": float("inf")}
    tail = max(1, len(loss) // 4)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    last = mean(loss[-tail:])
    return {"loss_first_quarter": mean(loss[:tail]), "loss_last_quarter": last,
            "loss_last_quarter_std": mean([(x - last) ** 2 for x in loss[-tail:]]) ** 0.5,
            "flip_rate_mean": mean(flips), "flip_rate_last_quarter": mean(flips[-tail:])}


def diagnostics(result: dict) -> list[str]:
    """Where each row's error comes from: per-timestep denoiser error (early/late thirds) and the top layers."""
    out = []
    for r in result["rows"]:
        te, ls = r.get("timestep_error"), r.get("layer_sensitivity")
        if not te:
            continue
        rel = te["rel_mse"]
        third = max(1, len(rel) // 3)
        m = lambda xs: sum(xs) / len(xs)
        line = (f"- {r['label']}: denoiser rel. MSE per step, mean {m(rel):.3g} (first third {m(rel[:third]):.3g}, "
                f"middle {m(rel[third:-third] or rel):.3g}, last third {m(rel[-third:]):.3g})")
        dyn = r.get("dynamics")
        if dyn:
            line += (f"; own-trajectory latent drift after the last step {dyn['drift'][-1]:.3g} ({dyn['n_images']} prompts), "
                     f"step-error coherence {dyn['coherence']:.2f}, constant-offset share {m(dyn['dc_fraction']):.2f}")
        clip = (r.get("activation_clipping") or {}).get("quantizers")
        if clip:
            n, c = next(iter(clip.items()))
            line += (f"; largest activation-quantizer error `{n.replace('.processor', '')}` range [{c['range'][0]:.3g}, {c['range'][1]:.3g}], "
                     f"{c['clipped_share']:.1e} of entries clipped carrying {c['clip_rel_err']:.2g} of its energy (rounding {c['round_rel_err']:.2g})")
        if ls:
            top = list(ls["layers"].items())[:3]
            total = sum(ls["layers"].values())
            line += (f"; alone-quantized layer errors sum {total:.3g} vs all quantized {ls['all_quantized']:.3g}; top: "
                     + ", ".join(f"`{n}` {v:.3g}" for n, v in top))
        out.append(line)
    return out


# ----------------------------------------------------------------------------------------- output
COLUMNS = [  # (key, header, format); key looked up in the row, then its summary
    ("bits", "bits", "{}"), ("avg_wbits", "avg W bits", "{:.2f}"), ("avg_abits", "avg A bits", "{:.2f}"),
    ("psnr", "PSNR ↑ (dB)", "{:.2f}"), ("ssim", "SSIM ↑", "{:.4f}"), ("fd_fp", "FD to FP ↓", "{:.2f}"),
    ("attr_all", "attr. all ↑", "{:.3f}"), ("attr_mean", "attr. mean ↑", "{:.3f}"),
    ("timestep_rel_mse", "step rel. MSE ↓", "{:.3g}"), ("quantize_s", "quantize (s)", "{:.0f}"),
    ("train_s", "of which training (s)", "{:.0f}"), ("peak_memory_mib", "peak RSS (MiB)", "{:.0f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key, row.get("summary", {}).get(key))
    if key == "train_s":
        d = row.get("details", {})
        value = d.get("train", {}).get("seconds") or d.get("reconstruction_seconds")
    if value is None:
        return "–"
    return fmt.format(value)


def _main_command(res: dict) -> str:
    """A command that reproduces every row: the latest session writing the default files, without the flags
    that only redo rows (else the session that measured the most rows)."""
    sessions = res.get("sessions") or []
    if not sessions:
        return res["command"].removeprefix(".venv/bin/python ")
    for session in reversed(sessions):
        words = session["command"].split()
        if "--json" not in words and "--markdown" not in words:
            kept, skip = [], False
            for word in words:
                if skip:
                    skip = False
                elif word in ("--redo", "--threads"):
                    skip = True
                elif word not in ("--fresh", "--diagnose"):
                    kept.append(word)
            return " ".join(kept)
    return max(sessions, key=lambda x: len(x.get("rows_run", [])))["command"]


def markdown(all_results: dict, args_line: str, analysis: str) -> str:
    lines = ["# RTN vs Q-Diffusion vs PCR vs EMF on the mini zoo (issues 5, 6, 7)", "",
             "Written by `benchmarks/methods.py` (JSON: `benchmarks/results/methods.json`); the hand-written analysis is at the end.", ""]
    for name, res in all_results["models"].items():
        s = res["settings"]
        lines += [f"## {name}", "",
                  f"Reproduce: `.venv/bin/python {_main_command(res)}`", "",
                  (f"Weights: {res['source']} (FP fingerprint `{res['reference']['fingerprint']}`). {s['n_images']} held-out prompts "
                   f"(`zoo.heldout_prompts`, seed = prompt index), {s['steps']} steps, guidance {s['guidance']}, {s['height']}x{s['width']}; "
                   f"{res['calib_prompts']} calibration prompts (`zoo.calibration_prompts`) for every method. Fréchet distances: "
                   f"{res['feature_space']}."), "",
                  f"Machine: {res['machine']}. FP images {res['reference']['summary'].get('generate_s', 0):.0f} s (first session). Sessions: "
                  + "; ".join(f"`{x['command']}` {x['started']} – "
                              + x.get("finished", "(in progress)" if i == len(res["sessions"]) - 1 else "(stopped before the end)")
                              + (f" ({x['wall_s'] / 60:.0f} min, load average {x['load_start']:.1f} → {x['load_end']:.1f}; rows run: "
                                 f"{', '.join(x['rows_run']) or 'none'})" if "wall_s" in x else "")
                              for i, x in enumerate(res.get("sessions", []))) + ".", "",
                  "Method options (beyond the library defaults): `" + json.dumps(res["method_options"], sort_keys=True) + "`.", "",
                  "| row | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        fp_row = {"bits": "float", "summary": res["reference"]["summary"]}
        lines.append("| FP | " + " | ".join(_cell(fp_row, k, f) for k, _, f in COLUMNS) + " |")
        for row in res["rows"]:
            lines.append(f"| {row['label']} | " + " | ".join(_cell(row, k, f) for k, _, f in COLUMNS) + " |")
        lines.append("")
        if any(r.get("summary_calib") for r in res["rows"]):
            lines += ["On the calibration prompts (PCR's prompt-generalization protocol):", "",
                      "| row | PSNR | SSIM | FD to FP | attr. all |", "|---|---|---|---|---|"]
            for row in res["rows"]:
                c = row.get("summary_calib") or {}
                lines.append(f"| {row['label']} | " + " | ".join("–" if c.get(k) is None else f"{c[k]:.4g}" for k in ("psnr", "ssim", "fd_fp", "attr_all")) + " |")
            lines.append("")
        lines += [("`quantize` is the whole wall time of `diffquant.quantize` (Q-Diffusion: recording + ranges + reconstruction; PCR: progressive "
                   "calibration + sensitivity + relaxing; EMF: serial dataset + sensitivity + training); `of which training` is EMF's QAT or "
                   "Q-Diffusion's block reconstruction; peak RSS is above the level at the start of quantization. `step rel. MSE` is the "
                   "denoiser's relative output error along the FP trajectory (8 prompts), averaged over steps."), ""]
        resumed = [r["label"] for r in res["rows"] if r.get("resumed_from_workdir")]
        if resumed:
            lines += [f"Rows resumed from a checkpoint of an interrupted run (their times are partial): {', '.join(resumed)}.", ""]
        for key, title in (("qdiffusion", "Issue 5 — Q-Diffusion (seed 001)"), ("pcr", "Issue 6 — PCR (seed 002)"), ("emf", "Issue 7 — EMF (seed 000)")):
            claims = res.get("claims", {}).get(key, [])
            if claims:
                lines += [f"### {title}: claims", ""]
                lines += [f"- {c['claim']}: **{c['verdict']}** — {c['text']}." for c in claims]
                lines.append("")
        lines += [("Paired 95 % intervals: per-image differences for PSNR/SSIM, a bootstrap over images (200 resamples) for FD; "
                   "'clear' means the interval excludes zero, and a claim of being closer holds only where it is clear on every metric."), ""]
        diag = diagnostics(res)
        if diag:
            lines += ["### Where the error comes from", ""] + diag + [""]
        for fig in res.get("figures", []):
            lines.append(f"![{Path(fig).stem}]({fig})")
        lines.append("")
    if analysis:
        lines += [analysis.rstrip(), ""]
    return "\n".join(lines)


def figures(name: str, res: dict, img_dir: Path, page_dir: Path) -> list[str]:
    """Per-timestep error curves (one panel per bit width), PCR per-step sensitivity, EMF loss/flip curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffquant.calibration.sensitivity import sensitivity_figure

    img_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = [r for r in res["rows"] if r.get("timestep_error")]
    if rows:
        drift = any(r.get("dynamics") for r in rows)
        fig, axes = plt.subplots(2 if drift else 1, len(res["bits"]), figsize=(5.2 * len(res["bits"]), 7.2 if drift else 3.6), squeeze=False)
        for col, bits in enumerate(res["bits"]):
            ax = axes[0][col]
            for r in rows:
                if r["bits"] == bits:
                    ax.plot(r["timestep_error"]["step"], r["timestep_error"]["rel_mse"], marker=".", label=r["variant"])
            ax.set_title(f"{name} {bits}: denoiser error per step")
            ax.set_ylabel("rel. MSE vs FP (FP inputs)")
            if drift:
                ax = axes[1][col]
                for r in rows:
                    if r["bits"] == bits and r.get("dynamics"):
                        ax.plot(range(len(r["dynamics"]["drift"])), r["dynamics"]["drift"], marker=".", label=r["variant"])
                ax.set_title(f"{name} {bits}: latent drift on its own trajectory")
                ax.set_ylabel("rel. MSE of latents vs FP sampler")
        for ax in axes.flat:
            ax.set_yscale("log")
            ax.set_xlabel("sampling step (0 = noisiest)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = img_dir / f"methods-timestep-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    for r in res["rows"]:
        sens = r.get("details", {}).get("sensitivity") if r["variant"] == "pcr" else None
        if sens:
            fig = sensitivity_figure(sens, r["details"]["relaxed_steps"], title=f"PCR per-step sensitivity: {name} {r['bits']}")
            path = img_dir / f"methods-pcr-sensitivity-{name}-{r['bits']}.png"
            fig.savefig(path, dpi=90, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
    emf = {r["variant"]: r["details"]["curves"] for r in res["rows"] if r["variant"].startswith("emf") and r.get("details", {}).get("curves")}
    if emf:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for order, c in emf.items():
            axes[0].plot(c["loss"], label=order, alpha=0.85)
            axes[1].plot(c["flip_rate"], label=order, alpha=0.85)
        axes[0].set_title(f"{name}: EMF training loss")
        axes[0].set_yscale("log")
        axes[1].set_title(f"{name}: weight codes flipped per step")
        for ax in axes:
            ax.set_xlabel("iteration")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = img_dir / f"methods-emf-training-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return [os.path.relpath(p, page_dir) for p in paths]


class Store:
    """methods.json (all models) and the page, rewritten atomically after every row.

    Each save re-reads the file and replaces only the models this run touched, so runs of different models
    (or a merge by hand) between two saves are kept."""

    def __init__(self, json_path: Path, md_path: Path, args_line: str):
        self.json_path, self.md_path, self.args_line = json_path, md_path, args_line
        self.data = self._read()
        self.touched: set[str] = set()

    def _read(self) -> dict:
        if self.json_path.is_file():
            return json.loads(self.json_path.read_text())
        return {"version": 1, "models": {}}

    def model(self, name: str, result: dict) -> None:
        self.data["models"][name] = result
        self.touched.add(name)

    def analysis(self) -> str:
        if not self.md_path.is_file():
            return ""
        text = self.md_path.read_text()
        i = text.find("\n" + ANALYSIS_HEADING)
        return text[i + 1:] if i >= 0 else ""

    def save(self) -> None:
        from diffquant.evaluation.report import jsonable
        from diffquant.io import atomic_write_text

        analysis = self.analysis()
        disk = self._read()
        for name in self.touched:
            disk["models"][name] = self.data["models"][name]
        self.data = {**disk, "models": {**disk["models"], **{n: self.data["models"][n] for n in self.touched}}}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.json_path, json.dumps(jsonable(self.data), indent=1, allow_nan=False) + "\n")
        atomic_write_text(self.md_path, markdown(self.data, self.args_line, analysis))


# ----------------------------------------------------------------------------------------- driver
def run_model(name: str, args, store: Store, method_options: dict) -> None:
    import diffquant
    from diffquant import zoo
    from diffquant.evaluation import EvalOptions, Evaluation, PromptItem, model_fingerprint
    from diffquant.evaluation.bench import parse_bits

    started = time.time()
    load_start = os.getloadavg()[0]
    fp, settings, source = load_fp(name, args.model_paths.get(name))
    if args.steps:
        settings = type(settings)(args.steps, settings.guidance, settings.height, settings.width)
    items = [PromptItem(p, i) for i, p in enumerate(zoo.heldout_prompts(args.prompts))]
    metrics = ["psnr", "ssim", "fd_fp", "attributes"] + ([] if args.no_curves else ["timestep", "sensitivity"])
    options = EvalOptions(metrics=metrics, cache_dir=Path(args.cache_dir) / name, batch_size=args.batch_size,
                          curve_items=min(8, len(items)), sensitivity_items=2, sensitivity_steps=3)
    calib_prompts = zoo.calibration_prompts(args.calib_prompts)
    print(f"[{name}] FP: {len(items)} images", flush=True)
    t0 = time.perf_counter()
    evals = {"heldout": Evaluation(fp, name, items, settings, options, prompts_spec=f"zoo:heldout:{args.prompts}")}
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

    earlier = {} if args.fresh else store.data["models"].get(name, {})
    previous = {r["key"]: r for r in earlier.get("rows", [])}
    bits_list = [f"w{w}a{a}" for w, a in parse_bits(args.bits)]
    emf_bits = bits_list if args.emf_bits == "all" else [f"w{w}a{a}" for w, a in parse_bits(args.emf_bits)]
    variants = [v.strip() for v in args.methods.split(",") if v.strip()]
    if args.emf_ablation and "emf-serial" not in variants:
        variants.append("emf-serial")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    ref_summary = dict(ev.reference["summary"])
    ref_summary["generate_s"] = fp_s
    if ev.reference["generation"]["generated"] == 0 and "generate_s" in earlier.get("reference", {}).get("summary", {}):
        ref_summary["generate_s"] = earlier["reference"]["summary"]["generate_s"]  # all cached: keep the time it took
    if args.calib_eval:
        ref_summary["calib"] = dict(evals["calib"].reference["summary"])
    result = {
        "command": f".venv/bin/python benchmarks/methods.py {store.args_line}".strip(),
        "source": source, "settings": ev.settings_record, "feature_space": ev.feature_space,
        "calib_prompts": len(calib_prompts), "method_options": method_options, "bits": bits_list,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "load_start": load_start,
        "reference": {"fingerprint": fp_fingerprint, "summary": ref_summary,
                      "generation": ev.reference["generation"],
                      "per_image": {"attr_all": [int(ok) for ok in ev.reference.get("attr_all_per_image", [])]}},
        "rows": [], "skipped": ev.skipped,
        "sessions": [],
    }
    if earlier.get("reference", {}).get("fingerprint") == fp_fingerprint:
        result["sessions"] = earlier.get("sessions") or [  # results written before sessions were recorded
            {"command": earlier["command"].removeprefix(".venv/bin/python "), "started": earlier["started"], "load_start": earlier["load_start"],
             **({k: earlier[k] for k in ("finished", "wall_s", "load_end")} if "wall_s" in earlier else {}),
             "rows_run": [r["label"] for r in earlier.get("rows", [])]}]
    session = {"command": f"benchmarks/methods.py {store.args_line}", "started": result["started"], "load_start": load_start}
    result["sessions"].append(session)
    same_table = (earlier.get("reference", {}).get("fingerprint") == fp_fingerprint and earlier.get("calib_prompts") == len(calib_prompts)
                  and earlier.get("settings") == json.loads(json.dumps(ev.settings_record, default=str)))
    # A run adds or redoes rows: rows it does not reach (other methods or bit widths, or after a crash) stay.
    result["rows"] = list(earlier.get("rows", [])) if same_table else []
    result["bits"] = bits_list + [b for b in earlier.get("bits", []) if same_table and b not in bits_list]
    store.model(name, result)
    store.save()

    def put_row(row: dict) -> None:
        rows = [r for r in result["rows"] if r["label"] != row["label"]] + [row]
        order = {b: i for i, b in enumerate(result["bits"])}
        rank = {v: i for i, v in enumerate(VARIANTS)}
        rows.sort(key=lambda r: (order.get(r["bits"], len(order)), rank.get(r["variant"], len(rank))))
        result["rows"] = rows

    emf_workdirs: dict[str, Path] = {}
    ran: list[str] = []  # labels quantized and scored in this session
    for bits in bits_list:
        wbits, abits = (int(x) for x in bits[1:].split("a"))
        for variant in variants:
            method = VARIANTS[variant][0]
            if (method == "emf" or variant == "rtn-float-time") and bits not in emf_bits:
                continue
            label = f"{variant}-{bits}"
            cfg = make_config(variant, wbits, abits, settings, calib_prompts, method_options, args.calib_batch_size)
            key = row_key(fp_fingerprint, variant, cfg, settings, args.prompts, args.calib_eval, calib_prompts)
            if key in previous and "summary" in previous[key] and variant not in args.redo:
                print(f"[{name}] {label}: finished in an earlier run, reused", flush=True)
                row = previous[key]
                put_row(row)
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
                    if "dynamics" not in row:
                        row["dynamics"] = error_dynamics(fp, pipe, items[: args.batch_size], settings)
                    row["activation_clipping"] = activation_clipping(pipe, items[: args.batch_size], settings)
                    del pipe
                    shutil.rmtree(work / key, ignore_errors=True)
                store.save()
                continue
            # The serial EMF ablation shares the parallel row's workdir: its dataset and layer sensitivity are
            # reused (QAT checkpoints are keyed by the training settings), so compare the two by training time.
            shared = variant == "emf-serial" and bits in emf_workdirs
            workdir = emf_workdirs[bits] if shared else work / key
            print(f"[{name}] {label}: quantizing", flush=True)
            pipe, cost = quantize_row(fp, cfg, calib_prompts, workdir, shared)
            cost["shared_emf_workdir"] = shared
            if variant == "emf":
                emf_workdirs[bits] = workdir
            report = diffquant.quant_record(diffquant.get_denoiser(pipe)).report
            row = {"label": label, "variant": variant, "method": method, "bits": bits, "key": key, "config": cfg.to_dict(), **cost,
                   "details": method_details(variant, report)}
            print(f"[{name}] {label}: quantized in {cost['quantize_s']:.0f} s; generating {len(items)} images", flush=True)
            row.update(score_row(evals, label, pipe, f"diffquant {cfg.label} {json.dumps(cfg.options, sort_keys=True)}",
                                 {k: cost[k] for k in ("quantize_s", "peak_memory_mib")}, features_dir / f"{key}.pt"))
            if not args.no_curves:
                row["dynamics"] = error_dynamics(fp, pipe, items[: args.batch_size], settings)
                row["activation_clipping"] = activation_clipping(pipe, items[: args.batch_size], settings)
            del pipe
            print(f"[{name}] {label}: " + json.dumps(_short(row["summary"], 4)) + f" (eval {row['eval_s']:.0f} s)", flush=True)
            put_row(row)
            ran.append(label)
            result["claims"] = check_claims(result, features_dir)
            store.save()
            if variant != "emf":
                shutil.rmtree(workdir, ignore_errors=True)
    for path in emf_workdirs.values():
        shutil.rmtree(path, ignore_errors=True)
    result["claims"] = check_claims(result, features_dir)
    result["figures"] = figures(name, result, Path(args.markdown).parent / "img", Path(args.markdown).parent)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC")
    result["wall_s"] = time.time() - started
    result["load_end"] = os.getloadavg()[0]
    session.update(finished=result["finished"], wall_s=result["wall_s"], load_end=result["load_end"],
                   rows_run=ran)
    store.save()
    print(f"[{name}] done in {result['wall_s'] / 60:.1f} min", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mini-sd,mini-sd3", help="mini-zoo names, or tiny-sd / tiny-sd3 (random weights) for smoke runs")
    p.add_argument("--model-path", action="append", default=[], metavar="NAME=FOLDER",
                   help="load NAME from this diffusers folder (NAME's zoo sampling settings); repeatable")
    p.add_argument("--bits", default="w4a8,w8a8", help="bit widths, W4A8 first: the three issues' main claims are there")
    p.add_argument("--methods", default="rtn,qdiffusion,pcr,emf", help=f"rows per bit width, from: {', '.join(VARIANTS)}")
    p.add_argument("--emf-bits", default="w4a8", help="bit widths that get EMF rows and its rtn-float-time control ('all': every --bits)")
    p.add_argument("--emf-ablation", action="store_true", help="add the emf-serial row (seed 000's serial-vs-parallel ablation)")
    p.add_argument("--prompts", type=int, default=256, help="held-out prompts, one image each, seed = prompt index")
    p.add_argument("--calib-prompts", type=int, default=8, help="calibration prompts (zoo calibration split), the same for every method")
    p.add_argument("--calib-eval", type=int, default=0, help="also score every row on this many calibration prompts (0: off)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps for generation and calibration (default: the model's)")
    p.add_argument("--qdiffusion-options", default=None, help=f"JSON, replaces the budget options {json.dumps(BUDGET_OPTIONS['qdiffusion'])}")
    p.add_argument("--pcr-options", default=None, help=f"JSON, replaces the budget options {json.dumps(BUDGET_OPTIONS['pcr'])}")
    p.add_argument("--emf-options", default=None, help=f"JSON, replaces the budget options {json.dumps(BUDGET_OPTIONS['emf'])}")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation batch")
    p.add_argument("--calib-batch-size", type=int, default=8, help="prompts per calibration sampling batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared 2-core machine)")
    p.add_argument("--no-curves", action="store_true", help="skip the per-timestep error and per-layer sensitivity")
    p.add_argument("--fresh", action="store_true", help="redo rows already finished in --json")
    p.add_argument("--redo", type=lambda v: [x for x in v.split(",") if x], default=[],
                   help="variants to redo although finished (a library change their settings do not show); other rows are kept")
    p.add_argument("--diagnose", action="store_true",
                   help="for finished rows without the error-dynamics diagnostics (trajectory drift), quantize again and add them")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "methods-cache"))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "methods-work"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "methods.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "results-methods.md"))
    args = p.parse_args(argv)
    args.model_paths = dict(spec.split("=", 1) for spec in args.model_path)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tune_allocator()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    method_options = {}
    for method in ("qdiffusion", "pcr", "emf"):
        given = getattr(args, f"{method}_options")
        method_options[method] = parse_json(given, f"--{method}-options") if given is not None else dict(BUDGET_OPTIONS[method])
    store = Store(Path(args.json), Path(args.markdown), " ".join(sys.argv[1:] if argv is None else argv))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        run_model(name, args, store, method_options)
    print(Path(args.markdown).read_text())


if __name__ == "__main__":
    main()
