"""SmoothQuant-style migration (``act_granularity="per_channel_smooth"``): per-input-channel factors searched per layer.

Our reading of SmoothQuant (Xiao et al., 2023) for a diffusion denoiser's Linear and Conv2d layers: a factor
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input channel ``j`` divides the activation and multiplies
the weight's input columns before the weight is quantized, so ``(X / s) (W s)^T = X W^T`` in float and the
activation's outliers move into the weight. The activation then keeps one static per-tensor scale per
timestep group. ``alpha`` is searched per layer on the calibration data (``SMOOTH_ALPHAS``, plus no smoothing
at all, so a layer never gets worse on its data than per-tensor) by the mean squared error of the layer
output with both operands fake-quantized. A convolution is scored as the linear maps of its kernel taps on
the recorded tokens (no spatial neighbourhoods are kept), a proxy that needs only tokens. The activation's
range in the search is min/max; the chosen factors then go through the configured observer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.affine import fake_quantize, qparams_from_range, qrange

SMOOTH_ALPHAS = (0.3, 0.5, 0.7, 0.85)
_FLOOR = 1e-5


def _columns(weight: torch.Tensor) -> torch.Tensor:
    """The weight as linear maps of the input channels: [out (x kernel taps), in]."""
    return weight if weight.dim() == 2 else weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])


def _by_channel(weight: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return factors.reshape([1, -1] + [1] * (weight.dim() - 2))


@torch.no_grad()
def fit_smoothing(layer: nn.Module, alphas: tuple[float, ...] = SMOOTH_ALPHAS) -> float | None:
    """Search the smoothing factors of ``layer``'s input on its observed tokens, fold them into the weight
    (recalibrating its weight quantizer) and into the input quantizer; returns the chosen alpha (None: none)."""
    q, wq = layer.input_quantizer, layer.weight_quantizer
    tokens, lo, hi = q.smoothing_statistics()
    device, dtype = layer.weight.device, layer.weight.dtype
    old = q.smooth.detach().float().cpu()
    w_raw = layer.weight.detach().float().cpu() / _by_channel(layer.weight, old)
    target = tokens @ _columns(w_raw).t()
    x_max = torch.maximum(lo.abs(), hi.abs()).clamp_min(_FLOOR)
    w_max = _columns(w_raw).abs().amax(dim=0).clamp_min(_FLOOR)
    bits = int(q.bits.max())
    qmin, qmax = qrange(bits, q.spec.symmetric, q.spec.unsigned)
    best: tuple[float, float | None, torch.Tensor] | None = None
    for alpha in (None, *alphas):
        factors = torch.ones_like(x_max) if alpha is None else (x_max**alpha / w_max ** (1 - alpha)).clamp_min(_FLOOR)
        w = w_raw * _by_channel(w_raw, factors)
        wq.calibrate(w.to(device))
        w_hat = wq(w.to(device)).float().cpu()
        scale, zero_point = qparams_from_range((lo / factors).min(), (hi / factors).max(), bits, q.spec.symmetric, q.spec.unsigned)
        x_hat = fake_quantize(tokens / factors, scale, zero_point, int(qmin), int(qmax))
        err = float((x_hat @ _columns(w_hat).t() - target).pow(2).mean())
        if best is None or err < best[0]:
            best = (err, alpha, factors)
    _, alpha, factors = best
    layer.weight.copy_((w_raw * _by_channel(w_raw, factors)).to(device=device, dtype=dtype))
    wq.calibrate(layer.weight)
    q.set_smoothing(factors)
    return alpha


@torch.no_grad()
def unsmooth_weight(layer: nn.Module) -> None:
    """Divide the smoothing factors back out of ``layer``'s weight (the layer leaves quantization)."""
    q = layer.input_quantizer
    if q is not None and q.smooth is not None:
        layer.weight.div_(_by_channel(layer.weight, q.smooth.to(layer.weight)))
