"""The optimizer step block reconstruction and QAT share, so both learn with the same order of operations."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.lsq import StepSizes


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    backward: Callable[[], None],
    *,
    step_sizes: StepSizes | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Clear gradients; ``backward`` (forward, loss, ``loss.backward()``); ``before_step`` (e.g. summing gradients
    across processes, zeroing frozen weights' gradients); the optimizer step; the LSQ clamp of ``step_sizes``;
    ``after_step`` (e.g. pinning frozen weights)."""
    optimizer.zero_grad(set_to_none=True)
    backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    if step_sizes is not None:
        step_sizes.clamp_()
    if after_step is not None:
        after_step()


class FloatMasters:
    """Half-precision trainable parameters held in float32 while learning (master copies in place).

    Adam's updates to weights are far below bfloat16's resolution (8 significant bits), so learning them in the
    model's dtype would lose most steps. The parameters themselves become float32 (same objects, so optimizer
    state and checkpoints need nothing else); quantized layers cast them to the compute dtype in each forward;
    ``restore`` returns them to their dtype when learning ends.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.dtypes = [(p, p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)]
        for p, _ in self.dtypes:
            p.data = p.data.float()

    def restore(self) -> None:
        for p, dtype in self.dtypes:
            p.data = p.data.to(dtype)
        self.dtypes = []
