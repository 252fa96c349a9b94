"""The visible lifecycle of a quantized module."""

from __future__ import annotations

from enum import Enum


class QuantState(str, Enum):
    """wrapped -> calibrating -> (learning) -> frozen -> converted.

    - ``wrapped``: quantizers attached, behaviour is exactly float.
    - ``calibrating``: activation observers record statistics; outputs stay float.
    - ``learning``: fake-quantized forward with trainable quantization parameters (AdaRound, LSQ, QAT).
    - ``frozen``: parameters fixed; fake-quantized forward with cached quantized weights.
    - ``converted``: integer kernels (``diffquant.runtime``).
    """

    WRAPPED = "wrapped"
    CALIBRATING = "calibrating"
    LEARNING = "learning"
    FROZEN = "frozen"
    CONVERTED = "converted"
