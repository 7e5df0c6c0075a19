"""The theta step: the reference's rules (formulas, torch's AdamW on the selection, frozen
coordinates bit-identical) and the Triton kernel (interpreted on CPU, compiled on GPU) against it."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.theta_update import theta_update_reference_
from resu_compile.kernels.triton.theta_update import theta_update_triton_
from tests.kernels.update_cases import (
    ALIGNED_SHAPES,
    CPU_DTYPES,
    CUDA,
    GPU_SHAPES,
    ODD_SHAPES,
    SHAPES,
    THETA_KW,
    TOL,
    assert_lists_close,
    assert_lists_equal,
    at,
    bools,
    clone,
    lists,
    mask,
    tensors,
)

SHAPE = (37, 23)


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_leaves_unselected_bit_identical(rule: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    sel = torch.rand(SHAPE, generator=gen) < 0.2
    p, m, v = (torch.randn(SHAPE, generator=gen).to(dtype) for _ in range(3))
    v = v.abs()
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    for step in range(1, 4):
        grad = torch.randn(SHAPE, generator=gen).to(dtype)
        theta_update_reference_(
            p, grad, pack_bits(sel), rule=rule, lr=1e-2, step=step, exp_avg=m, exp_avg_sq=v,
            weight_decay=1e-2,
        )  # fmt: skip
    assert torch.equal(p[~sel], p0[~sel])
    assert not torch.equal(p[sel], p0[sel])
    assert torch.equal(m[~sel], m0[~sel])
    assert torch.equal(v[~sel], v0[~sel])
    if rule != "adamw":
        assert torch.equal(v, v0)
    if rule == "sgd":
        assert torch.equal(m, m0)


def test_reference_rules_follow_their_formulas() -> None:
    gen = torch.Generator().manual_seed(4)
    sel = torch.rand(SHAPE, generator=gen) < 0.3
    bits = pack_bits(sel)
    p0, g = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    lr, wd, b1 = 0.1, 0.01, 0.8

    p = p0.clone()
    theta_update_reference_(p, g, bits, rule="sgd", lr=lr, step=1, weight_decay=wd)
    torch.testing.assert_close(p[sel], p0[sel] - lr * (g[sel] + wd * p0[sel]), rtol=0, atol=1e-6)

    p, m0 = p0.clone(), torch.randn(SHAPE, generator=gen)
    m = m0.clone()
    theta_update_reference_(p, g, bits, rule="momentum", lr=lr, step=1, exp_avg=m, beta1=b1)
    m_expected = b1 * m0[sel] + (1 - b1) * g[sel]
    torch.testing.assert_close(m[sel], m_expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(p[sel], p0[sel] - lr * m_expected, rtol=0, atol=1e-6)


def test_reference_adamw_matches_torch_adamw_on_selection() -> None:
    """On the selected coordinates the adamw rule is torch.optim.AdamW, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    sel = torch.rand(SHAPE, generator=gen) < 0.3
    bits = pack_bits(sel)
    p = torch.randn(SHAPE, generator=gen)
    m, v = torch.zeros(SHAPE), torch.zeros(SHAPE)
    theta = p[sel].clone().requires_grad_()
    opt = torch.optim.AdamW([theta], lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(1, 4):
        grad = torch.randn(SHAPE, generator=gen)
        theta.grad = grad[sel].clone()
        opt.step()
        theta_update_reference_(
            p, grad, bits, rule="adamw", lr=1e-2, step=step, exp_avg=m, exp_avg_sq=v,
            weight_decay=0.05,
        )  # fmt: skip
    assert torch.equal(p[sel], theta.detach())
    assert torch.equal(m[sel], opt.state[theta]["exp_avg"])
    assert torch.equal(v[sel], opt.state[theta]["exp_avg_sq"])


def test_reference_argument_errors() -> None:
    p, g = torch.zeros(4), torch.zeros(4)
    bits = pack_bits(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rule"):
        theta_update_reference_(p, g, bits, rule="adam", lr=0.1, step=1)
    with pytest.raises(ValueError, match="exp_avg"):
        theta_update_reference_(p, g, bits, rule="momentum", lr=0.1, step=1)


def _check_one(shape, dtype, sel_kind, rule, device) -> None:
    """One weight (a list of one) through the kernel, against the reference."""
    sel = mask(sel_kind, shape, device)
    assert sel is not None
    bits = pack_bits(sel)
    p, g, m, v = tensors(shape, dtype, device, None, 4)
    before = [p.clone(), m.clone(), v.clone()]
    ours = [t.clone() for t in before]
    kw = dict(rule=rule, lr=1e-2, step=2, beta1=0.8, weight_decay=1e-2)
    theta_update_reference_(p, g, bits, exp_avg=m, exp_avg_sq=v, **kw)
    theta_update_triton_(
        [ours[0]], [g.clone()], [bits], exp_avgs=[ours[1]], exp_avg_sqs=[ours[2]], **kw
    )
    for got, want, old in zip(ours, (p, m, v), before, strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
        assert torch.equal(got[~sel], old[~sel])


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["all_active", "all_pruned", "random"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_one_weight(shape, dtype, sel_kind, rule) -> None:
    _check_one(shape, dtype, sel_kind, rule, "cpu")


def _check_many(shapes, dtype, sel_kind, rule, device) -> None:
    """One launch over every weight: the reference's values, bit for bit a launch per weight, and
    frozen coordinates with the very same bits."""
    sels = bools(sel_kind, shapes, device)
    bits = [pack_bits(s) for s in sels]
    p, g, m, v = lists(shapes, dtype, device, 4)
    before = [p, m, v]
    want, single, ours = clone(before), clone(before), clone(before)
    for i in range(len(shapes)):
        p_i, m_i, v_i = at(want, i)
        theta_update_reference_(
            p_i, g[i], bits[i], rule=rule, exp_avg=m_i, exp_avg_sq=v_i, **THETA_KW
        )
        p_i, m_i, v_i = at(single, i)
        theta_update_triton_(
            [p_i], [g[i]], [bits[i]], rule=rule, exp_avgs=[m_i], exp_avg_sqs=[v_i], **THETA_KW
        )
    theta_update_triton_(
        ours[0], g, bits, rule=rule, exp_avgs=ours[1], exp_avg_sqs=ours[2], **THETA_KW
    )
    assert_lists_close(ours, want, dtype)
    assert_lists_equal(ours, single)
    for ours_row, old_row in zip(ours, before, strict=True):
        for got, old, sel in zip(ours_row, old_row, sels, strict=True):
            assert torch.equal(got[~sel], old[~sel])  # frozen: the very same bits
    if sel_kind == "random" and rule != "sgd":
        assert not torch.equal(ours[1][0], before[1][0])  # the states did move


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["random", "all", "none"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_kernel_many_weights(dtype, sel_kind, rule) -> None:
    _check_many(ODD_SHAPES, dtype, sel_kind, rule, "cpu")


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_kernel_aligned_path(rule) -> None:
    _check_many(ALIGNED_SHAPES, torch.float32, "random", rule, "cpu")


def test_kernel_takes_states_only_where_the_rule_needs_them() -> None:
    """sgd takes no state lists; empty tensors and an empty list are no-ops."""
    shapes = [(0, 5), (3, 7), (0,)]
    p, g = lists(shapes, torch.float32, "cpu", 2)
    bits = [pack_bits(s) for s in bools("all", shapes, "cpu")]
    want = [t.clone() for t in p]
    for i in range(len(shapes)):
        theta_update_reference_(want[i], g[i], bits[i], rule="sgd", **THETA_KW)
    theta_update_triton_(p, g, bits, rule="sgd", **THETA_KW)
    assert_lists_equal([p], [want])
    theta_update_triton_([], [], [], rule="adamw", exp_avgs=[], exp_avg_sqs=[], **THETA_KW)


def test_kernel_unaligned_base_address() -> None:
    """A view 4 bytes into its storage: the kernel must run without the alignment hint."""
    shapes = [(64, 64), (16, 48)]
    p, g, m, v = lists(shapes, torch.float32, "cpu", 4)
    storage = torch.zeros(64 * 64 + 1)
    shifted = storage[1:].view(64, 64)
    shifted.copy_(p[0])
    p[0] = shifted
    bits = [pack_bits(s) for s in bools("random", shapes, "cpu")]
    want = clone([p, m, v])
    for i in range(len(shapes)):
        p_i, m_i, v_i = at(want, i)
        theta_update_reference_(
            p_i, g[i], bits[i], rule="adamw", exp_avg=m_i, exp_avg_sq=v_i, **THETA_KW
        )
    theta_update_triton_(p, g, bits, rule="adamw", exp_avgs=m, exp_avg_sqs=v, **THETA_KW)
    assert_lists_close([p, m, v], want, torch.float32)
    assert storage[0] == 0


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["all_active", "all_pruned", "random"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (1024, 4097)], ids=str)
def test_kernel_one_weight_gpu(shape, dtype, sel_kind, rule) -> None:
    _check_one(shape, dtype, sel_kind, rule, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["random", "all", "none"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shapes", [GPU_SHAPES, ALIGNED_SHAPES], ids=["odd", "aligned"])
def test_kernel_many_weights_gpu(shapes, dtype, sel_kind, rule) -> None:
    _check_many(shapes, dtype, sel_kind, rule, "cuda")
