"""The consistency mode's statistics for every managed weight in one launch per dtype.

Each RESU step of the consistency mode (METHOD.md section 4) advances ``m = b*m + (1-b)*g`` and
``v = b*v + (1-b)*|g|`` on the pruned set P, then screens P by ``C = |m| / (v + delta) > tau``.
Weight by weight in PyTorch that is a dozen launches and several full-size temporaries per weight.
Here one pass reads ``g``, ``m``, ``v`` and the mask, stores the new statistics on P (other slots
keep their bits: they may hold the user's optimizer state) and writes ``P ∩ {C > tau}`` as packed
bits. ``C`` itself is not kept: the theta step recomputes it from the stored statistics
(:func:`resu_compile.kernels.fused_update.fused_theta_update_multi_`, ``consistency_ms``).
A set ``found_inf`` leaves the statistics as they were and selects nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import pack_bits, packed_numel, unpack_bits
from resu_compile.kernels.segments import (
    BLOCK,
    CHUNK_BLOCKS,
    FLOAT_DTYPES,
    NUM_WARPS,
    address_table,
    chunk_tables,
    load_chunk,
    on_gpu,
    pack_tile,
    segment_ptr,
    tile,
    tile_bits,
)
from resu_compile.method.consistency import DELTA, update_statistics_


@triton.jit
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
    BLOCK: tl.constexpr,
    CHUNK_BLOCKS: tl.constexpr,
):
    """Address rows: grad, m, v, mask bits, out bits."""
    _pid, seg, chunk_start, n = load_chunk(chunks_ptr, numels_ptr, BLOCK * CHUNK_BLOCKS)
    grad_ptr = segment_ptr(addrs_ptr, 0, n_segments, seg, GRAD_DTYPE)
    m_ptr = segment_ptr(addrs_ptr, 1, n_segments, seg, DTYPE)
    v_ptr = segment_ptr(addrs_ptr, 2, n_segments, seg, DTYPE)
    mask_ptr = segment_ptr(addrs_ptr, 3, n_segments, seg, tl.uint8)
    out_ptr = segment_ptr(addrs_ptr, 4, n_segments, seg, tl.uint8)
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
        tl.store(out_ptr + byte_offs, pack_tile(pruned & (c > tau)), mask=row_inb)


def consistency_statistics_(
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    *,
    beta: float,
    tau: float,
    found_inf: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Advance every weight's statistics on its pruned set; return each ``P ∩ {C > tau}`` packed.

    Contiguous CUDA tensors take one Triton launch per (device, dtype); anything else takes
    :func:`consistency_statistics_reference_`.
    """
    if not len(grads) == len(ms) == len(vs) == len(mask_bits):
        raise ValueError("consistency_statistics_: one grad, m, v and mask per weight")
    out: list[torch.Tensor | None] = [None] * len(grads)
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = {}
    for i, (g, m, v, bits) in enumerate(zip(grads, ms, vs, mask_bits, strict=True)):
        fused = (
            g.numel() > 0
            and all(t.is_contiguous() for t in (g, m, v, bits))
            and m.dtype == v.dtype
            and m.dtype in FLOAT_DTYPES
            and g.dtype in FLOAT_DTYPES
            and on_gpu([g, m, v, bits])
        )
        if fused:
            groups.setdefault((g.device, m.dtype, g.dtype), []).append(i)
        else:
            out[i] = consistency_statistics_reference_(
                g, m, v, bits, beta=beta, tau=tau, found_inf=found_inf
            )
    for indices in groups.values():
        found = consistency_statistics_triton_(
            [grads[i] for i in indices],
            [ms[i] for i in indices],
            [vs[i] for i in indices],
            [mask_bits[i] for i in indices],
            beta=beta,
            tau=tau,
            found_inf=found_inf,
        )
        for i, bits in zip(indices, found, strict=True):
            out[i] = bits
    return out  # type: ignore[return-value]


def consistency_statistics_reference_(
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    mask_bits: torch.Tensor,
    *,
    beta: float,
    tau: float,
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference for one weight: :func:`update_statistics_` on P, then ``P ∩ {C > tau}``."""
    pruned = ~unpack_bits(mask_bits, grad.shape).to(grad.device)
    if found_inf is not None:  # a skipped step leaves the statistics as they were
        pruned = pruned & ~found_inf.bool().to(grad.device)
        grad = grad.nan_to_num(0.0, 0.0, 0.0)
    c = update_statistics_(grad, m, v, pruned, beta)
    return pack_bits(pruned & (c > tau))


def consistency_statistics_triton_(
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor],
    *,
    beta: float,
    tau: float,
    found_inf: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The Triton path over weights of one device, one statistics dtype and one grad dtype."""
    device = grads[0].device
    # Zeros: on a step skipped for NaN / Inf the kernel writes nothing, and nothing is selected.
    outs = [torch.zeros(packed_numel(g.numel()), dtype=torch.uint8, device=device) for g in grads]
    tables = chunk_tables([g.numel() for g in grads], device)
    _statistics_kernel[tables.grid](
        address_table([grads, ms, vs, mask_bits, outs], device),
        len(grads),
        tables.chunks,
        tables.numels,
        found_inf,
        float(beta),
        float(1 - beta),
        DELTA,
        float(tau),
        DTYPE=FLOAT_DTYPES[ms[0].dtype],
        GRAD_DTYPE=FLOAT_DTYPES[grads[0].dtype],
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=BLOCK,
        CHUNK_BLOCKS=CHUNK_BLOCKS,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return outs
