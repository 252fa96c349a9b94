"""Helpers shared by tests: prompts, tiny calibration settings, deterministic sampling."""

from __future__ import annotations

import torch

PROMPTS = ["a red circle on the left", "a blue square at the top", "a large green star", "a small yellow triangle"]
SAMPLING = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)


def calibration_config(**overrides):
    from diffquant import CalibrationConfig

    base = dict(num_prompts=4, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, batch_size=4)
    base.update(overrides)
    return CalibrationConfig(**base)


def sample_latents(pipe, prompts=PROMPTS[:2], seed=0, **overrides):
    """Deterministic latents of ``pipe`` for ``prompts`` (same seed and noise every call)."""
    kwargs = {**SAMPLING, **overrides}
    with torch.no_grad():
        return pipe(prompts, generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images
