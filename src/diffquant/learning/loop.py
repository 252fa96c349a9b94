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
