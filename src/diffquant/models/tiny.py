"""Tiny SD-, SDXL-, SD3/SD3.5-, Flux-, PixArt-Σ- and SANA-style pipelines built from configs with random weights.

They exercise the real diffusers code paths (cross-attention, skip concatenations, ``text_time``
added conditioning, MMDiT joint and dual attention, Flux double/single-stream blocks with RoPE,
adaLN-single, linear attention and Mix-FFN) in seconds, for tests and for speed-free smoke runs. A CLIP tokenizer stands in for T5's.
Random weights say nothing about fidelity; the mini zoo (``diffquant.zoo``) does.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    T5Config,
    T5EncoderModel,
)

from ..tokenizers import build_clip_tokenizer

_WORDS = "a an the red green blue yellow cyan magenta circle square triangle star small large left right top bottom centre on of".split()


def _tokenizer(max_length: int = 16):
    with tempfile.TemporaryDirectory() as folder:
        return build_clip_tokenizer(_WORDS, folder, model_max_length=max_length)


def _text_config(vocab_size: int, hidden: int, projection: int | None = None) -> CLIPTextConfig:
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    if projection is not None:
        kwargs["projection_dim"] = projection
    return CLIPTextConfig(**kwargs)


def _vae(latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32, shift_factor=shift_factor,
    )


def tiny_unet(cross_attention_dim: int = 32, sdxl: bool = False, projection_input_dim: int = 0) -> UNet2DConditionModel:
    """A two-level UNet2DConditionModel with cross-attention blocks and skip concatenations like SD's."""
    kwargs: dict = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )
    if sdxl:
        kwargs.update(
            transformer_layers_per_block=(2, 1), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=projection_input_dim, use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
    return UNet2DConditionModel(**kwargs)


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x/2.x-style pipeline: CLIP text encoder, UNet2DConditionModel, DDIM, AutoencoderKL."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), 32))
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(32),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-style pipeline: two text encoders, ``text_time`` added conditioning, 2 transformer layers in a block."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), 16))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer), 16, projection=16))
    unet = tiny_unet(cross_attention_dim=32, sdxl=True, projection_input_dim=16 + 6 * 8)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5(vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    """A two-layer T5 encoder in eval mode (built from a config it would train: dropout 0.1 on every call)."""
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=vocab_size - 1, decoder_start_token_id=0)).eval()


def tiny_sd3_pipeline(seed: int = 0, sd35: bool = False) -> StableDiffusion3Pipeline:
    """SD3-style pipeline: SD3Transformer2DModel (MMDiT), two CLIP encoders, no T5, flow matching.
    ``sd35``: the SD3.5 form (dual attention ``attn2`` in the first block, q/k RMS norm)."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModelWithProjection(_text_config(len(tokenizer), 16, projection=16))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer), 16, projection=16))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, **(dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(shift_factor=0.0),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev-style pipeline: one double- and one single-stream block, RoPE, guidance embedding, CLIP + T5.
    Sample it at 32x32 px (8x8 packed tokens) with ``max_sequence_length`` <= 16 for speed."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(shift_factor=0.0),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), 16)), tokenizer=tokenizer,
        text_encoder_2=_t5(len(tokenizer)), tokenizer_2=tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Σ-style pipeline: adaLN-single DiT with cross-attention to T5 features, learned sigma, DPM-Solver.
    Its ``sample_size`` has no resolution bins: the adapter turns the pipeline's binning off."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=16,
        sample_size=8, patch_size=2, caption_channels=32, norm_num_groups=8, interpolation_scale=1,
    )
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=_t5(len(tokenizer)), vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """SANA-style pipeline: linear-attention DiT with Mix-FFN convolutions, a Gemma-2 text encoder, a DC-AE, flow
    matching. Sample it at 32x32 px (SANA needs multiples of 32; its ``sample_size`` has no bins)."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            pad_token_id=len(tokenizer) - 1)).eval()
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
        cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=1,
    )
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"), encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1), upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe
