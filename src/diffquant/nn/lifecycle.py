"""Model-level views and transitions over every ``QuantModule`` in a denoiser."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from torch import nn

from .base import QuantModule
from .state import QuantState


def quantized_layers(model: nn.Module) -> dict[str, QuantModule]:
    """Name -> quantized module (layers and attention processors), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}


def set_state(model: nn.Module, state: QuantState | str, names: Iterable[str] | None = None, seed: int = 0,
              fit_activations_later: bool = False) -> None:
    """Move the named quantized modules (all if ``names`` is None) to ``state``; every module's move is checked
    (``QuantModule.set_state``) before any module moves."""
    state = QuantState(state)
    layers = quantized_layers(model)
    selected = layers if names is None else {n: layers[n] for n in names}
    for module in selected.values():
        module.check_move(state, fit_activations_later)
    for i, module in enumerate(selected.values()):
        module.set_state(state, seed=seed + 1000 * i, fit_activations_later=fit_activations_later)


def unwrap_layer(model: nn.Module, name: str) -> nn.Module:
    """Put the plain float layer back in place of quantized layer ``name`` (same parameters); returns it."""
    layer = model.get_submodule(name)
    if not hasattr(layer, "to_float"):
        raise ValueError(f"{name} is not a quantized Linear/Conv2d; see diffquant.quantized_layers(model)")
    plain = layer.to_float()
    model.set_submodule(name, plain)
    return plain


def set_quant_enabled(
    model: nn.Module, enabled: bool, names: Iterable[str] | None = None, weights: bool = True, activations: bool = True
) -> None:
    """Switch fake quantization of the named modules (all if None) on or off; off is exact float."""
    layers = quantized_layers(model)
    names = None if names is None else set(names)
    unknown = (names or set()) - set(layers)
    if unknown:
        raise KeyError(f"not quantized layers: {sorted(unknown)[:5]}; see diffquant.quantized_layers(model)")
    for name, module in layers.items():
        if names is not None and name not in names:
            continue
        if weights:
            module.weight_quant_enabled = enabled
        if activations:
            module.act_quant_enabled = enabled


def states(model: nn.Module) -> Counter:
    """How many quantized modules are in each lifecycle state."""
    return Counter(m.state.value for m in quantized_layers(model).values())
