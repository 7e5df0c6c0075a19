"""Packed-bit storage for masks and selections: one bit per weight.

Format (shared by the reference path and every Triton kernel): the boolean tensor is flattened in
row-major order; element ``i`` lives in byte ``i >> 3`` at bit ``i & 7`` (least significant bit
first) of a ``uint8`` tensor of ``ceil(N / 8)`` bytes. Padding bits are 0. One bit per weight is the
whole memory price of a mask, which is what lets RESU train at dense memory.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_numel(numel: int) -> int:
    """Bytes needed to hold ``numel`` bits."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into the uint8 format above."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits: mask must be a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.uint8)
    weights = _BIT_WEIGHTS.to(mask.device)
    return (groups * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits: packed must be uint8, got {packed.dtype}")
    numel = 1
    for size in shape:
        numel *= size
    if packed.numel() != packed_numel(numel):
        raise ValueError(
            f"unpack_bits: {packed.numel()} bytes cannot hold shape {tuple(shape)} "
            f"(needs {packed_numel(numel)})"
        )
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.reshape(-1, 1) & weights) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def count_bits(packed: torch.Tensor) -> int:
    """Number of set bits (padding bits are always 0)."""
    weights = _BIT_WEIGHTS.to(packed.device)
    return int(((packed.reshape(-1, 1) & weights) != 0).sum())
