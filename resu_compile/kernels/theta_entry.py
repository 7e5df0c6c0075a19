"""RESU entry over every managed weight at once: theta's scale, then theta written on S.

At RESU entry (METHOD.md section 4) each weight gets ``theta = eps * sigma_A * N(0, 1)`` on its
selected set S and 0 on the rest of P, where ``sigma_A`` is the unbiased std of its active weights.
Per weight in PyTorch that is a dozen launches (masked mean, masked variance, the select); here two
reduction launches give every weight's ``sigma_A`` (mean first, then squared deviations from it,
as :func:`resu_compile.method.selective.initial_theta` computes it) and one launch writes
``W = where(S, scale * noise, where(M, W, 0))`` with the packed mask and selection read as bits.
The normal draws stay PyTorch's (one per weight, from the weight's own seeded generator), so the
draws do not depend on how the weights are batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import unpack_bits
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


@triton.jit
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


@triton.jit
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


def active_sigma(
    params: Sequence[torch.Tensor], mask_bits: Sequence[torch.Tensor], active: Sequence[int]
) -> torch.Tensor:
    """fp32 ``[len(params)]``: the unbiased std of each weight's active coordinates (0 when fewer
    than two are active), ``active[i]`` being the number of set bits of ``mask_bits[i]``."""
    if _fused(params, mask_bits):
        return active_sigma_triton(params, mask_bits, active)
    device = params[0].device  # the first weight's, for a model spread over several devices
    return torch.stack(
        [
            _sigma_reference(p, unpack_bits(b, p.shape)).to(device)
            for p, b in zip(params, mask_bits, strict=True)
        ]
    )


def write_theta_(
    params: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    select_bits: Sequence[torch.Tensor],
    noise: Sequence[torch.Tensor],
    scale: torch.Tensor,
) -> None:
    """``W = where(S, scale[i] * noise[i], where(M, W, 0))`` for every weight ``i``, in place;
    ``noise`` fp32 of each weight's shape, ``scale`` fp32 ``[len(params)]``."""
    if _fused(params, [*mask_bits, *select_bits, *noise]) and all(
        n.dtype == torch.float32 and n.is_contiguous() for n in noise
    ):
        write_theta_triton_(params, mask_bits, select_bits, noise, scale)
        return
    for i, param in enumerate(params):
        active = unpack_bits(mask_bits[i], param.shape)
        selected = unpack_bits(select_bits[i], param.shape)
        theta = (scale[i].to(param.device) * noise[i]).to(param.dtype)
        param.copy_(torch.where(selected, theta, param.masked_fill(~active, 0)))


def _fused(params: Sequence[torch.Tensor], others: Sequence[torch.Tensor]) -> bool:
    """One Triton launch serves these: contiguous weights of one supported dtype, one GPU."""
    return (
        len({p.dtype for p in params}) == 1
        and params[0].dtype in FLOAT_DTYPES
        and all(p.is_contiguous() and p.numel() for p in params)
        and on_gpu([*params, *others])
    )


def _sigma_reference(param: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``initial_theta``'s sigma: masked mean, then masked squared deviations, in fp32."""
    values = param.detach().float()
    count = active.sum()
    mean = torch.where(active, values, 0.0).sum() / count.clamp(min=1)
    variance = torch.where(active, (values - mean).square(), 0.0).sum() / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), 0.0)


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
        "DTYPE": FLOAT_DTYPES[params[0].dtype],
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
        DTYPE=FLOAT_DTYPES[params[0].dtype],
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
    )
