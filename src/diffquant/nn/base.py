"""Shared behaviour of quantized modules: lifecycle transitions and on/off switches."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..quant import ActivationQuantizer, WeightQuantizer
from .state import QuantState


class QuantModule(nn.Module):
    """Base of every module diffquant inserts; holds weight and/or activation quantizers.

    ``weight_quant_enabled``/``act_quant_enabled`` switch fake quantization off for sensitivity
    studies and block reconstruction without touching the calibrated parameters.
    """

    weight_quantizer: WeightQuantizer | None
    # True for the quantized form of a Linear/Conv2d (wrapped or converted), False for attention processors.
    is_layer: ClassVar[bool] = False

    def _init_quant(self) -> None:
        self.state = QuantState.WRAPPED
        self.weight_quant_enabled = True
        self.act_quant_enabled = True
        self._cached_weight: torch.Tensor | None = None

    def activation_quantizers(self) -> list[ActivationQuantizer]:
        return [m for m in self.children() if isinstance(m, ActivationQuantizer)]

    def set_state(self, state: QuantState, seed: int = 0) -> None:
        """Move to ``state``: calibrating starts observers; learning/frozen finish them."""
        state = QuantState(state)
        if state is QuantState.CONVERTED:
            raise ValueError("convert with diffquant.convert(model); set_state cannot produce integer modules")
        for i, q in enumerate(self.activation_quantizers()):
            if state is QuantState.WRAPPED:
                q.mode = "off"
                q.observer = None
            elif state is QuantState.CALIBRATING:
                q.start_observing(seed=seed + i)
            else:
                if q.mode == "observe":
                    q.finish_observing()
                q.mode = "quantize"
        self._cached_weight = None
        if state is QuantState.FROZEN and self.weight_quantizer is not None:
            with torch.no_grad():
                self._cached_weight = self.weight_quantizer(self.weight).detach()
        self.state = state

    def _weight(self) -> torch.Tensor:
        if self.weight_quantizer is None or not self.weight_quant_enabled:
            return self.weight
        if self.state is QuantState.FROZEN and self._cached_weight is not None:
            return self._cached_weight
        if self.state in (QuantState.LEARNING, QuantState.FROZEN):
            return self.weight_quantizer(self.weight)
        return self.weight

    def _quantize_activation(self, q: ActivationQuantizer | None, x: torch.Tensor) -> torch.Tensor:
        if q is None or q.mode == "off":
            return x
        if q.mode == "observe" or self.act_quant_enabled:
            return q(x)
        return x

    def refresh_weight_cache(self) -> None:
        """Recompute the cached quantized weight after the float weight or its scales changed."""
        if self.state is QuantState.FROZEN:
            self.set_state(QuantState.FROZEN)
