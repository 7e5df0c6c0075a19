"""The Triton kernel of :func:`resu_compile.kernels.commit_bits.commit_bits`."""

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
from resu_compile.kernels.triton.common import load_chunk, segment_ptr, tile


@triton.jit
def _popcount(byte):
    return tl.sum((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1, 1)


@triton.jit(do_not_specialize=["n_segments"])
def _commit_bits_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    counts_ptr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """Address rows: old, new, trained, revived (inputs); keep_state, revived (outputs)."""
    pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    old_ptr = segment_ptr(addrs_ptr, 0, n_segments, seg, tl.uint8)
    new_ptr = segment_ptr(addrs_ptr, 1, n_segments, seg, tl.uint8)
    trained_ptr = segment_ptr(addrs_ptr, 2, n_segments, seg, tl.uint8)
    revived_ptr = segment_ptr(addrs_ptr, 3, n_segments, seg, tl.uint8)
    keep_out = segment_ptr(addrs_ptr, 4, n_segments, seg, tl.uint8)
    revived_out = segment_ptr(addrs_ptr, 5, n_segments, seg, tl.uint8)
    resurrected_count = tl.zeros((), dtype=tl.int32)
    churn_count = tl.zeros((), dtype=tl.int32)
    survivor_count = tl.zeros((), dtype=tl.int32)
    trained_count = tl.zeros((), dtype=tl.int32)
    for i in range(CHUNK_BLOCKS):
        _offs, _inb, byte_offs, row_inb = tile(chunk_start + i * BLOCK, n, BLOCK)
        old = tl.load(old_ptr + byte_offs, mask=row_inb, other=0).to(tl.int32)
        new = tl.load(new_ptr + byte_offs, mask=row_inb, other=0).to(tl.int32)
        trained = tl.load(trained_ptr + byte_offs, mask=row_inb, other=0).to(tl.int32)
        revived = tl.load(revived_ptr + byte_offs, mask=row_inb, other=0).to(tl.int32)
        resurrected = new & ~old & 0xFF
        tl.store(keep_out + byte_offs, (new & old).to(tl.uint8), mask=row_inb)
        tl.store(revived_out + byte_offs, (revived | resurrected).to(tl.uint8), mask=row_inb)
        resurrected_count += tl.sum(_popcount(resurrected), 0)
        churn_count += tl.sum(_popcount(new ^ old), 0)
        survivor_count += tl.sum(_popcount(revived & new), 0)
        trained_count += tl.sum(_popcount(resurrected & trained), 0)
    tl.store(counts_ptr + 4 * pid, resurrected_count)
    tl.store(counts_ptr + 4 * pid + 1, churn_count)
    tl.store(counts_ptr + 4 * pid + 2, survivor_count)
    tl.store(counts_ptr + 4 * pid + 3, trained_count)


def commit_bits_triton(
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    trained: Sequence[torch.Tensor],
    revived: Sequence[torch.Tensor],
    numels: Sequence[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The Triton path of :func:`commit_bits`: the fields of its ``CommitBits``, in order."""
    device = old[0].device
    keep = [torch.empty_like(o) for o in old]
    revived_out = [torch.empty_like(o) for o in old]
    tables = chunk_tables(list(numels), device)
    per_chunk = torch.empty(tables.grid[0], 4, dtype=torch.int32, device=device)
    _commit_bits_kernel[tables.grid](
        address_table([old, new, trained, revived, keep, revived_out], device),
        len(old),
        tables.chunks,
        tables.numels,
        per_chunk,
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
    )
    counts = torch.zeros(len(old), 4, dtype=torch.int64, device=device)
    counts.index_add_(0, tables.segment, per_chunk.long())
    return keep, revived_out, counts
