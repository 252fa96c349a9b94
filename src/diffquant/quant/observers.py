"""Range estimation: min/max, percentile, and MSE search (shrink the range, keep the lowest Lp error)."""

from __future__ import annotations

import torch

from .affine import fake_quantize, qparams_from_range, qrange
from .spec import QuantSpec

_MSE_STEPS = 50  # candidate ranges alpha * [lo, hi] for alpha from 1.0 down to 0.2


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise quantile of [R, N] via kthvalue (no input-size limit, unlike torch.quantile)."""
    n = x.shape[1]
    k = min(max(int(round(q * (n - 1))) + 1, 1), n)
    return x.kthvalue(k, dim=1).values


def estimate_qparams(
    rows: torch.Tensor,
    spec: QuantSpec,
    bits: int | None = None,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``rows`` [R, N] under ``spec``.

    ``lo``/``hi`` are the full observed range per row (defaults to the rows' own min/max; an
    activation observer passes its running range while ``rows`` holds a subsample).
    """
    bits = spec.bits if bits is None else bits
    rows = rows.detach().float()
    lo = rows.amin(dim=1) if lo is None else lo.float()
    hi = rows.amax(dim=1) if hi is None else hi.float()
    if spec.observer == "percentile":
        q = spec.percentile / 100.0
        lo = torch.minimum(_quantile(rows, 1.0 - q), torch.zeros_like(lo)) if not spec.unsigned else lo
        hi = torch.maximum(_quantile(rows, q), torch.zeros_like(hi))
    scale, zero_point = qparams_from_range(lo, hi, bits, spec.symmetric, spec.unsigned)
    if spec.observer != "mse":
        return scale, zero_point
    qmin, qmax = qrange(bits, spec.symmetric, spec.unsigned)
    best_err = torch.full_like(scale, float("inf"))
    best_scale, best_zp = scale.clone(), zero_point.clone()
    for alpha in torch.linspace(1.0, 0.2, _MSE_STEPS).tolist():
        s, z = qparams_from_range(lo * alpha, hi * alpha, bits, spec.symmetric, spec.unsigned)
        err = (fake_quantize(rows, s[:, None], z[:, None], qmin, qmax) - rows).abs().pow(spec.mse_norm).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        best_zp = torch.where(better, z, best_zp)
    return best_scale, best_zp


class ActivationObserver:
    """Running range and a bounded random subsample, per (timestep group, channel segment).

    The subsample (up to ``max_samples`` values) feeds percentile and MSE estimation; min/max uses
    the exact running range. Sampling uses its own seeded generator, so calibration is repeatable.
    """

    def __init__(self, num_groups: int, num_segments: int, max_samples: int = 1 << 16, seed: int = 0) -> None:
        self.lo = torch.full((num_groups, num_segments), float("inf"))
        self.hi = torch.full((num_groups, num_segments), float("-inf"))
        self.samples: dict[tuple[int, int], torch.Tensor] = {}
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.count = torch.zeros(num_groups, dtype=torch.long)

    def observe(self, group: int, segment: int, x: torch.Tensor) -> None:
        x = x.detach().float().flatten().cpu()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise FloatingPointError("non-finite activation")
        self.lo[group, segment] = torch.minimum(self.lo[group, segment], lo)
        self.hi[group, segment] = torch.maximum(self.hi[group, segment], hi)
        take = min(x.numel(), self.max_samples // 8)
        picked = x if take == x.numel() else x[torch.randint(0, x.numel(), (take,), generator=self.generator)]
        old = self.samples.get((group, segment))
        merged = picked if old is None else torch.cat([old, picked])
        if merged.numel() > self.max_samples:
            merged = merged[torch.randperm(merged.numel(), generator=self.generator)[: self.max_samples]]
        self.samples[(group, segment)] = merged
        if segment == 0:
            self.count[group] += 1

    def observed_groups(self) -> list[int]:
        return [g for g in range(self.lo.shape[0]) if torch.isfinite(self.lo[g]).all()]


class ChannelObserver:
    """Per-(timestep group, input channel) running range and a bounded random subsample of whole tokens.

    The statistics of smoothing (``per_channel_smooth``): the migration factors come from the channels'
    ranges, the alpha search and the per-tensor scale of the smoothed input from the kept tokens
    (``max_values`` numbers per group, at least 16 tokens). ``x`` rows are tokens: ``[N, C]``.
    """

    def __init__(self, num_groups: int, channels: int, max_values: int = 1 << 16, seed: int = 0) -> None:
        self.lo = torch.full((num_groups, channels), float("inf"))
        self.hi = torch.full((num_groups, channels), float("-inf"))
        self.rows: dict[int, torch.Tensor] = {}
        self.max_rows = max(16, max_values // channels)
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, group: int, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        if rows.numel() == 0:
            return
        if not bool(torch.isfinite(rows).all()):
            raise FloatingPointError("non-finite activation")
        self.lo[group] = torch.minimum(self.lo[group], rows.amin(dim=0))
        self.hi[group] = torch.maximum(self.hi[group], rows.amax(dim=0))
        take = min(rows.shape[0], self.max_rows // 4)
        picked = rows[torch.randperm(rows.shape[0], generator=self.generator)[:take]]
        merged = picked if group not in self.rows else torch.cat([self.rows[group], picked])
        if merged.shape[0] > self.max_rows:
            merged = merged[torch.randperm(merged.shape[0], generator=self.generator)[: self.max_rows]]
        self.rows[group] = merged

    def observed_groups(self) -> list[int]:
        return [g for g in range(self.lo.shape[0]) if torch.isfinite(self.lo[g]).all()]
