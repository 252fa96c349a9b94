"""Named recipes: QuantConfig fields chosen together for a result, over the registered methods.

A method is one paper's procedure; a recipe says which of the shared parts to combine with it. ``faithful``
(4-bit weights about as faithful as 8-bit ones, docs/recipes.md) is Q-Diffusion's block reconstruction
(Li et al. 2023: time step-aware calibration, shortcut splitting, BRECQ/AdaRound weights, LSQ activations)
started from MSE-searched weight ranges (the grid search of PTQ4DM/Q-Diffusion's activation observer applied to
weights), with 5x the default AdaRound iterations, and 8-bit activations scaled per group of 64 input channels at
run time (the dynamic scaling of torchao/SDNQ/SVDQuant's activation side; static per-tensor scales are the
papers'). Fields given explicitly win over the recipe's (:func:`recipe_config`).
"""

from __future__ import annotations

from typing import Any

from .config import QuantConfig

RECIPES: dict[str, dict[str, Any]] = {
    "faithful": dict(method="qdiffusion", weight_observer="mse", act_granularity="per_group", options={"preset": "faithful"}),
}


def recipe_fields(name: str) -> dict[str, Any]:
    """The QuantConfig fields of recipe ``name`` (a copy); an unknown name fails naming the recipes."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    fields = dict(RECIPES[name])
    fields["options"] = dict(fields.get("options", {}))
    return fields


def recipe_config(name: str, **fields: Any) -> QuantConfig:
    """``QuantConfig`` of recipe ``name`` (any bits) with ``fields`` on top (``options`` merged, the given ones winning)."""
    return QuantConfig(**apply_recipe(name, fields, set(fields)))


def apply_recipe(name: str, fields: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """QuantConfig keyword arguments ``fields`` with recipe ``name``'s value for every field not in ``explicit``
    (the ones a user gave); options merged, the given ones winning."""
    out = dict(fields)
    for key, value in recipe_fields(name).items():
        if key == "options":
            out["options"] = {**value, **fields.get("options", {})}
        elif key not in explicit:
            out[key] = value
    return out


__all__ = ["RECIPES", "apply_recipe", "recipe_config", "recipe_fields"]
