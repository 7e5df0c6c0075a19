"""The Triton kernel of :func:`resu_compile.kernels.masked_zero.zero_where_clear_`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels.launch import (
    BLOCK,
    CHUNK_BLOCKS,
    NUM_WARPS,
    address_table,
    chunk_tables,
)
from resu_compile.kernels.triton.common import TL_DTYPES, load_chunk, segment_ptr, tile, tile_bits


@triton.jit(do_not_specialize=["n_segments"])
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
        DTYPE=TL_DTYPES[dtype],
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
    )
