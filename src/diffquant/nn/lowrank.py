"""Low-rank float branch beside a quantized layer (``QuantConfig.lowrank_rank``): SVDQuant's decomposition.

Our reading of SVDQuant (Li et al., 2024) for any method: at wrap time a layer's weight, viewed as
``[out, in_flat]``, is split as ``W = up @ down + R`` from its truncated SVD (``up = U_r sqrt(S_r)``,
``down = sqrt(S_r) V_r^T``). The branch ``up @ down`` runs in 16-bit float on the *unquantized* input; the
residual ``R``, whose largest singular directions (where the outliers concentrate) are gone, becomes the
layer's ``weight`` and is what every method calibrates (RTN's ranges, AdaRound/LSQ reconstruction, EMF's QAT)
and quantizes. The factors are rounded to float16 values once, so "16 bits per branch parameter" in the average
bits (``branch_bits``) is exact whatever dtype the model runs in; they are not learned afterwards.
Two choices differ from the paper: the SVD is of the float weight before smoothing (``per_channel_smooth``
then migrates the residual's activation outliers, and the branch sees the unsmoothed input), and a convolution's
branch is a ``rank``-channel convolution with the layer's kernel followed by a 1x1 one (the SVD of its weight
as ``[out, in * kh * kw]``). Grouped convolutions get no branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BRANCH_BITS = 16


@torch.no_grad()
def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in_flat])`` of the best rank-``r`` approximation of ``weight`` viewed as [out, in_flat]
    (truncated SVD, singular values split evenly between the factors), in float32 rounded to float16 values."""
    w2 = weight.detach().float().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(w2, full_matrices=False)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    return up.half().float(), down.half().float()


class LowRankBranch(nn.Module):
    """``x -> up(down(x))`` in float: a Linear's ``down`` is ``[r, in]``; a Conv2d's is a ``[r, in, kh, kw]`` kernel with
    the layer's stride, padding and dilation, and ``up`` a 1x1 convolution. Parameters are frozen (no gradient)."""

    def __init__(self, weight_shape: tuple[int, ...], rank: int, conv: dict | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.zeros(rank, *weight_shape[1:], device=device, dtype=dtype), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(weight_shape[0], rank, device=device, dtype=dtype), requires_grad=False)
        self.conv = conv

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def delta(self) -> torch.Tensor:
        """``up @ down`` in the weight's shape (float32)."""
        return (self.up.float() @ self.down.float().flatten(1)).reshape(self.up.shape[0], *self.down.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One memory layout: a float conv's rounding depends on it, and an integer layer's output may come channels-last.
        x, down, up = x.contiguous(), self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            return F.linear(F.linear(x, down), up)
        return F.conv2d(F.conv2d(x, down, None, **self.conv), up[:, :, None, None])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, {BRANCH_BITS}-bit float"


def branch_rank(layer: nn.Module, rank: int) -> int:
    """The rank ``layer`` gets for a requested ``rank``: at most min(out, in_flat); 0 (no branch) for grouped or
    non-zero-padded convolutions, whose kernel a plain ``conv2d`` branch would not reproduce."""
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        return 0
    return min(rank, layer.weight.shape[0], layer.weight[0].numel())


@torch.no_grad()
def attach_branch(layer: nn.Module, rank: int, split: bool = True) -> None:
    """Give quantized ``layer`` a rank-``rank`` branch (``branch_rank``). ``split``: take it out of the weight now (the
    weight becomes the residual; its weight quantizer is recalibrated); else leave zeros for a saved state dict."""
    rank = branch_rank(layer, rank)
    if rank == 0:
        return
    conv = None if not isinstance(layer, nn.Conv2d) else {
        "stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    w = layer.weight
    branch = LowRankBranch(tuple(w.shape), rank, conv, device=w.device, dtype=w.dtype)
    if split:
        up, down = low_rank_factors(w, rank)
        branch.up.copy_(up)
        branch.down.copy_(down.reshape(branch.down.shape))
        # A new tensor: the float model's parameter (shared by the wrapper) keeps the full weight.
        layer.weight = nn.Parameter((w.float() - branch.delta()).to(w.dtype), requires_grad=w.requires_grad)
        layer.weight_quantizer.calibrate(layer.weight)
    layer.lowrank = branch


@torch.no_grad()
def merge_branch(layer: nn.Module) -> None:
    """Fold ``layer``'s branch back into its (unsmoothed) weight and drop it: the layer leaves quantization."""
    branch = getattr(layer, "lowrank", None)
    if branch is not None:
        layer.weight.add_(branch.delta().to(layer.weight))
        layer.lowrank = None


def branch_bits(layer: nn.Module) -> float:
    """Bits per weight element the branch adds (its parameters at ``BRANCH_BITS``), for average-bit accounting."""
    branch = getattr(layer, "lowrank", None)
    if branch is None:
        return 0.0
    numel = math.prod(layer.weight_quantizer.weight_shape)
    return BRANCH_BITS * (branch.up.numel() + branch.down.numel()) / numel
