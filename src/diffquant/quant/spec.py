"""What a quantizer does, as a small frozen, JSON-serializable dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
OBSERVERS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """An affine integer grid and how its range is estimated.

    ``symmetric`` grids are signed with zero point 0; asymmetric grids are unsigned with a zero
    point. ``unsigned`` forces a grid starting at 0 (softmax outputs). ``granularity`` applies to
    weights (per output channel, or groups of ``group_size`` input elements); activations are
    per-tensor (optionally split into channel segments, see ``ActivationQuantizer``).
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        return cls(**data)
