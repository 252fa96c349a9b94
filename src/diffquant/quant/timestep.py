"""Timestep-indexed quantization parameters.

An activation quantizer may hold one parameter set per *timestep group*; a group is represented
by its centre on the training-timestep axis (0..num_train_timesteps). The denoiser's current
timestep selects the nearest centre, so a schedule with a different number of inference steps
maps each step to the nearest calibrated group. Uniform groups partition [0, T); per-step groups
(PCR) put one centre on each calibration step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TimestepGroups:
    """Group centres on the training-timestep axis, sorted ascending."""

    centers: list[float] = field(default_factory=lambda: [500.0])

    def __post_init__(self) -> None:
        if not self.centers:
            raise ValueError("a timestep grouping needs at least one group")
        self.centers = sorted(float(c) for c in self.centers)
        self._centers_t = torch.tensor(self.centers, dtype=torch.float64)

    @classmethod
    def uniform(cls, num_groups: int, num_train_timesteps: int = 1000) -> TimestepGroups:
        if num_groups < 1:
            raise ValueError(f"timestep_groups must be >= 1, got {num_groups}")
        width = num_train_timesteps / num_groups
        return cls([(i + 0.5) * width for i in range(num_groups)])

    @classmethod
    def per_step(cls, timesteps: list[float] | torch.Tensor) -> TimestepGroups:
        values = [float(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
        return cls(sorted(set(values)))

    def __len__(self) -> int:
        return len(self.centers)

    def index(self, t: torch.Tensor | float) -> torch.Tensor:
        """Nearest-centre group index for each timestep in ``t`` (same shape, long)."""
        t = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        return (t.unsqueeze(-1) - self._centers_t).abs().argmin(dim=-1)

    def to_dict(self) -> dict:
        return {"centers": list(self.centers)}

    @classmethod
    def from_dict(cls, data: dict) -> TimestepGroups:
        return cls(list(data["centers"]))


class TimestepContext:
    """The group of the denoiser call in flight, shared by all activation quantizers of one model.

    ``group`` is an int when the whole batch shares one timestep, or a long tensor [B] when a batch
    mixes timesteps (parallel QAT). ``force(g)`` pins a group regardless of t (used while
    calibrating one step at a time).
    """

    def __init__(self, groups: TimestepGroups) -> None:
        self.groups = groups
        self.group: int | torch.Tensor = 0
        self.forced: int | None = None
        self.timestep: torch.Tensor | None = None

    def set_timestep(self, t: torch.Tensor | float) -> None:
        t = torch.as_tensor(t).detach()
        self.timestep = t
        if self.forced is not None:
            self.group = self.forced
            return
        idx = self.groups.index(t.flatten())
        if idx.numel() == 1 or bool((idx == idx[0]).all()):
            self.group = int(idx.flatten()[0])
        else:
            self.group = idx

    def force(self, group: int | None) -> None:
        if group is not None and not 0 <= group < len(self.groups):
            raise IndexError(f"timestep group {group} out of range 0..{len(self.groups) - 1}")
        self.forced = group
        if group is not None:
            self.group = group
