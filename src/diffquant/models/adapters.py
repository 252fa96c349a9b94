"""Architecture knowledge, one adapter per denoiser family.

An adapter names what the methods need and nothing else: the reconstruction blocks, the layers
fed by a skip concatenation (and the channel split), the time-dependent projections and how to run
them alone (EMF's precalculation), the first and last layers, which attention processors to swap,
where the timestep argument is and its range, and the pipeline arguments its sampling needs.
Families beyond the UNet and the SD3 MMDiT live in their own modules (``flux.py``, ``pixart.py``: PixArt, SANA) and
join ``ADAPTERS`` with ``register_adapter`` when ``diffquant.models`` is imported.
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


class UNet2DConditionAdapter(DenoiserAdapter):
    """UNet2DConditionModel: SD 1.x/2.x, and SDXL (``text_time`` added conditioning, deeper transformers)."""

    family = "unet2d-condition"
    model_class = "UNet2DConditionModel"
    block_types = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D")

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

    time_condition = ("added_cond_kwargs", "class_labels", "timestep_cond")

    def time_layers(self) -> list[str]:
        heads = ("time_embedding.", "add_embedding.", "class_embedding.")
        return [n for n in self.layers() if n.startswith(heads) or n.endswith(".time_emb_proj")]

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        unet = self.model
        if unet.config.addition_embed_type not in (None, "text_time") or unet.class_embedding is not None:
            raise ValueError("time precalculation supports UNets without class embeddings and with addition_embed_type None or 'text_time'")
        param = next(unet.parameters())
        proxy = torch.empty(t.shape[0], 1, device=param.device, dtype=param.dtype)
        emb = unet.time_embedding(unet.get_time_embed(sample=proxy, timestep=t), cond.get("timestep_cond"))
        added = {k.split(".", 1)[1]: v for k, v in cond.items() if k.startswith("added_cond_kwargs.")}
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=None, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        for module in unet.modules():
            if type(module).__name__ == "ResnetBlock2D" and module.time_emb_proj is not None:
                module.time_emb_proj(emb if module.skip_time_act else module.nonlinearity(emb))

    def io_layers(self) -> list[str]:
        return [n for n in ("conv_in", "conv_out") if n in self.layers()]

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        base = ("sample", "timestep", "encoder_hidden_states")
        return base + ("text_embeds", "time_ids") if self.model.config.addition_embed_type == "text_time" else base

    def example_inputs(self, batch: int = 2, size: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
        cfg, g = self.model.config, _gen()
        size = size or cfg.sample_size
        out = {"sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
               "timestep": torch.full((batch,), 500.0),
               "encoder_hidden_states": torch.randn(batch, seq_len, cfg.cross_attention_dim, generator=g)}
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + 6 size/crop ids, concatenated by add_embedding
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["text_embeds"] = torch.randn(batch, pooled, generator=g)
            out["time_ids"] = torch.tensor([[8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size]]).expand(batch, 6).contiguous()
        return out

    @classmethod
    def flat_inputs(cls, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        named = dict(zip(("sample", "timestep", "encoder_hidden_states"), args))
        named.update({k: kwargs[k] for k in ("sample", "timestep", "encoder_hidden_states") if k in kwargs})
        out = {**named, "timestep": _batched_timestep(named["timestep"], named["sample"])}
        out.update(kwargs.get("added_cond_kwargs") or {})
        return out

    def call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs} or None
        return self.model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                          added_cond_kwargs=added, return_dict=False)[0]


class SD3TransformerAdapter(DenoiserAdapter):
    """SD3Transformer2DModel (MMDiT): blocks are the joint transformer blocks; adaLN modulations are time layers."""

    family = "sd3-transformer"
    model_class = "SD3Transformer2DModel"
    block_types = ("JointTransformerBlock",)
    time_condition = ("pooled_projections",)

    def time_layers(self) -> list[str]:
        ada = {n for n, m in self.model.named_modules() if type(m).__name__ in ADA_NORMS}
        return [n for n in self.layers() if n.startswith("time_text_embed.") or n.rsplit(".", 1)[0] in ada]

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        run_ada_norms(self.model, self.model.time_text_embed(t, cond["pooled_projections"]))

    def io_layers(self) -> list[str]:
        return [n for n in ("pos_embed.proj", "proj_out") if n in self.layers()]

    input_names = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")

    def example_inputs(self, batch: int = 2, size: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
        cfg, g = self.model.config, _gen()
        size = size or cfg.sample_size
        return {"hidden_states": torch.randn(batch, cfg.in_channels, size, size, generator=g),
                "timestep": torch.full((batch,), 500.0),
                "encoder_hidden_states": torch.randn(batch, seq_len, cfg.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g)}

    @classmethod
    def flat_inputs(cls, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        out = dict(zip(cls.input_names, args))
        out.update({k: kwargs[k] for k in cls.input_names if k in kwargs})
        out["timestep"] = _batched_timestep(out["timestep"], out["hidden_states"])
        return out

    def call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: inputs[k] for k in self.input_names}, return_dict=False)[0]


ADAPTERS: list[type[DenoiserAdapter]] = [UNet2DConditionAdapter, SD3TransformerAdapter]


def register_adapter(cls: type[DenoiserAdapter]) -> type[DenoiserAdapter]:
    """Class decorator: ``get_adapter`` considers ``cls`` (a family module registers its adapter on import)."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


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
