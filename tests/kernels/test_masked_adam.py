"""The masked Adam / AdamW step: the reference against torch.optim bit for bit, the Triton kernel
(interpreted on CPU, compiled on GPU) against the reference, ``keep_pruned``, and theta's AdamW in
the same pass equal to two passes."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels import masked_adam
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.masked_adam import ThetaAdamW, masked_adam_, masked_adam_reference_
from resu_compile.kernels.theta_update import theta_update_
from resu_compile.kernels.triton.masked_adam import masked_adam_triton_
from resu_compile.kernels.triton.theta_update import theta_update_triton_
from tests.kernels.update_cases import (
    ALIGNED_SHAPES,
    CPU_DTYPES,
    CUDA,
    GPU_SHAPES,
    MASKS,
    ODD_SHAPES,
    SHAPES,
    TOL,
    assert_lists_close,
    assert_lists_equal,
    assert_pruned_zero,
    clone,
    lists,
    mask,
    masks,
    tensors,
)

TORCH_SHAPE = (37, 23)
TORCH_STEPS = 5
TORCH_CONFIGS = {
    "adam_l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-1)),
    "adamw_maximize_betas": (
        torch.optim.AdamW,
        dict(lr=3e-3, betas=(0.3, 0.95), eps=1e-6, weight_decay=1e-2, maximize=True),
    ),
}
CONFIGS = {
    "adam_l2": dict(weight_decay=1e-2, decoupled_weight_decay=False, maximize=False, beta1=0.9),
    "adamw": dict(weight_decay=1e-1, decoupled_weight_decay=True, maximize=False, beta1=0.9),
    "adamw_max_lowbeta": dict(
        weight_decay=1e-2, decoupled_weight_decay=True, maximize=True, beta1=0.3
    ),
    "adam_l2_max": dict(weight_decay=1e-2, decoupled_weight_decay=False, maximize=True, beta1=0.3),
}
HYPER = dict(step=3, lr=1e-2, beta2=0.999, eps=1e-8)


def _kwargs(cls: type, cfg: dict, step: int) -> dict:
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


def _run_torch(cls: type, cfg: dict, active: torch.Tensor | None):
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(TORCH_SHAPE, generator=gen)
    dense = start.clone().requires_grad_()
    opt = cls([dense], foreach=False, **cfg)
    ours = start.clone() if active is None else start * active
    m, v = torch.zeros(TORCH_SHAPE), torch.zeros(TORCH_SHAPE)
    bits = None if active is None else pack_bits(active)
    for i in range(TORCH_STEPS):
        grad = torch.randn(TORCH_SHAPE, generator=gen)
        dense.grad = grad.clone()
        opt.step()
        masked_adam_reference_(ours, grad, m, v, bits, **_kwargs(cls, cfg, step=i + 1))
    state = opt.state[dense]
    return dense.detach(), state["exp_avg"], state["exp_avg_sq"], ours, m, v


def _random_mask(seed: int = 2) -> torch.Tensor:
    return torch.rand(TORCH_SHAPE, generator=torch.Generator().manual_seed(seed)) < 0.4


@pytest.mark.parametrize("dense_mask", [False, True], ids=["no_mask", "all_active_bits"])
@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_reference_matches_torch_bitwise(name: str, dense_mask: bool) -> None:
    active = torch.ones(TORCH_SHAPE, dtype=torch.bool) if dense_mask else None
    cls, cfg = TORCH_CONFIGS[name]
    p_ref, m_ref, v_ref, p, m, v = _run_torch(cls, cfg, active)
    assert torch.equal(p, p_ref)
    assert torch.equal(m, m_ref)
    assert torch.equal(v, v_ref)


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_reference_random_mask_invariants(name: str) -> None:
    active = _random_mask()
    cls, cfg = TORCH_CONFIGS[name]
    p_ref, m_ref, v_ref, p, m, v = _run_torch(cls, cfg, active)
    for ours, ref in ((p, p_ref), (m, m_ref), (v, v_ref)):
        assert torch.equal(ours[active], ref[active])
        assert torch.equal(ours[~active], torch.zeros_like(ours[~active]))


def test_reference_ignores_the_pruned_gradient() -> None:
    """A non-finite gradient on a pruned coordinate leaves no trace anywhere."""
    active = _random_mask()
    grad = torch.randn(TORCH_SHAPE)
    grad[~active] = float("nan")
    p, m, v = torch.randn(TORCH_SHAPE) * active, torch.zeros(TORCH_SHAPE), torch.zeros(TORCH_SHAPE)
    kw = _kwargs(torch.optim.AdamW, dict(lr=1e-2), 1)
    masked_adam_reference_(p, grad, m, v, pack_bits(active), **kw)
    for t in (p, m, v):
        assert torch.isfinite(t).all()
        assert torch.equal(t[~active], torch.zeros_like(t[~active]))


def test_reference_rounds_low_precision_once() -> None:
    """fp16 is computed in fp32 and rounded once, the kernels' contract."""
    active = _random_mask()
    p, g, m, v = (torch.randn(TORCH_SHAPE) for _ in range(4))
    v = v.abs()
    kw = _kwargs(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), 3)
    p16, m16, v16 = p.half(), m.half(), v.half()
    p32, m32, v32 = p16.float(), m16.float(), v16.float()
    masked_adam_reference_(p16, g.half(), m16, v16, pack_bits(active), **kw)
    masked_adam_reference_(p32, g.half().float(), m32, v32, pack_bits(active), **kw)
    assert torch.equal(p16, p32.half())
    assert torch.equal(m16, m32.half())
    assert torch.equal(v16, v32.half())


def _check_one(shape, dtype, mask_kind, name, device) -> None:
    """One weight (a list of one) through the kernel, against the reference."""
    active = mask(mask_kind, shape, device)
    bits = None if active is None else pack_bits(active)
    p, g, m, v = tensors(shape, dtype, device, active, 4)
    ours = [p.clone(), m.clone(), v.clone()]
    kw = dict(HYPER, **CONFIGS[name])
    masked_adam_reference_(p, g, m, v, bits, **kw)
    masked_adam_triton_(
        *([t] for t in (ours[0], g.clone(), *ours[1:])), None if bits is None else [bits], **kw
    )
    for got, want in zip(ours, (p, m, v), strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
    assert_pruned_zero(ours, active)


@pytest.mark.parametrize("name", ["adam_l2", "adamw", "adamw_max_lowbeta"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_one_weight(shape, dtype, mask_kind, name) -> None:
    _check_one(shape, dtype, mask_kind, name, "cpu")


def _check_many(shapes, dtype, mask_kind, name, device) -> None:
    """One launch over every weight: the reference's values, and bit for bit a launch per weight."""
    active, bits = masks(mask_kind, shapes, device)
    p, g, m, v = lists(shapes, dtype, device, 4)
    want, single, ours = clone([p, m, v]), clone([p, m, v]), clone([p, m, v])
    kw = dict(HYPER, **CONFIGS[name])
    for i in range(len(shapes)):
        b = None if bits is None else bits[i]
        masked_adam_reference_(want[0][i], g[i], want[1][i], want[2][i], b, **kw)
        masked_adam_triton_(
            [single[0][i]], [g[i]], [single[1][i]], [single[2][i]], None if b is None else [b], **kw
        )
    masked_adam_triton_(ours[0], g, ours[1], ours[2], bits, **kw)
    assert_lists_close(ours, want, dtype)
    assert_lists_equal(ours, single)
    if active is not None:
        for row in ours:
            for t, m_i in zip(row, active, strict=True):
                assert not t[~m_i].any()


@pytest.mark.parametrize("name", ["adamw", "adam_l2_max"])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_kernel_many_weights(dtype, mask_kind, name) -> None:
    _check_many(ODD_SHAPES, dtype, mask_kind, name, "cpu")


def test_kernel_grad_dtype_may_differ_from_param() -> None:
    """fp32 gradients (e.g. accumulated) with fp16 weights and fp16 states."""
    shapes = [(5, 37, 23), (3, 1500)]
    _, bits = masks("random", shapes, "cpu")
    p, _, m, v = lists(shapes, torch.float16, "cpu", 4)
    g = [torch.randn(s) for s in shapes]
    want, ours = clone([p, m, v]), clone([p, m, v])
    kw = dict(HYPER, step=1, **CONFIGS["adamw"])
    for i in range(len(shapes)):
        masked_adam_reference_(want[0][i], g[i], want[1][i], want[2][i], bits[i], **kw)
    masked_adam_triton_(ours[0], g, ours[1], ours[2], bits, **kw)
    assert_lists_close(ours, want, torch.float16)


def test_kernel_writes_only_inside_each_tensor() -> None:
    """Params and states carved from one buffer with sentinel gaps: the gaps stay untouched.

    Unmasked Adam changes every coordinate it writes (a theta step would store an unselected
    out-of-bounds value back unchanged and hide the fault).
    """
    shapes, gap = ODD_SHAPES, 3
    sizes = [torch.Size(s).numel() for s in shapes]
    buffers = [torch.full((sum(sizes) + gap * (len(sizes) + 1),), 7.0) for _ in range(3)]
    inside = torch.zeros_like(buffers[0], dtype=torch.bool)
    p_src, g, m_src, v_src = lists(shapes, torch.float32, "cpu", 4)
    views = []
    for buf, src in zip(buffers, (p_src, m_src, v_src), strict=True):
        row, offset = [], gap
        for t, size in zip(src, sizes, strict=True):
            row.append(buf[offset : offset + size].view(t.shape))
            row[-1].copy_(t)
            inside[offset : offset + size] = True
            offset += size + gap
        views.append(row)
    want = clone(views)
    kw = dict(HYPER, **CONFIGS["adamw"])
    for i in range(len(shapes)):
        masked_adam_reference_(want[0][i], g[i], want[1][i], want[2][i], None, **kw)
    masked_adam_triton_(views[0], g, views[1], views[2], None, **kw)
    assert_lists_close(views, want, torch.float32)
    for buf in buffers:
        assert (buf[~inside] == 7.0).all()


def test_kernel_rejects_what_it_would_get_wrong() -> None:
    p = torch.zeros(8, 6)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    kw = dict(HYPER, step=1, lr=1e-3, **CONFIGS["adamw"])
    with pytest.raises(ValueError, match="contiguous"):
        masked_adam_triton_([p.t()], [p.t()], [m.t()], [v.t()], None, **kw)
    with pytest.raises(ValueError, match="bytes"):
        masked_adam_triton_([p], [p], [m], [v], [torch.zeros(5, dtype=torch.uint8)], **kw)
    with pytest.raises(ValueError, match="dtype"):
        masked_adam_triton_([p], [p], [m.half()], [v], None, **kw)
    with pytest.raises(ValueError, match="step"):
        masked_adam_triton_([p], [p], [m], [v], None, **{**kw, "step": 0})


def test_entry_point_routes_to_the_kernel_or_the_reference(monkeypatch) -> None:
    """CPU tensors take the reference; let through (as CUDA tensors are), the lists take one
    launch per (dtype, has a mask) group; the results agree with the reference."""
    shapes = [(5, 37), (3, 1500), (1, 1), (16, 48)]
    _, bits = masks("random", shapes, "cpu")
    bits[3] = None
    p, g, m, v = lists(shapes, torch.float32, "cpu", 4)
    p[1], m[1], v[1] = p[1].half(), m[1].half(), v[1].half()
    kw = dict(HYPER, **CONFIGS["adamw"])
    want = clone([p, m, v])
    for i in range(len(shapes)):
        masked_adam_reference_(want[0][i], g[i], want[1][i], want[2][i], bits[i], **kw)
    on_cpu = clone([p, m, v])
    masked_adam_(*on_cpu[:1], g, *on_cpu[1:], bits, **kw)
    assert_lists_equal(on_cpu, want)
    launches = []
    monkeypatch.setattr(masked_adam, "on_gpu", lambda tensors: True)
    monkeypatch.setattr(
        "resu_compile.kernels.triton.masked_adam.masked_adam_triton_",
        lambda params, *args, **kwargs: (
            launches.append(len(params)) or masked_adam_triton_(params, *args, **kwargs)
        ),
    )
    ours = clone([p, m, v])
    masked_adam_(*ours[:1], g, *ours[1:], bits, **kw)
    assert sorted(launches) == [1, 1, 2]
    for got, expected in zip(ours, want, strict=True):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL[a.dtype])


def _check_keep_pruned(dtype: torch.dtype, device: str, through_kernel: bool) -> None:
    """``keep_pruned`` steps the actives as the zeroing step does and leaves pruned slots of the
    param and both moments bit-identical."""
    gen = torch.Generator().manual_seed(3)
    shape = (5, 37, 23)
    active = (torch.rand(shape, generator=gen) < 0.4).to(device)
    original = [torch.randn(shape, generator=gen) for _ in range(4)]
    original[3] = original[3].abs()
    original = [t.to(device=device, dtype=dtype) for t in original]
    bits = pack_bits(active)
    kw = dict(HYPER, **CONFIGS["adamw"])
    zeroing = [t.clone() for t in original]
    masked_adam_reference_(*zeroing, bits, keep_pruned=False, **kw)
    kept = [t.clone() for t in original]
    if through_kernel:
        masked_adam_triton_(*([t] for t in kept), [bits], keep_pruned=True, **kw)
    else:
        masked_adam_reference_(*kept, bits, keep_pruned=True, **kw)
    for i in (0, 2, 3):  # the gradient (index 1) is never written
        assert torch.equal(kept[i][~active], original[i][~active]), "a pruned slot changed"
        torch.testing.assert_close(kept[i][active], zeroing[i][active], **TOL[dtype])
        assert torch.count_nonzero(zeroing[i][~active]) == 0


@pytest.mark.parametrize("through_kernel", [False, True], ids=["reference", "kernel"])
def test_keep_pruned(through_kernel: bool) -> None:
    _check_keep_pruned(torch.float32, "cpu", through_kernel)


def _check_theta_same_pass(dtype, device: str, user_wd: float, theta_wd: float, kernel: bool):
    """Theta's AdamW in the actives' pass equals the two passes: bit for bit in the interpreter and
    on the reference path, within rounding on the GPU."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(5, 37, 23), (64, 33), (3,)]
    active = [torch.rand(s, generator=gen) < 0.5 for s in shapes]
    selections = [~a & (torch.rand(a.shape, generator=gen) < 0.3) for a in active]

    def rand(scale: float, positive: bool = False) -> list[torch.Tensor]:
        values = [torch.randn(s, generator=gen) * scale for s in shapes]
        return [(v.abs() if positive else v).to(device, dtype) for v in values]

    params, grads, exp_avgs, exp_avg_sqs = rand(1), rand(1), rand(0.1), rand(0.01, True)
    mask_bits = [pack_bits(a).to(device) for a in active]
    select_bits = [pack_bits(s).to(device) for s in selections]
    user = {**HYPER, **CONFIGS["adamw"], "beta2": 0.95, "weight_decay": user_wd}
    theta = dict(lr=1e-2, step=2, beta1=0.8, beta2=0.99, weight_decay=theta_wd)
    one = clone([params, exp_avgs, exp_avg_sqs])
    two = clone([params, exp_avgs, exp_avg_sqs])
    same_pass = ThetaAdamW(select_bits, **theta)
    if kernel:
        masked_adam_triton_(
            one[0], grads, one[1], one[2], mask_bits, keep_pruned=True, theta=same_pass, **user
        )
        masked_adam_triton_(two[0], grads, two[1], two[2], mask_bits, keep_pruned=True, **user)
        theta_update_triton_(
            two[0], grads, select_bits, rule="adamw", exp_avgs=two[1], exp_avg_sqs=two[2], **theta
        )
    else:
        masked_adam_(
            one[0], grads, one[1], one[2], mask_bits, keep_pruned=True, theta=same_pass, **user
        )
        masked_adam_(two[0], grads, two[1], two[2], mask_bits, keep_pruned=True, **user)
        theta_update_(
            two[0], grads, select_bits, rule="adamw", exp_avgs=two[1], exp_avg_sqs=two[2], **theta
        )
    # The very same arithmetic: interpreted, or compiled without FMA contraction.
    assert_lists_equal(one, two)
    assert any(not torch.equal(a, b) for a, b in zip(one[0], params, strict=True))


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize(("user_wd", "theta_wd"), [(0.1, 0.0), (0.0, 0.05), (0.01, 0.02)])
def test_theta_in_the_same_pass_equals_two_passes(user_wd, theta_wd, kernel) -> None:
    for dtype in CPU_DTYPES:
        _check_theta_same_pass(dtype, "cpu", user_wd, theta_wd, kernel)


def test_theta_in_the_same_pass_needs_keep_pruned_and_decoupled_decay() -> None:
    p = [torch.zeros(8)]
    bits = [torch.zeros(1, dtype=torch.uint8)]
    theta = ThetaAdamW(bits, lr=1e-3, step=1)
    kw = dict(HYPER, **CONFIGS["adamw"])
    for bad in ({"keep_pruned": False}, {"decoupled_weight_decay": False}, {"maximize": True}):
        with pytest.raises(ValueError, match="theta needs"):
            masked_adam_(p, p, p, p, bits, theta=theta, **{**kw, "keep_pruned": True, **bad})
    with pytest.raises(ValueError, match="theta needs"):
        masked_adam_(p, p, p, p, None, theta=theta, keep_pruned=True, **kw)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", ["adam_l2", "adamw", "adamw_max_lowbeta"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (1024, 4097)], ids=str)
def test_kernel_one_weight_gpu(shape, dtype, mask_kind, name) -> None:
    _check_one(shape, dtype, mask_kind, name, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", ["adamw", "adam_l2_max"])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shapes", [GPU_SHAPES, ALIGNED_SHAPES], ids=["odd", "aligned"])
def test_kernel_many_weights_gpu(shapes, dtype, mask_kind, name) -> None:
    _check_many(shapes, dtype, mask_kind, name, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keep_pruned_gpu(dtype: torch.dtype) -> None:
    _check_keep_pruned(dtype, "cuda", through_kernel=True)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_theta_in_the_same_pass_equals_two_passes_gpu(dtype: torch.dtype) -> None:
    _check_theta_same_pass(dtype, "cuda", 0.1, 0.02, kernel=True)
