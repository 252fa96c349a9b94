"""Quantization methods: each a short recipe over the shared core (wrap, calibrate, reconstruct, train).

A method lives in ``methods/<module>.py`` as a ``Method`` subclass; the registry lists those whose
module is present, so ``QuantConfig(method=...)`` accepts exactly the installed recipes.
"""

from __future__ import annotations

import importlib

from .base import Method, QuantJob

_RECIPES = {"rtn": ("rtn", "RTN"), "qdiffusion": ("qdiffusion", "QDiffusion"), "pcr": ("pcr", "PCR"), "emf": ("emf", "EMF")}


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for name, (module, cls) in _RECIPES.items():
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{module}":
                continue
            raise
        found[name] = getattr(mod, cls)()
    return found


METHODS: dict[str, Method] = _discover()

__all__ = ["METHODS", "Method", "QuantJob"]
