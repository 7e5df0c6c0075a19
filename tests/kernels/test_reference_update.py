"""The reference updates against torch.optim, bit for bit, and the mask / selection invariants."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.reference import (
    masked_adam_,
    masked_sgd_,
    theta_update_,
    topk_threshold,
)

SHAPE = (37, 23)
STEPS = 5

SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum_nesterov_wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening_maximize": dict(
        lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3, maximize=True
    ),
}
ADAM_CONFIGS = {
    "adam_l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-1)),
    "adamw_maximize_betas": (
        torch.optim.AdamW,
        dict(lr=3e-3, betas=(0.3, 0.95), eps=1e-6, weight_decay=1e-2, maximize=True),
    ),
}


def _sgd_kwargs(cfg: dict, first_step: bool) -> dict:
    return dict(
        lr=cfg["lr"],
        momentum=cfg.get("momentum", 0.0),
        dampening=cfg.get("dampening", 0.0),
        weight_decay=cfg.get("weight_decay", 0.0),
        nesterov=cfg.get("nesterov", False),
        maximize=cfg.get("maximize", False),
        first_step=first_step,
    )


def _adam_kwargs(cls: type, cfg: dict, step: int) -> dict:
    beta1, beta2 = cfg.get("betas", (0.9, 0.999))
    return dict(
        step=step,
        lr=cfg["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=cfg.get("eps", 1e-8),
        weight_decay=cfg.get("weight_decay", 0.0),
        decoupled_weight_decay=cls is torch.optim.AdamW,
        maximize=cfg.get("maximize", False),
    )


def _run_sgd(cfg: dict, mask: torch.Tensor | None):
    """Steps torch.optim.SGD on a dense copy and the reference on a masked one, same gradients."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(SHAPE, generator=gen)
    dense = start.clone().requires_grad_()
    opt = torch.optim.SGD([dense], foreach=False, **cfg)
    ours = start.clone() if mask is None else start * mask
    buf = torch.zeros(SHAPE)
    bits = None if mask is None else pack_bits(mask)
    for i in range(STEPS):
        grad = torch.randn(SHAPE, generator=gen)
        dense.grad = grad.clone()
        opt.step()
        masked_sgd_(ours, grad, buf, bits, **_sgd_kwargs(cfg, first_step=i == 0))
    return dense.detach(), opt.state[dense].get("momentum_buffer"), ours, buf


def _run_adam(cls: type, cfg: dict, mask: torch.Tensor | None):
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(SHAPE, generator=gen)
    dense = start.clone().requires_grad_()
    opt = cls([dense], foreach=False, **cfg)
    ours = start.clone() if mask is None else start * mask
    m, v = torch.zeros(SHAPE), torch.zeros(SHAPE)
    bits = None if mask is None else pack_bits(mask)
    for i in range(STEPS):
        grad = torch.randn(SHAPE, generator=gen)
        dense.grad = grad.clone()
        opt.step()
        masked_adam_(ours, grad, m, v, bits, **_adam_kwargs(cls, cfg, step=i + 1))
    state = opt.state[dense]
    return dense.detach(), state["exp_avg"], state["exp_avg_sq"], ours, m, v


@pytest.mark.parametrize("dense_mask", [False, True], ids=["no_mask", "all_active_bits"])
@pytest.mark.parametrize("name", list(SGD_CONFIGS))
def test_sgd_matches_torch_bitwise(name: str, dense_mask: bool) -> None:
    mask = torch.ones(SHAPE, dtype=torch.bool) if dense_mask else None
    p_ref, buf_ref, p, buf = _run_sgd(SGD_CONFIGS[name], mask)
    assert torch.equal(p, p_ref)
    if buf_ref is not None:
        assert torch.equal(buf, buf_ref)


@pytest.mark.parametrize("dense_mask", [False, True], ids=["no_mask", "all_active_bits"])
@pytest.mark.parametrize("name", list(ADAM_CONFIGS))
def test_adam_matches_torch_bitwise(name: str, dense_mask: bool) -> None:
    mask = torch.ones(SHAPE, dtype=torch.bool) if dense_mask else None
    cls, cfg = ADAM_CONFIGS[name]
    p_ref, m_ref, v_ref, p, m, v = _run_adam(cls, cfg, mask)
    assert torch.equal(p, p_ref)
    assert torch.equal(m, m_ref)
    assert torch.equal(v, v_ref)


def _random_mask(seed: int = 2) -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed)) < 0.4


@pytest.mark.parametrize("name", list(SGD_CONFIGS))
def test_sgd_random_mask_invariants(name: str) -> None:
    """Active coordinates follow torch exactly (the update is elementwise); pruned ones stay 0."""
    mask = _random_mask()
    p_ref, buf_ref, p, buf = _run_sgd(SGD_CONFIGS[name], mask)
    assert torch.equal(p[mask], p_ref[mask])
    assert torch.equal(p[~mask], torch.zeros_like(p[~mask]))
    assert torch.equal(buf[~mask], torch.zeros_like(buf[~mask]))
    if buf_ref is not None:
        assert torch.equal(buf[mask], buf_ref[mask])


@pytest.mark.parametrize("name", list(ADAM_CONFIGS))
def test_adam_random_mask_invariants(name: str) -> None:
    mask = _random_mask()
    cls, cfg = ADAM_CONFIGS[name]
    p_ref, m_ref, v_ref, p, m, v = _run_adam(cls, cfg, mask)
    for ours, ref in ((p, p_ref), (m, m_ref), (v, v_ref)):
        assert torch.equal(ours[mask], ref[mask])
        assert torch.equal(ours[~mask], torch.zeros_like(ours[~mask]))


def test_pruned_gradient_is_ignored() -> None:
    """A non-finite gradient on a pruned coordinate leaves no trace anywhere."""
    mask = _random_mask()
    grad = torch.randn(SHAPE)
    grad[~mask] = float("nan")
    p, m, v = torch.randn(SHAPE) * mask, torch.zeros(SHAPE), torch.zeros(SHAPE)
    masked_adam_(
        p, grad, m, v, pack_bits(mask), **_adam_kwargs(torch.optim.AdamW, dict(lr=1e-2), 1)
    )
    for t in (p, m, v):
        assert torch.isfinite(t).all()
        assert torch.equal(t[~mask], torch.zeros_like(t[~mask]))


def test_low_precision_rounds_once() -> None:
    """fp16 is computed in fp32 and rounded once, the fused kernels' contract."""
    mask = _random_mask()
    p, g, m, v = (torch.randn(SHAPE) for _ in range(4))
    v = v.abs()
    kw = _adam_kwargs(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), 3)
    p16, m16, v16 = p.half(), m.half(), v.half()
    p32, m32, v32 = p16.float(), m16.float(), v16.float()
    masked_adam_(p16, g.half(), m16, v16, pack_bits(mask), **kw)
    masked_adam_(p32, g.half().float(), m32, v32, pack_bits(mask), **kw)
    assert torch.equal(p16, p32.half())
    assert torch.equal(m16, m32.half())
    assert torch.equal(v16, v32.half())


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_theta_update_leaves_unselected_bit_identical(rule: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    sel = torch.rand(SHAPE, generator=gen) < 0.2
    p, m, v = (torch.randn(SHAPE, generator=gen).to(dtype) for _ in range(3))
    v = v.abs()
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    for step in range(1, 4):
        grad = torch.randn(SHAPE, generator=gen).to(dtype)
        theta_update_(
            p,
            grad,
            pack_bits(sel),
            rule=rule,
            lr=1e-2,
            step=step,
            exp_avg=m,
            exp_avg_sq=v,
            weight_decay=1e-2,
        )
    assert torch.equal(p[~sel], p0[~sel])
    assert not torch.equal(p[sel], p0[sel])
    assert torch.equal(m[~sel], m0[~sel])
    assert torch.equal(v[~sel], v0[~sel])
    if rule != "adamw":
        assert torch.equal(v, v0)
    if rule == "sgd":
        assert torch.equal(m, m0)


def test_theta_rules_follow_their_formulas() -> None:
    gen = torch.Generator().manual_seed(4)
    sel = torch.rand(SHAPE, generator=gen) < 0.3
    bits = pack_bits(sel)
    p0, g = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    lr, wd, b1 = 0.1, 0.01, 0.8

    p = p0.clone()
    theta_update_(p, g, bits, rule="sgd", lr=lr, step=1, weight_decay=wd)
    torch.testing.assert_close(p[sel], p0[sel] - lr * (g[sel] + wd * p0[sel]), rtol=0, atol=1e-6)

    p, m0 = p0.clone(), torch.randn(SHAPE, generator=gen)
    m = m0.clone()
    theta_update_(p, g, bits, rule="momentum", lr=lr, step=1, exp_avg=m, beta1=b1)
    m_expected = b1 * m0[sel] + (1 - b1) * g[sel]
    torch.testing.assert_close(m[sel], m_expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(p[sel], p0[sel] - lr * m_expected, rtol=0, atol=1e-6)


def test_theta_adamw_matches_torch_adamw_on_selection() -> None:
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
        theta_update_(
            p,
            grad,
            bits,
            rule="adamw",
            lr=1e-2,
            step=step,
            exp_avg=m,
            exp_avg_sq=v,
            weight_decay=0.05,
        )
    assert torch.equal(p[sel], theta.detach())
    assert torch.equal(m[sel], opt.state[theta]["exp_avg"])
    assert torch.equal(v[sel], opt.state[theta]["exp_avg_sq"])


def test_argument_errors() -> None:
    p, g = torch.zeros(4), torch.zeros(4)
    bits = pack_bits(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rule"):
        theta_update_(p, g, bits, rule="adam", lr=0.1, step=1)
    with pytest.raises(ValueError, match="exp_avg"):
        theta_update_(p, g, bits, rule="momentum", lr=0.1, step=1)
    with pytest.raises(ValueError, match="momentum_buffer"):
        masked_sgd_(
            p,
            g,
            None,
            bits,
            lr=0.1,
            momentum=0.9,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
            first_step=True,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_threshold_is_kth_largest(dtype: torch.dtype) -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(6)).to(dtype)
    ordered = values.float().sort(descending=True).values
    for k in (1, 17, 500, 1000):
        assert topk_threshold(values, k) == ordered[k - 1].item()
    with pytest.raises(ValueError):
        topk_threshold(values, 0)
    with pytest.raises(ValueError):
        topk_threshold(values, 1001)
