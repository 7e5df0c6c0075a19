"""The Triton kernel of :func:`resu_compile.kernels.consistency.consistency_statistics_`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import packed_numel
from resu_compile.kernels.launch import (
    BLOCK,
    CHUNK_BLOCKS,
    NUM_WARPS,
    address_table,
    chunk_tables,
)
from resu_compile.kernels.triton.common import (
    TL_DTYPES,
    load_chunk,
    pack_tile,
    segment_ptr,
    tile,
    tile_bits,
)
from resu_compile.method.consistency import DELTA


@triton.jit(do_not_specialize=["n_segments"])
def _statistics_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    found_inf_ptr,
    beta,
    one_minus_beta,
    delta,
    tau,
    DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_WITHIN: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """Address rows: grad, m, v, mask bits, out bits, within bits (read only ``HAS_WITHIN``)."""
    _pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    grad_ptr = segment_ptr(addrs_ptr, 0, n_segments, seg, GRAD_DTYPE)
    m_ptr = segment_ptr(addrs_ptr, 1, n_segments, seg, DTYPE)
    v_ptr = segment_ptr(addrs_ptr, 2, n_segments, seg, DTYPE)
    mask_ptr = segment_ptr(addrs_ptr, 3, n_segments, seg, tl.uint8)
    out_ptr = segment_ptr(addrs_ptr, 4, n_segments, seg, tl.uint8)
    within_ptr = segment_ptr(addrs_ptr, 5, n_segments, seg, tl.uint8)
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if skip:  # the statistics stay; the out bits were allocated as zeros
        return
    for i in range(CHUNK_BLOCKS):
        offs, inb, byte_offs, row_inb = tile(chunk_start + i * BLOCK, n, BLOCK)
        pruned = inb & (tile_bits(mask_ptr, byte_offs, row_inb) == 0)
        g = tl.load(grad_ptr + offs, mask=pruned, other=0.0).to(tl.float32)
        m = (tl.load(m_ptr + offs, mask=pruned, other=0.0).to(tl.float32) * beta) + (
            g * one_minus_beta
        )
        v = (tl.load(v_ptr + offs, mask=pruned, other=0.0).to(tl.float32) * beta) + (
            tl.abs(g) * one_minus_beta
        )
        m = m.to(DTYPE)
        v = v.to(DTYPE)
        tl.store(m_ptr + offs, m, mask=pruned)
        tl.store(v_ptr + offs, v, mask=pruned)
        c = tl.div_rn(tl.abs(m.to(tl.float32)), v.to(tl.float32) + delta)
        chosen = pruned & (c > tau)
        if HAS_WITHIN:
            chosen = chosen & (tile_bits(within_ptr, byte_offs, row_inb) != 0)
        tl.store(out_ptr + byte_offs, pack_tile(chosen), mask=row_inb)


def consistency_statistics_triton_(
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    *,
    beta: float,
    tau: float,
    found_inf: torch.Tensor | None = None,
    within: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The Triton path over weights of one device, one statistics dtype and one grad dtype."""
    device = grads[0].device
    # Zeros: on a step skipped for NaN / Inf the kernel writes nothing, and nothing is selected.
    # One allocation: the bits live for one step, so views of it keep nothing alive for long.
    sizes = [packed_numel(g.numel()) for g in grads]
    outs = list(torch.zeros(sum(sizes), dtype=torch.uint8, device=device).split(sizes))
    tables = chunk_tables([g.numel() for g in grads], device)
    rows = [grads, ms, vs, mask_bits, outs, outs if within is None else within]
    _statistics_kernel[tables.grid](
        address_table(rows, device),
        len(grads),
        tables.chunks,
        tables.numels,
        found_inf,
        float(beta),
        float(1 - beta),
        DELTA,
        float(tau),
        DTYPE=TL_DTYPES[ms[0].dtype],
        GRAD_DTYPE=TL_DTYPES[grads[0].dtype],
        HAS_FOUND_INF=found_inf is not None,
        HAS_WITHIN=within is not None,
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return outs
