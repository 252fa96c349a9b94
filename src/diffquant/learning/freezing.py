"""Selective freezing (EMF): find weights whose integer value keeps flipping during QAT and pin them.

Reading chosen: after every optimizer step each tracked weight's integer code is compared with
the previous step's; a weight *oscillates* when it flipped in at least ``threshold`` of the steps
tracked so far while never leaving a two-level band (max code − min code ≤ 1), which separates
oscillation from a weight that is honestly moving to another level. A frozen weight is pinned to
the nearer of its two levels (its mean code, rounded): after every later step its float value is
set back to that level's grid point under the current scale, so its integer value no longer
changes (its gradient is zeroed too). Freezing runs in rounds; the caller picks which layers each
round covers (EMF: the sensitive layers first, then all).
"""

from __future__ import annotations

import torch

from ..nn import QuantModule
from .lowrank import base_weight


def _codes(module: QuantModule) -> torch.Tensor:
    """The weight's integer codes, rows x inputs, in the grid's smallest dtype (int8 / uint8 up to 8 bits)."""
    with torch.no_grad():
        q = module.weight_quantizer.integer_codes(module.weight.detach())
    return q.reshape(q.shape[0], -1)


BYTES_PER_WEIGHT = 11  # the state below for codes of up to 8 bits: 2.57 G weights (SDXL's UNet) hold 26 GiB


class SelectiveFreezer:
    """Flip statistics and freeze masks for the weights of ``layers`` (name -> quantized module)."""

    STATE = ("prev", "flips", "code_sum", "code_min", "code_max", "frozen", "frozen_codes")

    def __init__(self, layers: dict[str, QuantModule]) -> None:
        self.layers = layers
        self.steps = 0
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, module in layers.items():
            codes = _codes(module)
            self.state[name] = {
                "prev": codes, "flips": torch.zeros_like(codes, dtype=torch.int16), "code_sum": torch.zeros_like(codes, dtype=torch.float32),
                "code_min": codes.clone(), "code_max": codes.clone(), "frozen": torch.zeros_like(codes, dtype=torch.bool),
                "frozen_codes": torch.zeros_like(codes),
            }

    def observe(self) -> float:
        """Record this step's codes; returns the fraction of unfrozen tracked weights that flipped."""
        flipped = total = 0
        self.steps += 1
        for name, module in self.layers.items():
            s = self.state[name]
            codes = _codes(module)
            changed = (codes != s["prev"]) & ~s["frozen"]
            s["flips"] += changed.to(s["flips"].dtype)
            s["code_sum"] += codes.float()
            torch.minimum(s["code_min"], codes, out=s["code_min"])
            torch.maximum(s["code_max"], codes, out=s["code_max"])
            s["prev"] = codes
            flipped += int(changed.sum())
            total += int((~s["frozen"]).sum())
        return flipped / max(total, 1)

    def freeze(self, names: list[str], threshold: float) -> dict[str, int]:
        """Freeze the oscillating, not yet frozen weights of ``names``; returns how many per layer."""
        counts: dict[str, int] = {}
        if self.steps == 0:
            return counts
        for name in names:
            s = self.state[name]
            oscillating = (s["flips"].float() / self.steps >= threshold) & (s["code_max"] - s["code_min"] <= 1) & ~s["frozen"]
            n = int(oscillating.sum())
            if n:
                mean_code = torch.round(s["code_sum"] / self.steps).to(s["frozen_codes"].dtype)
                s["frozen_codes"] = torch.where(oscillating, mean_code, s["frozen_codes"])
                s["frozen"] |= oscillating
                counts[name] = n
        self.pin()
        return counts

    def zero_frozen_grads(self) -> None:
        for name, module in self.layers.items():
            frozen = self.state[name]["frozen"]
            base = base_weight(module)
            if frozen.any() and base.grad is not None:
                base.grad.view(frozen.shape)[frozen] = 0

    @torch.no_grad()
    def pin(self) -> None:
        """Move every frozen weight back onto its frozen level under the current scale."""
        for name, module in self.layers.items():
            s = self.state[name]
            if not s["frozen"].any():
                continue
            quantizer = module.weight_quantizer
            target = quantizer.dequantize(s["frozen_codes"].float()).reshape(s["frozen"].shape)
            current = module.weight.detach().reshape(s["frozen"].shape)
            base = base_weight(module)
            correction = torch.where(s["frozen"], target - current, torch.zeros_like(current)).to(base.dtype)
            base.add_(correction.reshape(base.shape))

    def frozen_count(self) -> int:
        return sum(int(s["frozen"].sum()) for s in self.state.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{key}": value for name, s in self.state.items() for key, value in s.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        self.steps = steps
        for name, s in self.state.items():
            for key in self.STATE:
                s[key] = tensors[f"{name}/{key}"].to(s[key].device, s[key].dtype)  # earlier checkpoints held int16 codes
