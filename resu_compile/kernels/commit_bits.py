"""The commit's bookkeeping on packed masks, every managed weight in one launch.

After the amnesty tournament has chosen each weight's new mask, the commit (METHOD.md sections 5
and 6) needs, per weight, the resurrected set ``new & ~old``, the coordinates whose optimizer state
survives (``new & old``: the newly pruned and the resurrected restart from zero), the updated
"ever resurrected" bits, and four counts for telemetry. Weight by weight in PyTorch that is a dozen
launches each plus a host sync per weight; here it is one pass over the packed bytes (N/8 per
input) that writes the two new bit tensors and a row of counts per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import count_bits
from resu_compile.kernels.segments import (
    BLOCK,
    CHUNK_BLOCKS,
    NUM_WARPS,
    address_table,
    chunk_tables,
    load_chunk,
    on_gpu,
    segment_ptr,
    tile,
)

COUNTS = ("resurrected", "churn", "survivors", "resurrected_trained")


class CommitBits(NamedTuple):
    """Per weight: the state-keeping bits, the updated revived bits, and the counts."""

    keep_state: list[torch.Tensor]  # new & old
    revived: list[torch.Tensor]  # revived | (new & ~old)
    counts: torch.Tensor  # int64 [weights, 4], columns as COUNTS


@triton.jit
def _popcount(byte):
    return tl.sum((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1, 1)


@triton.jit
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


def commit_bits(
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    trained: Sequence[torch.Tensor],
    revived: Sequence[torch.Tensor],
    numels: Sequence[int],
) -> CommitBits:
    """The commit's bit algebra and counts for weights of ``numels`` elements (every argument
    packed bits on one device)."""
    if on_gpu([*old, *new, *trained, *revived]):
        return commit_bits_triton(old, new, trained, revived, numels)
    return commit_bits_reference(old, new, trained, revived)


def commit_bits_reference(
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    trained: Sequence[torch.Tensor],
    revived: Sequence[torch.Tensor],
) -> CommitBits:
    """Byte operations weight by weight (the CPU path and the oracle)."""
    keep, revived_out, counts = [], [], []
    for o, n, t, r in zip(old, new, trained, revived, strict=True):
        resurrected = n & ~o
        keep.append(n & o)
        revived_out.append(r | resurrected)
        counts.append(
            [count_bits(x) for x in (resurrected, n ^ o, r & n, resurrected & t)],
        )
    device = old[0].device if old else torch.device("cpu")
    return CommitBits(keep, revived_out, torch.tensor(counts, dtype=torch.int64, device=device))


def commit_bits_triton(
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    trained: Sequence[torch.Tensor],
    revived: Sequence[torch.Tensor],
    numels: Sequence[int],
) -> CommitBits:
    """The Triton path of :func:`commit_bits`."""
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
    return CommitBits(keep, revived_out, counts)
