"""Each input feature's sum of squares over every token (Wanda's ``||X_j||^2``), for the
calibrate variant.

The sum runs over every dim but the last, so on a ``(tokens, features)`` activation it is a
reduction down the columns. Traced as aten ops, Inductor splits that reduction into kernels of
its own per input (and folds the producer's pointwise work into them), which made GPT-2-small's
calibrate forward 1.17-1.23x dense. The opaque op here reads the input once, in tiles whose long
side runs along its contiguous dim, with rows split among programs so a tall input fills the GPU
(:mod:`resu_compile.kernels.triton.column_norms`).
"""

from __future__ import annotations

import torch

from resu_compile.kernels.launch import FLOAT_DTYPES

#: (size, stride) of one dim.
Dim = tuple[int, int]


@torch.library.custom_op("resu::column_sq_sums", mutates_args=())
def column_sq_sums(x: torch.Tensor) -> torch.Tensor:
    """float32 sums of ``x ** 2`` over every dim but the last (a 1-D ``x``: its own squares).

    CUDA tensors of a floating dtype take the Triton kernel (any strides whose leading dims merge
    into two; others are copied contiguous first); the rest :func:`column_sq_sums_reference`.
    """
    if not (x.is_cuda and x.dtype in FLOAT_DTYPES and x.numel()):
        return column_sq_sums_reference(x)
    rows = row_dims(x)
    if rows is None:
        x = x.contiguous()
        rows = row_dims(x)
    from resu_compile.kernels.triton.column_norms import column_sq_sums_triton

    return column_sq_sums_triton(x, *rows)


@column_sq_sums.register_fake
def _column_sq_sums_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[-1:], dtype=torch.float32)


def column_sq_sums_reference(x: torch.Tensor) -> torch.Tensor:
    """The sums the kernel must match."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x[None]
    return rows.float().square().sum(0)


def row_dims(x: torch.Tensor) -> tuple[Dim, Dim] | None:
    """``x``'s dims but the last as two (outer, inner) dims that address every row, merging
    neighbours where one steps over the other whole; None if they do not merge into two.

    A contiguous ``(batch, tokens, features)`` gives one dim of all rows; a channels-last view of
    an NCHW activation (N, H, W, C) gives (N, H * W)."""
    merged: list[Dim] = []
    for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if merged and stride == merged[-1][0] * merged[-1][1]:
            merged[-1] = (merged[-1][0] * size, merged[-1][1])
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        return None
    merged += [(1, 0)] * (2 - len(merged))
    inner, outer = merged
    return outer, inner
