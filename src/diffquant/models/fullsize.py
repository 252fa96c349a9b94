"""Full-size denoisers from their published configs (random weights) inside pipelines of tiny parts.

For memory and speed measurements only (benchmarks/fullsize.py, benchmarks/runtime.py): the UNet is the real
architecture (SD 1.5: 859.5M parameters; SDXL base: 2.57B), while the text encoders are one-layer CLIPs of the
real hidden sizes (so cross-attention and SDXL's pooled text keep their shapes, 77 tokens) and the VAE is the
tiny one of ``models.tiny`` (scale factor 2: a 64x64 latent is a 128x128 image; calibration samples latents, so
the VAE never runs there). Random weights say nothing about image quality.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..tokenizers import build_clip_tokenizer
from .tiny import _WORDS, _vae

# runwayml/stable-diffusion-v1-5 unet/config.json (defaults omitted)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (defaults omitted)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
# black-forest-labs/FLUX.1-dev transformer/config.json: 19 double- and 38 single-stream blocks of width 3072 (11.9B);
# benchmarks/runtime.py builds a slice of it (its widths, fewer blocks): the whole model does not fit a 24 GiB CPU in fp32
FLUX1_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
TOKENS = 77


def fullsize_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    """The published ``name`` (sd15, sdxl) UNet with random weights (seeded)."""
    if name not in UNETS:
        raise ValueError(f"unknown full-size model {name!r}; choose one of {', '.join(UNETS)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNETS[name]).eval()


def _text(vocab: int, hidden: int, projection: int | None = None) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                            num_attention_heads=hidden // 64, max_position_embeddings=TOKENS, bos_token_id=vocab - 2,
                            eos_token_id=vocab - 1, pad_token_id=vocab - 1, **({"projection_dim": projection} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def fullsize_pipeline(name: str, seed: int = 0):
    """A diffusers pipeline (SD or SDXL) around the full-size ``name`` UNet; tiny text encoders and VAE (module docstring)."""
    unet = fullsize_unet(name, seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_clip_tokenizer(_WORDS, folder, model_max_length=TOKENS)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if name == "sd15":
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text(len(tokenizer), 768), tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text(len(tokenizer), 768), tokenizer=tokenizer,
                                         text_encoder_2=_text(len(tokenizer), 1280, projection=1280), tokenizer_2=tokenizer,
                                         unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
