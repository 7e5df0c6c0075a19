"""The Triton update kernels against the reference (interpreter on CPU, real kernels on GPU).

Values must agree to rounding (fp32 math in both, fused multiply-adds may differ by an ulp); the
invariants must hold exactly: pruned coordinates are 0 in the parameter and every state tensor, and
the theta step leaves unselected coordinates bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels import reference
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.fused_update import (
    fused_masked_adam_,
    fused_masked_sgd_,
    fused_theta_update_,
)

# (5, 37, 23) and (3, 1500) span several programs and end on a partial block and a partial byte.
SHAPES = [(5, 37, 23), (1, 1), (3, 1500)]
MASKS = ["none", "all_active", "all_pruned", "random"]
SGD_CONFIGS = {
    "plain": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "nesterov_wd": dict(
        momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False
    ),
    "damp_maximize": dict(
        momentum=0.8, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=True
    ),
}
ADAM_CONFIGS = {
    "adam_l2": dict(weight_decay=1e-2, decoupled_weight_decay=False, maximize=False, beta1=0.9),
    "adamw": dict(weight_decay=1e-1, decoupled_weight_decay=True, maximize=False, beta1=0.9),
    "adamw_max_lowbeta": dict(
        weight_decay=1e-2, decoupled_weight_decay=True, maximize=True, beta1=0.3
    ),
}
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mask(kind: str, shape: tuple[int, ...], device: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_active":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "all_pruned":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(7)
    return (torch.rand(shape, generator=gen) < 0.5).to(device)


def _tensors(shape, dtype, device, mask, count: int) -> list[torch.Tensor]:
    """param, grad, then ``count - 2`` states: random everywhere (pruned state must be re-zeroed),
    with a NaN gradient on pruned coordinates (it must be ignored)."""
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(count)]
    if count > 3:
        out[3] = out[3].abs()  # a second moment is non-negative
    if mask is not None:
        out[1] = out[1].masked_fill(~mask, float("nan"))
    return out


def _assert_pruned_zero(tensors, mask) -> None:
    if mask is None:
        return
    for t in tensors:
        assert torch.equal(t[~mask], torch.zeros_like(t[~mask]))


def _check_sgd(shape, dtype, mask_kind, name, first_step, device) -> None:
    mask = _mask(mask_kind, shape, device)
    bits = None if mask is None else pack_bits(mask)
    p, g, buf = _tensors(shape, dtype, device, mask, 3)
    ours = [p.clone(), buf.clone()]
    kw = dict(lr=0.05, first_step=first_step, **SGD_CONFIGS[name])
    reference.masked_sgd_(p, g, buf, bits, **kw)
    fused_masked_sgd_(ours[0], g.clone(), ours[1], bits, **kw)
    for got, want in zip(ours, (p, buf), strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
    # Without momentum the buffer is no state: neither implementation touches it.
    _assert_pruned_zero(ours if kw["momentum"] else ours[:1], mask)


def _check_adam(shape, dtype, mask_kind, name, device) -> None:
    mask = _mask(mask_kind, shape, device)
    bits = None if mask is None else pack_bits(mask)
    p, g, m, v = _tensors(shape, dtype, device, mask, 4)
    ours = [p.clone(), m.clone(), v.clone()]
    kw = dict(step=3, lr=1e-2, beta2=0.999, eps=1e-8, **ADAM_CONFIGS[name])
    reference.masked_adam_(p, g, m, v, bits, **kw)
    fused_masked_adam_(ours[0], g.clone(), ours[1], ours[2], bits, **kw)
    for got, want in zip(ours, (p, m, v), strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
    _assert_pruned_zero(ours, mask)


def _check_theta(shape, dtype, sel_kind, rule, device) -> None:
    sel = _mask(sel_kind, shape, device)
    assert sel is not None
    bits = pack_bits(sel)
    p, g, m, v = _tensors(shape, dtype, device, None, 4)
    before = [p.clone(), m.clone(), v.clone()]
    ours = [t.clone() for t in before]
    kw = dict(rule=rule, lr=1e-2, step=2, beta1=0.8, weight_decay=1e-2)
    reference.theta_update_(p, g, bits, exp_avg=m, exp_avg_sq=v, **kw)
    fused_theta_update_(ours[0], g.clone(), bits, exp_avg=ours[1], exp_avg_sq=ours[2], **kw)
    for got, want, old in zip(ours, (p, m, v), before, strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
        assert torch.equal(got[~sel], old[~sel])


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", list(SGD_CONFIGS))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sgd(shape, dtype, mask_kind, name, first_step) -> None:
    _check_sgd(shape, dtype, mask_kind, name, first_step, "cpu")


@pytest.mark.parametrize("name", list(ADAM_CONFIGS))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adam(shape, dtype, mask_kind, name) -> None:
    _check_adam(shape, dtype, mask_kind, name, "cpu")


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["all_active", "all_pruned", "random"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_theta(shape, dtype, sel_kind, rule) -> None:
    _check_theta(shape, dtype, sel_kind, rule, "cpu")


def test_grad_dtype_may_differ_from_param() -> None:
    """An fp32 gradient (e.g. accumulated) with an fp16 weight and fp16 states."""
    shape = (5, 37, 23)
    mask = _mask("random", shape, "cpu")
    p, _, m, v = _tensors(shape, torch.float16, "cpu", mask, 4)
    g = torch.randn(shape)
    ours = [p.clone(), m.clone(), v.clone()]
    kw = dict(step=1, lr=1e-2, beta2=0.999, eps=1e-8, **ADAM_CONFIGS["adamw"])
    reference.masked_adam_(p, g, m, v, pack_bits(mask), **kw)
    fused_masked_adam_(ours[0], g, ours[1], ours[2], pack_bits(mask), **kw)
    for got, want in zip(ours, (p, m, v), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float16])


def test_rejects_what_the_flat_kernel_would_get_wrong() -> None:
    p = torch.zeros(8, 6)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    kw = dict(
        step=1,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=True,
        maximize=False,
    )
    with pytest.raises(ValueError, match="contiguous"):
        fused_masked_adam_(p.t(), p.t(), m.t(), v.t(), None, **kw)
    with pytest.raises(ValueError, match="bytes"):
        fused_masked_adam_(p, p, m, v, torch.zeros(5, dtype=torch.uint8), **kw)
    with pytest.raises(ValueError, match="dtype"):
        fused_masked_adam_(p, p, m.half(), v, None, **kw)
    with pytest.raises(ValueError, match="step"):
        fused_masked_adam_(p, p, m, v, None, **{**kw, "step": 0})


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", list(SGD_CONFIGS))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (1024, 4097)], ids=str)
def test_sgd_gpu(shape, dtype, mask_kind, name, first_step) -> None:
    _check_sgd(shape, dtype, mask_kind, name, first_step, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", list(ADAM_CONFIGS))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (1024, 4097)], ids=str)
def test_adam_gpu(shape, dtype, mask_kind, name) -> None:
    _check_adam(shape, dtype, mask_kind, name, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["all_active", "all_pruned", "random"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (1024, 4097)], ids=str)
def test_theta_gpu(shape, dtype, sel_kind, rule) -> None:
    _check_theta(shape, dtype, sel_kind, rule, "cuda")
