"""Architecture knowledge, one adapter per denoiser family.

An adapter names what the methods need and nothing else: the reconstruction blocks, the layers
fed by a skip concatenation (and the channel split), the time-dependent projections and how to run
them alone (EMF's precalculation), the first and last layers, which attention processors to swap,
where the timestep argument is and its range, and the pipeline arguments its sampling needs.
This file holds the base class, the registry (``ADAPTERS``, ``register_adapter``, ``get_adapter``) and helpers the
families share; each family lives in its own module (``unet.py``, ``sd3.py``, ``flux.py``, ``pixart.py``: PixArt and
SANA, ``unet2d.py``) and joins ``ADAPTERS`` with ``@register_adapter`` when ``diffquant.models`` is imported.
"""

from __future__ import annotations

import inspect
import logging
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class DenoiserAdapter:
    """Generic fallback: every Linear/Conv2d is a unit of its own; no skips, no time layers."""

    family = "generic"
    model_class: str | None = None  # the diffusers class name this adapter knows; None: any
    block_types: tuple[str, ...] = ()
    timestep_range = 1000.0  # the denoiser's timestep argument spans [0, timestep_range] (Flux: scheduler t / 1000)
    time_condition: tuple[str, ...] = ()  # forward arguments besides the timestep that the time layers read

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return cls.supports_name(getattr(model, "class_name", type(model).__name__))  # a deployed denoiser names its class

    @classmethod
    def supports_name(cls, class_name: str) -> bool:
        return cls.model_class is None or class_name == cls.model_class

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = list(inspect.signature(model.forward).parameters)
        self._timestep_index = params.index("timestep") if "timestep" in params else None

    def layers(self) -> dict[str, nn.Module]:
        """The quantizable layers, in registration order: plain Linear and Conv2d, or what diffquant made of
        them (wrapped or converted), so a quantized model names the same layers and blocks as its float one."""
        from ..nn.base import QuantModule

        return {n: m for n, m in self.model.named_modules()
                if type(m) in (nn.Linear, nn.Conv2d) or (isinstance(m, QuantModule) and m.is_layer)}

    def blocks(self) -> list[str]:
        """Reconstruction units: named blocks, then every layer outside a block as a unit of its own."""
        blocks = [n for n, m in self.model.named_modules() if type(m).__name__ in self.block_types and n]
        top = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks if o != b)]
        singles = [n for n in self.layers() if not any(n.startswith(b + ".") for b in top)]
        return top + singles

    def initial_noise(self, pipe: Any, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Float32 initial latents in the form the pipeline's ``latents`` argument takes, row i drawn from ``seeds[i]``
        alone with the shape the pipeline would draw it in, so a row equals the pipeline's own per-prompt generator."""
        scale = getattr(pipe, "vae_scale_factor", 8)
        return _seeded_rows((self.model.config.in_channels, height // scale, width // scale), seeds)

    def skip_splits(self) -> dict[str, list[int]]:
        """Layer name -> [deep channels, skip channels] for layers fed by a raw skip concatenation."""
        return {}

    def time_layers(self) -> list[str]:
        """Layers whose output depends only on the timestep (and per-prompt pooled conditioning)."""
        return []

    def io_layers(self) -> list[str]:
        return []

    def attention_modules(self) -> dict[str, str]:
        """Attention module name -> 'standard' | 'joint' (which quantized processor replaces its own)."""
        from diffusers.models.attention_processor import Attention

        kinds = {"AttnProcessor2_0": "standard", "AttnProcessor": "standard", "JointAttnProcessor2_0": "joint"}
        found = {}
        for name, module in self.model.named_modules():
            if isinstance(module, Attention):
                kind = kinds.get(type(module.processor).__name__)
                if kind is None:
                    logger.warning("attention %s uses %s; its matmuls stay float", name, type(module.processor).__name__)
                else:
                    found[name] = kind
        return found

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Run only the time-dependent layers for timesteps ``t`` (denoiser-argument units) and the flat
        ``time_condition`` tensors ``cond`` (one row per timestep): EMF fills its lookup tables this way."""
        raise ValueError(f"time precalculation does not support {type(self.model).__name__} yet; use another method")

    def sampling_extras(self, pipe) -> dict:
        """Pipeline arguments this family needs by default (``SamplingSettings.extras``; given extras win)."""
        return {}

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The timestep argument of a forward call, or None when the model has none."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if self._timestep_index is not None and len(args) > self._timestep_index:
            return args[self._timestep_index]
        return None

    # -- the denoiser call, flattened to named tensors (export and deployed runtimes) -------------
    input_names: tuple[str, ...] = ()
    unbatched_inputs: tuple[str, ...] = ()  # inputs without a batch axis (Flux's position ids)
    dynamic_batch_export = True  # False: torch.export pins the batch (a reshape of the family's own code needs it)

    def example_inputs(self, batch: int = 2, size: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
        """Named example tensors of one denoiser call (``input_names`` order); ``size`` is the latent side."""
        raise ValueError(f"no export support for {type(self.model).__name__}; supported: UNet2DConditionModel, SD3Transformer2DModel")

    @classmethod
    def flat_inputs(cls, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The diffusers call ``denoiser(*args, **kwargs)`` as ``{input name: tensor}`` (timestep as float [B])."""
        raise ValueError(f"{cls.__name__} names no denoiser inputs")

    def call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the (torch) denoiser on ``flat_inputs``-style named tensors; returns the prediction."""
        raise ValueError(f"{type(self).__name__} names no denoiser inputs")

    def describe(self) -> dict:
        return {
            "family": self.family,
            "blocks": len(self.blocks()),
            "layers": len(self.layers()),
            "skip_splits": self.skip_splits(),
            "time_layers": len(self.time_layers()),
        }


ADA_NORMS = ("AdaLayerNormZero", "AdaLayerNormContinuous", "SD35AdaLayerNormZeroX", "AdaLayerNormZeroSingle")


def run_ada_norms(model: nn.Module, temb: torch.Tensor) -> None:
    """Every adaLN modulation of ``model`` on the time embedding ``temb`` (SD3, Flux: ``linear(silu(temb))``)."""
    for module in model.modules():
        if type(module).__name__ in ADA_NORMS and getattr(module, "linear", None) is not None:
            module.linear(module.silu(temb))


def _batched_timestep(t, sample: torch.Tensor) -> torch.Tensor:
    """The timestep as float32 [B] (pipelines pass a 0-d tensor, a [B] tensor or a number)."""
    t = torch.as_tensor(t, device=sample.device).float().flatten()
    return t.expand(sample.shape[0]) if t.numel() == 1 else t


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


ADAPTERS: list[type[DenoiserAdapter]] = []  # filled by @register_adapter as diffquant.models imports each family


def register_adapter(cls: type[DenoiserAdapter]) -> type[DenoiserAdapter]:
    """Class decorator: ``get_adapter`` considers ``cls`` (a family module registers its adapter on import)."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def _seeded_rows(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """[len(seeds), *shape] standard normal, row i from a CPU generator seeded with ``seeds[i]``."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def get_adapter(model: nn.Module, warn: bool = True) -> DenoiserAdapter:
    """The adapter for ``model``'s family; unknown classes get generic Linear/Conv2d wrapping."""
    for cls in ADAPTERS:
        if cls.supports(model):
            return cls(model)
    if warn:
        logger.warning(
            "no diffquant adapter for %s: falling back to generic Linear/Conv2d wrapping "
            "(no block reconstruction units, shortcut splits or time layers)", type(model).__name__
        )
    return DenoiserAdapter(model)


def get_denoiser(pipe_or_denoiser) -> nn.Module:
    """The denoiser of a diffusers pipeline (``unet`` or ``transformer``), or the module itself."""
    if isinstance(pipe_or_denoiser, nn.Module):
        return pipe_or_denoiser
    for attr in ("unet", "transformer"):
        module = getattr(pipe_or_denoiser, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(pipe_or_denoiser).__name__} has no `unet` or `transformer` component to quantize")


def adapter_class(class_name: str) -> type[DenoiserAdapter]:
    """The adapter class for a denoiser class name (a deployed denoiser has no torch model to inspect)."""
    return next((cls for cls in ADAPTERS if cls.supports_name(class_name)), DenoiserAdapter)


def matches_any(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch(name, p) for p in patterns)
