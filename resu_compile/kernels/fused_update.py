"""Fused masked optimizer updates: one pass over the weight, mask read as packed bits.

Each kernel reads the parameter, the gradient, the optimizer state and one bit per weight, and
writes the parameter and state once, which is the traffic of a plain fused optimizer plus N/8 bytes.
That is how the sparse phases train at dense speed (DESIGN.md "The fast path"). The maths mirrors
:mod:`resu_compile.kernels.reference` in fp32 whatever the storage dtype (fp32, fp16 or bf16;
states share the parameter's dtype, the gradient may differ).

Loads and stores are predicated on bounds only, never on a mask bit, so Triton can vectorise them;
mask and selection act through in-register selects. (Unstructured masks touch every 32-byte sector
anyway, so skipping pruned elements would save no traffic.)

Hyper-parameters are runtime fp32 scalars so that a learning-rate schedule never recompiles; only
boolean structure (momentum on/off, nesterov, ...) is ``tl.constexpr``. Every tensor must be
contiguous: the kernels see the weight as a flat row-major array, as the mask format does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resu_compile.kernels.bits import packed_numel
from resu_compile.kernels.reference import check_theta_args

BLOCK = 2048
NUM_WARPS = 4

_RULE_IDS = {"sgd": 0, "momentum": 1, "adamw": 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _bit_is_set(bits_ptr, offs, inb):
    """Bit ``offs`` of the packed-bit array: byte ``offs >> 3``, bit ``offs & 7``, LSB first."""
    byte = tl.load(bits_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
    return inb & (((byte >> (offs & 7).to(tl.int32)) & 1) != 0)


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
    HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    active = inb
    if HAS_MASK:
        active = _bit_is_set(mask_ptr, offs, inb)
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
        out_buf = tl.where(active, buf, 0.0)
        tl.store(buf_ptr + offs, out_buf.to(buf_ptr.dtype.element_ty), mask=inb)
        g = g + momentum * buf if NESTEROV else buf
    p = p - lr * g
    tl.store(param_ptr + offs, tl.where(active, p, 0.0).to(param_ptr.dtype.element_ty), mask=inb)


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
    HAS_MASK: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    active = inb
    if HAS_MASK:
        active = _bit_is_set(mask_ptr, offs, inb)
    p = tl.load(param_ptr + offs, mask=inb).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=inb).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=inb).to(tl.float32)
    if MAXIMIZE:
        g = -g
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
    tl.store(param_ptr + offs, tl.where(active, p, 0.0).to(param_ptr.dtype.element_ty), mask=inb)
    tl.store(m_ptr + offs, tl.where(active, m, 0.0).to(m_ptr.dtype.element_ty), mask=inb)
    tl.store(v_ptr + offs, tl.where(active, v, 0.0).to(v_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _theta_update_kernel(
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    sel_ptr,
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
    RULE: tl.constexpr,
    HAS_WD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Unselected coordinates are stored back with the very bits that were loaded."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    sel = _bit_is_set(sel_ptr, offs, inb)
    p_old = tl.load(param_ptr + offs, mask=inb)
    p = p_old.to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=inb).to(tl.float32)
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


def _check_bits(name: str, bits: torch.Tensor, param: torch.Tensor) -> None:
    if bits.dtype != torch.uint8 or bits.device != param.device or not bits.is_contiguous():
        raise ValueError(f"{name}: packed bits must be a contiguous uint8 tensor on param's device")
    if bits.numel() != packed_numel(param.numel()):
        raise ValueError(f"{name}: {bits.numel()} bytes of bits for {param.numel()} weights")


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
) -> None:
    """Triton twin of :func:`reference.masked_sgd_` (same arguments and semantics)."""
    has_momentum = momentum != 0
    if has_momentum and momentum_buffer is None:
        raise ValueError("fused_masked_sgd_: momentum != 0 needs a momentum_buffer")
    _check("fused_masked_sgd_", param, grad, momentum_buffer if has_momentum else None)
    if mask_bits is not None:
        _check_bits("fused_masked_sgd_", mask_bits, param)
    n = param.numel()
    if n == 0:
        return
    _masked_sgd_kernel[(triton.cdiv(n, BLOCK),)](
        param,
        grad,
        momentum_buffer if has_momentum else None,
        mask_bits,
        n,
        float(lr),
        float(momentum),
        float(1 - dampening),
        float(weight_decay),
        HAS_MASK=mask_bits is not None,
        HAS_WD=weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize),
        FIRST_STEP=bool(first_step),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
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
) -> None:
    """Triton twin of :func:`reference.masked_adam_` (same arguments and semantics)."""
    _check("fused_masked_adam_", param, grad, exp_avg, exp_avg_sq)
    if mask_bits is not None:
        _check_bits("fused_masked_adam_", mask_bits, param)
    scalars = _adam_scalars(step, lr, beta1, beta2, weight_decay)
    n = param.numel()
    if n == 0:
        return
    _masked_adam_kernel[(triton.cdiv(n, BLOCK),)](
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
        HAS_MASK=mask_bits is not None,
        HAS_WD=weight_decay != 0,
        DECOUPLED=bool(decoupled_weight_decay),
        MAXIMIZE=bool(maximize),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
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
) -> None:
    """Triton twin of :func:`reference.theta_update_` (same arguments and semantics)."""
    check_theta_args(rule, exp_avg, exp_avg_sq)
    uses_m, uses_v = rule != "sgd", rule == "adamw"
    _check(
        "fused_theta_update_",
        param,
        grad,
        exp_avg if uses_m else None,
        exp_avg_sq if uses_v else None,
    )
    _check_bits("fused_theta_update_", select_bits, param)
    # Bias corrections only matter to adamw; step 1 keeps other rules valid whatever they pass.
    scalars = _adam_scalars(step if uses_v else 1, lr, beta1, beta2, weight_decay)
    n = param.numel()
    if n == 0:
        return
    _theta_update_kernel[(triton.cdiv(n, BLOCK),)](
        param,
        grad,
        exp_avg if uses_m else None,
        exp_avg_sq if uses_v else None,
        select_bits,
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
        RULE=_RULE_IDS[rule],
        HAS_WD=weight_decay != 0,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
