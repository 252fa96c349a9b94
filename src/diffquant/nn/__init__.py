"""Quantized module wrappers and model-level lifecycle helpers."""

from .attention import PROCESSORS, QuantAttnProcessor, QuantFluxAttnProcessor, QuantJointAttnProcessor, QuantSanaLinearAttnProcessor
from .base import QuantModule
from .layers import QuantConv2d, QuantLinear
from .lifecycle import quantized_layers, set_quant_enabled, set_state, states, unwrap_layer
from .state import QuantState

__all__ = [
    "PROCESSORS",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantFluxAttnProcessor",
    "QuantJointAttnProcessor",
    "QuantLinear",
    "QuantModule",
    "QuantSanaLinearAttnProcessor",
    "QuantState",
    "quantized_layers",
    "set_quant_enabled",
    "set_state",
    "states",
    "unwrap_layer",
]
