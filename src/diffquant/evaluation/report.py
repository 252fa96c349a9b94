"""Self-contained HTML report (images and plots base64-embedded) and atomic JSON/text writes.

The page has: settings, one metric table (a row per model), the metrics that were skipped and
why, the per-timestep error curve, per-layer sensitivity bars, and the image grid
FP | each model with per-image PSNR.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_write
from ..plots import figure_b64, sensitivity_plot
from .prompts import PromptItem

# Display names and formats of the per-model summary columns, in table order.
COLUMNS: dict[str, tuple[str, str]] = {
    "psnr": ("PSNR to FP (dB) ↑", "{:.2f}"),
    "psnr_to_fake_quant": ("PSNR to fake quant (dB) ↑", "{:.2f}"),
    "ssim": ("SSIM to FP ↑", "{:.4f}"),
    "lpips": ("LPIPS to FP ↓", "{:.4f}"),
    "fd_fp": ("Fréchet dist. to FP ↓", "{:.3f}"),
    "fd_ref": ("Fréchet dist. to reference ↓", "{:.3f}"),
    "clip_score": ("CLIP score ↑", "{:.2f}"),
    "attr_all": ("attributes: all correct ↑", "{:.3f}"),
    "attr_mean": ("attributes: mean accuracy ↑", "{:.3f}"),
    "timestep_rel_mse": ("denoiser rel. MSE (mean over steps) ↓", "{:.2e}"),
    "weight_coverage": ("quantized share of weights", "{:.1%}"),
    "mac_coverage": ("quantized share of MACs", "{:.1%}"),
    "avg_wbits": ("avg weight bits (whole denoiser)", "{:.2f}"),
    "avg_abits": ("avg activation bits (whole denoiser, per MAC)", "{:.2f}"),
    "calibration_s": ("calibration wall time (s)", "{:.1f}"),
    "peak_memory_mib": ("peak memory (MiB)", "{:.0f}"),
    "denoiser_mib": ("denoiser on disk (MiB)", "{:.2f}"),
}


def jsonable(value):
    """Replace non-finite floats (PSNR of identical images is +inf) by strings so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: str | Path, obj) -> None:
    atomic_write(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def format_value(key: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "∞ (identical)" if key == "psnr" else "∞"
    return COLUMNS.get(key, ("", "{:.4g}"))[1].format(value)


def _png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image_b64(image: torch.Tensor) -> str:
    return _png_b64((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def timestep_plot(models: list[dict]) -> str | None:
    """One curve per model: relative MSE of the denoiser output against the sampling step."""
    curves = [(m["label"], m["timestep_error"]) for m in models if m.get("timestep_error")]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, curve in curves:
        ax.plot(curve["step"], curve["rel_mse"], marker="o", label=label)
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("sampling step (0 = first, noisiest)")
    ax.set_ylabel("rel. MSE of denoiser output vs FP")
    ax.set_title("Per-timestep denoiser error along the FP trajectory")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return figure_b64(fig)


def _table(headers: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child { text-align: left; }
table.grid td { text-align: center; vertical-align: top; font-size: 0.8em; }
table.grid img { width: 128px; height: 128px; image-rendering: pixelated; display: block; margin: auto; }
.prompt { max-width: 18em; text-align: left !important; }
.note { color: #555; font-size: 0.9em; }
table.skipped td { text-align: left; }
img.plot { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
"""


def render_html(results: dict, items: list[PromptItem], images: dict[str, torch.Tensor], title: str) -> str:
    """The report page. ``images`` maps each label (reference first) to its [N, 3, H, W] images."""
    models = results["models"]
    ref = results["reference"]
    rows_src = [ref] + models
    keys = [k for k in COLUMNS if any(m.get("summary", {}).get(k) is not None for m in rows_src)]
    metric_rows = [[html.escape(m["label"])] + [format_value(k, m.get("summary", {}).get(k)) for k in keys] for m in rows_src]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    s = results["settings"]
    parts.append(f'<p class="note">Reference: <b>{html.escape(ref["spec"])}</b>; {len(items)} images '
                 f'({html.escape(str(s["prompts"]))}), {s["steps"]} steps, guidance {s["guidance"]}, {s["height"]}×{s["width"]}. '
                 f'Same prompts, seeds and initial noise for every model.</p>')
    parts.append("<h2>Metrics</h2>")
    parts.append(_table(["model"] + [COLUMNS[k][0] for k in keys], metric_rows, "metrics"))
    parts.append(f'<p class="note">Feature space for Fréchet distances: {html.escape(results["feature_space"])}.</p>')
    unavailable = [m for m in models if m.get("unavailable")]
    if unavailable:
        parts.append("<h2>Unavailable models</h2>")
        parts.append(_table(["model", "reason"], [[html.escape(m["label"]), html.escape(m["unavailable"])] for m in unavailable]))
    if results.get("skipped"):
        parts.append("<h2>Skipped metrics</h2>")
        parts.append(_table(["metric", "why"], [[html.escape(k), html.escape(v)] for k, v in results["skipped"].items()], "skipped"))
    attr_models = [m for m in rows_src if m.get("attributes")]
    if attr_models:
        names = list(attr_models[0]["attributes"])
        parts.append("<h2>Attribute accuracy (mini-zoo evaluator)</h2>")
        parts.append(_table(["model"] + names, [[html.escape(m["label"])] + [f'{m["attributes"][n]:.3f}' for n in names] for m in attr_models], "attributes"))
    plot = timestep_plot(models)
    if plot or any(m.get("sensitivity") for m in models):
        parts.append("<h2>Where the error comes from</h2>")
    if plot:
        parts.append(f'<img class="plot" alt="per-timestep error" src="data:image/png;base64,{plot}">')
    for m in models:
        if m.get("sensitivity"):
            sens = m["sensitivity"]
            parts.append(f'<p class="note">{html.escape(m["label"])}: all layers quantized {sens["all_quantized"]:.2e}, '
                         f'none {sens["none_quantized"]:.2e} (rel. MSE over {sens["n_inputs"]} captured denoiser calls).</p>')
            parts.append(f'<img class="plot" alt="per-layer sensitivity {html.escape(m["label"])}" '
                         f'src="data:image/png;base64,{sensitivity_plot(m["label"], sens)}">')
    parts.append("<h2>Images</h2>")
    shown = [m for m in models if m["label"] in images]
    grid_rows = []
    for i, item in enumerate(items):
        row = [f'<span class="prompt">{html.escape(item.prompt)}</span><br>seed {item.seed}',
               f'<img alt="FP {i}" src="data:image/png;base64,{_image_b64(images[ref["label"]][i])}">']
        for m in shown:
            p = m["per_image"][i]["psnr"]
            row.append(f'<img alt="{html.escape(m["label"])} {i}" src="data:image/png;base64,{_image_b64(images[m["label"]][i])}">'
                       f'PSNR {format_value("psnr", p)}')
        grid_rows.append(row)
    parts.append(_table(["prompt", ref["label"]] + [m["label"] for m in shown], grid_rows, "grid"))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def markdown_table(results: dict) -> str:
    """The metric table as GitHub markdown (bench prints and saves it)."""
    rows_src = [results["reference"]] + results["models"]
    keys = [k for k in COLUMNS if any(m.get("summary", {}).get(k) is not None for m in rows_src)]
    lines = ["| model | " + " | ".join(COLUMNS[k][0] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m in rows_src:
        cells = [format_value(k, m.get("summary", {}).get(k)) for k in keys]
        if m.get("unavailable"):
            cells = [f"unavailable: {m['unavailable']}"] + [""] * (len(keys) - 1)
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
