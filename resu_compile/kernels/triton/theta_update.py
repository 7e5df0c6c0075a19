"""The Triton kernel of :func:`resu_compile.kernels.theta_update.theta_update_`: one launch steps
theta on the selections of a list of weights of any sizes, each program one block of one weight.

Unselected coordinates are stored back with the very bits that were loaded. A set ``found_inf`` is
read by each program alongside its block table entry, and the program returns before it touches a
weight or a state.
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
    update_block,
    update_ptr,
    vector_tile,
    vector_tile_bits,
)
from resu_compile.kernels.update_math import check_consistency_args, check_theta_args
from resu_compile.method.consistency import DELTA

_RULE_IDS = {"sgd": 0, "momentum": 1, "adamw": 2}


@triton.jit
def _theta_block(
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    sel_ptr,
    cm_ptr,
    cv_ptr,
    start,
    n,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    neg_step_size,
    bc2_sqrt,
    delta,
    RULE: tl.constexpr,
    HAS_WD: tl.constexpr,
    CONSISTENCY: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    """With ``CONSISTENCY`` the gradient is weighted by ``C = |cm| / (cv + delta)``, from the
    consistency statistics ``cm``, ``cv`` (METHOD.md section 4). (Over 60 lines: one argument a
    line, and the three rules.)"""
    offs, inb = vector_tile(start, n, BLOCK, VEC)
    sel = vector_tile_bits(sel_ptr, start, n, BLOCK, VEC)
    p_old = tl.load(param_ptr + offs, mask=inb)
    p = p_old.to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=inb).to(tl.float32)
    if CONSISTENCY:
        cm = tl.load(cm_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        cv = tl.load(cv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        g = g * tl.div_rn(tl.abs(cm), cv + delta)
    if RULE == 2:
        m_old = tl.load(m_ptr + offs, mask=inb)
        v_old = tl.load(v_ptr + offs, mask=inb)
        p, m, v = adam_math(
            p,
            g,
            m_old.to(tl.float32),
            v_old.to(tl.float32),
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            weight_decay,
            decay,
            neg_step_size,
            bc2_sqrt,
            HAS_WD,
            True,
        )
        tl.store(m_ptr + offs, tl.where(sel, m.to(m_old.dtype), m_old), mask=inb)
        tl.store(v_ptr + offs, tl.where(sel, v.to(v_old.dtype), v_old), mask=inb)
    else:
        if HAS_WD:
            g = g + weight_decay * p
        if RULE == 1:
            m_old = tl.load(m_ptr + offs, mask=inb)
            m = m_old.to(tl.float32) * beta1 + one_minus_beta1 * g
            tl.store(m_ptr + offs, tl.where(sel, m.to(m_old.dtype), m_old), mask=inb)
            g = m
        p = p - lr * g
    tl.store(param_ptr + offs, tl.where(sel, p.to(p_old.dtype), p_old), mask=inb)


@triton.jit(do_not_specialize=["n_tensors"])
def _theta_update_kernel(
    addrs_ptr,
    n_tensors,
    blocks_ptr,
    numels_ptr,
    param0_ptr,
    grad0_ptr,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    neg_step_size,
    bc2_sqrt,
    delta,
    found_inf_ptr,
    RULE: tl.constexpr,
    HAS_WD: tl.constexpr,
    CONSISTENCY: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    """Address rows: param, grad, exp_avg if RULE >= 1, exp_avg_sq if RULE == 2 (the rule id is
    also its number of state tensors), the consistency statistics m, v if CONSISTENCY, then the
    select bits. (Over 60 lines: one argument a line.)"""
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:  # loaded alongside the block table; skips before any weight or state
        skip = tl.load(found_inf_ptr) != 0
    t, start, n = update_block(blocks_ptr, numels_ptr, ALIGNED, BLOCK)
    if skip:
        return
    dtype = param0_ptr.dtype.element_ty
    param_ptr = update_ptr(addrs_ptr, 0, n_tensors, t, dtype, ALIGNED)
    m_ptr = param_ptr  # stand-ins for the states a rule does not have: never dereferenced
    v_ptr = param_ptr
    if RULE >= 1:
        m_ptr = update_ptr(addrs_ptr, 2, n_tensors, t, dtype, ALIGNED)
    if RULE == 2:
        v_ptr = update_ptr(addrs_ptr, 3, n_tensors, t, dtype, ALIGNED)
    cm_ptr = param_ptr  # stand-ins again, without CONSISTENCY
    cv_ptr = param_ptr
    bits_row = 2 + RULE
    if CONSISTENCY:
        cm_ptr = update_ptr(addrs_ptr, 2 + RULE, n_tensors, t, dtype, ALIGNED)
        cv_ptr = update_ptr(addrs_ptr, 3 + RULE, n_tensors, t, dtype, ALIGNED)
        bits_row = 4 + RULE
    _theta_block(
        param_ptr,
        update_ptr(addrs_ptr, 1, n_tensors, t, grad0_ptr.dtype.element_ty, ALIGNED),
        m_ptr,
        v_ptr,
        update_ptr(addrs_ptr, bits_row, n_tensors, t, tl.uint8, False),
        cm_ptr,
        cv_ptr,
        start,
        n,
        lr,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        weight_decay,
        decay,
        neg_step_size,
        bc2_sqrt,
        delta,
        RULE,
        HAS_WD,
        CONSISTENCY,
        BLOCK,
        VEC,
    )


def theta_update_triton_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    select_bits: Sequence[torch.Tensor],
    *,
    rule: str,
    lr: float,
    step: int,
    exp_avgs: Sequence[torch.Tensor] | None = None,
    exp_avg_sqs: Sequence[torch.Tensor] | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    found_inf: torch.Tensor | None = None,
    consistency_ms: Sequence[torch.Tensor] | None = None,
    consistency_vs: Sequence[torch.Tensor] | None = None,
    delta: float = DELTA,
) -> None:
    """The theta step of weights of one device and dtype, in one launch (arguments as in
    :func:`resu_compile.kernels.theta_update.theta_update_`). (Over 60 lines: its arguments and
    the kernel's, one a line.)"""
    check_theta_args(rule, exp_avgs, exp_avg_sqs)
    consistency = check_consistency_args(consistency_ms, consistency_vs)
    uses_m, uses_v = rule != "sgd", rule == "adamw"
    # Bias corrections only matter to adamw; step 1 keeps other rules valid whatever they pass.
    scalars = adam_scalars(step if uses_v else 1, lr, beta1, beta2, weight_decay)
    launch.check_found_inf("theta_update_triton_", found_inf, params)
    states = [exp_avgs] if uses_m else []
    if uses_v:
        states.append(exp_avg_sqs)
    if consistency:
        states += [consistency_ms, consistency_vs]
    run = launch.update_launch(
        "theta_update_triton_",
        params,
        grads,
        states,  # type: ignore[arg-type]
        [select_bits],
    )
    if run is None:
        return
    _theta_update_kernel[run.tables.grid](
        run.addrs,
        run.n_tensors,
        run.tables.chunks,
        run.tables.numels,
        params[0],
        grads[0],
        float(lr),
        float(beta1),
        float(1 - beta1),
        scalars["beta2"],
        scalars["one_minus_beta2"],
        float(eps),
        float(weight_decay),
        scalars["decay"],
        scalars["neg_step_size"],
        scalars["bc2_sqrt"],
        float(delta),
        found_inf,
        RULE=_RULE_IDS[rule],
        HAS_WD=weight_decay != 0,
        CONSISTENCY=consistency,
        HAS_FOUND_INF=found_inf is not None,
        ALIGNED=run.aligned,
        BLOCK=run.block,
        VEC=run.vec,
        num_warps=run.num_warps,
        enable_fp_fusion=launch.FP_FUSION,
    )
