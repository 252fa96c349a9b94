"""UNet2DModel: the unconditional denoiser of DDPM/DDIM (pixel space) and LDM (latent space) pipelines.

The architecture Q-Diffusion's shortcut split is defined on: every up-block ResNet reads
``cat([deep, skip])`` and its 1x1 ``conv_shortcut`` sees the raw concatenation. Its blocks are
ResNet blocks, self-attention blocks (plain ``Attention`` modules, no transformer block around
them) and samplers; the time layers are the timestep MLP, a class embedding if any, and each
ResNet's ``time_emb_proj``. No text, so no cross-attention and nothing per prompt.
"""

from __future__ import annotations

import torch

from .adapters import _batched_timestep, _gen, register_adapter
from .unet import UNet2DConditionAdapter


@register_adapter
class UNet2DAdapter(UNet2DConditionAdapter):
    """UNet2DModel: skip splits, time and io layers as for the conditional UNet; ``Attention`` is a block."""

    family = "unet2d"
    model_class = "UNet2DModel"
    block_types = ("ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D")
    input_names = ("sample", "timestep")  # type: ignore[assignment]
    time_condition = ("class_labels",)

    def time_path(self, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Only the time layers, as ``UNet2DModel.forward`` runs them: the timestep MLP, then every ``time_emb_proj``."""
        unet = self.model
        if unet.class_embedding is not None:
            raise ValueError("time precalculation supports UNet2DModel without class embeddings; use another method for class-conditional models")
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
        for module in unet.modules():
            if type(module).__name__ == "ResnetBlock2D" and module.time_emb_proj is not None:
                module.time_emb_proj(emb if module.skip_time_act else module.nonlinearity(emb))

    def example_inputs(self, batch: int = 2, size: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        size = size or cfg.sample_size
        return {"sample": torch.randn(batch, cfg.in_channels, size, size, generator=_gen()),
                "timestep": torch.full((batch,), 500.0)}

    @classmethod
    def flat_inputs(cls, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        named = dict(zip(cls.input_names, args))
        named.update({k: kwargs[k] for k in cls.input_names if k in kwargs})
        return {**named, "timestep": _batched_timestep(named["timestep"], named["sample"])}

    def call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(inputs["sample"], inputs["timestep"], return_dict=False)[0]
