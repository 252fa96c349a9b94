"""Low-rank weight adapters for QAT: W' = W + (alpha / r) * B @ A, merged into W before freezing.

Registered as a ``torch.nn.utils.parametrize`` parametrization of ``weight``, so every quantized
wrapper keeps reading ``self.weight`` unchanged; ``merge_low_rank`` folds the delta in and removes
the parametrization, so the saved model is the standard format.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class LowRankDelta(nn.Module):
    """Adds a rank-``rank`` update to a weight viewed as [out, in_flat]. B starts at zero (no change)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        out_features, in_flat = weight.shape[0], weight[0].numel()
        rank = max(1, min(rank, out_features, in_flat))
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.randn(rank, in_flat, device=weight.device, dtype=weight.dtype) / math.sqrt(in_flat))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scaling * (self.lora_b @ self.lora_a)).reshape(weight.shape)


def add_low_rank(module: nn.Module, rank: int) -> LowRankDelta:
    delta = LowRankDelta(module.weight.detach(), rank)
    parametrize.register_parametrization(module, "weight", delta)
    return delta


def base_weight(module: nn.Module) -> torch.Tensor:
    """The trainable/float tensor under ``weight``: the original when parametrized, else the weight."""
    return module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight


def merge_low_rank(module: nn.Module) -> None:
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
