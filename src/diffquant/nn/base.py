"""Shared behaviour of quantized modules: lifecycle transitions and on/off switches."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..quant import ActivationQuantizer, WeightQuantizer
from .smoothing import fit_smoothing
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
        self.lowrank = None  # a LowRankBranch (nn.lowrank) when QuantConfig.lowrank_rank gives this layer one

    def activation_quantizers(self) -> list[ActivationQuantizer]:
        return [m for m in self.children() if isinstance(m, ActivationQuantizer)]

    def set_state(self, state: QuantState | str, seed: int = 0, fit_activations_later: bool = False) -> None:
        """Move to ``state`` (``QuantState.TRANSITIONS``): calibrating starts observers; learning/frozen finish them.

        Raises ValueError naming the fix for a move the lifecycle does not allow, and for entering ``learning``/
        ``frozen`` while an activation quantizer was never calibrated, unless ``fit_activations_later``: the caller
        fits every group itself before it is used (PCR's progressive calibration, on quantized weights).
        """
        state = QuantState(state)
        self.check_move(state, fit_activations_later)
        self._apply_state(state, seed)

    def check_move(self, state: QuantState, fit_activations_later: bool = False) -> None:
        """Raise (naming the fix) unless ``set_state(state)`` is a lifecycle move from the current state."""
        if state is QuantState.CONVERTED:
            raise ValueError("convert with diffquant.convert(model); set_state cannot produce integer modules")
        if not self.state.can_move_to(state):
            allowed = ", ".join(s.value for s in QuantState if self.state.can_move_to(s))
            raise ValueError(f"{self.state.value} -> {state.value} is not a lifecycle move (from {self.state.value}: "
                             f"{allowed}); to calibrate again, wrap the float model again (wrap_denoiser)")
        if state in (QuantState.LEARNING, QuantState.FROZEN) and not fit_activations_later:
            pending = [q for q in self.activation_quantizers() if q.mode != "observe" and not q.calibrated]
            if pending:
                raise ValueError(
                    f"{pending[0].name or type(self).__name__}: activations were never calibrated, so {self.state.value} -> "
                    f"{state.value} would quantize them with scale 1.0; set_state(model, 'calibrating') and run calibration "
                    "data first (or quantize weights only: abits=None)")

    def restore_state(self, state: QuantState | str) -> None:
        """Enter ``state`` with parameters loaded from a saved model (they count as calibrated)."""
        for q in self.activation_quantizers():
            q.calibrated = True
        self._apply_state(QuantState(state), 0)

    def _apply_state(self, state: QuantState, seed: int) -> None:
        for i, q in enumerate(self.activation_quantizers()):
            if state is QuantState.WRAPPED:
                q.mode = "off"
                q.observer = None
            elif state is QuantState.CALIBRATING:
                q.start_observing(seed=seed + i)
            else:
                if q.mode == "observe":
                    if q.smoothing:
                        fit_smoothing(self)  # before the weight is quantized or learned
                    q.finish_observing()
                q.mode = "quantize"
        if state is QuantState.FROZEN and self.weight_quantizer is not None:
            self._quantize_weight_in_place()
        self.state = state

    @torch.no_grad()
    def _quantize_weight_in_place(self) -> None:
        """Freezing: the weight becomes its fake-quantized values, so a frozen model holds one weight copy.

        The values are those the learning forward computes (honouring a learned rounding, which is then
        dropped), so frozen outputs equal fake quantization of the float weight bit for bit; re-freezing is
        the identity (``fake_quantize`` of a grid value returns it), so saving and loading stay bit-exact.
        """
        self.weight.copy_(self.weight_quantizer(self.weight))
        self.weight_quantizer.rounding = None

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight a forward uses, in the compute dtype ``dtype``: fake-quantized on the fly while learning, the
        weight itself otherwise (frozen: it already holds the grid values, so switching weight quantization off
        cannot restore float). Learning may keep the weight in float32 (QAT's master copies) under a half-precision
        model; the cast is then the only copy in the compute dtype."""
        w = self.weight
        if self.weight_quantizer is not None and self.weight_quant_enabled and self.state is QuantState.LEARNING:
            w = self.weight_quantizer(w)
        return w.to(dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def _quantize_activation(self, q: ActivationQuantizer | None, x: torch.Tensor) -> torch.Tensor:
        """The input the layer's float op sees: smoothed (always: the weight holds the factors), then fake-quantized."""
        if q is None:
            return x
        x = q.smooth_input(x)
        if q.mode == "off":
            return x
        if q.mode == "observe" or self.act_quant_enabled:
            return q(x)
        return x

    def _add_branch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` plus the low-rank float branch on the layer's unquantized, unsmoothed input ``x`` (if it has one)."""
        return y if self.lowrank is None else y + self.lowrank(x).to(y.dtype)

    # -- saving: each module says how it is stored, so serialization needs no module classes ----
    def saved_weight_codes(self) -> torch.Tensor | None:
        """Integer codes saved in place of the float weight (``<name>.weight_codes``); None saves the state dict as is."""
        return None if self.weight_quantizer is None else self.weight_quantizer.integer_codes(self.weight)

    @torch.no_grad()
    def restore_weight_codes(self, codes: torch.Tensor) -> None:
        """Inverse of ``saved_weight_codes``: the weight becomes exactly the grid values the codes name."""
        self.weight.copy_(self.weight_quantizer.dequantize(codes).to(self.weight.dtype))

    @torch.no_grad()
    def bake_rounding(self) -> None:
        """Make the weight the grid values its learned rounding chose, then drop the rounding (end of AdaRound)."""
        self.restore_weight_codes(self.weight_quantizer.integer_codes(self.weight))
        self.weight_quantizer.rounding = None

    def converted_form(self) -> dict | None:
        """JSON that rebuilds this module from the wrapped model's one at load (``diffquant.registry.CONVERTED``
        keyed by its ``kind``); None when the wrapped model's own module is this module."""
        return None
