"""diffquant: quantize text-to-image diffusion models to low bit widths, faithfully, and run them fast.

    import diffquant
    pipe = diffquant.quantize(pipe, diffquant.QuantConfig(method="rtn", wbits=8, abits=8), calibration=prompts)
    diffquant.save(pipe, "q/")
    pipe = diffquant.load("q/")

``import diffquant`` loads nothing heavy: each public name (and each submodule, ``diffquant.runtime``...) is
imported at its first use (PEP 562), so the command line answers ``--help`` without torch or diffusers. The
registry's tables import their providers (methods, the mini zoo, the runtime's converted layers) at their
first read, so every lookup sees what an eager import used to register.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import registry as _registry
from .lazy import lazy_attribute

__version__ = "0.1.0"

# The modules whose import fills diffquant.registry: recipes, bundled models and prompt sets, converted layers,
# deployment engines.
_registry.provided_by(f"{__name__}.methods", f"{__name__}.zoo", f"{__name__}.runtime", f"{__name__}.deployment")

# public name -> the submodule that defines it
_API: dict[str, str] = {
    "quantize": "api",
    "CalibrationSet": "calibration", "record_denoiser_calls": "calibration",
    "CalibrationConfig": "config", "QuantConfig": "config", "recipe_config": "recipes",
    "QuantState": "nn", "quantized_layers": "nn", "set_quant_enabled": "nn", "set_state": "nn",
    "QuantSpec": "quant", "TimestepGroups": "quant",
    "load": "deployment",
    "save": "serialization",
    "average_bits": "bits", "get_denoiser": "wrap", "quant_record": "wrap",
    "convert": "runtime",  # real integer inference, diffquant.runtime
}

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from .api import quantize
    from .calibration import CalibrationSet, record_denoiser_calls
    from .config import CalibrationConfig, QuantConfig
    from .recipes import recipe_config
    from .deployment import load
    from .nn import QuantState, quantized_layers, set_quant_enabled, set_state
    from .quant import QuantSpec, TimestepGroups
    from .runtime import convert  # noqa: F401
    from .serialization import save
    from .bits import average_bits
    from .wrap import get_denoiser, quant_record


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _API, globals(), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


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
    "recipe_config",
    "record_denoiser_calls",
    "save",
    "set_quant_enabled",
    "set_state",
]

from diffquant import hf_quantizer as _hf; _hf.install()
from diffquant import lora as _lora; _lora.install()  # LoRA (peft) on quantized layers, once peft is imported
