"""The generated page (``docs/results-methods.md``): one table per model, the claims, the diagnostics, figures.

Everything here is a function of the stored results, so ``benchmarks/methods.py --render-only`` rewrites the
page from ``methods.json`` without running anything; the hand-written text under ``## Analysis`` is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffquant.evaluation.prompts import calibration_seeds

from . import peers

ANALYSIS_HEADING = "## Analysis"


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


COLUMNS = [  # (key, header, format); key looked up in the row, then its summary
    ("bits", "bits", "{}"), ("avg_wbits", "avg W bits", "{:.2f}"), ("avg_abits", "avg A bits", "{:.2f}"),
    ("psnr", "PSNR ↑ (dB)", "{:.2f}"), ("ssim", "SSIM ↑", "{:.4f}"), ("fd_fp", "FD to FP ↓", "{:.2f}"),
    ("attr_all", "attr. all ↑", "{:.3f}"), ("attr_mean", "attr. mean ↑", "{:.3f}"),
    ("timestep_rel_mse", "step rel. MSE ↓", "{:.3g}"), ("quantize_s", "quantize (s)", "{:.0f}"),
    ("train_s", "of which training (s)", "{:.0f}"), ("peak_memory_mib", "peak RSS (MiB)", "{:.0f}"),
]


def whole_denoiser_bits(row: dict) -> bool:
    """Whether a row's average bits are ``diffquant.bits``' whole-denoiser convention: rows measured by the harness
    since it computes coverage carry ``weight_coverage``; rows stored before carry the earlier ``average_bits``."""
    return "weight_coverage" in row.get("summary", {})


OLD_BITS_NOTE = ("² Stored before average bits had one convention: Linear/Conv2d weights only with float layers at 16 bits, "
                 "activation bits the plain mean over activation quantizers (the earlier `diffquant.average_bits`); the other "
                 "rows, like the peer table, use the whole-denoiser one (`diffquant.bits`: every parameter element, float ones "
                 "at 32 bits in float32; activations MAC-weighted, float ones at 32). Rerun a row (`--redo`) for the latter.")


def columns(res: dict) -> list[tuple[str, str, str]]:
    """The table's columns: FD to real images beside FD to FP where it was measured (unconditional models)."""
    if res["reference"]["summary"].get("fd_ref") is None:
        return COLUMNS
    at = next(i for i, c in enumerate(COLUMNS) if c[0] == "fd_fp") + 1
    return COLUMNS[:at] + [("fd_ref", "FD to real ↓", "{:.2f}")] + COLUMNS[at:]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key, row.get("summary", {}).get(key))
    if key in ("avg_wbits", "avg_abits") and value is not None and not whole_denoiser_bits(row):
        return fmt.format(value) + " ²"
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


def markdown(all_results: dict, analysis: str) -> str:
    lines = ["# RTN vs Q-Diffusion vs PCR vs EMF on the mini zoo (issues 5, 6, 7)", "",
             "Written by `benchmarks/methods.py` (JSON: `benchmarks/results/methods.json`); the hand-written analysis is at the end.", ""]
    for name, res in all_results["models"].items():
        s, cols = res["settings"], columns(res)
        draw, n_calib = res.get("calib_draw", 0), res["calib_prompts"]
        pairs = (f"{s['n_images']} unconditional samples (seed = sample index), {s['steps']} steps; {n_calib} "
                 f"calibration samples (seeds {calibration_seeds(1, draw)[0]}..) for every method; FD to real: against as many real "
                 "scenes (`zoo.data.real_scenes`)" if res.get("unconditional") else
                 f"{s['n_images']} held-out prompts (`zoo.heldout_prompts`, seed = prompt index), {s['steps']} steps, guidance "
                 f"{s['guidance']}, {s['height']}x{s['width']}; {n_calib} calibration prompts (`zoo.calibration_prompts`"
                 f"{f', numbers {n_calib * draw}..' if draw else ''}) for every method")
        lines += [f"## {name}", "",
                  f"Reproduce: `.venv/bin/python {_main_command(res)}`", "",
                  (f"Weights: {res['source']} (FP fingerprint `{res['reference']['fingerprint']}`). {pairs}. Fréchet distances: "
                   f"{res['feature_space']}."), "",
                  f"Machine: {res['machine']}. FP images {res['reference']['summary'].get('generate_s', 0):.0f} s (first session). Sessions: "
                  + "; ".join(f"`{x['command']}` {x['started']} – "
                              + x.get("finished", "(in progress)" if i == len(res["sessions"]) - 1 else "(stopped before the end)")
                              + (f" ({x['wall_s'] / 60:.0f} min, load average {x['load_start']:.1f} → {x['load_end']:.1f}; rows run: "
                                 f"{', '.join(x['rows_run']) or 'none'})" if "wall_s" in x else "")
                              for i, x in enumerate(res.get("sessions", []))) + ".", "",
                  "Method options (beyond the library defaults): `" + json.dumps(res["method_options"], sort_keys=True) + "`.", "",
                  "| row | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        fp_row = {"bits": "float", "summary": res["reference"]["summary"]}
        lines.append("| FP | " + " | ".join(_cell(fp_row, k, f) for k, _, f in cols) + " |")
        for row in res["rows"]:
            lines.append(f"| {row['label']} | " + " | ".join(_cell(row, k, f) for k, _, f in cols) + " |")
        lines.append("")
        if any(r.get("summary_calib") for r in res["rows"]):
            lines += ["On the calibration prompts (PCR's prompt-generalization protocol):", "",
                      "| row | PSNR | SSIM | FD to FP | attr. all |", "|---|---|---|---|---|"]
            for row in res["rows"]:
                c = row.get("summary_calib") or {}
                lines.append(f"| {row['label']} | " + " | ".join("–" if c.get(k) is None else f"{c[k]:.4g}" for k in ("psnr", "ssim", "fd_fp", "attr_all")) + " |")
            lines.append("")
        if any(not whole_denoiser_bits(r) and r.get("avg_wbits") is not None for r in res["rows"]):
            lines += [OLD_BITS_NOTE, ""]
        lines += [("`quantize` is the whole wall time of `diffquant.quantize` (Q-Diffusion: recording + ranges + reconstruction; PCR: progressive "
                   "calibration + sensitivity + relaxing; EMF: serial dataset + sensitivity + training); `of which training` is EMF's QAT or "
                   "Q-Diffusion's block reconstruction; peak RSS is above the level at the start of quantization. `step rel. MSE` is the "
                   "denoiser's relative output error along the FP trajectory (8 prompts), averaged over steps."), ""]
        if res.get("peers"):
            lines += peers.markdown(name, res["peers"])
        resumed = [r["label"] for r in res["rows"] if r.get("resumed_from_workdir")]
        if resumed:
            lines += [f"Rows resumed from a checkpoint of an interrupted run (their times are partial): {', '.join(resumed)}.", ""]
        for key, title in (("qdiffusion", "Issue 5 — Q-Diffusion (seed 001)"), ("pcr", "Issue 6 — PCR (seed 002)"), ("emf", "Issue 7 — EMF (seed 000)"),
                           ("recipe", "Issue 19 — the faithful recipe (diffquant.recipes)")):
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
    path = bits_figure(name, res, img_dir, plt)
    if path is not None:
        paths.append(path)
    return [os.path.relpath(p, page_dir) for p in paths]


def bits_figure(name: str, res: dict, img_dir: Path, plt) -> Path | None:
    """Average weight bits (whole denoiser) against PSNR and FD to FP: one point per row of the methods table and
    per peer of the peer table (its prompts are the first of the table's: same images, fewer)."""
    points = [(r["label"], r["avg_wbits"], r["summary"]["psnr"], r["summary"]["fd_fp"], "o") for r in res["rows"]
              if r.get("avg_wbits") is not None and "summary" in r and whole_denoiser_bits(r)]
    peers = res.get("peers") or {}
    points += [(p["label"], p["summary"]["avg_wbits"], p["summary"]["psnr"], p["summary"]["fd_fp"], "^")
               for p in peers.get("rows", []) if p["summary"].get("avg_wbits") is not None and not p["label"].startswith("diffquant")]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for label, wbits, psnr, fd, marker in points:
        for ax, value in zip(axes, (psnr, max(fd, 1e-3))):
            ax.scatter(wbits, value, marker=marker)
            ax.annotate(label, (wbits, value), fontsize=6, xytext=(3, 2), textcoords="offset points")
    axes[0].set_ylabel("PSNR to FP (dB)")
    axes[1].set_ylabel("FD to FP (evaluator features)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("average weight bits, whole denoiser (o: methods table; ^: peers, "
                      f"first {peers.get('n_images', '?')} prompts)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{name}: fidelity against average weight bits")
    fig.tight_layout()
    path = img_dir / f"methods-bits-{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def analysis(md_path: Path, heading: str = ANALYSIS_HEADING) -> str:
    """The hand-written text of the page (from its ``heading`` on), kept when the page is rewritten."""
    if not md_path.is_file():
        return ""
    text = md_path.read_text()
    i = text.find("\n" + heading)
    return text[i + 1:] if i >= 0 else ""


def write_page(md_path: Path, data: dict) -> None:
    """Rewrite the page from ``data`` (methods.json's content), keeping its analysis."""
    from diffquant.io import atomic_write_text

    atomic_write_text(md_path, markdown(data, analysis(md_path)))
