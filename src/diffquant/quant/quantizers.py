"""Weight and activation quantizers as modules whose parameters live in the model's state dict."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .adaround import AdaRound
from .affine import fake_quantize, qparams_from_range, qrange, quantize_to_int, round_ste
from .observers import ActivationObserver, ChannelObserver, estimate_qparams
from .spec import ACT_GRANULARITIES, WEIGHT_GRANULARITIES, QuantSpec
from .timestep import TimestepContext

GROUP_PARAM_BITS = 16  # a per-group scale (or zero point) as group formats store it (fp16), for average-bit accounting
OVERFLOW_FIX = "the model overflows here; run in float32 (torch_dtype=torch.float32) or lower the guidance scale"


class NonFiniteError(FloatingPointError):
    """NaN/Inf found in ``where``; ``diffquant.guard`` replaces the generic ``fix`` by the diagnosed cause."""

    def __init__(self, where: str, fix: str = OVERFLOW_FIX) -> None:
        self.where = where
        super().__init__(f"NaN/Inf in {where}: {fix}")


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The smallest integer dtype holding the grid ``[qmin, qmax]``."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int16 if qmin >= -(2**15) and qmax < 2**15 else torch.int32


def _segment_bounds(total: int, splits: list[int] | None, group_size: int | None, unit: int = 1) -> list[tuple[int, int]]:
    """[start, end) segments along an axis of ``total`` elements: input splits, each cut into groups."""
    sizes = [s * unit for s in splits] if splits else [total]
    if sum(sizes) != total:
        raise ValueError(f"split sizes {splits} (x{unit}) do not add up to {total} elements")
    bounds, start = [], 0
    for size in sizes:
        step = group_size or size
        for a in range(start, start + size, step):
            bounds.append((a, min(a + step, start + size)))
        start += size
    return bounds


def _segment_index(bounds: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.full((b - a,), i, dtype=torch.long) for i, (a, b) in enumerate(bounds)])


class WeightQuantizer(nn.Module):
    """Per-tensor, per-output-channel or per-group weight quantizer.

    The weight is viewed as [out, in_flat]. Scales are held per (row, segment) where rows are output
    channels (one row for per-tensor) and segments cut ``in_flat`` into input-channel splits (shortcut
    splitting) and groups (per-group). ``rounding`` may replace round-to-nearest (AdaRound).
    """

    def __init__(self, spec: QuantSpec, weight_shape: torch.Size | tuple[int, ...], input_splits: list[int] | None = None):
        super().__init__()
        if spec.granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight granularity {spec.granularity!r} is for activations; choose one of {', '.join(WEIGHT_GRANULARITIES)}")
        self.spec = spec
        self.weight_shape = tuple(weight_shape)
        out_channels = self.weight_shape[0]
        kernel = math.prod(self.weight_shape[2:]) if len(self.weight_shape) > 2 else 1
        in_flat = math.prod(self.weight_shape[1:])
        group = spec.group_size if spec.granularity == "per_group" else None
        self.input_splits = list(input_splits) if input_splits else None
        self.bounds = _segment_bounds(in_flat, self.input_splits, group * kernel if group else None, unit=kernel)
        rows = 1 if spec.granularity == "per_tensor" else out_channels
        self.scale = nn.Parameter(torch.ones(rows, len(self.bounds)), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(rows, len(self.bounds)))
        self.register_buffer("seg_index", _segment_index(self.bounds), persistent=False)
        self.qmin, self.qmax = qrange(spec.bits, spec.symmetric)
        self.rounding: nn.Module | None = None

    @property
    def bits(self) -> int:
        return self.spec.bits

    def group_param_bits(self) -> float:
        """Bits per weight element that per-group scales (and zero points, if asymmetric) add, at 16 bits each.

        Group formats quote them in their bits per weight (a scale per 64 weights: +0.25 bits); per-tensor and
        per-channel scales are a vanishing share at full size and stay uncounted (``diffquant.bits``)."""
        if self.spec.granularity != "per_group":
            return 0.0
        params = self.scale.numel() * (1 if self.spec.symmetric else 2)
        return GROUP_PARAM_BITS * params / math.prod(self.weight_shape)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        """Set scales from the weight with the spec's observer (min/max, percentile or MSE)."""
        w2 = weight.detach().float().reshape(self.weight_shape[0], -1)
        for s, (a, b) in enumerate(self.bounds):
            rows = w2[:, a:b]
            if self.spec.granularity == "per_tensor":
                rows = rows.reshape(1, -1)
            scale, zero_point = estimate_qparams(rows, self.spec)
            self.scale[:, s] = scale.to(self.scale.device)
            self.zero_point[:, s] = zero_point.to(self.zero_point.device)

    def _expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale[:, self.seg_index], self.zero_point[:, self.seg_index]

    def expanded_scale(self) -> torch.Tensor:
        """The scale of every weight element, as ``[out, in_flat]``."""
        return self._expanded()[0]

    def learn_rounding(self, weight: torch.Tensor) -> AdaRound:
        """Round ``weight`` with a learned AdaRound from now on (until ``QuantModule.bake_rounding``); returns it."""
        self.rounding = AdaRound(weight.reshape(self.weight_shape[0], -1), self.expanded_scale())
        return self.rounding

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self._expanded()
        w2 = weight.reshape(self.weight_shape[0], -1)
        rounded = self.rounding(w2, scale) if self.rounding is not None else None
        out = fake_quantize(w2.float(), scale, zero_point, self.qmin, self.qmax, rounded=rounded)
        return out.reshape(self.weight_shape).to(weight.dtype)

    @torch.no_grad()
    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``weight`` (honouring a learned rounding) in the smallest dtype holding the grid."""
        scale, zero_point = self._expanded()
        w2 = weight.reshape(self.weight_shape[0], -1).float()
        if self.rounding is not None:
            q = torch.clamp(self.rounding(w2, scale) + zero_point, self.qmin, self.qmax)
        else:
            q = quantize_to_int(w2, scale, zero_point, self.qmin, self.qmax)
        dtype = code_dtype(self.qmin, self.qmax)
        return q.to(dtype).reshape(self.weight_shape)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self._expanded()
        q = codes.reshape(self.weight_shape[0], -1).float()
        return ((q - zero_point) * scale).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        split = f", splits={self.input_splits}" if self.input_splits else ""
        return f"w{self.spec.bits} {self.spec.granularity} {'sym' if self.spec.symmetric else 'asym'}{split}"


class ActivationQuantizer(nn.Module):
    """Activation quantizer with one parameter set per timestep group (and channel segment).

    ``mode``: ``off`` passes through; ``observe`` records statistics (calibration) and passes
    through; ``quantize`` fake-quantizes with the parameters of the context's current group.
    ``bits`` may differ per group (PCR's relaxed steps). ``channel_splits`` quantizes a concatenated
    input in parts with separate parameters (Q-Diffusion's shortcut splitting).

    The spec's granularity (``ACT_GRANULARITIES``) decides where scales come from, so every method
    (RTN, reconstruction, QAT) quantizes under it without code of its own:
    ``per_tensor``: static scale and zero point per (timestep group, segment), fitted by the observer.
    ``per_token`` / ``per_group``: dynamic, from each token's range (the channels of one position: the last
    axis of a Linear input, axis 1 of a Conv2d input) in each segment, cut into groups of ``group_size``
    channels for ``per_group``; the observer is skipped and there is no step size to learn (LSQ leaves them
    out: ``step_size_parameters``), but ``bits`` per timestep group still apply.
    ``per_channel_smooth``: static per-tensor scales of the input divided by the per-channel ``smooth``
    factors (``channels`` of them), which the owning layer searches and multiplies into its weight columns
    (``nn.smoothing``); the observer keeps per-channel ranges and whole tokens for that search.
    """

    def __init__(
        self,
        spec: QuantSpec,
        context: TimestepContext | None = None,
        num_groups: int = 1,
        channel_splits: list[int] | None = None,
        channel_axis: int = -1,
        channels: int | None = None,
    ):
        super().__init__()
        if spec.granularity not in ACT_GRANULARITIES:
            raise ValueError(f"activation granularity {spec.granularity!r} is for weights; choose one of {', '.join(ACT_GRANULARITIES)}")
        self.spec = spec
        self.context = context
        self.channel_splits = list(channel_splits) if channel_splits else None
        self.channel_axis = channel_axis
        num_segments = len(self.channel_splits) if self.channel_splits else 1
        self.scale = nn.Parameter(torch.ones(num_groups, num_segments), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(num_groups, num_segments))
        self.register_buffer("bits", torch.full((num_groups,), spec.bits, dtype=torch.long))
        if self.channel_splits:
            self.register_buffer("seg_index", _segment_index(_segment_bounds(sum(self.channel_splits), self.channel_splits, None)), persistent=False)
        else:
            self.seg_index = None
        if self.smoothing and channels is None:
            raise ValueError("per_channel_smooth needs the layer's input channel count (channels=)")
        self.register_buffer("smooth", torch.ones(channels) if self.smoothing else None)
        self.mode = "off"
        self.observer: ActivationObserver | ChannelObserver | None = None
        self.name = ""
        # True once the parameters come from data (observed, or loaded with a saved model); not saved itself.
        # Dynamic scales need no data.
        self.calibrated = spec.dynamic

    @property
    def dynamic(self) -> bool:
        return self.spec.dynamic

    @property
    def smoothing(self) -> bool:
        return self.spec.granularity == "per_channel_smooth"

    @property
    def num_groups(self) -> int:
        return self.scale.shape[0]

    def current_group(self) -> int | torch.Tensor:
        """The timestep group of this call: an int, or a per-sample tensor when a batch mixes timesteps."""
        return 0 if self.context is None or self.num_groups == 1 else self.context.group

    def start_observing(self, seed: int = 0) -> None:
        """Record statistics from now on (nothing to record for dynamic scales: the input passes through)."""
        if self.smoothing:
            self.observer = ChannelObserver(self.num_groups, self.smooth.numel(), seed=seed)
        elif not self.dynamic:
            self.observer = ActivationObserver(self.num_groups, self.scale.shape[1], seed=seed)
        self.mode = "observe"

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as rows of channels: one row per token (position)."""
        return x.movedim(self.channel_axis, -1).reshape(-1, x.shape[self.channel_axis])

    def _observe(self, x: torch.Tensor) -> None:
        assert self.observer is not None
        group = self.current_group()
        groups = [(group, x)] if isinstance(group, int) else [
            (int(g), x[group.to(x.device) == g]) for g in torch.unique(group).tolist()
        ]
        for g, xg in groups:
            try:
                if isinstance(self.observer, ChannelObserver):
                    self.observer.observe(g, self._tokens(xg))
                    continue
                parts = torch.split(xg, self.channel_splits, dim=self.channel_axis) if self.channel_splits else [xg]
                for s, part in enumerate(parts):
                    self.observer.observe(g, s, part)
            except FloatingPointError:
                t = None if self.context is None or self.context.timestep is None else self.context.timestep.flatten()[0].item()
                raise NonFiniteError(f"the input of {self.name or 'a quantized layer'} at timestep {t}") from None

    def _segment_stats(self, g: int, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(samples [1, N], lo [1], hi [1]) of timestep group ``g`` and segment ``s`` as the grid will see them."""
        obs = self.observer
        if isinstance(obs, ChannelObserver):
            a, b = _segment_bounds(obs.lo.shape[1], self.channel_splits, None)[s]
            return obs.rows[g][:, a:b].reshape(1, -1), obs.lo[g, a:b].min()[None], obs.hi[g, a:b].max()[None]
        return obs.samples[(g, s)][None], obs.lo[g, s : s + 1], obs.hi[g, s : s + 1]

    def smoothing_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [N, C], lo [C], hi [C]) of the unsmoothed input over every observed timestep group (the search's data)."""
        obs = self.observer
        if not isinstance(obs, ChannelObserver) or not obs.observed_groups():
            raise RuntimeError(f"{self.name}: no calibration data reached this layer; check the calibration prompts and steps")
        s = self.smooth.detach().float().cpu()
        groups = obs.observed_groups()
        rows = torch.cat([obs.rows[g] for g in groups]) * s
        return rows, obs.lo[groups].amin(dim=0) * s, obs.hi[groups].amax(dim=0) * s

    @torch.no_grad()
    def set_smoothing(self, factors: torch.Tensor) -> None:
        """Divide the input by ``factors`` from now on; observed statistics follow (the owning layer scales its weight)."""
        ratio = self.smooth.detach().float().cpu() / factors.float().cpu()
        if isinstance(self.observer, ChannelObserver):
            self.observer.lo *= ratio
            self.observer.hi *= ratio
            self.observer.rows = {g: r * ratio for g, r in self.observer.rows.items()}
        self.smooth.copy_(factors.to(self.smooth))

    def smooth_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` divided by the smoothing factors along its channel axis (``x`` itself without smoothing)."""
        if self.smooth is None:
            return x
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return x / self.smooth.to(x.dtype).reshape(shape)

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Turn the statistics into scales; groups never observed borrow the nearest observed group's."""
        if self.dynamic:
            self.mode = "quantize"
            return
        if self.observer is None:
            raise RuntimeError(f"{self.name}: finish_observing() called without start_observing()")
        observed = self.observer.observed_groups()
        if not observed:
            raise RuntimeError(f"{self.name}: no calibration data reached this layer; check the calibration prompts and steps")
        for g in observed:
            for s in range(self.scale.shape[1]):
                samples, lo, hi = self._segment_stats(g, s)
                scale, zero_point = estimate_qparams(samples, self.spec, bits=int(self.bits[g]), lo=lo, hi=hi)
                self.scale[g, s] = scale[0]
                self.zero_point[g, s] = zero_point[0]
        centers = self.context.groups.centers if self.context is not None and len(self.context.groups) == self.num_groups else list(range(self.num_groups))
        for g in range(self.num_groups):
            if g not in observed:
                nearest = min(observed, key=lambda o: abs(centers[o] - centers[g]))
                self.scale[g] = self.scale[nearest]
                self.zero_point[g] = self.zero_point[nearest]
        self.observer = None
        self.mode = "quantize"
        self.calibrated = True

    @torch.no_grad()
    def refit_group(self, group: int) -> None:
        """``finish_observing`` for timestep group ``group`` alone: the other groups keep their parameters."""
        others = torch.ones(self.num_groups, dtype=torch.bool)
        others[group] = False
        scale, zero_point = self.scale.detach().clone(), self.zero_point.clone()
        self.finish_observing()
        self.scale[others] = scale[others].to(self.scale.device)
        self.zero_point[others] = zero_point[others].to(self.zero_point.device)

    def group_params(self, group: int) -> dict[str, torch.Tensor]:
        """Scale and zero point of one timestep group (one value per channel segment)."""
        return {"scale": self.scale[group].detach(), "zero_point": self.zero_point[group]}

    @torch.no_grad()
    def set_group_params(self, group: int, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale[group] = scale.to(self.scale.device)
        self.zero_point[group] = zero_point.to(self.zero_point.device)
        self.calibrated = True

    def group_range(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) per channel segment that group ``group``'s grid spans; ``set_group_range`` of it is the identity
        (a symmetric grid reports ``±qmax·scale``, the range ``qparams_from_range`` maps onto it)."""
        qmin, qmax = qrange(int(self.bits[group]), self.spec.symmetric, self.spec.unsigned)
        scale, zero_point = self.scale[group].detach().float(), self.zero_point[group].float()
        if self.spec.symmetric and not self.spec.unsigned:
            return -qmax * scale, qmax * scale
        return (qmin - zero_point) * scale, (qmax - zero_point) * scale

    @torch.no_grad()
    def set_group_range(self, group: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Map ``[lo, hi]`` (per channel segment) onto group ``group``'s grid at its own bit width."""
        scale, zero_point = qparams_from_range(lo, hi, int(self.bits[group]), self.spec.symmetric, self.spec.unsigned)
        self.set_group_params(group, scale, zero_point)

    def group_bits(self, group: int) -> int:
        return int(self.bits[group])

    def set_group_bits(self, group: int, bits: int) -> None:
        """Quantize timestep group ``group`` at ``bits`` (e.g. PCR's relaxed steps); refit or rescale the group after."""
        dataclasses.replace(self.spec, bits=bits)  # validates the width with QuantSpec's one-line error
        self.bits[group] = bits

    def broadcast_param(self, param: torch.Tensor, x: torch.Tensor, per_sample: bool) -> torch.Tensor:
        """Broadcast a per-(group,segment) parameter picked for this call over ``x``."""
        shape = [1] * x.dim()
        if self.seg_index is not None:
            param = param[..., self.seg_index.to(param.device)]
            shape[self.channel_axis] = param.shape[-1]
        else:
            param = param[..., 0]
        if per_sample:
            shape[0] = param.shape[0]
        return param.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.observer is not None:
                self._observe(x)
            return x
        return self.fake_quant(x, self.current_group())

    def fake_quant(self, x: torch.Tensor, group: int | torch.Tensor) -> torch.Tensor:
        """Fake quantization of ``x`` with timestep group ``group`` (an int, or one per sample)."""
        per_sample = not isinstance(group, int)
        if per_sample:
            group = group.to(self.scale.device)
        bits = self.bits[group]
        if self.dynamic:
            return self._dynamic_fake_quant(x, bits.reshape([-1] + [1] * (x.dim() - 1)) if per_sample else int(bits))
        scale = self.broadcast_param(self.scale[group], x, per_sample)
        zero_point = self.broadcast_param(self.zero_point[group], x, per_sample)
        qmin, qmax = qrange(bits, self.spec.symmetric, self.spec.unsigned)
        if per_sample:
            qmin = qmin.reshape([-1] + [1] * (x.dim() - 1))
            qmax = qmax.reshape([-1] + [1] * (x.dim() - 1))
        else:
            qmin, qmax = int(qmin), int(qmax)
        return fake_quantize(x.float(), scale, zero_point, qmin, qmax).to(x.dtype)

    def dynamic_bounds(self, channels: int) -> list[tuple[int, int]]:
        """[start, end) channels sharing one dynamic scale per token: the segments, cut into groups for ``per_group``."""
        group = self.spec.group_size if self.spec.granularity == "per_group" else None
        return _segment_bounds(channels, self.channel_splits, group)

    def dynamic_qparams(self, tokens: torch.Tensor, bits: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of each token from its range over the last axis (kept, size 1); no gradient."""
        t = tokens.detach().float()
        return qparams_from_range(t.amin(dim=-1, keepdim=True), t.amax(dim=-1, keepdim=True), bits,
                                  self.spec.symmetric, self.spec.unsigned)

    def _dynamic_fake_quant(self, x: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
        xm = x.float().movedim(self.channel_axis, -1)
        if torch.is_tensor(bits):  # per sample: [B, 1, ...] against the moved layout
            bits = bits.to(xm.device)
        qmin, qmax = qrange(bits, self.spec.symmetric, self.spec.unsigned)
        bounds = self.dynamic_bounds(xm.shape[-1])
        sizes = {b - a for a, b in bounds}
        if len(sizes) == 1:  # equal groups: one reshape, one pass
            size = sizes.pop()
            xg = xm.reshape(*xm.shape[:-1], len(bounds), size)
            if torch.is_tensor(bits):
                bits, qmin, qmax = (v.unsqueeze(-1) for v in (bits, qmin, qmax))
            scale, zero_point = self.dynamic_qparams(xg, bits)
            out = fake_quantize(xg, scale, zero_point, qmin, qmax).reshape(xm.shape)
        else:
            parts = []
            for a, b in bounds:
                scale, zero_point = self.dynamic_qparams(xm[..., a:b], bits)
                parts.append(fake_quantize(xm[..., a:b], scale, zero_point, qmin, qmax))
            out = torch.cat(parts, dim=-1)
        return out.movedim(-1, self.channel_axis).to(x.dtype)

    def average_bits(self, weights: torch.Tensor | None = None) -> float:
        """Mean bit width over groups (optionally weighted, e.g. by how many steps map to each)."""
        bits = self.bits.float()
        if weights is None:
            return float(bits.mean())
        return float((bits * weights).sum() / weights.sum())

    def extra_repr(self) -> str:
        bits = sorted(set(self.bits.tolist()))
        split = f", splits={self.channel_splits}" if self.channel_splits else ""
        kind = "" if self.spec.granularity == "per_tensor" else f" {self.spec.granularity}"
        return f"a{'/'.join(map(str, bits))}{kind} groups={self.num_groups}{' unsigned' if self.spec.unsigned else ''}{split} mode={self.mode}"


__all__ = ["ActivationQuantizer", "WeightQuantizer", "round_ste"]
