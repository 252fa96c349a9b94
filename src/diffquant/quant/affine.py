"""Uniform affine quantization in float ("fake quantization") with a straight-through estimator.

q = clamp(round(x / s) + z, qmin, qmax);  x_hat = (q - z) * s

The rounding passes gradients straight through (STE), so gradients reach both ``x`` and the
scale ``s`` (LSQ) and vanish outside the clipping range. The integer runtime computes the same
``q``, so fake-quantized and converted models give the same numbers.
"""

from __future__ import annotations

import torch


def qrange(bits: int | torch.Tensor, symmetric: bool, unsigned: bool = False) -> tuple:
    """Integer grid bounds: signed ``[-2^(b-1), 2^(b-1)-1]`` for symmetric, ``[0, 2^b-1]`` otherwise."""
    if unsigned or not symmetric:
        return 0 * bits, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with the identity as gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: torch.Tensor | int,
    qmax: torch.Tensor | int,
    rounded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x``; ``rounded`` replaces ``round(x / scale)`` (AdaRound supplies it).

    Without autograd the same operations run in place on one new tensor (about 4x faster on large
    activations such as softmax outputs). The result is bit-identical: the STE's ``a + (round(a) - a)``
    is exactly ``round(a)`` in floating point (the difference is exact by Sterbenz's lemma, and the
    integer sum is representable), and every later operation is the same, in the same order.
    """
    if rounded is None and not torch.is_grad_enabled():
        q = torch.div(x, scale)
        if q.shape == torch.broadcast_shapes(q.shape, torch.Size(getattr(zero_point, "shape", ()))):
            return q.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    q = round_ste(x / scale) if rounded is None else rounded
    q = torch.clamp(q + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin, qmax) -> torch.Tensor:
    """The integer codes ``q`` (as float) of ``x`` on the grid."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int | torch.Tensor, symmetric: bool, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` onto the grid (zero always representable)."""
    eps = torch.finfo(torch.float32).eps
    if not torch.is_tensor(bits):
        bits = torch.tensor(bits, dtype=torch.float32, device=lo.device)
    bits = bits.to(torch.float32)
    if unsigned:
        hi = torch.clamp(hi, min=0)
        scale = torch.clamp(hi / (2**bits - 1), min=eps)
        return scale, torch.zeros_like(scale)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / (2 ** (bits - 1) - 1), min=eps)
        return scale, torch.zeros_like(scale)
    lo = torch.clamp(lo, max=0)
    hi = torch.clamp(hi, min=0)
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=eps)
    zero_point = torch.clamp(torch.round(-lo / scale), 0 * bits, 2**bits - 1)
    return scale, zero_point
