"""Tiny unconditional pipelines built from configs with random weights: DDPM and DDIM in pixel space,
LDM over a VQ (or KL) autoencoder. Q-Diffusion's own setting, for tests and speed-free smoke runs.

The UNet2DModel has what the adapter must find: ResNet blocks, self-attention blocks, samplers, up-block
ResNets reading ``cat([deep, skip])`` through a 1x1 ``conv_shortcut``, and the time-embedding MLP.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline, UNet2DModel, VQModel


def tiny_unet2d(in_channels: int = 3, sample_size: int = 16) -> UNet2DModel:
    """A two-level UNet2DModel: a plain and an attention level down, the mirror up, a mid block with attention."""
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8,
    )


def _ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ddpm_pipeline(seed: int = 0) -> DDPMPipeline:
    """DDPM in pixel space (16x16 RGB); its stochastic sampler draws fresh noise every step."""
    torch.manual_seed(seed)
    return _ready(DDPMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler(num_train_timesteps=1000)))


def tiny_ddim_pipeline(seed: int = 0) -> DDIMPipeline:
    """DDIM in pixel space (16x16 RGB), the CIFAR-10 setting of Q-Diffusion's paper in miniature."""
    torch.manual_seed(seed)
    return _ready(DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000)))


def tiny_ldm_pipeline(seed: int = 0, autoencoder: str = "vq") -> LDMPipeline:
    """Unconditional latent diffusion: a UNet2DModel over the 8x8x3 latents of a VQ (or ``"kl"``) autoencoder."""
    if autoencoder not in ("vq", "kl"):
        raise ValueError(f"unknown autoencoder {autoencoder!r}; use 'vq' or 'kl'")
    torch.manual_seed(seed)
    parts = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                 up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
                 latent_channels=3, norm_num_groups=8, sample_size=16)
    vae = VQModel(**parts, num_vq_embeddings=32, vq_embed_dim=3) if autoencoder == "vq" else AutoencoderKL(**parts)
    return _ready(LDMPipeline(vqvae=vae, unet=tiny_unet2d(in_channels=3, sample_size=8), scheduler=DDIMScheduler(num_train_timesteps=1000)))
