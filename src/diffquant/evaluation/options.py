"""What an evaluation measures and where it caches: plain data, torch-free, so the ``eval`` / ``bench``
commands take their option defaults from it without loading the harness."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "fd_fp", "fd_ref", "clip", "attributes", "timestep", "sensitivity")


def parse_metrics(spec: str | None) -> list[str]:
    """'all' (default) or a comma list of METRICS."""
    if not spec or spec.strip() == "all":
        return list(METRICS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)} (or 'all')")
    return names


@dataclass
class EvalOptions:
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    cache_dir: Path = Path("runs/cache")
    batch_size: int = 4
    inception_weights: str | None = None
    clip_model: str | None = None
    lpips_weights: str | None = None
    reference_images: str | None = None
    curve_items: int = 4  # images whose trajectories give the per-timestep curve
    sensitivity_items: int = 2  # images (one batch) whose denoiser calls give per-layer sensitivity
    sensitivity_steps: int = 3
    sensitivity_max_layers: int | None = None


__all__ = ["METRICS", "EvalOptions", "parse_metrics"]
