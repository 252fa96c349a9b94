"""Quantizer math: specs, affine fake quantization with STE, range observers, timestep groups."""

from .affine import fake_quantize, qrange, round_ste
from .quantizers import ActivationQuantizer, WeightQuantizer
from .spec import QuantSpec
from .timestep import TimestepContext, TimestepGroups

__all__ = [
    "ActivationQuantizer",
    "QuantSpec",
    "TimestepContext",
    "TimestepGroups",
    "WeightQuantizer",
    "fake_quantize",
    "qrange",
    "round_ste",
]
