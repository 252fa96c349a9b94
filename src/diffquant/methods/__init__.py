"""Quantization methods: each a short recipe over the shared core (wrap, calibrate, reconstruct, train).

A method lives in ``methods/<module>.py`` as a ``Method`` subclass; importing this package registers
those whose module is present in ``diffquant.registry``, so ``QuantConfig(method=...)`` accepts
exactly the installed recipes.
"""

from __future__ import annotations

import importlib

from ..registry import METHODS, register_method
from .base import Method, QuantJob

_RECIPES = {"rtn": ("rtn", "RTN"), "qdiffusion": ("qdiffusion", "QDiffusion"), "pcr": ("pcr", "PCR"), "emf": ("emf", "EMF")}


def _discover() -> None:
    for module, cls in _RECIPES.values():
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{module}":
                continue
            raise
        register_method(getattr(mod, cls)())


_discover()

__all__ = ["METHODS", "Method", "QuantJob"]
