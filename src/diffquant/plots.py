"""Plots as base64 PNG, shared by the HTML report and the methods that save a chart beside their data."""

from __future__ import annotations

import base64
import io


def figure_b64(fig) -> str:
    """A matplotlib figure as base64 PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def sensitivity_plot(label: str, sensitivity: dict, top: int = 30) -> str:
    """Horizontal bars of the ``top`` most sensitive layers (error when only that layer is quantized)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted(sensitivity["layers"].items(), key=lambda kv: kv[1], reverse=True)[:top]
    fig, ax = plt.subplots(figsize=(7.5, 0.25 * len(ranked) + 1.2))
    ax.barh([name for name, _ in ranked][::-1], [v for _, v in ranked][::-1], color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("rel. MSE of denoiser output, only this layer quantized")
    ax.set_title(f"{label}: per-layer sensitivity (top {len(ranked)} of {len(sensitivity['layers'])})")
    ax.tick_params(axis="y", labelsize=7)
    return figure_b64(fig)
