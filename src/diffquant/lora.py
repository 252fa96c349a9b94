"""LoRA on quantized models through diffusers' and peft's own LoRA path.

    pipe = diffquant.load("q/")                       # fake-quant, or converted to integer kernels
    pipe.load_lora_weights(lora, adapter_name="style")  # pipe.set_adapters(...), pipe.unload_lora_weights()

Every quantized layer (``QuantLinear`` / ``QuantConv2d``, ``IntLinear`` / ``IntConv2d``) keeps computing
exactly as before: peft's LoRA layer calls it as its ``base_layer``, and the LoRA branch
``B(A(x)) * scaling`` runs in float on the layer's unquantized input beside it. Nothing of the base is
re-quantized, so unloading restores the model bit for bit.

Fusing (``pipe.fuse_lora()``), our choice: on a frozen fake-quant layer the merged weight is put back on the
layer's own grid, ``W = Q(W_q + sum of the fused deltas)`` with the layer's calibrated scales (one rounding,
however many adapters are fused), so a fused model is again a plain quantized model that saves and converts
to integer kernels with no LoRA cost at run time. That quantizes the LoRA delta (a delta under half a weight
step mostly vanishes) and feeds the fused branch quantized activations, so fused images differ from unfused
ones; ``unfuse_lora()`` restores the saved integer codes exactly. Converted (integer) layers refuse to fuse:
fuse on the fake-quant model, then convert.

Registration: peft wraps only the layer types it knows; its (experimental) custom-module API,
``LoraConfig._register_custom_module``, maps other types to user LoRA layers per config. ``enable()`` makes
every ``LoraConfig`` created afterwards carry diffquant's mapping (diffusers builds its own configs inside
``load_lora_weights``). ``import diffquant`` calls ``install()``, which runs ``enable()`` as soon as peft is
imported (right away if it already is): peft costs seconds to import, so a model that never sees a LoRA never
pays for it. Plain LoRA only (no DoRA or other variants) on quantized layers.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from .hf_quantizer import after_import

FUSE_CONVERTED = ("fuse_lora on a converted (integer) layer is not supported: fuse on the fake-quant model "
                  "(diffquant.load without convert), then diffquant.convert it, or keep the LoRA unfused")


def enable() -> None:
    """Make every peft ``LoraConfig`` created from now on wrap diffquant's quantized layers (idempotent).

    Needed only for configs built before ``import diffquant`` imported peft; ``install()`` calls it otherwise.
    """
    from peft import LoraConfig

    if getattr(LoraConfig, "_diffquant_layers", None):
        return
    if not hasattr(LoraConfig, "_register_custom_module"):
        raise ImportError("this peft has no LoraConfig._register_custom_module; install peft>=0.14 for LoRA on quantized models")
    layers = lora_layers()
    post_init = LoraConfig.__post_init__

    @functools.wraps(post_init)
    def __post_init__(self, *args: Any, **kwargs: Any) -> None:
        post_init(self, *args, **kwargs)
        self._register_custom_module(layers)

    LoraConfig.__post_init__ = __post_init__
    LoraConfig._diffquant_layers = layers


def _enable_after_import(peft: Any) -> None:
    try:
        enable()
    except Exception as e:  # peft itself stays usable; only LoRA on quantized layers is missing
        warnings.warn(f"diffquant: LoRA on quantized layers is unavailable ({e})", stacklevel=2)


def install() -> None:
    """Run ``enable()`` when peft gets imported, or now if it already is (``import diffquant`` calls this); the same
    for the Flux loader's widening check (``_converted_layers_kept_out``) when diffusers' LoRA loaders load."""
    after_import("peft", _enable_after_import)
    after_import("diffusers.loaders.lora_pipeline", _converted_layers_kept_out)


def _converted_layers_kept_out(lora_pipeline: Any) -> None:
    """diffusers' Flux loader (``FluxLoraLoaderMixin._maybe_expand_lora_state_dict``) reads every target's float
    weight from the state dict (``<layer>.weight``) to zero-pad LoRAs narrower than it (Control LoRAs); a converted
    layer holds integer codes (``qweight``) instead, so that lookup fails. The targets that are converted layers are
    checked here (the LoRA's input width must be the layer's: nothing is padded) and kept out of that step."""
    mixin = getattr(lora_pipeline, "FluxLoraLoaderMixin", None)
    original = getattr(mixin, "_maybe_expand_lora_state_dict", None)
    if original is None or getattr(original, "_diffquant", False):
        return

    def expand(cls: Any, transformer: Any, lora_state_dict: dict) -> dict:
        from .runtime import IntLayer

        prefix, held = f"{cls.transformer_name}.", {}
        for key in [k for k in lora_state_dict if k.startswith(prefix) and k.endswith(".lora_A.weight")]:
            name = key[len(prefix):-len(".lora_A.weight")]
            try:
                layer = transformer.get_submodule(name)
            except AttributeError:
                continue
            layer = getattr(layer, "base_layer", layer)  # a LoRA already loaded wraps it
            if isinstance(layer, IntLayer):
                if lora_state_dict[key].shape[1] != layer.weight_shape[1]:
                    raise ValueError(f"{name}: the LoRA takes {lora_state_dict[key].shape[1]} inputs, the converted layer "
                                     f"{layer.weight_shape[1]}; widening LoRAs (Control) need the float model")
                held[key] = lora_state_dict.pop(key)
        out = original.__func__(cls, transformer, lora_state_dict)
        out.update(held)
        return out

    expand._diffquant = True
    mixin._maybe_expand_lora_state_dict = classmethod(expand)


@functools.cache
def lora_layers() -> dict[type, type]:
    """diffquant layer class -> its peft LoRA layer class (the mapping ``enable()`` registers on every config)."""
    import torch
    from peft.tuners.lora import layer as peft_lora
    from peft.tuners.tuners_utils import check_adapters_to_merge
    from torch import nn

    from .nn import QuantConv2d, QuantLinear, QuantState
    from .runtime import IntConv2d, IntLinear

    class QuantLoraLayer:
        """Shared part: plain LoRA only, and fusing onto the base layer's grid (module docstring)."""

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
            init = getattr(config, "init_lora_weights", True)
            if super().resolve_lora_variant(config=config, **kwargs) is not None or init not in (True, False, "gaussian"):
                raise ValueError(f"{type(self.get_base_layer()).__name__}: diffquant's quantized layers take plain LoRA only "
                                 "(no DoRA or other variant, no init from the base weight); apply it to the float model")
            return None

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
            if not names:
                return
            base = self.get_base_layer()
            if base.state is QuantState.CONVERTED:
                raise ValueError(FUSE_CONVERTED)
            if base.state is not QuantState.FROZEN:
                raise ValueError(f"fuse_lora needs frozen quantized layers, not {base.state.value} ones; "
                                 "finish quantization (or diffquant.load the saved model) first")
            if any(self.lora_bias[n] for n in names):
                raise ValueError("fuse_lora of an adapter with lora_bias is not supported on quantized layers; keep it unfused")
            if not self.merged_adapters:
                self._unmerged_codes = base.saved_weight_codes()
            merged = self.merged_adapters + names
            with torch.no_grad():
                w = base.weight_quantizer.dequantize(self._unmerged_codes).float()
                for n in merged:
                    w = w + self.get_delta_weight(n).float()
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs in the fused weight of {type(base).__name__}: adapter {names} seems broken")
                base.weight.copy_(base.weight_quantizer(w).to(base.weight.dtype))
            self.merged_adapters = merged

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
                return
            base = self.get_base_layer()
            if base.state is QuantState.CONVERTED:
                raise ValueError("this LoRA was fused before diffquant.convert, so the integer codes hold it; "
                                 "reload the model to remove it")
            base.restore_weight_codes(self._unmerged_codes)
            self.merged_adapters = []
            del self._unmerged_codes

    class QuantLoraLinear(QuantLoraLayer, peft_lora.Linear):
        """peft's LoRA Linear over a ``QuantLinear`` or ``IntLinear``."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

    class QuantLoraConv2d(QuantLoraLayer, peft_lora.Conv2d):
        """peft's LoRA Conv2d over a ``QuantConv2d`` or ``IntConv2d``."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_channels, module.out_channels

        def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
            # peft builds the LoRA convolutions as type(base_layer)(...): hand it a plain Conv2d of the same
            # geometry, device and dtype (an empty weight) while it does
            real = self.base_layer
            w = real.weight
            twin = nn.Conv2d(real.in_channels, real.out_channels, real.kernel_size, real.stride, real.padding,
                             real.dilation, real.groups, bias=real.bias is not None, device="meta")
            twin.weight = nn.Parameter(w.new_empty((0,) * w.dim()), requires_grad=False)
            self.base_layer = twin
            try:
                super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
            finally:
                self.base_layer = real

    return {QuantLinear: QuantLoraLinear, IntLinear: QuantLoraLinear, QuantConv2d: QuantLoraConv2d, IntConv2d: QuantLoraConv2d}


__all__ = ["FUSE_CONVERTED", "enable", "install", "lora_layers"]
