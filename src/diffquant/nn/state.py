"""The lifecycle of a quantized module: an ordered state with the moves it allows."""

from __future__ import annotations

from enum import Enum


class QuantState(str, Enum):
    """wrapped < calibrating < learning < frozen < converted.

    - ``wrapped``: quantizers attached, behaviour is exactly float.
    - ``calibrating``: activation observers record statistics; outputs stay float.
    - ``learning``: fake-quantized forward with trainable quantization parameters (AdaRound, LSQ, QAT).
    - ``frozen``: parameters fixed; the weight itself holds its fake-quantized values (one copy).
    - ``converted``: integer kernels (``diffquant.runtime``); a converted module never moves again.

    ``TRANSITIONS`` lists the moves; entering ``learning`` or ``frozen`` further needs every activation
    quantizer calibrated (``QuantModule.set_state`` checks it), since an uncalibrated one would quantize
    with a scale of 1.0.
    """

    WRAPPED = "wrapped"
    CALIBRATING = "calibrating"
    LEARNING = "learning"
    FROZEN = "frozen"
    CONVERTED = "converted"

    @property
    def rank(self) -> int:
        return _ORDER.index(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        return self.rank <= other.rank

    def can_move_to(self, target: QuantState) -> bool:
        return target in TRANSITIONS[self]


_ORDER = list(QuantState)

_W, _C, _L, _F, _X = _ORDER
# The moves the methods make. Forward, with the shortcuts: wrapped -> learning (weight-only reconstruction, QAT,
# PCR's progressive calibration, which fits activations as it goes), wrapped -> frozen (weight-only RTN;
# loading), calibrating -> frozen (RTN). One move back: frozen -> learning (training a frozen model further).
# Staying put re-enters the state (re-freezing re-quantizes the weight, the identity; reconstruction moves every
# module to learning, some already there). ``converted`` comes from diffquant.convert only, and is final.
TRANSITIONS: dict[QuantState, frozenset[QuantState]] = {
    _W: frozenset({_W, _C, _L, _F}),
    _C: frozenset({_C, _L, _F}),
    _L: frozenset({_L, _F}),
    _F: frozenset({_L, _F, _X}),
    _X: frozenset({_X}),
}
