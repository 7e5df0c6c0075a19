"""The Triton kernel of :func:`resu_compile.kernels.nonfinite.any_nonfinite`."""

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
from resu_compile.kernels.triton.common import TL_DTYPES, load_chunk, segment_ptr


@triton.jit(do_not_specialize=["n_segments"])
def _any_nonfinite_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    flag_ptr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """Sets ``flag_ptr[0] = 1`` if this program's chunk holds a NaN or an Inf (a plain store: every
    writer writes the same value)."""
    _pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    ptr = segment_ptr(addrs_ptr, 0, n_segments, seg, DTYPE)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(CHUNK_BLOCKS):
        offs = chunk_start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        bad = bad | ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
    tl.store(flag_ptr, 1.0, mask=tl.max(bad, 0) > 0)


def any_nonfinite_triton_(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype, flag: torch.Tensor
) -> None:
    """The Triton path over contiguous tensors of one ``dtype`` on ``flag``'s device: sets
    ``flag[0] = 1`` if one holds NaN or Inf (``flag`` is left as it is otherwise)."""
    device = flag.device
    tables = chunk_tables([t.numel() for t in tensors], device)
    _any_nonfinite_kernel[tables.grid](
        address_table([tensors], device),
        len(tensors),
        tables.chunks,
        tables.numels,
        flag,
        DTYPE=TL_DTYPES[dtype],
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
    )
