"""Two signed 4-bit codes per byte: the on-disk (and in-state-dict) form of int4 weights.

Codes in [-8, 7] are stored as their low nibbles; element ``2i`` goes to the low nibble of byte
``i`` and element ``2i+1`` to the high nibble, along the flattened input dimension of the weight
viewed as ``[out, in_flat]``. An odd ``in_flat`` is padded with one zero code per row.
"""

from __future__ import annotations

import math

import torch


def packed_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """Shape of the packed uint8 tensor for int4 codes of ``shape`` ([out, ceil(in_flat / 2)])."""
    in_flat = math.prod(shape[1:])
    return shape[0], (in_flat + 1) // 2


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] of any shape [out, ...] into uint8 [out, ceil(in_flat / 2)]."""
    flat = codes.reshape(codes.shape[0], -1)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError("int4 packing needs codes in [-8, 7]; this weight was not quantized to 4 bits")
    nib = (flat.to(torch.int16) & 0xF).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = torch.cat([nib, nib.new_zeros(nib.shape[0], 1)], dim=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 codes of ``shape``."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    nib = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, : math.prod(shape[1:])]
    return torch.where(nib > 7, nib - 16, nib).reshape(shape)
