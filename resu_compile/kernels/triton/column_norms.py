"""The Triton kernel of :func:`resu_compile.kernels.column_norms.column_sq_sums`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu_compile.kernels.launch import NUM_WARPS

#: Programs to aim for per streaming multiprocessor: enough to keep memory busy on a tall input
#: whose columns alone would give a handful of programs.
PROGRAMS_PER_SM = 4
#: Elements a program reads per iteration (a tile); its long side runs along the contiguous dim.
TILE_LONG, TILE_SHORT = 128, 32


@triton.jit
def _column_sq_sums_kernel(
    x_ptr,
    partial_ptr,
    rows,
    inner,
    cols,
    stride_outer,
    stride_inner,
    stride_col,
    rows_per_program,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (c, s): the sums of squares of columns block ``c`` over rows block ``s``, written
    to row ``s`` of ``partial``. Row ``i`` of the flattened input lies at
    ``(i // inner) * stride_outer + (i % inner) * stride_inner``."""
    col_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_in = col_offs < cols
    first = tl.program_id(1).to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for start in range(first, last, BLOCK_R):
        row_offs = start + tl.arange(0, BLOCK_R)
        base = (row_offs // inner) * stride_outer + (row_offs % inner) * stride_inner
        ptrs = x_ptr + base[:, None] + col_offs[None, :].to(tl.int64) * stride_col
        valid = (row_offs < last)[:, None] & col_in[None, :]
        value = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        acc += value * value
    tl.store(partial_ptr + tl.program_id(1) * cols + col_offs, tl.sum(acc, axis=0), mask=col_in)


def column_sq_sums_triton(
    x: torch.Tensor, outer: tuple[int, int], inner: tuple[int, int]
) -> torch.Tensor:
    """Sums of squares over the (size, stride) dims ``outer`` and ``inner`` of ``x``'s last dim.

    Rows split among programs so the grid fills the GPU; each program writes its own partial row
    and the partial rows are summed after (fixed order: the same input gives the same bits).
    """
    cols, stride_col = x.shape[-1], x.stride(-1)
    rows = outer[0] * inner[0]
    block_r, block_c = (TILE_SHORT, TILE_LONG) if stride_col == 1 else (TILE_LONG, TILE_SHORT)
    col_blocks = triton.cdiv(cols, block_c)
    # Under the CPU interpreter (the tests) a few programs, so rows still split among several.
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    wanted = max(1, triton.cdiv(PROGRAMS_PER_SM * sms, col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(rows, wanted), block_r) * block_r
    splits = max(1, triton.cdiv(rows, rows_per_program))
    partial = torch.empty((splits, cols), dtype=torch.float32, device=x.device)
    _column_sq_sums_kernel[(col_blocks, splits)](
        x,
        partial,
        rows,
        inner[0],
        cols,
        outer[1],
        inner[1],
        stride_col,
        rows_per_program,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )
    return partial[0] if splits == 1 else partial.sum(0)
