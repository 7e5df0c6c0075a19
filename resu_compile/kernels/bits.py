"""Packed-bit storage for masks and selections: one bit per weight.

Format (shared by the reference path, the compiled graphs and every Triton kernel): the boolean
tensor is flattened in row-major order; element ``i`` lives in byte ``i >> 3`` at bit ``i & 7``
(least significant bit first) of a ``uint8`` tensor of ``ceil(N / 8)`` bytes. Padding bits are 0.
One bit per weight is the whole memory price of a mask, which is what lets RESU train at dense
memory.
"""

from __future__ import annotations

import torch


def packed_numel(numel: int) -> int:
    """Bytes needed to hold ``numel`` bits."""
    return (numel + 7) // 8


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into the uint8 format above."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits: mask must be a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.uint8) << _shifts(mask.device)
    return groups.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``.

    Written with shifts, views and a slice only, so inside a compiled graph Inductor folds the
    unpacking into whatever elementwise kernel consumes the mask (no N-byte temporary).
    """
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.numel() != packed_numel(numel):
        raise ValueError(
            f"unpack_bits: shape {tuple(shape)} needs {packed_numel(numel)} uint8 values, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:numel].reshape(shape).bool()


def count_bits(packed: torch.Tensor) -> int:
    """Number of set bits (padding bits are always 0)."""
    return int(((packed.unsqueeze(-1) >> _shifts(packed.device)) & 1).sum())
