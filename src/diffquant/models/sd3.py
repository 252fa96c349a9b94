"""SD3/SD3.5 (``SD3Transformer2DModel``, MMDiT): joint transformer blocks; the time/pooled-text embedder and every
adaLN modulation are time layers."""

from __future__ import annotations

import torch

from .adapters import ADA_NORMS, DenoiserAdapter, _batched_timestep, _gen, register_adapter, run_ada_norms


@register_adapter
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
