"""FLUX.1 (``FluxTransformer2DModel``): double-stream and single-stream blocks, RoPE, adaLN modulation.

Blocks for reconstruction: every ``FluxTransformerBlock`` (double stream: image and text tokens with
their own weights, joint attention) and ``FluxSingleTransformerBlock`` (one stream of text + image
tokens, attention and MLP in parallel). Time-dependent layers: the timestep / guidance / pooled-text
embedder ``time_text_embed`` and every adaLN modulation ``linear`` (``norm1``, ``norm1_context``,
``norm``, ``norm_out``); RoPE has no weights and stays as it is. Attention runs through
``FluxAttention`` modules (not diffusers' ``Attention``), swapped for ``QuantFluxAttnProcessor``.

The pipeline passes ``timestep = t / 1000`` (and ``guidance``, for guidance-distilled models), so the
timestep argument spans 0..1: ``timestep_range`` puts timestep groups and EMF's keys on that axis.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .adapters import DenoiserAdapter, _batched_timestep, _gen, _seeded_rows, run_ada_norms, register_adapter

logger = logging.getLogger(__name__)


@register_adapter
class FluxTransformerAdapter(DenoiserAdapter):
    family = "flux-transformer"
    model_class = "FluxTransformer2DModel"
    block_types = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    timestep_range = 1.0
    time_condition = ("pooled_projections", "guidance")

    def initial_noise(self, pipe: Any, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """FluxPipeline's latents are packed: 2x2 latent patches as tokens [B, (h/2)(w/2), 4C]; each row drawn unpacked
        [C, h, w] as ``FluxPipeline.prepare_latents`` draws it, then packed the same way."""
        scale, channels = pipe.vae_scale_factor, self.model.config.in_channels // 4
        h, w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
        return pipe._pack_latents(_seeded_rows((channels, h, w), seeds), len(seeds), channels, h, w)

    def time_layers(self) -> list[str]:
        ada = {n for n, m in self.model.named_modules() if hasattr(m, "linear") and type(m).__name__.startswith("AdaLayerNorm")}
        return [n for n in self.layers() if n.startswith("time_text_embed.") or n.rsplit(".", 1)[0] in ada]

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        model, dtype = self.model, next(self.model.parameters()).dtype
        t = t.to(dtype) * 1000  # as FluxTransformer2DModel.forward scales it
        guidance = cond.get("guidance")
        if guidance is None:
            temb = model.time_text_embed(t, cond["pooled_projections"])
        else:
            temb = model.time_text_embed(t, guidance.to(dtype) * 1000, cond["pooled_projections"])
        run_ada_norms(model, temb)

    def io_layers(self) -> list[str]:
        return [n for n in ("x_embedder", "proj_out") if n in self.layers()]

    def attention_modules(self) -> dict[str, str]:
        found = {}
        for name, module in self.model.named_modules():
            if type(module).__name__ == "FluxAttention":
                if type(module.processor).__name__ == "FluxAttnProcessor":
                    found[name] = "flux"
                else:
                    logger.warning("attention %s uses %s; its matmuls stay float", name, type(module.processor).__name__)
        return found

    # -- the denoiser call as named tensors (export); img_ids/txt_ids are [tokens, 3], shared by the batch
    unbatched_inputs = ("img_ids", "txt_ids")

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        base = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")
        return base + ("guidance",) if self.model.config.guidance_embeds else base

    def example_inputs(self, batch: int = 2, size: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
        cfg, g = self.model.config, _gen()
        side = (size or 16) // 2  # latent side -> packed 2x2 patches per side
        ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        out = {"hidden_states": torch.randn(batch, side * side, cfg.in_channels, generator=g),
               "timestep": torch.full((batch,), 0.5),
               "encoder_hidden_states": torch.randn(batch, seq_len, cfg.joint_attention_dim, generator=g),
               "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
               "img_ids": torch.cat([torch.zeros(side * side, 1), ids.float()], dim=1),
               "txt_ids": torch.zeros(seq_len, 3)}
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5)
        return out

    @classmethod
    def flat_inputs(cls, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance")
        out = dict(zip(names, args))
        out.update({k: kwargs[k] for k in names if kwargs.get(k) is not None})
        out["timestep"] = _batched_timestep(out["timestep"], out["hidden_states"])
        return out

    def call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: inputs[k] for k in self.input_names}, return_dict=False)[0]
