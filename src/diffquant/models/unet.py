"""SD 1.x/2.x and SDXL (``UNet2DConditionModel``): ResNet and transformer blocks, the up-blocks' skip
concatenations (split inputs of their 1x1 ``conv_shortcut``), the time embedding and every ``time_emb_proj``."""

from __future__ import annotations

import torch

from .adapters import DenoiserAdapter, _batched_timestep, _gen, register_adapter


@register_adapter
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
