"""A denoiser call as a flat list of named tensors: what exporters trace and deployed engines are fed.

The names, example tensors and the call itself come from the family's adapter (``models/<family>.py``),
so every family an adapter knows exports without family checks here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.adapters import get_adapter


class FlatCall(nn.Module):
    """The denoiser as ``forward(*tensors in input order[, group index])`` for tracing.

    ``state`` (any object with a ``group`` attribute) receives the trailing group-index input, when given.
    """

    def __init__(self, denoiser: nn.Module, names: list[str], state: Any = None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.names = list(names)
        self.state = state
        self.adapter = get_adapter(denoiser, warn=False)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.state is not None and len(tensors) > len(self.names):
            self.state.group = tensors[-1]
        return self.adapter.call(dict(zip(self.names, tensors)))


def example_inputs(denoiser: nn.Module, batch: int = 2, size: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
    """Named example inputs of one denoiser call (float32), from its family's adapter."""
    return get_adapter(denoiser, warn=False).example_inputs(batch, size, seq_len)


__all__ = ["FlatCall", "example_inputs"]
