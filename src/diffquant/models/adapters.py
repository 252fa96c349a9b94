"""Architecture knowledge, one adapter per denoiser family.

An adapter names what the methods need and nothing else: the reconstruction blocks, the layers
fed by a skip concatenation (and the channel split), the time-dependent projections, the first
and last layers, which attention processors to swap, and where the timestep argument is.
"""

from __future__ import annotations

import inspect
import logging
from fnmatch import fnmatch

import torch
from torch import nn

logger = logging.getLogger(__name__)


class DenoiserAdapter:
    """Generic fallback: every Linear/Conv2d is a unit of its own; no skips, no time layers."""

    family = "generic"
    block_types: tuple[str, ...] = ()

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return True

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

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The timestep argument of a forward call, or None when the model has none."""
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if self._timestep_index is not None and len(args) > self._timestep_index:
            return args[self._timestep_index]
        return None

    def describe(self) -> dict:
        return {
            "family": self.family,
            "blocks": len(self.blocks()),
            "layers": len(self.layers()),
            "skip_splits": self.skip_splits(),
            "time_layers": len(self.time_layers()),
        }


class UNet2DConditionAdapter(DenoiserAdapter):
    """UNet2DConditionModel: SD 1.x/2.x, and SDXL (``text_time`` added conditioning, deeper transformers)."""

    family = "unet2d-condition"
    block_types = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "UNet2DConditionModel"

    def skip_splits(self) -> dict[str, list[int]]:
        """Up-block ResNets see cat([deep, skip]); their 1x1 ``conv_shortcut`` reads the raw concatenation."""
        m = self.model
        if m.mid_block is not None:
            prev = m.mid_block.resnets[-1].out_channels
        else:
            prev = m.down_blocks[-1].resnets[-1].out_channels
        splits = {}
        for i, block in enumerate(m.up_blocks):
            for j, resnet in enumerate(block.resnets):
                deep = prev if j == 0 else block.resnets[j - 1].out_channels
                skip = resnet.in_channels - deep
                if skip > 0 and resnet.conv_shortcut is not None:
                    splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = [deep, skip]
            prev = block.resnets[-1].out_channels
        return splits

    def time_layers(self) -> list[str]:
        heads = ("time_embedding.", "add_embedding.", "class_embedding.")
        return [n for n in self.layers() if n.startswith(heads) or n.endswith(".time_emb_proj")]

    def io_layers(self) -> list[str]:
        return [n for n in ("conv_in", "conv_out") if n in self.layers()]


class SD3TransformerAdapter(DenoiserAdapter):
    """SD3Transformer2DModel (MMDiT): blocks are the joint transformer blocks; adaLN modulations are time layers."""

    family = "sd3-transformer"
    block_types = ("JointTransformerBlock",)
    _ada_norms = ("AdaLayerNormZero", "AdaLayerNormContinuous", "SD35AdaLayerNormZeroX", "AdaLayerNormZeroSingle")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "SD3Transformer2DModel"

    def time_layers(self) -> list[str]:
        ada = {n for n, m in self.model.named_modules() if type(m).__name__ in self._ada_norms}
        return [n for n in self.layers() if n.startswith("time_text_embed.") or n.rsplit(".", 1)[0] in ada]

    def io_layers(self) -> list[str]:
        return [n for n in ("pos_embed.proj", "proj_out") if n in self.layers()]


ADAPTERS: tuple[type[DenoiserAdapter], ...] = (UNet2DConditionAdapter, SD3TransformerAdapter)


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


def matches_any(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch(name, p) for p in patterns)
