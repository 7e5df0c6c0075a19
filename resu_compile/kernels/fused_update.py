"""Fused masked optimizer updates: one pass over the weight, mask read as packed bits.

Each kernel reads the parameter, the gradient, the optimizer state and one bit per weight, and
writes the parameter and state once, which is the traffic of a plain fused optimizer plus N/8 bytes.
That is how the sparse phases train at dense speed (DESIGN.md "The fast path"). The maths mirrors
:mod:`resu_compile.kernels.reference` in fp32 whatever the storage dtype (fp32, fp16 or bf16;
states share the parameter's dtype, the gradient may differ).

A program updates one block of ``BLOCK`` consecutive weights seen as a ``[BLOCK // VEC, VEC]``
tile, ``VEC`` being the elements of one 128-bit access (4 fp32, 8 fp16/bf16): each tile row is one
vector load or store per tensor, and lies within one mask byte (the bit format is defined once, in
:mod:`resu_compile.kernels.bits`). A thread loads the mask byte of each of its rows once and expands
it to bits with shifts in registers, instead of one byte load per element. Blocks start at
multiples of ``BLOCK``, so on whole bytes.

Loads and stores are predicated on bounds only, never on a mask bit, so Triton can vectorise them;
mask and selection act through in-register selects. (Unstructured masks touch every 32-byte sector
anyway, so skipping pruned elements would save no traffic.)

Hyper-parameters are runtime fp32 scalars so that a learning-rate schedule never recompiles; only
boolean structure (momentum on/off, nesterov, ...) is ``tl.constexpr``. Every tensor must be
contiguous: the kernels see the weight as a flat row-major array, as the mask format does.

``*_multi_`` variants update a list of weights of any sizes in one launch (the RESU phase steps
every managed weight at once): the grid runs over the blocks of all tensors, a cached per-block
table says which tensor and which block each program takes, and the tensors are reached through a
table of base addresses (int64, cast to typed pointers in the kernel).

Every update takes an optional ``found_inf``: a one-element fp32 or bool tensor on the weights'
device, as torch's fused optimizers take. Nonzero (or NaN, or True) skips the step on the device:
each program reads it once and returns before it reads or writes a weight or a state, so a caller
that detects non-finite gradients on the device never needs a device-to-host sync to skip a step.
The references take it too and check it on the host (they are the CPU path).
"""

from __future__ import annotations

import functools
import itertools
import operator
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import packed_numel
from resu_compile.kernels.reference import check_consistency_args, check_theta_args
from resu_compile.method.consistency import DELTA

# (BLOCK, num_warps) by (the parameter's element size, whether theta's AdamW rides along), from
# benchmarks/tune_updates.py on an H100: 8 elements a thread (one 128-bit access per tensor in bf16,
# two in fp32) move 92-96% of the copy bandwidth; 16 leave too few threads resident to keep memory
# busy (bf16's theta update fell to 68%). The one-pass RESU step holds each coordinate's own
# scalars and its old values besides: in fp32 it needs 4 elements a thread (95%; 8 give 93%), in
# bf16 8 (80%; 4 give 79%, 16 give 76%). BLOCK: a power of two, at least 8.
LAUNCH_CONFIGS: dict[tuple[int, bool], tuple[int, int]] = {
    (4, False): (1024, 4),
    (2, False): (1024, 4),
    (4, True): (1024, 8),
    (2, True): (1024, 4),
}

# Every multiply and add rounds on its own, as torch's separate ops do: with fusion into FMAs (the
# default of Triton 3.6) each kernel's arithmetic depends on what the compiler makes of it, and the
# per-tensor, multi-tensor and one-pass kernels differ in the last bit. benchmarks/tune_updates.py
# measures both settings.
FP_FUSION = False

_RULE_IDS = {"sgd": 0, "momentum": 1, "adamw": 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Base addresses and sizes the multi-tensor kernels may assume divisible by this (16 bytes: one
# 128-bit access), when every tensor of a call allows it; otherwise they run without the hint.
_ALIGN = 16


def launch_config(dtype: torch.dtype, theta: bool = False) -> tuple[int, int, int]:
    """``(BLOCK, VEC, num_warps)`` of the update kernels for parameters of ``dtype`` (``theta``: the
    one-pass RESU step)."""
    size = dtype.itemsize
    block, num_warps = LAUNCH_CONFIGS[size, theta]
    return block, 16 // size, num_warps


@triton.jit
def _tile(start, n, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Offsets ``[BLOCK // VEC, VEC]`` of the block at ``start`` and their in-bounds predicate."""
    rows = tl.arange(0, BLOCK // VEC)
    offs = start + (rows[:, None] * VEC + tl.arange(0, VEC)[None, :])
    return offs, offs < n


@triton.jit
def _tile_bits(bits_ptr, start, n, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """The bit of every element of :func:`_tile`, as booleans; out-of-bounds elements read 0.

    Element ``i`` is bit ``i & 7`` of byte ``i >> 3`` (bits.py), so row ``r`` lies in byte
    ``start // 8 + r // (8 // VEC)`` from bit ``(r % (8 // VEC)) * VEC``: a thread loads one byte
    per row it holds and expands it with shifts. ``max_contiguous(.., 1)`` keeps that load in the
    rows' own register layout; left alone, Triton vectorises it in a layout of its own and converts
    through shared memory, behind a barrier that holds back every data load of the block.
    """
    rows = tl.arange(0, BLOCK // VEC)
    byte_idx = tl.max_contiguous(start // 8 + rows // (8 // VEC), 1)
    byte = tl.load(bits_ptr + byte_idx, mask=byte_idx * 8 < n, other=0).to(tl.int32)
    shift = (rows % (8 // VEC)) * VEC
    return ((byte[:, None] >> (shift[:, None] + tl.arange(0, VEC)[None, :])) & 1) != 0


@triton.jit
def _adam_math(
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
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
):
    """torch's single-tensor Adam body in fp32; ``lerp`` follows torch's two-sided formula."""
    if HAS_WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    m = tl.where(lerp_w < 0.5, m + lerp_w * (g - m), g - (g - m) * (1.0 - lerp_w))
    v = v * beta2 + (one_minus_beta2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    return p, m, v


@triton.jit
def _store_active(ptr, offs, inb, active, value, KEEP_PRUNED: tl.constexpr):
    """Store ``value`` on active coordinates; pruned ones get 0, or keep their bits."""
    if KEEP_PRUNED:
        old = tl.load(ptr + offs, mask=inb)
        tl.store(ptr + offs, tl.where(active, value.to(old.dtype), old), mask=inb)
    else:
        tl.store(ptr + offs, tl.where(active, value, 0.0).to(ptr.dtype.element_ty), mask=inb)


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
    offs, inb = _tile(start, n, BLOCK, VEC)
    active = inb
    if HAS_MASK:
        active = _tile_bits(mask_ptr, start, n, BLOCK, VEC)
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
        _store_active(buf_ptr, offs, inb, active, buf, KEEP_PRUNED)
        g = g + momentum * buf if NESTEROV else buf
    p = p - lr * g
    _store_active(param_ptr, offs, inb, active, p, KEEP_PRUNED)


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
    """Adam on the active coordinates; with ``THETA`` (the RESU phase with trainable actives, in
    one pass) also theta's AdamW on the selected pruned ones, whose eight scalars (same order as
    the actives' own) ``theta_scalars`` points to; other pruned coordinates keep their bits."""
    offs, inb = _tile(start, n, BLOCK, VEC)
    active = inb
    if HAS_MASK:
        active = _tile_bits(mask_ptr, start, n, BLOCK, VEC)
    p = tl.load(param_ptr + offs, mask=inb).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=inb).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb).to(tl.float32)
    if MAXIMIZE:
        g = -g
    update = active
    if THETA:  # each coordinate takes its own rule's scalars: the same arithmetic as two passes
        update = active | _tile_bits(sel_ptr, start, n, BLOCK, VEC)
        lerp_w = tl.where(active, lerp_w, tl.load(theta_scalars))
        beta2 = tl.where(active, beta2, tl.load(theta_scalars + 1))
        one_minus_beta2 = tl.where(active, one_minus_beta2, tl.load(theta_scalars + 2))
        eps = tl.where(active, eps, tl.load(theta_scalars + 3))
        weight_decay = tl.where(active, weight_decay, tl.load(theta_scalars + 4))
        decay = tl.where(active, decay, tl.load(theta_scalars + 5))
        neg_step_size = tl.where(active, neg_step_size, tl.load(theta_scalars + 6))
        bc2_sqrt = tl.where(active, bc2_sqrt, tl.load(theta_scalars + 7))
    p, m, v = _adam_math(
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
    _store_active(param_ptr, offs, inb, update, p, KEEP_PRUNED)
    _store_active(m_ptr, offs, inb, update, m, KEEP_PRUNED)
    _store_active(v_ptr, offs, inb, update, v, KEEP_PRUNED)


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
    """Unselected coordinates are stored back with the very bits that were loaded. With
    ``CONSISTENCY`` the gradient is weighted by ``C = |cm| / (cv + delta)``, from the consistency
    statistics ``cm``, ``cv`` (METHOD.md section 4)."""
    offs, inb = _tile(start, n, BLOCK, VEC)
    sel = _tile_bits(sel_ptr, start, n, BLOCK, VEC)
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
        p, m, v = _adam_math(
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


# ----- one tensor per launch: the block is program_id * BLOCK -----


@triton.jit
def _masked_sgd_kernel(
    param_ptr,
    grad_ptr,
    buf_ptr,
    mask_ptr,
    n,
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
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if skip:
        return
    _sgd_block(
        param_ptr,
        grad_ptr,
        buf_ptr,
        mask_ptr,
        tl.program_id(0).to(tl.int64) * BLOCK,
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


@triton.jit
def _masked_adam_kernel(
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    mask_ptr,
    n,
    lerp_w,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    decay,
    neg_step_size,
    bc2_sqrt,
    found_inf_ptr,
    HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    KEEP_PRUNED: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if skip:
        return
    _adam_block(
        param_ptr,
        grad_ptr,
        m_ptr,
        v_ptr,
        mask_ptr,
        mask_ptr,
        tl.program_id(0).to(tl.int64) * BLOCK,
        n,
        lerp_w,
        beta2,
        one_minus_beta2,
        eps,
        weight_decay,
        decay,
        neg_step_size,
        bc2_sqrt,
        found_inf_ptr,
        HAS_MASK,
        HAS_WD,
        DECOUPLED,
        MAXIMIZE,
        KEEP_PRUNED,
        False,
        BLOCK,
        VEC,
    )


@triton.jit
def _theta_update_kernel(
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    sel_ptr,
    cm_ptr,
    cv_ptr,
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
    found_inf_ptr,
    RULE: tl.constexpr,
    HAS_WD: tl.constexpr,
    CONSISTENCY: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if skip:
        return
    _theta_block(
        param_ptr,
        grad_ptr,
        m_ptr,
        v_ptr,
        sel_ptr,
        cm_ptr,
        cv_ptr,
        tl.program_id(0).to(tl.int64) * BLOCK,
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


# ----- many tensors per launch: program -> (tensor, block) through the block table -----


@triton.jit
def _multi_block(blocks_ptr, numels_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor index, block start and tensor size, from the host-built tables."""
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64) * BLOCK
    n = tl.load(numels_ptr + t)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    return t, start, n


@triton.jit
def _multi_ptr(addrs_ptr, row, n_tensors, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t`` of address row ``row`` as a ``DTYPE`` pointer.

    Divisibility does not survive an integer-to-pointer cast, so without the hint no access would
    be vectorised; the host sets ``ALIGNED`` only when every base address of the call is 16-byte
    aligned (and every size a multiple of 16, for the bounds predicate).
    """
    ptr = tl.load(addrs_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _masked_sgd_multi_kernel(
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
    HAS_MASK."""
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:  # loaded alongside the block table; skips before any weight or state
        skip = tl.load(found_inf_ptr) != 0
    t, start, n = _multi_block(blocks_ptr, numels_ptr, ALIGNED, BLOCK)
    if skip:
        return
    dtype = param0_ptr.dtype.element_ty
    param_ptr = _multi_ptr(addrs_ptr, 0, n_tensors, t, dtype, ALIGNED)
    buf_ptr = param_ptr  # stand-ins for absent rows: never dereferenced
    mask_ptr = param_ptr
    if HAS_MOMENTUM:
        buf_ptr = _multi_ptr(addrs_ptr, 2, n_tensors, t, dtype, ALIGNED)
    if HAS_MASK:
        mask_ptr = _multi_ptr(addrs_ptr, 2 + HAS_MOMENTUM, n_tensors, t, tl.uint8, False)
    _sgd_block(
        param_ptr,
        _multi_ptr(addrs_ptr, 1, n_tensors, t, grad0_ptr.dtype.element_ty, ALIGNED),
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


@triton.jit
def _masked_adam_multi_kernel(
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
    select bits if THETA."""
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:  # loaded alongside the block table; skips before any weight or state
        skip = tl.load(found_inf_ptr) != 0
    t, start, n = _multi_block(blocks_ptr, numels_ptr, ALIGNED, BLOCK)
    if skip:
        return
    dtype = param0_ptr.dtype.element_ty
    param_ptr = _multi_ptr(addrs_ptr, 0, n_tensors, t, dtype, ALIGNED)
    mask_ptr = param_ptr  # stand-ins when there is no mask or selection: never dereferenced
    sel_ptr = param_ptr
    if HAS_MASK:
        mask_ptr = _multi_ptr(addrs_ptr, 4, n_tensors, t, tl.uint8, False)
    if THETA:
        sel_ptr = _multi_ptr(addrs_ptr, 5, n_tensors, t, tl.uint8, False)
    _adam_block(
        param_ptr,
        _multi_ptr(addrs_ptr, 1, n_tensors, t, grad0_ptr.dtype.element_ty, ALIGNED),
        _multi_ptr(addrs_ptr, 2, n_tensors, t, dtype, ALIGNED),
        _multi_ptr(addrs_ptr, 3, n_tensors, t, dtype, ALIGNED),
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


@triton.jit
def _theta_update_multi_kernel(
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
    select bits."""
    skip = False  # a constexpr: no branch at all without found_inf
    if HAS_FOUND_INF:  # loaded alongside the block table; skips before any weight or state
        skip = tl.load(found_inf_ptr) != 0
    t, start, n = _multi_block(blocks_ptr, numels_ptr, ALIGNED, BLOCK)
    if skip:
        return
    dtype = param0_ptr.dtype.element_ty
    param_ptr = _multi_ptr(addrs_ptr, 0, n_tensors, t, dtype, ALIGNED)
    m_ptr = param_ptr  # stand-ins for the states a rule does not have: never dereferenced
    v_ptr = param_ptr
    if RULE >= 1:
        m_ptr = _multi_ptr(addrs_ptr, 2, n_tensors, t, dtype, ALIGNED)
    if RULE == 2:
        v_ptr = _multi_ptr(addrs_ptr, 3, n_tensors, t, dtype, ALIGNED)
    cm_ptr = param_ptr  # stand-ins again, without CONSISTENCY
    cv_ptr = param_ptr
    bits_row = 2 + RULE
    if CONSISTENCY:
        cm_ptr = _multi_ptr(addrs_ptr, 2 + RULE, n_tensors, t, dtype, ALIGNED)
        cv_ptr = _multi_ptr(addrs_ptr, 3 + RULE, n_tensors, t, dtype, ALIGNED)
        bits_row = 4 + RULE
    _theta_block(
        param_ptr,
        _multi_ptr(addrs_ptr, 1, n_tensors, t, grad0_ptr.dtype.element_ty, ALIGNED),
        m_ptr,
        v_ptr,
        _multi_ptr(addrs_ptr, bits_row, n_tensors, t, tl.uint8, False),
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


def _check(
    name: str, param: torch.Tensor, grad: torch.Tensor, *states: torch.Tensor | None
) -> None:
    """Reject what the flat kernels would silently get wrong."""
    if param.dtype not in _DTYPES or grad.dtype not in _DTYPES:
        raise TypeError(f"{name}: param/grad must be fp32, fp16 or bf16")
    if not param.is_contiguous() or not grad.is_contiguous():
        raise ValueError(f"{name}: param and grad must be contiguous")
    if grad.shape != param.shape or grad.device != param.device:
        raise ValueError(f"{name}: grad must match param in shape and device")
    for state in states:
        if state is None:
            continue
        if state.shape != param.shape or state.dtype != param.dtype or state.device != param.device:
            raise ValueError(f"{name}: state tensors must match param in shape, dtype and device")
        if not state.is_contiguous():
            raise ValueError(f"{name}: state tensors must be contiguous")


def _check_found_inf(
    name: str, found_inf: torch.Tensor | None, device: torch.device | None
) -> None:
    """``found_inf``: ``None``, or one fp32 / bool element on the weights' device (no sync)."""
    if found_inf is None:
        return
    if found_inf.dtype not in (torch.float32, torch.bool) or found_inf.numel() != 1:
        raise ValueError(f"{name}: found_inf must be a 1-element float32 or bool tensor")
    if device is not None and found_inf.device != device:
        raise ValueError(f"{name}: found_inf must be on the weights' device")


def _check_bits(name: str, bits: torch.Tensor, param: torch.Tensor) -> None:
    if bits.dtype != torch.uint8 or bits.device != param.device or not bits.is_contiguous():
        raise ValueError(f"{name}: packed bits must be a contiguous uint8 tensor on param's device")
    if bits.numel() != packed_numel(param.numel()):
        raise ValueError(f"{name}: {bits.numel()} bytes of bits for {param.numel()} weights")


class _MultiLaunch(NamedTuple):
    """What a ``*_multi_kernel`` launch needs beyond the update's own scalars."""

    addrs: torch.Tensor  # int64 [rows * n_tensors]: row r, tensor t at r * n_tensors + t
    n_tensors: int
    blocks: torch.Tensor  # int32 [n_blocks, 2]: (tensor index, block index within the tensor)
    numels: torch.Tensor  # int64 [n_tensors]
    n_blocks: int
    aligned: bool
    block: int
    vec: int
    num_warps: int


# Small LRU caches. A block table depends on the shapes only. An address table is its own key (its
# device copy holds exactly the key's integers), so it is reused for as long as the tensors keep
# their storage: parameters and optimizer states always, gradients when the caching allocator hands
# the same blocks back; a miss costs one host-to-device copy of a few hundred int64.
_CACHE_SIZE = 16
_BLOCK_TABLES: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()
_ADDRESS_TABLES: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
# Sets of lasting tensors (params, states, bits) already checked: ids, addresses and param shapes.
_CHECKED: OrderedDict[tuple, bool] = OrderedDict()


_INTERPRETED = not isinstance(_theta_update_multi_kernel, triton.runtime.JITFunction)


def _cached(cache: OrderedDict, key: tuple, build):
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _block_table(
    numels: tuple[int, ...], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    n_blocks = int(counts.sum())
    if n_blocks >= 2**31:
        raise ValueError(f"{n_blocks} blocks of {block} weights do not fit one launch")
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts  # first program of each tensor
    index = torch.arange(n_blocks) - first[tensor]
    table = torch.stack([tensor, index], dim=1).to(torch.int32)
    return (
        table.to(device),
        torch.tensor(numels, dtype=torch.int64).to(device),
        n_blocks,
    )


def _address_table(
    addrs: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    host = torch.frombuffer(array("q", addrs), dtype=torch.int64)
    # From pageable memory CUDA stages the copy before returning, without waiting for the stream;
    # the cache keeps the host tensor alive all the same.
    return host, host.to(device, non_blocking=True)


def _multi_launch(
    name: str,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    bits: Sequence[Sequence[torch.Tensor]],
    theta: bool = False,
) -> _MultiLaunch | None:
    """Check lists as :func:`_check` / :func:`_check_bits` check one tensor, and build the tables
    (``theta``: for the one-pass RESU step's launch configuration).

    Address rows, in this order: params, grads, each state list (the params' dtype), each packed-bit
    list. ``None`` when there is nothing to update.
    """
    rows = [params, grads, *states, *bits]
    n_tensors = len(params)
    if any(len(row) != n_tensors for row in rows):
        raise ValueError(f"{name}: every list must have one tensor per parameter")
    if n_tensors == 0:
        return None
    dtype, grad_dtype, device = params[0].dtype, grads[0].dtype, params[0].device
    if _INTERPRETED and device.type != "cpu":
        # The interpreter runs on host copies of the arguments; the addresses would be the device's.
        raise RuntimeError(f"{name}: under TRITON_INTERPRET the tensors must be on the CPU")
    if dtype not in _DTYPES or grad_dtype not in _DTYPES:
        raise TypeError(f"{name}: param/grad must be fp32, fp16 or bf16")
    shapes = [p.shape for p in params]
    numels = tuple(p.numel() for p in params)
    addrs = tuple([t.data_ptr() for row in rows for t in row])
    # Params, states and bits live across steps: they are checked once per set of tensors, and a
    # step re-checks only its new gradients. A tensor replaced (states reloaded, bits re-packed at
    # a transition, a param's .data swapped) is built while the old one is alive, so it has another
    # address and the set is checked again.
    lasting = (
        tuple(map(id, itertools.chain(params, *states, *bits))),
        addrs[:n_tensors] + addrs[2 * n_tensors :],
        tuple(shapes),
    )
    checked = lasting in _CHECKED
    if not _rows_valid(rows, len(states), shapes, numels, rows_to_check=[1] if checked else None):
        _raise_row_fault(name, rows, len(states), shapes, numels)
    _cached(_CHECKED, lasting, lambda: True)

    n_float = (2 + len(states)) * n_tensors  # the rows read as vectors: all but the bits
    # _ALIGN is a power of two: every value is a multiple of it iff their bitwise OR is.
    aligned = functools.reduce(operator.or_, (*numels, *addrs[:n_float])) % _ALIGN == 0
    block, vec, num_warps = launch_config(dtype, theta)
    blocks, numels_dev, n_blocks = _cached(
        _BLOCK_TABLES, (device, block, numels), lambda: _block_table(numels, block, device)
    )
    if n_blocks == 0:
        return None
    _, addrs_dev = _cached(_ADDRESS_TABLES, (device, addrs), lambda: _address_table(addrs, device))
    return _MultiLaunch(
        addrs_dev, n_tensors, blocks, numels_dev, n_blocks, aligned, block, vec, num_warps
    )


def _rows_valid(
    rows: list[Sequence[torch.Tensor]],
    n_states: int,
    shapes: list[torch.Size],
    numels: tuple[int, ...],
    rows_to_check: list[int] | None = None,
) -> bool:
    """Whether every row (or those of ``rows_to_check``) is as :func:`_multi_launch` needs it:
    row-wide comparisons, which cost the host a fraction of a loop of checks per tensor (this runs
    every optimizer step, and on a model whose step is bound by the host every microsecond here is
    a microsecond of step time)."""
    dtype, grad_dtype, device = rows[0][0].dtype, rows[1][0].dtype, rows[0][0].device
    n = len(shapes)
    for r in range(len(rows)) if rows_to_check is None else rows_to_check:
        row = rows[r]
        floating = r < 2 + n_states
        want = torch.uint8 if not floating else grad_dtype if r == 1 else dtype
        if (
            [t.dtype for t in row] != [want] * n
            or [t.device for t in row] != [device] * n
            or not all([t.is_contiguous() for t in row])
            or (
                [t.shape for t in row] != shapes
                if floating
                else [t.numel() for t in row] != [packed_numel(m) for m in numels]
            )
        ):
            return False
    return True


def _raise_row_fault(
    name: str,
    rows: list[Sequence[torch.Tensor]],
    n_states: int,
    shapes: list[torch.Size],
    numels: tuple[int, ...],
) -> None:
    """The error for the first fault :func:`_rows_valid` found, tensor by tensor."""
    dtype, grad_dtype, device = rows[0][0].dtype, rows[1][0].dtype, rows[0][0].device
    for r, row in enumerate(rows):
        floating = r < 2 + n_states
        for t, shape, numel in zip(row, shapes, numels, strict=True):
            if floating and t.dtype != (grad_dtype if r == 1 else dtype):
                if r < 2:
                    raise TypeError(f"{name}: params (and grads) must share one dtype")
                raise ValueError(
                    f"{name}: state tensors must match param in shape, dtype and device"
                )
            if not floating and t.dtype != torch.uint8:
                raise ValueError(
                    f"{name}: packed bits must be a contiguous uint8 tensor on param's device"
                )
            if t.device != device:
                raise ValueError(f"{name}: every tensor must be on one device")
            if not t.is_contiguous():
                raise ValueError(f"{name}: every tensor must be contiguous")
            if floating and t.shape != shape:
                raise ValueError(f"{name}: grads and states must match their param's shape")
            if not floating and t.numel() != packed_numel(numel):
                raise ValueError(f"{name}: packed bits must hold ceil(numel / 8) bytes per param")
    raise AssertionError(f"{name}: _rows_valid and _raise_row_fault disagree")


def _device_of(params: Sequence[torch.Tensor]) -> torch.device | None:
    return params[0].device if len(params) else None


def _adam_scalars(
    step: int, lr: float, beta1: float, beta2: float, weight_decay: float
) -> dict[str, float]:
    """Host-side scalars of torch's Adam step, computed in double exactly as torch does."""
    if step < 1:
        raise ValueError(f"step must be >= 1 (the count after the increment), got {step}")
    return {
        "beta2": float(beta2),
        "one_minus_beta2": float(1 - beta2),
        "decay": float(1 - lr * weight_decay),
        "neg_step_size": float(-(lr / (1 - beta1**step))),
        "bc2_sqrt": float((1 - beta2**step) ** 0.5),
    }


def fused_masked_sgd_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    mask_bits: torch.Tensor | None,
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
    """Triton twin of :func:`reference.masked_sgd_` (same arguments and semantics; ``found_inf``
    is read on the device, as in the module docstring)."""
    has_momentum = momentum != 0
    if has_momentum and momentum_buffer is None:
        raise ValueError("fused_masked_sgd_: momentum != 0 needs a momentum_buffer")
    _check("fused_masked_sgd_", param, grad, momentum_buffer if has_momentum else None)
    if mask_bits is not None:
        _check_bits("fused_masked_sgd_", mask_bits, param)
    _check_found_inf("fused_masked_sgd_", found_inf, param.device)
    n = param.numel()
    if n == 0:
        return
    block, vec, num_warps = launch_config(param.dtype)
    _masked_sgd_kernel[(triton.cdiv(n, block),)](
        param,
        grad,
        momentum_buffer if has_momentum else None,
        mask_bits,
        n,
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
        BLOCK=block,
        VEC=vec,
        num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )


def fused_masked_adam_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask_bits: torch.Tensor | None,
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
) -> None:
    """Triton twin of :func:`reference.masked_adam_` (same arguments and semantics; ``found_inf``
    is read on the device, as in the module docstring)."""
    _check("fused_masked_adam_", param, grad, exp_avg, exp_avg_sq)
    if mask_bits is not None:
        _check_bits("fused_masked_adam_", mask_bits, param)
    _check_found_inf("fused_masked_adam_", found_inf, param.device)
    scalars = _adam_scalars(step, lr, beta1, beta2, weight_decay)
    n = param.numel()
    if n == 0:
        return
    block, vec, num_warps = launch_config(param.dtype)
    _masked_adam_kernel[(triton.cdiv(n, block),)](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        mask_bits,
        n,
        float(1 - beta1),
        scalars["beta2"],
        scalars["one_minus_beta2"],
        float(eps),
        float(weight_decay),
        scalars["decay"],
        scalars["neg_step_size"],
        scalars["bc2_sqrt"],
        found_inf,
        HAS_MASK=mask_bits is not None,
        HAS_WD=weight_decay != 0,
        DECOUPLED=bool(decoupled_weight_decay),
        MAXIMIZE=bool(maximize),
        HAS_FOUND_INF=found_inf is not None,
        KEEP_PRUNED=bool(keep_pruned),
        BLOCK=block,
        VEC=vec,
        num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )


def fused_theta_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    select_bits: torch.Tensor,
    *,
    rule: str,
    lr: float,
    step: int,
    exp_avg: torch.Tensor | None = None,
    exp_avg_sq: torch.Tensor | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    found_inf: torch.Tensor | None = None,
    consistency_m: torch.Tensor | None = None,
    consistency_v: torch.Tensor | None = None,
    delta: float = DELTA,
) -> None:
    """Triton twin of :func:`reference.theta_update_` (same arguments and semantics; ``found_inf``
    is read on the device, as in the module docstring)."""
    check_theta_args(rule, exp_avg, exp_avg_sq)
    consistency = check_consistency_args(consistency_m, consistency_v)
    uses_m, uses_v = rule != "sgd", rule == "adamw"
    _check(
        "fused_theta_update_",
        param,
        grad,
        exp_avg if uses_m else None,
        exp_avg_sq if uses_v else None,
        consistency_m,
        consistency_v,
    )
    _check_bits("fused_theta_update_", select_bits, param)
    _check_found_inf("fused_theta_update_", found_inf, param.device)
    # Bias corrections only matter to adamw; step 1 keeps other rules valid whatever they pass.
    scalars = _adam_scalars(step if uses_v else 1, lr, beta1, beta2, weight_decay)
    n = param.numel()
    if n == 0:
        return
    block, vec, num_warps = launch_config(param.dtype)
    _theta_update_kernel[(triton.cdiv(n, block),)](
        param,
        grad,
        exp_avg if uses_m else None,
        exp_avg_sq if uses_v else None,
        select_bits,
        consistency_m,
        consistency_v,
        n,
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
        BLOCK=block,
        VEC=vec,
        num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )


def fused_masked_sgd_multi_(
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
    """:func:`fused_masked_sgd_` on every ``(params[i], grads[i], ...)`` in one launch.

    Lists hold one tensor per parameter (``mask_bits`` is a list, or ``None`` for all); each list
    shares one dtype, every tensor is contiguous and on one device. A nonzero ``found_inf`` (one
    fp32 or bool element on that device) makes the launch a no-op without a host sync: each program
    reads it alongside its block table entry and returns before touching any weight or state.
    """
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError("fused_masked_sgd_multi_: momentum != 0 needs momentum_buffers")
    _check_found_inf("fused_masked_sgd_multi_", found_inf, _device_of(params))
    launch = _multi_launch(
        "fused_masked_sgd_multi_",
        params,
        grads,
        [momentum_buffers] if has_momentum and momentum_buffers is not None else [],
        [] if mask_bits is None else [mask_bits],
    )
    if launch is None:
        return
    _masked_sgd_multi_kernel[(launch.n_blocks,)](
        launch.addrs,
        launch.n_tensors,
        launch.blocks,
        launch.numels,
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
        ALIGNED=launch.aligned,
        BLOCK=launch.block,
        VEC=launch.vec,
        num_warps=launch.num_warps,
        enable_fp_fusion=FP_FUSION,
    )


class ThetaAdamW(NamedTuple):
    """Theta's AdamW on the selected pruned coordinates (METHOD.md section 4), for
    :func:`fused_masked_adam_multi_` to apply in the same pass as the actives' own step."""

    select_bits: Sequence[torch.Tensor]
    lr: float
    step: int
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def scalars(self, device: torch.device) -> torch.Tensor:
        """The eight fp32 scalars the kernel reads, in the order of the actives' own."""
        s = _adam_scalars(self.step, self.lr, self.beta1, self.beta2, self.weight_decay)
        values = [1 - self.beta1, s["beta2"], s["one_minus_beta2"], self.eps, self.weight_decay]
        values += [s["decay"], s["neg_step_size"], s["bc2_sqrt"]]
        return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


def fused_masked_adam_multi_(
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
    """:func:`fused_masked_adam_` on every ``(params[i], grads[i], ...)`` in one launch (lists as in
    :func:`fused_masked_sgd_multi_`).

    With ``theta`` (and ``keep_pruned``), the selected pruned coordinates take theta's AdamW in the
    same pass, reading and writing the same state tensors: the arithmetic of this call without
    ``theta`` followed by :func:`fused_theta_update_multi_` (rule ``adamw``), for one read and
    write of every tensor instead of two (bit for bit, compiled too: see ``FP_FUSION``). The
    actives' weight decay must then be decoupled (or zero), and ``maximize`` off.
    """
    scalars = _adam_scalars(step, lr, beta1, beta2, weight_decay)
    _check_found_inf("fused_masked_adam_multi_", found_inf, _device_of(params))
    if theta is not None and (
        not keep_pruned
        or mask_bits is None
        or maximize
        or (weight_decay != 0 and not decoupled_weight_decay)
    ):
        raise ValueError(
            "fused_masked_adam_multi_: theta needs keep_pruned=True, mask_bits, maximize=False "
            "and decoupled (or zero) weight decay"
        )
    bits = [] if mask_bits is None else [mask_bits]
    if theta is not None:
        bits.append(theta.select_bits)
    launch = _multi_launch(
        "fused_masked_adam_multi_",
        params,
        grads,
        [exp_avgs, exp_avg_sqs],
        bits,
        theta=theta is not None,
    )
    if launch is None:
        return
    _masked_adam_multi_kernel[(launch.n_blocks,)](
        launch.addrs,
        launch.n_tensors,
        launch.blocks,
        launch.numels,
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
        None if theta is None else theta.scalars(params[0].device),
        HAS_MASK=mask_bits is not None,
        HAS_WD=weight_decay != 0 or (theta is not None and theta.weight_decay != 0),
        DECOUPLED=bool(decoupled_weight_decay) or theta is not None,
        MAXIMIZE=bool(maximize),
        HAS_FOUND_INF=found_inf is not None,
        KEEP_PRUNED=bool(keep_pruned),
        THETA=theta is not None,
        ALIGNED=launch.aligned,
        BLOCK=launch.block,
        VEC=launch.vec,
        num_warps=launch.num_warps,
        enable_fp_fusion=FP_FUSION,
    )


def fused_theta_update_multi_(
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
    """:func:`fused_theta_update_` on every ``(params[i], grads[i], select_bits[i], ...)`` in one
    launch: the RESU phase's theta step over all managed weights.

    ``exp_avgs`` / ``exp_avg_sqs`` are lists (one state per parameter) where the rule needs them,
    ``consistency_ms`` / ``consistency_vs`` in consistency mode; lists as in
    :func:`fused_masked_sgd_multi_`. The reference is a loop of :func:`reference.theta_update_`.
    """
    check_theta_args(rule, exp_avgs, exp_avg_sqs)  # type: ignore[arg-type]  # presence only
    consistency = check_consistency_args(consistency_ms, consistency_vs)  # type: ignore[arg-type]
    uses_m, uses_v = rule != "sgd", rule == "adamw"
    scalars = _adam_scalars(step if uses_v else 1, lr, beta1, beta2, weight_decay)
    _check_found_inf("fused_theta_update_multi_", found_inf, _device_of(params))
    states = [exp_avgs] if uses_m else []
    if uses_v:
        states.append(exp_avg_sqs)
    if consistency:
        states += [consistency_ms, consistency_vs]
    launch = _multi_launch(
        "fused_theta_update_multi_",
        params,
        grads,
        states,  # type: ignore[arg-type]
        [select_bits],
    )
    if launch is None:
        return
    _theta_update_multi_kernel[(launch.n_blocks,)](
        launch.addrs,
        launch.n_tensors,
        launch.blocks,
        launch.numels,
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
        ALIGNED=launch.aligned,
        BLOCK=launch.block,
        VEC=launch.vec,
        num_warps=launch.num_warps,
        enable_fp_fusion=FP_FUSION,
    )
