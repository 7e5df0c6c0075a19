"""Many tensors in one launch, for the transition kernels: chunk tables and address tables.

A transition touches every managed weight once; launched weight by weight, a 48-weight model pays
for hundreds of launches that each move a few megabytes. The transition kernels instead see the
weights as *segments* of one problem: the grid runs over fixed-size chunks of every segment (a
cached host-built table maps program -> (segment, chunk)), and each segment's tensors are reached
through a table of base addresses, one row per role (scores, bits, outputs, ...).

Chunks hold ``CHUNK`` elements, a multiple of 8, so every chunk starts on a whole byte of a packed
mask (:mod:`resu_compile.kernels.bits`) and a program can read or write mask bytes without sharing
them with another program.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per tile, seen as [BLOCK // 8, 8]: one mask byte per tile row
# Tiles per program. Triton's CPU interpreter (the CPU tests) runs every tile of a program even
# past a segment's end, so there chunks are short: small test tensors then span many chunks,
# which is what the cross-chunk logic (tie ranks, histogram flushes) needs tested.
CHUNK_BLOCKS = 2 if os.environ.get("TRITON_INTERPRET") == "1" else 16
CHUNK = BLOCK * CHUNK_BLOCKS
NUM_WARPS = 4
_CACHE_SIZE = 16
# Element types the segment kernels read as floats (fp32 compute).
FLOAT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class ChunkTables(NamedTuple):
    """The device tables of one list of segment sizes (see :func:`chunk_tables`)."""

    chunks: torch.Tensor  # int32 [C, 2]: (segment, chunk index within the segment)
    numels: torch.Tensor  # int64 [S]
    first_chunk: torch.Tensor  # int64 [C]: the first chunk of each chunk's segment
    segment: torch.Tensor  # int64 [C]: each chunk's segment

    @property
    def grid(self) -> tuple[int]:
        return (self.chunks.shape[0],)

    def segment_sums(self, per_chunk: torch.Tensor) -> torch.Tensor:
        """float64 [S]: the per-chunk values summed over each segment's chunks."""
        sums = torch.zeros(self.numels.shape[0], dtype=torch.float64, device=per_chunk.device)
        return sums.index_add_(0, self.segment, per_chunk.double())


def chunk_tables(numels: Sequence[int], device: torch.device) -> ChunkTables:
    """Tables for segments of ``numels`` elements; cached, since the sizes change only with the
    model (one host-to-device copy the first time)."""
    return _chunk_tables(tuple(numels), torch.device(device))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _chunk_tables(numels: tuple[int, ...], device: torch.device) -> ChunkTables:
    counts = torch.tensor([triton.cdiv(n, CHUNK) for n in numels], dtype=torch.int64)
    segment = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(int(counts.sum())) - first[segment]
    return ChunkTables(
        torch.stack([segment, index], dim=1).to(torch.int32).to(device),
        torch.tensor(list(numels), dtype=torch.int64).to(device),
        first[segment].to(device),
        segment.to(device),
    )


def address_table(rows: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """int64 base addresses, row-major: tensor ``s`` of row ``r`` at ``r * len(rows[0]) + s``."""
    for row in rows:
        for tensor in row:
            if not tensor.is_contiguous() or tensor.device != device:
                raise ValueError(f"segment tensors must be contiguous and on {device}")
    addrs = [t.data_ptr() for row in rows for t in row]
    return torch.tensor(addrs, dtype=torch.int64).to(device, non_blocking=True)


def on_gpu(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the Triton kernels serve these tensors (all on one CUDA device); else references."""
    return bool(tensors) and all(t.is_cuda and t.device == tensors[0].device for t in tensors)


@triton.jit
def load_chunk(chunks_ptr, numels_ptr, CHUNK: tl.constexpr):
    """This program's chunk: its index, segment, first element and its segment's size."""
    pid = tl.program_id(0)
    seg = tl.load(chunks_ptr + 2 * pid)
    start = tl.load(chunks_ptr + 2 * pid + 1).to(tl.int64) * CHUNK
    return pid, seg, start, tl.load(numels_ptr + seg)


@triton.jit
def segment_ptr(addrs_ptr, row, n_segments, seg, DTYPE: tl.constexpr):
    """Segment ``seg``'s tensor of address row ``row``, as a ``DTYPE`` pointer."""
    return tl.load(addrs_ptr + row * n_segments + seg).to(tl.pointer_type(DTYPE))


@triton.jit
def tile(start, n, BLOCK: tl.constexpr):
    """Offsets ``[BLOCK // 8, 8]`` of the tile at ``start``, whether each is in bounds, and the
    byte offsets of its rows with whether each row holds an element."""
    rows = tl.arange(0, BLOCK // 8)
    offs = start + rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    return offs, offs < n, start // 8 + rows, start + rows * 8 < n


@triton.jit
def tile_bits(bits_ptr, byte_offs, row_inb):
    """The bits of a :func:`tile` as an int32 ``[BLOCK // 8, 8]`` of 0 / 1 (0 out of bounds)."""
    byte = tl.load(bits_ptr + byte_offs, mask=row_inb, other=0).to(tl.int32)
    return (byte[:, None] >> tl.arange(0, 8)[None, :]) & 1


@triton.jit
def pack_tile(bits):
    """``[BLOCK // 8, 8]`` of 0 / 1 -> the ``BLOCK // 8`` uint8 bytes (bit ``j`` of a row = column
    ``j``), the format of :mod:`resu_compile.kernels.bits`."""
    return tl.sum(bits.to(tl.int32) << tl.arange(0, 8)[None, :], 1).to(tl.uint8)
