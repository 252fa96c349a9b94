"""What a quantizer does, as a small frozen, JSON-serializable dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
# Activations: static per-tensor (per timestep group); static per-tensor after SmoothQuant-style per-input-channel
# migration into the weight; dynamic per token, or per token and group of ``group_size`` input channels.
ACT_GRANULARITIES = ("per_tensor", "per_channel_smooth", "per_token", "per_group")
DYNAMIC_GRANULARITIES = ("per_token", "per_group")
GRANULARITIES = tuple(dict.fromkeys(WEIGHT_GRANULARITIES + ACT_GRANULARITIES))
OBSERVERS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """An affine integer grid and how its range is estimated.

    ``symmetric`` grids are signed with zero point 0; asymmetric grids are unsigned with a zero
    point. ``unsigned`` forces a grid starting at 0 (softmax outputs). ``granularity`` is one of
    ``WEIGHT_GRANULARITIES`` for a weight (per output channel, or groups of ``group_size`` input elements)
    and one of ``ACT_GRANULARITIES`` for an activation (``ActivationQuantizer``: static per-tensor, smoothed,
    or dynamic per token / per token and group of ``group_size`` channels).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    group_size: int = 128
    observer: str = "minmax"
    percentile: float = 99.99
    mse_norm: float = 2.0
    unsigned: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer from 2 to 16, got {self.bits!r}; use e.g. 4 or 8")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def dynamic(self) -> bool:
        """Scales computed from each input at run time (activations per token or per group): nothing to calibrate."""
        return self.granularity in DYNAMIC_GRANULARITIES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        return cls(**data)
