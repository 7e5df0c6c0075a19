"""The Triton kernels of :mod:`resu_compile.kernels.theta_entry`: sigma_A, then theta on S."""

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
def _active_sum_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    center_ptr,
    partial_ptr,
    SQUARED: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """The chunk's sum of ``x`` (or of ``(x - center)**2``) over its active coordinates.
    Address rows: the weights, their packed masks."""
    pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    ptr = segment_ptr(addrs_ptr, 0, n_segments, seg, DTYPE)
    bits_ptr = segment_ptr(addrs_ptr, 1, n_segments, seg, tl.uint8)
    center = tl.load(center_ptr + seg)
    acc = tl.zeros((), dtype=tl.float32)
    for i in range(CHUNK_BLOCKS):
        offs, inb, byte_offs, row_inb = tile(chunk_start + i * BLOCK, n, BLOCK)
        x = tl.load(ptr + offs, mask=inb, other=0).to(tl.float32)
        if SQUARED:
            x = (x - center) * (x - center)
        active = tile_bits(bits_ptr, byte_offs, row_inb) != 0
        acc += tl.sum(tl.sum(tl.where(active, x, 0.0), 1), 0)
    tl.store(partial_ptr + pid, acc)


@triton.jit(do_not_specialize=["n_segments"])
def _write_theta_kernel(
    addrs_ptr,
    n_segments,
    chunks_ptr,
    numels_ptr,
    scale_ptr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """``W = where(S, scale * noise, where(M, W, 0))``. Address rows: weights, masks, selections,
    fp32 noise."""
    _pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    ptr = segment_ptr(addrs_ptr, 0, n_segments, seg, DTYPE)
    mask_ptr = segment_ptr(addrs_ptr, 1, n_segments, seg, tl.uint8)
    select_ptr = segment_ptr(addrs_ptr, 2, n_segments, seg, tl.uint8)
    noise_ptr = segment_ptr(addrs_ptr, 3, n_segments, seg, tl.float32)
    scale = tl.load(scale_ptr + seg)
    for i in range(CHUNK_BLOCKS):
        offs, inb, byte_offs, row_inb = tile(chunk_start + i * BLOCK, n, BLOCK)
        w = tl.load(ptr + offs, mask=inb, other=0)
        noise = tl.load(noise_ptr + offs, mask=inb, other=0.0)
        active = tile_bits(mask_ptr, byte_offs, row_inb) != 0
        selected = tile_bits(select_ptr, byte_offs, row_inb) != 0
        theta = (scale * noise).to(DTYPE)
        tl.store(
            ptr + offs, tl.where(selected, theta, tl.where(active, w, 0.0).to(DTYPE)), mask=inb
        )


def active_sigma_triton(
    params: Sequence[torch.Tensor], mask_bits: Sequence[torch.Tensor], active: Sequence[int]
) -> torch.Tensor:
    """The Triton path of :func:`active_sigma`."""
    device = params[0].device
    tables = chunk_tables([p.numel() for p in params], device)
    addrs = address_table([params, mask_bits], device)
    count = torch.tensor(list(active), dtype=torch.float64).to(device, non_blocking=True)
    partial = torch.empty(tables.grid[0], dtype=torch.float32, device=device)
    launch = {
        "DTYPE": TL_DTYPES[params[0].dtype],
        "BLOCK": BLOCK,
        "CHUNK_BLOCKS": CHUNK_BLOCKS,
        "num_warps": NUM_WARPS,
    }
    head = (addrs, len(params), tables.chunks, tables.numels)
    zeros = torch.zeros(len(params), dtype=torch.float32, device=device)
    _active_sum_kernel[tables.grid](*head, zeros, partial, SQUARED=False, **launch)
    mean = (tables.segment_sums(partial) / count.clamp(min=1)).float()
    _active_sum_kernel[tables.grid](*head, mean, partial, SQUARED=True, **launch)
    variance = tables.segment_sums(partial) / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), 0.0).float()


def write_theta_triton_(
    params: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    select_bits: Sequence[torch.Tensor],
    noise: Sequence[torch.Tensor],
    scale: torch.Tensor,
) -> None:
    """The Triton path of :func:`write_theta_`."""
    device = params[0].device
    tables = chunk_tables([p.numel() for p in params], device)
    _write_theta_kernel[tables.grid](
        address_table([params, mask_bits, select_bits, noise], device),
        len(params),
        tables.chunks,
        tables.numels,
        scale.float().contiguous(),
        DTYPE=TL_DTYPES[params[0].dtype],
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
    )
