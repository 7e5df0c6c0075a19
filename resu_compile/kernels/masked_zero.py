"""Zero many tensors where their packed mask bit is clear, in one launch per (device, dtype).

Every transition zeroes the newly pruned coordinates of each weight and of each optimizer state
shaped like it (METHOD.md section 1: ``W[P] == 0`` and the state is 0 on ``P``). Done per tensor
with ``masked_fill_`` that is an unpacked mask plus a launch per tensor; the Triton kernel
(:mod:`resu_compile.kernels.triton.masked_zero`) reads the packed bits and only stores: zeros where
a bit is clear, nothing elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import packed_numel, unpack_bits
from resu_compile.kernels.launch import FLOAT_DTYPES, on_gpu

ZEROABLE_DTYPES = (*FLOAT_DTYPES, torch.float64)  # zeroing needs no arithmetic


def zero_where_clear_(tensors: Sequence[torch.Tensor], bits: Sequence[torch.Tensor]) -> None:
    """``tensors[i][~unpack_bits(bits[i])] = 0`` for every ``i``, in place.

    Contiguous CUDA tensors of a floating dtype take one Triton launch per (device, dtype);
    anything else takes :func:`zero_where_clear_reference_` (the CPU path).
    """
    if len(tensors) != len(bits):
        raise ValueError("zero_where_clear_: one packed-bit tensor per tensor")
    for i, (tensor, packed) in enumerate(zip(tensors, bits, strict=True)):
        if packed.dtype != torch.uint8 or packed.numel() != packed_numel(tensor.numel()):
            raise ValueError(f"zero_where_clear_: bits[{i}] must hold ceil(numel / 8) uint8 bytes")
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        fused = tensor.numel() and tensor.is_contiguous() and tensor.dtype in ZEROABLE_DTYPES
        if fused and on_gpu([tensor, bits[i]]):
            groups.setdefault((tensor.device, tensor.dtype), []).append(i)
        else:
            zero_where_clear_reference_(tensor, bits[i])
    if groups:
        from resu_compile.kernels.triton.masked_zero import zero_where_clear_triton_

        for (_, dtype), indices in groups.items():
            zero_where_clear_triton_(
                [tensors[i] for i in indices], [bits[i] for i in indices], dtype
            )


def zero_where_clear_reference_(tensor: torch.Tensor, bits: torch.Tensor) -> None:
    """The reference of one tensor: ``masked_fill_`` with the unpacked mask."""
    tensor.masked_fill_(~unpack_bits(bits, tensor.shape).to(tensor.device), 0)
