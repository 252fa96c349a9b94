"""Real low-bit inference: integer layers, packed int4 weights, conversion, ONNX export (DESIGN §6)."""

from .convert import convert, default_backend, is_converted, not_convertible
from .modules import BACKENDS, IntConv2d, IntLayer, IntLinear, onednn_available
from .packing import pack_int4, unpack_int4

__all__ = [
    "BACKENDS",
    "IntConv2d",
    "IntLayer",
    "IntLinear",
    "convert",
    "default_backend",
    "is_converted",
    "not_convertible",
    "onednn_available",
    "pack_int4",
    "unpack_int4",
]
