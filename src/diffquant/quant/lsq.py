"""LSQ (Esser et al. 2020): quantizer step sizes learned by gradient descent through the STE.

Block reconstruction (Q-Diffusion's second stage, activation step sizes) and QAT (EMF, weight and
activation step sizes) both learn them through ``StepSizes``, with one policy: each step-size tensor
is its own Adam group whose learning rate is relative to its starting magnitude (``step_size_lr``),
and after every optimizer step the step sizes are clamped at ``SCALE_FLOOR``, the floor the observers
give every scale (``affine.qparams_from_range``), so a learned scale never leaves the range a
calibrated one can take. Zero points stay as calibrated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer

SCALE_FLOOR = torch.finfo(torch.float32).eps


def step_size_lr(scale: torch.Tensor, relative_lr: float) -> float:
    """Adam learning rate for learning one step-size tensor (LSQ): ``relative_lr`` x its mean magnitude.

    Adam moves every parameter by about its learning rate per step whatever the gradient's size, so an
    absolute rate means different things for step sizes of 1e-3 and 1e-1: measured, an absolute 1e-4
    moved the mini models' step sizes by 5-150 % in 100 steps and made held-out images worse (EMF:
    docs/emf.md; Q-Diffusion: docs/results-methods.md). Relative to the tensor, every quantizer moves
    by at most about ``relative_lr`` of its size per step.
    """
    return relative_lr * float(scale.detach().abs().mean().clamp_min(1e-8))


def step_size_parameters(model: nn.Module, weights: bool = True, activations: bool = True) -> dict[str, nn.Parameter]:
    """The step sizes of every quantizer in ``model`` (every timestep group), by parameter name, in module order.

    Dynamic activation quantizers (per token / per group) have none: their scales come from each input."""
    kinds = (WeightQuantizer,) * weights + (ActivationQuantizer,) * activations
    return {f"{name}.scale": q.scale for name, q in model.named_modules()
            if kinds and isinstance(q, kinds) and not getattr(q, "dynamic", False)}


class StepSizes:
    """A set of step-size tensors being learned: their optimizer groups, the clamp, and a way back.

    ``start`` makes them trainable and remembers where they began (``revert`` returns there, e.g. when
    learning made a block worse on its own data); ``stop`` ends training. ``clamp_`` runs after every
    optimizer step (``learning.loop.optimizer_step`` calls it).
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)
        self.initial: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.params)

    def start(self, relative_lr: float) -> list[dict]:
        """Make the step sizes trainable; returns one Adam group per tensor, lr relative to its current magnitude."""
        self.initial = [p.detach().clone() for p in self.params]
        for p in self.params:
            p.requires_grad_(True)
        return [{"params": [p], "lr": step_size_lr(p0, relative_lr)} for p, p0 in zip(self.params, self.initial)]

    def stop(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.params:
            p.clamp_(min=SCALE_FLOOR)

    @torch.no_grad()
    def revert(self) -> None:
        for p, p0 in zip(self.params, self.initial):
            p.copy_(p0)
