"""The Triton kernel of :func:`resu_compile.kernels.masked_sgd.masked_sgd_`: one launch updates a
list of weights of any sizes, each program one block of one weight.

Loads and stores are predicated on bounds only, never on a mask bit, so Triton can vectorise them;
the mask acts through in-register selects. (Unstructured masks touch every 32-byte sector anyway, so
skipping pruned elements would save no traffic.) A set ``found_inf`` is read by each program
alongside its block table entry, and the program returns before it touches a weight or a state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels import launch
from resu_compile.kernels.triton.common import (
    store_active,
    update_block,
    update_ptr,
    vector_tile,
    vector_tile_bits,
)


@triton.jit
def _sgd_block(
    param_ptr,
    grad_ptr,
    buf_ptr,
    mask_ptr,
    start,
    n,
    lr,
    momentum,
    one_minus_damp,
    weight_decay,
    HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    KEEP_PRUNED: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    offs, inb = vector_tile(start, n, BLOCK, VEC)
    active = inb
    if HAS_MASK:
        active = vector_tile_bits(mask_ptr, start, n, BLOCK, VEC)
    p = tl.load(param_ptr + offs, mask=inb).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=inb).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = g
        else:
            buf = tl.load(buf_ptr + offs, mask=inb).to(tl.float32)
            buf = buf * momentum + one_minus_damp * g
        store_active(buf_ptr, offs, inb, active, buf, KEEP_PRUNED)
        g = g + momentum * buf if NESTEROV else buf
    p = p - lr * g
    store_active(param_ptr, offs, inb, active, p, KEEP_PRUNED)


@triton.jit(do_not_specialize=["n_tensors"])
def _masked_sgd_kernel(
    addrs_ptr,
    n_tensors,
    blocks_ptr,
    numels_ptr,
    param0_ptr,
    grad0_ptr,
    lr,
    momentum,
    one_minus_damp,
    weight_decay,
    found_inf_ptr,
    HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    KEEP_PRUNED: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    """Address rows: param, grad, the momentum buffer if HAS_MOMENTUM, then the mask bits if
    HAS_MASK. (Over 60 lines: one argument a line.)"""
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:  # loaded alongside the block table; skips before any weight or state
        skip = tl.load(found_inf_ptr) != 0
    t, start, n = update_block(blocks_ptr, numels_ptr, ALIGNED, BLOCK)
    if skip:
        return
    dtype = param0_ptr.dtype.element_ty
    param_ptr = update_ptr(addrs_ptr, 0, n_tensors, t, dtype, ALIGNED)
    buf_ptr = param_ptr  # stand-ins for absent rows: never dereferenced
    mask_ptr = param_ptr
    if HAS_MOMENTUM:
        buf_ptr = update_ptr(addrs_ptr, 2, n_tensors, t, dtype, ALIGNED)
    if HAS_MASK:
        mask_ptr = update_ptr(addrs_ptr, 2 + HAS_MOMENTUM, n_tensors, t, tl.uint8, False)
    _sgd_block(
        param_ptr,
        update_ptr(addrs_ptr, 1, n_tensors, t, grad0_ptr.dtype.element_ty, ALIGNED),
        buf_ptr,
        mask_ptr,
        start,
        n,
        lr,
        momentum,
        one_minus_damp,
        weight_decay,
        HAS_MASK,
        HAS_WD,
        HAS_MOMENTUM,
        NESTEROV,
        MAXIMIZE,
        FIRST_STEP,
        KEEP_PRUNED,
        BLOCK,
        VEC,
    )


def masked_sgd_triton_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    mask_bits: Sequence[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
) -> None:
    """The masked SGD step of weights of one device and dtype, in one launch (arguments as in
    :func:`resu_compile.kernels.masked_sgd.masked_sgd_`)."""
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError("masked_sgd_triton_: momentum != 0 needs momentum_buffers")
    launch.check_found_inf("masked_sgd_triton_", found_inf, params)
    run = launch.update_launch(
        "masked_sgd_triton_",
        params,
        grads,
        [momentum_buffers] if has_momentum and momentum_buffers is not None else [],
        [] if mask_bits is None else [mask_bits],
    )
    if run is None:
        return
    _masked_sgd_kernel[run.tables.grid](
        run.addrs,
        run.n_tensors,
        run.tables.chunks,
        run.tables.numels,
        params[0],
        grads[0],
        float(lr),
        float(momentum),
        float(1 - dampening),
        float(weight_decay),
        found_inf,
        HAS_MASK=mask_bits is not None,
        HAS_WD=weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize),
        FIRST_STEP=bool(first_step),
        HAS_FOUND_INF=found_inf is not None,
        KEEP_PRUNED=bool(keep_pruned),
        ALIGNED=run.aligned,
        BLOCK=run.block,
        VEC=run.vec,
        num_warps=run.num_warps,
        enable_fp_fusion=launch.FP_FUSION,
    )
