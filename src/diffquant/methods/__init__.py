"""Quantization methods: each a short recipe over the shared core (wrap, calibrate, reconstruct, train)."""

from __future__ import annotations

from .base import Method, QuantJob
from .rtn import RTN

METHODS: dict[str, Method] = {m.name: m for m in (RTN(),)}

__all__ = ["METHODS", "Method", "QuantJob"]
