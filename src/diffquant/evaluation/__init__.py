"""Paired evaluation of quantized diffusion pipelines against their FP reference (DESIGN §5).

``Evaluation`` scores models on the same prompts, seeds and initial noise; ``run_bench`` adds
methods, bit widths and peer baselines; ``cli`` exposes both as ``diffquant eval`` / ``bench``.
Each name is imported at its first use (PEP 562): the commands' ``--help`` loads neither torch nor torchmetrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..lazy import lazy_attribute

# public name -> the submodule that defines it
_API: dict[str, str] = {
    "METRICS": "options", "EvalOptions": "options", "parse_metrics": "options",
    "Evaluation": "harness",
    "MetricUnavailable": "metrics", "frechet_distance": "metrics", "psnr": "metrics", "ssim": "metrics",
    "generate": "paired", "model_fingerprint": "paired",
    "PromptItem": "prompts", "load_prompts": "prompts", "parse_seeds": "prompts",
}

if TYPE_CHECKING:
    from .harness import Evaluation
    from .metrics import MetricUnavailable, frechet_distance, psnr, ssim
    from .options import METRICS, EvalOptions, parse_metrics
    from .paired import generate, model_fingerprint
    from .prompts import PromptItem, load_prompts, parse_seeds


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _API, globals(), name)


__all__ = [
    "METRICS", "EvalOptions", "Evaluation", "MetricUnavailable", "PromptItem", "frechet_distance",
    "generate", "load_prompts", "model_fingerprint", "parse_metrics", "parse_seeds", "psnr", "ssim",
]
