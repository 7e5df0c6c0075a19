"""The Triton kernel of :func:`resu_compile.kernels.masked_adam.masked_adam_`: one launch updates a
list of weights of any sizes, each program one block of one weight, theta's AdamW in the same pass
when asked (module docstring of :mod:`resu_compile.kernels.masked_adam`).

Loads and stores are predicated on bounds only, never on a mask bit, so Triton can vectorise them;
mask and selection act through in-register selects. A set ``found_inf`` is read by each program
alongside its block table entry, and the program returns before it touches a weight or a state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from resu_compile.kernels import launch
from resu_compile.kernels.triton.common import (
    adam_math,
    adam_scalars,
    store_active,
    update_block,
    update_ptr,
    vector_tile,
    vector_tile_bits,
)
from resu_compile.kernels.update_math import ThetaAdamW


@triton.jit
def _adam_block(
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    mask_ptr,
    sel_ptr,
    start,
    n,
    lerp_w,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    neg_step_size,
    bc2_sqrt,
    theta_scalars,
    HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    KEEP_PRUNED: tl.constexpr,
    THETA: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    """Adam on the active coordinates; with ``THETA`` also theta's AdamW on the selected pruned
    ones, whose eight scalars (same order as the actives' own) ``theta_scalars`` points to; other
    pruned coordinates keep their bits. (Over 60 lines: one argument a line.)"""
    offs, inb = vector_tile(start, n, BLOCK, VEC)
    active = inb
    if HAS_MASK:
        active = vector_tile_bits(mask_ptr, start, n, BLOCK, VEC)
    p = tl.load(param_ptr + offs, mask=inb).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=inb).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb).to(tl.float32)
    if MAXIMIZE:
        g = -g
    update = active
    if THETA:  # each coordinate takes its own rule's scalars: the same arithmetic as two passes
        update = active | vector_tile_bits(sel_ptr, start, n, BLOCK, VEC)
        lerp_w = tl.where(active, lerp_w, tl.load(theta_scalars))
        beta2 = tl.where(active, beta2, tl.load(theta_scalars + 1))
        one_minus_beta2 = tl.where(active, one_minus_beta2, tl.load(theta_scalars + 2))
        eps = tl.where(active, eps, tl.load(theta_scalars + 3))
        weight_decay = tl.where(active, weight_decay, tl.load(theta_scalars + 4))
        decay = tl.where(active, decay, tl.load(theta_scalars + 5))
        neg_step_size = tl.where(active, neg_step_size, tl.load(theta_scalars + 6))
        bc2_sqrt = tl.where(active, bc2_sqrt, tl.load(theta_scalars + 7))
    p, m, v = adam_math(
        p,
        g,
        m,
        v,
        lerp_w,
        beta2,
        one_minus_beta2,
        eps,
        weight_decay,
        decay,
        neg_step_size,
        bc2_sqrt,
        HAS_WD,
        DECOUPLED,
    )
    store_active(param_ptr, offs, inb, update, p, KEEP_PRUNED)
    store_active(m_ptr, offs, inb, update, m, KEEP_PRUNED)
    store_active(v_ptr, offs, inb, update, v, KEEP_PRUNED)


@triton.jit(do_not_specialize=["n_tensors"])
def _masked_adam_kernel(
    addrs_ptr,
    n_tensors,
    blocks_ptr,
    numels_ptr,
    param0_ptr,
    grad0_ptr,
    lerp_w,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    neg_step_size,
    bc2_sqrt,
    found_inf_ptr,
    theta_scalars,
    HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    KEEP_PRUNED: tl.constexpr,
    THETA: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    """Address rows: param, grad, exp_avg, exp_avg_sq, then the mask bits if HAS_MASK, then the
    select bits if THETA. (Over 60 lines: one argument a line.)"""
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:  # loaded alongside the block table; skips before any weight or state
        skip = tl.load(found_inf_ptr) != 0
    t, start, n = update_block(blocks_ptr, numels_ptr, ALIGNED, BLOCK)
    if skip:
        return
    dtype = param0_ptr.dtype.element_ty
    param_ptr = update_ptr(addrs_ptr, 0, n_tensors, t, dtype, ALIGNED)
    mask_ptr = param_ptr  # stand-ins when there is no mask or selection: never dereferenced
    sel_ptr = param_ptr
    if HAS_MASK:
        mask_ptr = update_ptr(addrs_ptr, 4, n_tensors, t, tl.uint8, False)
    if THETA:
        sel_ptr = update_ptr(addrs_ptr, 5, n_tensors, t, tl.uint8, False)
    _adam_block(
        param_ptr,
        update_ptr(addrs_ptr, 1, n_tensors, t, grad0_ptr.dtype.element_ty, ALIGNED),
        update_ptr(addrs_ptr, 2, n_tensors, t, dtype, ALIGNED),
        update_ptr(addrs_ptr, 3, n_tensors, t, dtype, ALIGNED),
        mask_ptr,
        sel_ptr,
        start,
        n,
        lerp_w,
        beta2,
        one_minus_beta2,
        eps,
        weight_decay,
        decay,
        neg_step_size,
        bc2_sqrt,
        theta_scalars,
        HAS_MASK,
        HAS_WD,
        DECOUPLED,
        MAXIMIZE,
        KEEP_PRUNED,
        THETA,
        BLOCK,
        VEC,
    )


def _theta_scalars(theta: ThetaAdamW, device: torch.device) -> torch.Tensor:
    """The eight fp32 scalars the kernel reads for theta, in the order of the actives' own."""
    s = adam_scalars(theta.step, theta.lr, theta.beta1, theta.beta2, theta.weight_decay)
    values = [1 - theta.beta1, s["beta2"], s["one_minus_beta2"], theta.eps, theta.weight_decay]
    values += [s["decay"], s["neg_step_size"], s["bc2_sqrt"]]
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


def masked_adam_triton_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    mask_bits: Sequence[torch.Tensor] | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    found_inf: torch.Tensor | None = None,
    keep_pruned: bool = False,
    theta: ThetaAdamW | None = None,
) -> None:
    """The masked Adam step of weights of one device and dtype, in one launch (arguments as in
    :func:`resu_compile.kernels.masked_adam.masked_adam_`, whose checks of ``theta`` it relies
    on). (Over 60 lines: its arguments and the kernel's, one a line.)"""
    scalars = adam_scalars(step, lr, beta1, beta2, weight_decay)
    launch.check_found_inf("masked_adam_triton_", found_inf, params)
    bits = [] if mask_bits is None else [mask_bits]
    if theta is not None:
        bits.append(theta.select_bits)
    run = launch.update_launch(
        "masked_adam_triton_",
        params,
        grads,
        [exp_avgs, exp_avg_sqs],
        bits,
        theta=theta is not None,
    )
    if run is None:
        return
    _masked_adam_kernel[run.tables.grid](
        run.addrs,
        run.n_tensors,
        run.tables.chunks,
        run.tables.numels,
        params[0],
        grads[0],
        float(1 - beta1),
        scalars["beta2"],
        scalars["one_minus_beta2"],
        float(eps),
        float(weight_decay),
        scalars["decay"],
        scalars["neg_step_size"],
        scalars["bc2_sqrt"],
        found_inf,
        None if theta is None else _theta_scalars(theta, params[0].device),
        HAS_MASK=mask_bits is not None,
        HAS_WD=weight_decay != 0 or (theta is not None and theta.weight_decay != 0),
        DECOUPLED=bool(decoupled_weight_decay) or theta is not None,
        MAXIMIZE=bool(maximize),
        HAS_FOUND_INF=found_inf is not None,
        KEEP_PRUNED=bool(keep_pruned),
        THETA=theta is not None,
        ALIGNED=run.aligned,
        BLOCK=run.block,
        VEC=run.vec,
        num_warps=run.num_warps,
        enable_fp_fusion=launch.FP_FUSION,
    )
