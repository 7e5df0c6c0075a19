"""The masked SGD step: the reference against torch.optim.SGD bit for bit, the Triton kernel
(interpreted on CPU, compiled on GPU) against the reference, and ``keep_pruned``."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels import masked_sgd
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.masked_sgd import masked_sgd_, masked_sgd_reference_
from resu_compile.kernels.triton.masked_sgd import masked_sgd_triton_
from tests.kernels.update_cases import (
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
    "plain": dict(lr=0.1),
    "momentum_nesterov_wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening_maximize": dict(
        lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3, maximize=True
    ),
}
CONFIGS = {
    "plain": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "nesterov_wd": dict(
        momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False
    ),
    "damp_maximize": dict(
        momentum=0.8, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=True
    ),
}


def _kwargs(cfg: dict, first_step: bool) -> dict:
    return dict(
        lr=cfg["lr"],
        momentum=cfg.get("momentum", 0.0),
        dampening=cfg.get("dampening", 0.0),
        weight_decay=cfg.get("weight_decay", 0.0),
        nesterov=cfg.get("nesterov", False),
        maximize=cfg.get("maximize", False),
        first_step=first_step,
    )


def _run_torch(cfg: dict, active: torch.Tensor | None):
    """Steps torch.optim.SGD on a dense copy and the reference on a masked one, same gradients."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(TORCH_SHAPE, generator=gen)
    dense = start.clone().requires_grad_()
    opt = torch.optim.SGD([dense], foreach=False, **cfg)
    ours = start.clone() if active is None else start * active
    buf = torch.zeros(TORCH_SHAPE)
    bits = None if active is None else pack_bits(active)
    for i in range(TORCH_STEPS):
        grad = torch.randn(TORCH_SHAPE, generator=gen)
        dense.grad = grad.clone()
        opt.step()
        masked_sgd_reference_(ours, grad, buf, bits, **_kwargs(cfg, first_step=i == 0))
    return dense.detach(), opt.state[dense].get("momentum_buffer"), ours, buf


@pytest.mark.parametrize("dense_mask", [False, True], ids=["no_mask", "all_active_bits"])
@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_reference_matches_torch_bitwise(name: str, dense_mask: bool) -> None:
    active = torch.ones(TORCH_SHAPE, dtype=torch.bool) if dense_mask else None
    p_ref, buf_ref, p, buf = _run_torch(TORCH_CONFIGS[name], active)
    assert torch.equal(p, p_ref)
    if buf_ref is not None:
        assert torch.equal(buf, buf_ref)


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_reference_random_mask_invariants(name: str) -> None:
    """Active coordinates follow torch exactly (the update is elementwise); pruned ones stay 0."""
    active = torch.rand(TORCH_SHAPE, generator=torch.Generator().manual_seed(2)) < 0.4
    p_ref, buf_ref, p, buf = _run_torch(TORCH_CONFIGS[name], active)
    assert torch.equal(p[active], p_ref[active])
    assert torch.equal(p[~active], torch.zeros_like(p[~active]))
    assert torch.equal(buf[~active], torch.zeros_like(buf[~active]))
    if buf_ref is not None:
        assert torch.equal(buf[active], buf_ref[active])


def test_momentum_needs_a_buffer() -> None:
    p, g = torch.zeros(4), torch.zeros(4)
    bits = pack_bits(torch.ones(4, dtype=torch.bool))
    kw = dict(_kwargs({"lr": 0.1, "momentum": 0.9}, first_step=True))
    with pytest.raises(ValueError, match="momentum_buffer"):
        masked_sgd_reference_(p, g, None, bits, **kw)
    with pytest.raises(ValueError, match="momentum_buffer"):
        masked_sgd_([p], [g], None, [bits], **kw)


def _check_one(shape, dtype, mask_kind, name, first_step, device) -> None:
    """One weight (a list of one) through the kernel, against the reference."""
    active = mask(mask_kind, shape, device)
    bits = None if active is None else pack_bits(active)
    p, g, buf = tensors(shape, dtype, device, active, 3)
    ours = [p.clone(), buf.clone()]
    kw = dict(lr=0.05, first_step=first_step, **CONFIGS[name])
    masked_sgd_reference_(p, g, buf, bits, **kw)
    masked_sgd_triton_([ours[0]], [g.clone()], [ours[1]], None if bits is None else [bits], **kw)
    for got, want in zip(ours, (p, buf), strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])
    # Without momentum the buffer is no state: neither implementation touches it.
    assert_pruned_zero(ours if kw["momentum"] else ours[:1], active)


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_one_weight(shape, dtype, mask_kind, name, first_step) -> None:
    _check_one(shape, dtype, mask_kind, name, first_step, "cpu")


def _check_many(shapes, dtype, mask_kind, name, first_step, device) -> None:
    """One launch over every weight: the reference's values, and bit for bit a launch per weight."""
    _, bits = masks(mask_kind, shapes, device)
    p, g, buf = lists(shapes, dtype, device, 3)
    want, single, ours = clone([p, buf]), clone([p, buf]), clone([p, buf])
    kw = dict(lr=0.05, first_step=first_step, **CONFIGS[name])
    for i in range(len(shapes)):
        b = None if bits is None else bits[i]
        masked_sgd_reference_(want[0][i], g[i], want[1][i], b, **kw)
        masked_sgd_triton_([single[0][i]], [g[i]], [single[1][i]], None if b is None else [b], **kw)
    masked_sgd_triton_(ours[0], g, ours[1], bits, **kw)
    assert_lists_close(ours, want, dtype)
    assert_lists_equal(ours, single)


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", ["plain", "nesterov_wd"])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_kernel_many_weights(mask_kind, name, first_step) -> None:
    _check_many(ODD_SHAPES, torch.float16, mask_kind, name, first_step, "cpu")


def test_kernel_without_momentum_takes_no_buffers() -> None:
    shapes = [(5, 37), (1, 1)]
    p, g = lists(shapes, torch.float32, "cpu", 2)
    want = [t.clone() for t in p]
    kw = dict(lr=0.05, first_step=False, **CONFIGS["plain"])
    for i in range(len(shapes)):
        masked_sgd_reference_(want[i], g[i], None, None, **kw)
    masked_sgd_triton_(p, g, None, None, **kw)
    assert_lists_close([p], [want], torch.float32)


def test_entry_point_routes_to_the_kernel_or_the_reference(monkeypatch) -> None:
    """CPU tensors take the reference; let through (as CUDA tensors are), one launch per dtype
    serves the lists, a mixed-dtype list included; the results agree with the reference."""
    shapes = [(5, 37), (3, 1500), (1, 1)]
    _, bits = masks("random", shapes, "cpu")
    p, g, buf = lists(shapes, torch.float32, "cpu", 3)
    p[1], buf[1] = p[1].half(), buf[1].half()
    kw = dict(lr=0.05, first_step=False, keep_pruned=True, **CONFIGS["nesterov_wd"])
    want, ours = clone([p, buf]), clone([p, buf])
    for i in range(len(shapes)):
        masked_sgd_reference_(want[0][i], g[i], want[1][i], bits[i], **kw)
    launches = []
    monkeypatch.setattr(masked_sgd, "on_gpu", lambda tensors: True)
    monkeypatch.setattr(
        "resu_compile.kernels.triton.masked_sgd.masked_sgd_triton_",
        lambda params, *args, **kwargs: (
            launches.append(len(params)) or masked_sgd_triton_(params, *args, **kwargs)
        ),
    )
    masked_sgd_(ours[0], g, ours[1], bits, **kw)
    assert sorted(launches) == [1, 2]
    for got, expected in zip(ours, want, strict=True):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, **TOL[a.dtype])


def _check_keep_pruned(dtype: torch.dtype, device: str, through_kernel: bool) -> None:
    """``keep_pruned`` steps the actives as the zeroing step does and leaves pruned slots of the
    param and the buffer bit-identical."""
    gen = torch.Generator().manual_seed(3)
    shape = (5, 37, 23)
    active = (torch.rand(shape, generator=gen) < 0.4).to(device)
    original = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
    bits = pack_bits(active)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True)
    kw.update(maximize=False, first_step=False)
    zeroing = [t.clone() for t in original]
    masked_sgd_reference_(*zeroing, bits, keep_pruned=False, **kw)
    kept = [t.clone() for t in original]
    if through_kernel:
        masked_sgd_triton_(*([t] for t in kept), [bits], keep_pruned=True, **kw)
    else:
        masked_sgd_reference_(*kept, bits, keep_pruned=True, **kw)
    for i in (0, 2):  # the gradient (index 1) is never written
        assert torch.equal(kept[i][~active], original[i][~active]), "a pruned slot changed"
        torch.testing.assert_close(kept[i][active], zeroing[i][active], **TOL[dtype])
        assert torch.count_nonzero(zeroing[i][~active]) == 0


@pytest.mark.parametrize("through_kernel", [False, True], ids=["reference", "kernel"])
def test_keep_pruned(through_kernel: bool) -> None:
    _check_keep_pruned(torch.float32, "cpu", through_kernel)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (1024, 4097)], ids=str)
def test_kernel_one_weight_gpu(shape, dtype, mask_kind, name, first_step) -> None:
    _check_one(shape, dtype, mask_kind, name, first_step, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", ["plain", "nesterov_wd"])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_kernel_many_weights_gpu(dtype, mask_kind, name, first_step) -> None:
    _check_many(GPU_SHAPES, dtype, mask_kind, name, first_step, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keep_pruned_gpu(dtype: torch.dtype) -> None:
    _check_keep_pruned(dtype, "cuda", through_kernel=True)
