"""diffquant: quantize text-to-image diffusion models to low bit widths, faithfully, and run them fast.

    import diffquant
    pipe = diffquant.quantize(pipe, diffquant.QuantConfig(method="rtn", wbits=8, abits=8), calibration=prompts)
    diffquant.save(pipe, "q/")
    pipe = diffquant.load("q/")
"""

__version__ = "0.1.0"

from .api import quantize
from .calibration import CalibrationSet, record_denoiser_calls
from .config import CalibrationConfig, QuantConfig
from .nn import QuantState, quantized_layers, set_quant_enabled, set_state
from .quant import QuantSpec, TimestepGroups
from .deployment import load
from .serialization import save
from .wrap import average_bits, get_denoiser, quant_record
from .runtime import convert  # noqa: F401  (real integer inference, diffquant.runtime)

try:  # the bundled mini models register their defaults and prompt sets (diffquant.registry)
    from . import zoo  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.zoo":
        raise

__all__ = [
    "CalibrationConfig",
    "CalibrationSet",
    "QuantConfig",
    "QuantSpec",
    "QuantState",
    "TimestepGroups",
    "average_bits",
    "get_denoiser",
    "load",
    "quant_record",
    "quantize",
    "quantized_layers",
    "record_denoiser_calls",
    "save",
    "set_quant_enabled",
    "set_state",
]

from diffquant import hf_quantizer as _hf; _hf.install()
