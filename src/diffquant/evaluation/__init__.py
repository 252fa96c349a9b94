"""Paired evaluation of quantized diffusion pipelines against their FP reference (DESIGN §5).

``Evaluation`` scores models on the same prompts, seeds and initial noise; ``run_bench`` adds
methods, bit widths and peer baselines; ``cli`` exposes both as ``diffquant eval`` / ``bench``.
"""

from .harness import METRICS, EvalOptions, Evaluation, parse_metrics
from .metrics import MetricUnavailable, frechet_distance, psnr, ssim
from .paired import generate, model_fingerprint
from .prompts import PromptItem, load_prompts, parse_seeds

__all__ = [
    "METRICS", "EvalOptions", "Evaluation", "MetricUnavailable", "PromptItem", "frechet_distance",
    "generate", "load_prompts", "model_fingerprint", "parse_metrics", "parse_seeds", "psnr", "ssim",
]
