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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def unet_inputs(seed: int = 0, batch: int = 2) -> dict:
    """Keyword inputs of one call of the tiny SD UNet (16x16 latents, 16 tokens of width 32) at t=500."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 16, 16, generator=g), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, 16, 32, generator=g), return_dict=False)


_QUANTIZED: dict = {}


def quantized_copy(tiny_pipes, family: str, defaults: dict, **cfg):
    """A copy of a tiny pipeline quantized with ``QuantConfig(**defaults, **cfg)`` on two prompts (each configuration
    quantized once per test session)."""
    import copy

    import diffquant
    from diffquant import QuantConfig

    settings = {**defaults, **cfg}
    key = (family, repr(sorted(settings.items())))
    if key not in _QUANTIZED:
        pipe = copy.deepcopy(tiny_pipes[family])
        diffquant.quantize(pipe, QuantConfig(**settings), calibration=PROMPTS[:2], progress=False)
        _QUANTIZED[key] = pipe
    return copy.deepcopy(_QUANTIZED[key])
