"""The mini zoo's architectures: the VAE, the word-level tokenizer, the text encoders and the denoiser pipelines.

Built from configs (no weights), so training, tests and the model cards share one definition.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data


def build_vae(shift_factor: float | None = None, scaling_factor: float = 1.0, levels: int = 3):
    """AutoencoderKL 32x32x3 <-> 8x8x4 (4x down, ``levels=3``) or 16x16x4 (2x down, ``levels=2``).

    One resnet per level, attention in the mid block. mini-flux uses two levels: FluxPipeline packs
    latents 2x2, so 16x16 latents give it 64 image tokens, as many as mini-sd3's MMDiT sees.
    """
    from diffusers import AutoencoderKL

    if levels not in (2, 3):
        raise ValueError(f"levels must be 2 or 3, got {levels}")
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=data.RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(32, 64, 64)[:levels], layers_per_block=1, norm_num_groups=16,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


MAX_TOKENS = 24  # longest caption is 19 words + BOS + EOS


def build_tokenizer(folder: Path):
    """Word-level CLIP tokenizer over the caption grammar: one token per caption word."""
    from ..tokenizers import build_clip_tokenizer

    return build_clip_tokenizer(data.vocabulary(), folder, model_max_length=MAX_TOKENS)


def _clip_config(tokenizer, hidden: int, layers: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
              num_attention_heads=max(1, hidden // 32), max_position_embeddings=MAX_TOKENS,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, hidden_act="gelu")
    if projection is not None:
        kw["projection_dim"] = projection
    return CLIPTextConfig(**kw)


def build_sd_pipeline(vae, tokenizer):
    """mini-sd: AutoencoderKL + CLIPTextModel + UNet2DConditionModel (cross-attention at both levels) + DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(_clip_config(tokenizer, 64, 2))
    unet = UNet2DConditionModel(
        sample_size=data.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=32,
    )
    # Linear betas (DDPM/LDM) rather than SD's scaled_linear: on 8x8 latents scaled_linear leaves enough
    # signal at t=999 (sqrt(alpha_bar)=0.07) that the UNet reads the background and layout from the
    # residual instead of the caption, and sampling from pure noise then ignores the text. Linear betas
    # end at sqrt(alpha_bar)=0.006. "trailing" spacing makes the first DDIM step t=999.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_ddim_pipeline(width: int = 32):
    """mini-ddim: an unconditional pixel-space UNet2DModel (32x32x3) + DDIM, Q-Diffusion's CIFAR-10 setting in miniature.

    Three levels (32, 16, 8 pixels; ``width``, 2 ``width``, 2 ``width`` channels) of one ResNet each, two-head
    self-attention at 8x8 only, the up path's skip
    concatenations feeding 1x1 ``conv_shortcut``s (what the shortcut split quantizes). Linear betas as in
    DDPM; "trailing" spacing makes the first DDIM step t=999; x0 is clipped to [-1, 1] as in DDIM's CIFAR runs.
    """
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=data.RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=width,
        norm_num_groups=min(16, width // 2),
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              clip_sample=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              timestep_spacing="trailing")
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd3_pipeline(vae, tokenizer, t5_stub: bool = True):
    """mini-sd3: two CLIPTextModelWithProjection (no T5) + SD3Transformer2DModel (patch 1) + flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    te1 = CLIPTextModelWithProjection(_clip_config(tokenizer, 64, 2, projection=64))
    te2 = CLIPTextModelWithProjection(_clip_config(tokenizer, 64, 2, projection=64))
    transformer = SD3Transformer2DModel(
        sample_size=data.RESOLUTION // 4, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
        pooled_projection_dim=128, pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=vae, text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer,
        text_encoder_3=zero_t5_stub(len(tokenizer), 128) if t5_stub else None, tokenizer_3=tokenizer if t5_stub else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zero_t5_stub(vocab_size: int, dim: int):
    """A one-layer T5EncoderModel whose final RMS norm has zero gain: it outputs exact zeros.

    ``StableDiffusion3Pipeline.from_pretrained(folder)`` cannot load a folder whose text_encoder_3
    is null (it is not an optional component), and a real T5 is far beyond this machine. With this
    stub the pipeline computes exactly what it computes with ``text_encoder_3=None`` (zeros of
    ``joint_attention_dim`` for the T5 tokens), and the folder loads with no extra arguments.
    """
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=dim, d_kv=8, d_ff=16, num_layers=1, num_heads=1,
                                    feed_forward_proj="relu", is_encoder_decoder=False, use_cache=False))
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model.eval().requires_grad_(False)


class ZeroTokenJointAttnProcessor:
    """Training-only joint attention where the last context token stands for ``multiplicity`` copies.

    With no T5 encoder the SD3 pipeline appends 256 all-zero T5 tokens to the context. Those tokens
    enter identical and stay identical through every block (no positional embedding on context), so
    attention over 256 copies equals attention over one copy whose logit is raised by log(256). We
    train with one zero token and that bias: the same function the pipeline computes, ~4x cheaper.
    """

    def __init__(self, multiplicity: int = 256) -> None:
        self.log_mult = math.log(multiplicity)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b = hidden_states.shape[0]
        n_img = hidden_states.shape[1]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = (heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                      heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_mult
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        h, c = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            c = attn.to_add_out(c)
        h = attn.to_out[1](attn.to_out[0](h))
        return h, c



FLUX_T5_TOKENS = MAX_TOKENS  # mini-flux's max_sequence_length (zoo.DEFAULTS passes it; FluxPipeline's own default is 512)


def build_flux_pipeline(vae, tokenizer, width: int = 128, double: int = 2, single: int = 4, text_hidden: int = 128,
                        t5_dim: int = 128, t5_layers: int = 3):
    """mini-flux: CLIPTextModel (pooled) + a small T5EncoderModel (tokens) + FluxTransformer2DModel + flow matching.

    As in FLUX.1: T5's token sequence enters the joint attention, CLIP's pooled output the time
    embedding (every block's adaLN modulation); the transformer has a guidance embedding. The VAE's
    latents pack 2x2 into tokens of 16 channels (16x16x4 latents of the two-level VAE: 64 tokens). Both text encoders read the same word-level
    tokenizer (a CLIPTokenizer serves as the T5 tokenizer).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    head = 32
    rope = (8, 12, 12)  # (unused text/frame axis, rows, columns): sums to the head dimension
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=double, num_single_layers=single,
        attention_head_dim=head, num_attention_heads=width // head, joint_attention_dim=t5_dim,
        pooled_projection_dim=text_hidden, guidance_embeds=True, axes_dims_rope=rope,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=t5_dim, d_kv=32, d_ff=4 * t5_dim, num_layers=t5_layers,
                                 num_heads=t5_dim // 32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                 is_encoder_decoder=False, use_cache=False, pad_token_id=tokenizer.pad_token_id))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), vae=vae,
        text_encoder=CLIPTextModel(_clip_config(tokenizer, text_hidden, 2)), tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
