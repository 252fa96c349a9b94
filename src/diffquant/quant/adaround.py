"""AdaRound: learned up/down rounding of weights (Nagel et al. 2020), as used by BRECQ and Q-Diffusion.

Each weight element chooses between floor(w/s) and floor(w/s)+1 through a continuous variable V:
the soft offset h(V) = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1) with zeta = 1.1, gamma = -0.1
(the rectified sigmoid, which reaches exactly 0 and 1). A regulariser sum(1 - |2h - 1|^beta) with beta
annealed from large to small pushes every h to 0 or 1; ``harden()`` then switches to the hard choice
``V >= 0``. The module plugs into ``WeightQuantizer.rounding`` and returns the rounded value of w/s
before the zero point; ``integer_codes`` honours it, so the learned rounding reaches the saved codes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ZETA = 1.1
GAMMA = -0.1


class AdaRound(nn.Module):
    """Learned rounding for one weight tensor viewed as [out, in_flat] with its expanded scale.

    V starts where h(V) equals the fractional part of w/s, so the soft forward initially reproduces
    the float weight (inside the clipping range) and the optimisation starts from no rounding error.
    """

    def __init__(self, w2: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        x = (w2.detach().float() / scale.detach()).float()
        rest = (x - torch.floor(x)).clamp(0.0, 1.0)
        # Inverse of the rectified sigmoid at ``rest`` (rest - gamma lies in [0.1, 1.1], so this is finite).
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
        self.alpha = nn.Parameter(alpha)
        self.hard = False

    def soft_offsets(self) -> torch.Tensor:
        """h(V) in [0, 1]: how far up from floor(w/s) each element rounds while learning."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def hard_offsets(self) -> torch.Tensor:
        """The final 0/1 choice: round up where V >= 0 (h >= 0.5)."""
        return (self.alpha.detach() >= 0).float()

    def forward(self, w2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        base = torch.floor(w2.detach().float() / scale.detach())
        return base + (self.hard_offsets() if self.hard else self.soft_offsets())

    def harden(self) -> None:
        self.hard = True

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1."""
        return (1.0 - (2.0 * self.soft_offsets() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def binary_fraction(self, tolerance: float = 0.01) -> float:
        """Share of soft offsets within ``tolerance`` of 0 or 1 (1.0 = the regulariser has converged)."""
        h = self.soft_offsets()
        return float(((h <= tolerance) | (h >= 1.0 - tolerance)).float().mean())

    @torch.no_grad()
    def flipped_fraction(self, w2: torch.Tensor, scale: torch.Tensor) -> float:
        """Share of elements whose hard rounding differs from round-to-nearest."""
        x = w2.detach().float() / scale.detach()
        return float(((torch.floor(x) + self.hard_offsets()) != torch.round(x)).float().mean())


class BetaSchedule:
    """Regulariser weight and exponent over iterations: off during warm-up, then beta decays linearly.

    As in BRECQ's ``LinearTempDecay``: beta = start for the first ``warmup`` fraction of iterations
    (where the rounding loss is not applied), then falls linearly to ``end`` at the last iteration.
    """

    def __init__(self, iterations: int, warmup: float, start: float, end: float) -> None:
        self.iterations = iterations
        self.decay_start = int(math.floor(warmup * iterations))
        self.start, self.end = start, end

    def active(self, step: int) -> bool:
        return step >= self.decay_start

    def beta(self, step: int) -> float:
        if step < self.decay_start:
            return self.start
        span = max(self.iterations - 1 - self.decay_start, 1)
        progress = min((step - self.decay_start) / span, 1.0)
        return self.end + (self.start - self.end) * (1.0 - progress)
