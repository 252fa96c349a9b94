"""PEP 562 lazy attributes for a package: a public name, or a submodule, imported at its first use.

The package root and ``diffquant.evaluation`` keep ``import diffquant`` free of torch, diffusers and
torchmetrics this way, so ``diffquant --help`` answers fast while every public name stays where it was.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def lazy_attribute(package: str, api: Mapping[str, str], namespace: dict[str, Any], name: str) -> Any:
    """``name`` from the submodule ``api`` maps it to, else the submodule ``package.name``; cached in ``namespace``
    (the package's ``globals()``) so the next access is a plain lookup. AttributeError when neither exists."""
    if name in api:
        value = getattr(importlib.import_module(f"{package}.{api[name]}"), name)
    elif name.startswith("__"):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    else:
        try:
            value = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    namespace[name] = value
    return value


__all__ = ["lazy_attribute"]
