"""Zero many tensors where their packed mask bit is clear, in one launch per dtype.

Every transition zeroes the newly pruned coordinates of each weight and of each optimizer state
shaped like it (METHOD.md section 1: ``W[P] == 0`` and the state is 0 on ``P``). Done per tensor
with ``masked_fill_`` that is an unpacked mask plus a launch per tensor; here the kernel reads the
packed bits and only stores: zeros where a bit is clear, nothing elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import packed_numel, unpack_bits
from resu_compile.kernels.segments import (
    BLOCK,
    CHUNK_BLOCKS,
    FLOAT_DTYPES,
    NUM_WARPS,
    address_table,
    chunk_tables,
    load_chunk,
    on_gpu,
    segment_ptr,
    tile,
    tile_bits,
)

_DTYPES = {**FLOAT_DTYPES, torch.float64: tl.float64}  # zeroing needs no arithmetic


@triton.jit
def _zero_where_clear_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """Address rows: the tensors, then their packed bits."""
    _pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    ptr = segment_ptr(addrs_ptr, 0, n_segments, seg, DTYPE)
    bits_ptr = segment_ptr(addrs_ptr, 1, n_segments, seg, tl.uint8)
    for i in range(CHUNK_BLOCKS):
        offs, inb, byte_offs, row_inb = tile(chunk_start + i * BLOCK, n, BLOCK)
        keep = tile_bits(bits_ptr, byte_offs, row_inb)
        tl.store(ptr + offs, tl.zeros(offs.shape, DTYPE), mask=inb & (keep == 0))


def zero_where_clear_(tensors: Sequence[torch.Tensor], bits: Sequence[torch.Tensor]) -> None:
    """``tensors[i][~unpack_bits(bits[i])] = 0`` for every ``i``, in place.

    Contiguous CUDA tensors of a floating dtype take one Triton launch per (device, dtype);
    anything else takes ``masked_fill_`` (the reference, and the CPU path).
    """
    if len(tensors) != len(bits):
        raise ValueError("zero_where_clear_: one packed-bit tensor per tensor")
    for i, (tensor, packed) in enumerate(zip(tensors, bits, strict=True)):
        if packed.dtype != torch.uint8 or packed.numel() != packed_numel(tensor.numel()):
            raise ValueError(f"zero_where_clear_: bits[{i}] must hold ceil(numel / 8) uint8 bytes")
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        fused = tensor.numel() and tensor.is_contiguous() and tensor.dtype in _DTYPES
        if fused and on_gpu([tensor, bits[i]]):
            groups.setdefault((tensor.device, tensor.dtype), []).append(i)
        else:
            zero_where_clear_reference_(tensor, bits[i])
    for (_, dtype), indices in groups.items():
        zero_where_clear_triton_([tensors[i] for i in indices], [bits[i] for i in indices], dtype)


def zero_where_clear_reference_(tensor: torch.Tensor, bits: torch.Tensor) -> None:
    """The reference of one tensor: ``masked_fill_`` with the unpacked mask."""
    tensor.masked_fill_(~unpack_bits(bits, tensor.shape).to(tensor.device), 0)


def zero_where_clear_triton_(
    tensors: Sequence[torch.Tensor], bits: Sequence[torch.Tensor], dtype: torch.dtype
) -> None:
    """The Triton path over tensors of one ``dtype`` on one device."""
    device = tensors[0].device
    tables = chunk_tables([t.numel() for t in tensors], device)
    _zero_where_clear_kernel[tables.grid](
        address_table([tensors, bits], device),
        len(tensors),
        tables.chunks,
        tables.numels,
        DTYPE=_DTYPES[dtype],
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
    )
