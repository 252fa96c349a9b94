"""PixArt-α/Σ (``PixArtTransformer2DModel``) and SANA (``SanaTransformer2DModel``): adaLN-single DiTs.

adaLN-single: one shared projection ``adaln_single`` turns the timestep (and, for PixArt-α at 1024 px,
resolution and aspect ratio) into the modulation of every block; each block adds its own learned
``scale_shift_table`` (a parameter, not a layer: nothing to quantize). So the time-dependent layers are
``adaln_single``'s linears, and EMF's precalculation runs ``adaln_single`` alone.

Their pipelines bin the requested size to the nearest trained resolution and refuse models whose
``sample_size`` has no bin table ("Invalid sample size"); ``sampling_extras`` turns binning off for
those, so calibration and evaluation sample the size they ask for.
"""

from __future__ import annotations

import logging

import torch

from .adapters import DenoiserAdapter, _batched_timestep, _gen, register_adapter

logger = logging.getLogger(__name__)


class _AdaLNSingleAdapter(DenoiserAdapter):
    binned_sizes: tuple[int, ...] = ()  # denoiser sample sizes the pipeline has resolution bins for
    io_names: tuple[str, ...] = ()

    def time_layers(self) -> list[str]:
        return [n for n in self.layers() if n.startswith(("adaln_single.", "time_embed."))]

    def io_layers(self) -> list[str]:
        return [n for n in self.io_names if n in self.layers()]

    def sampling_extras(self, pipe) -> dict:
        return {} if self.model.config.sample_size in self.binned_sizes else {"use_resolution_binning": False}

    # -- the denoiser call as named tensors (export): latents, t, caption features and their padding mask
    # torch.export (torch 2.13) fails on a symbolic batch here: "Runtime assertion failed for Eq((s42//s95), 16)"
    dynamic_batch_export = False
    _names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self._names + (("guidance",) if getattr(self.model.config, "guidance_embeds", False) else ())

    def example_inputs(self, batch: int = 2, size: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
        if getattr(self.model, "use_additional_conditions", False):
            raise ValueError("export of PixArt-α with resolution conditions (sample_size 128) is not supported yet")
        cfg, g = self.model.config, _gen()
        size = size or cfg.sample_size
        out = {"hidden_states": torch.randn(batch, cfg.in_channels, size, size, generator=g), "timestep": torch.full((batch,), 500.0),
               "encoder_hidden_states": torch.randn(batch, seq_len, cfg.caption_channels, generator=g),
               "encoder_attention_mask": torch.ones(batch, seq_len)}
        if "guidance" in self.input_names:
            out["guidance"] = torch.full((batch,), 4.5)
        return out

    @classmethod
    def flat_inputs(cls, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        names = ("hidden_states", "encoder_hidden_states", "timestep")  # the forward's positional order
        out = dict(zip(names, args))
        out.update({k: kwargs[k] for k in (*cls._names, "guidance") if kwargs.get(k) is not None})
        out["timestep"] = _batched_timestep(out["timestep"], out["hidden_states"])
        return out

    def call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}} if self.family == "pixart-transformer" else {}
        return self.model(**{k: inputs[k] for k in self.input_names if k in inputs}, **extra, return_dict=False)[0]


@register_adapter
class PixArtTransformerAdapter(_AdaLNSingleAdapter):
    family = "pixart-transformer"
    model_class = "PixArtTransformer2DModel"
    block_types = ("BasicTransformerBlock",)
    binned_sizes = (32, 64, 128, 256)
    io_names = ("pos_embed.proj", "proj_out")
    time_condition = ("added_cond_kwargs",)

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        added = {k.split(".", 1)[1]: v for k, v in cond.items() if k.startswith("added_cond_kwargs.")}
        dtype = next(self.model.parameters()).dtype
        self.model.adaln_single(t, added or {"resolution": None, "aspect_ratio": None}, batch_size=t.shape[0], hidden_dtype=dtype)


@register_adapter
class SanaTransformerAdapter(_AdaLNSingleAdapter):
    """SANA: linear self-attention (``SanaLinearAttnProcessor2_0``), cross-attention, Mix-FFN (1x1, depthwise 3x3 and
    1x1 convolutions: plain Conv2d layers), and ``time_embed`` (adaLN-single, or with a guidance embedder)."""

    family = "sana-transformer"
    model_class = "SanaTransformer2DModel"
    block_types = ("SanaTransformerBlock",)
    binned_sizes = (16, 32, 64, 128)
    io_names = ("patch_embed.proj", "proj_out")
    time_condition = ("guidance",)

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        dtype = next(self.model.parameters()).dtype
        if cond.get("guidance") is not None:
            self.model.time_embed(t, guidance=cond["guidance"], hidden_dtype=dtype)
        else:
            self.model.time_embed(t, batch_size=t.shape[0], hidden_dtype=dtype)

    def attention_modules(self) -> dict[str, str]:
        from diffusers.models.attention_processor import Attention

        found = {}
        for name, module in self.model.named_modules():
            if not isinstance(module, Attention):
                continue
            kind = type(module.processor).__name__
            if kind == "SanaLinearAttnProcessor2_0":
                found[name] = "linear"
            elif kind == "SanaAttnProcessor2_0" and module.norm_q is None:  # then the same computation as AttnProcessor2_0
                found[name] = "standard"
            else:
                logger.warning("attention %s uses %s; its matmuls stay float", name, kind)
        return found
