"""The multi-tensor update kernels (one launch over a list of weights) against the references.

The reference for a list is a loop of the per-tensor reference. Values agree to rounding, as in
test_fused_update.py; the invariants hold exactly: unselected coordinates keep their bits in the
parameter and every state, pruned ones end at 0. And since the multi kernels run the very block
code of the per-tensor kernels, they must agree with them bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels import fused_update, reference
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.fused_update import (
    fused_masked_adam_,
    fused_masked_adam_multi_,
    fused_masked_sgd_,
    fused_masked_sgd_multi_,
    fused_theta_update_,
    fused_theta_update_multi_,
)

# Odd sizes: partial blocks and bytes, a single weight, several blocks; not all multiples of 16, so
# the kernels run without the alignment hints. ALIGNED_SHAPES take the hinted path.
ODD_SHAPES = [(5, 37), (1, 1), (3, 1500), (64, 64)]
ALIGNED_SHAPES = [(64, 64), (16, 48), (3, 1504)]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
THETA_KW = dict(lr=1e-2, step=2, beta1=0.8, weight_decay=1e-2)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _bools(kind: str, shapes, device: str, seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if kind == "all":
            out.append(torch.ones(shape, dtype=torch.bool))
        elif kind == "none":
            out.append(torch.zeros(shape, dtype=torch.bool))
        else:
            out.append(torch.rand(shape, generator=gen) < 0.3)
    return [b.to(device) for b in out]


def _lists(shapes, dtype, device, count: int) -> list[list[torch.Tensor]]:
    """``count`` lists (param, grad, states...) of random tensors; the 4th, a second moment, >= 0."""
    gen = torch.Generator().manual_seed(0)
    lists = [
        [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
        for _ in range(count)
    ]
    if count > 3:
        lists[3] = [t.abs() for t in lists[3]]
    return lists


def _clone(lists):
    return [[t.clone() for t in row] for row in lists]


def _assert_lists_close(got, want, dtype) -> None:
    for got_row, want_row in zip(got, want, strict=True):
        for a, b in zip(got_row, want_row, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])


def _assert_lists_equal(got, want) -> None:
    for got_row, want_row in zip(got, want, strict=True):
        for a, b in zip(got_row, want_row, strict=True):
            assert torch.equal(a, b)


def _at(lists, i: int) -> list[torch.Tensor]:
    return [row[i] for row in lists]


def _check_theta(shapes, dtype, sel_kind, rule, device) -> None:
    sels = _bools(sel_kind, shapes, device)
    bits = [pack_bits(s) for s in sels]
    p, g, m, v = _lists(shapes, dtype, device, 4)
    before = [p, m, v]
    want, single, ours = _clone(before), _clone(before), _clone(before)
    for i in range(len(shapes)):
        for fn, (p_i, m_i, v_i) in (
            (reference.theta_update_, _at(want, i)),
            (fused_theta_update_, _at(single, i)),
        ):
            fn(p_i, g[i], bits[i], rule=rule, exp_avg=m_i, exp_avg_sq=v_i, **THETA_KW)
    fused_theta_update_multi_(
        ours[0], g, bits, rule=rule, exp_avgs=ours[1], exp_avg_sqs=ours[2], **THETA_KW
    )
    _assert_lists_close(ours, want, dtype)
    _assert_lists_equal(ours, single)
    for ours_row, old_row in zip(ours, before, strict=True):
        for got, old, sel in zip(ours_row, old_row, sels, strict=True):
            assert torch.equal(got[~sel], old[~sel])  # frozen: the very same bits
    if sel_kind == "random" and rule != "sgd":
        assert not torch.equal(ours[1][0], before[1][0])  # the states did move


@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["random", "all", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_theta_multi(dtype, sel_kind, rule) -> None:
    _check_theta(ODD_SHAPES, dtype, sel_kind, rule, "cpu")


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_theta_multi_aligned_path(rule) -> None:
    _check_theta(ALIGNED_SHAPES, torch.float32, "random", rule, "cpu")


def test_theta_multi_states_only_where_the_rule_needs_them() -> None:
    """sgd takes no state lists; empty tensors and an empty list are no-ops."""
    shapes = [(0, 5), (3, 7), (0,)]
    p, g = _lists(shapes, torch.float32, "cpu", 2)
    bits = [pack_bits(s) for s in _bools("all", shapes, "cpu")]
    want = [t.clone() for t in p]
    for i in range(len(shapes)):
        reference.theta_update_(want[i], g[i], bits[i], rule="sgd", **THETA_KW)
    fused_theta_update_multi_(p, g, bits, rule="sgd", **THETA_KW)
    _assert_lists_equal([p], [want])
    fused_theta_update_multi_([], [], [], rule="adamw", exp_avgs=[], exp_avg_sqs=[], **THETA_KW)


def _launch(params, grads):
    return fused_update._multi_launch("test", params, grads, [], [])


def test_alignment_hint_only_when_every_tensor_allows_it() -> None:
    aligned = [torch.zeros(s) for s in ALIGNED_SHAPES]
    launch = _launch(aligned, aligned)
    assert launch is not None and launch.aligned
    odd = [torch.zeros(s) for s in ODD_SHAPES]
    launch = _launch(odd, odd)
    assert launch is not None and not launch.aligned
    shifted = torch.zeros(4097)[1:].view(64, 64)  # contiguous, 4 bytes off a 16-byte boundary
    launch = _launch([*aligned, shifted], [*aligned, shifted])
    assert launch is not None and not launch.aligned


def test_theta_multi_unaligned_base_address() -> None:
    """A view 4 bytes into its storage: the kernel must run without the alignment hint."""
    shapes = [(64, 64), (16, 48)]
    p, g, m, v = _lists(shapes, torch.float32, "cpu", 4)
    storage = torch.zeros(64 * 64 + 1)
    shifted = storage[1:].view(64, 64)
    shifted.copy_(p[0])
    p[0] = shifted
    bits = [pack_bits(s) for s in _bools("random", shapes, "cpu")]
    want = _clone([p, m, v])
    for i in range(len(shapes)):
        p_i, m_i, v_i = _at(want, i)
        reference.theta_update_(
            p_i, g[i], bits[i], rule="adamw", exp_avg=m_i, exp_avg_sq=v_i, **THETA_KW
        )
    fused_theta_update_multi_(p, g, bits, rule="adamw", exp_avgs=m, exp_avg_sqs=v, **THETA_KW)
    _assert_lists_close([p, m, v], want, torch.float32)
    assert storage[0] == 0


def test_multi_writes_only_inside_each_tensor() -> None:
    """Params and states carved from one buffer with sentinel gaps: the gaps stay untouched.

    Unmasked Adam changes every coordinate it writes (a theta step would store an unselected
    out-of-bounds value back unchanged and hide the fault).
    """
    shapes, gap = ODD_SHAPES, 3
    sizes = [torch.Size(s).numel() for s in shapes]
    buffers = [torch.full((sum(sizes) + gap * (len(sizes) + 1),), 7.0) for _ in range(3)]
    inside = torch.zeros_like(buffers[0], dtype=torch.bool)
    p_src, g, m_src, v_src = _lists(shapes, torch.float32, "cpu", 4)
    views = []
    for buf, src in zip(buffers, (p_src, m_src, v_src), strict=True):
        row, offset = [], gap
        for t, size in zip(src, sizes, strict=True):
            row.append(buf[offset : offset + size].view(t.shape))
            row[-1].copy_(t)
            inside[offset : offset + size] = True
            offset += size + gap
        views.append(row)
    want = _clone(views)
    kw = dict(step=3, lr=1e-2, beta2=0.999, eps=1e-8, **ADAM_CONFIGS["adamw"])
    for i in range(len(shapes)):
        reference.masked_adam_(want[0][i], g[i], want[1][i], want[2][i], None, **kw)
    fused_masked_adam_multi_(views[0], g, views[1], views[2], None, **kw)
    _assert_lists_close(views, want, torch.float32)
    for buf in buffers:
        assert (buf[~inside] == 7.0).all()


def test_steady_state_reuses_the_tables(monkeypatch) -> None:
    """Same shapes: the block table is cached; same tensors: the address table too."""
    shapes = [(5, 37), (3, 1500)]
    p, g, m, v = _lists(shapes, torch.float32, "cpu", 4)
    bits = [pack_bits(s) for s in _bools("random", shapes, "cpu")]
    calls = {"block": 0, "address": 0}
    block_table, address_table = fused_update._block_table, fused_update._address_table

    def counting(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(fused_update, "_block_table", counting("block", block_table))
    monkeypatch.setattr(fused_update, "_address_table", counting("address", address_table))
    monkeypatch.setattr(fused_update, "_BLOCK_TABLES", type(fused_update._BLOCK_TABLES)())
    monkeypatch.setattr(fused_update, "_ADDRESS_TABLES", type(fused_update._ADDRESS_TABLES)())
    kw = dict(rule="adamw", exp_avgs=m, exp_avg_sqs=v, **THETA_KW)
    for _ in range(3):
        fused_theta_update_multi_(p, g, bits, **kw)
    assert calls == {"block": 1, "address": 1}
    fused_theta_update_multi_(p, [t.clone() for t in g], bits, **kw)  # new grads, same shapes
    assert calls == {"block": 1, "address": 2}


def test_multi_rejects_what_the_kernel_would_get_wrong() -> None:
    p = [torch.zeros(8, 6), torch.zeros(3, 3)]
    bits = [pack_bits(torch.ones(t.shape, dtype=torch.bool)) for t in p]
    kw = dict(rule="sgd", **THETA_KW)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        fused_theta_update_multi_(p, p[:1], bits, **kw)
    with pytest.raises(TypeError, match="share one dtype"):
        fused_theta_update_multi_([p[0], p[1].half()], p, bits, **kw)
    with pytest.raises(ValueError, match="contiguous"):
        fused_theta_update_multi_([p[0].t(), p[1]], p, bits, **kw)
    with pytest.raises(ValueError, match="shape"):
        fused_theta_update_multi_(p, [p[0], torch.zeros(9)], bits, **kw)
    with pytest.raises(ValueError, match="bytes"):
        fused_theta_update_multi_(p, p, [bits[0], torch.zeros(5, dtype=torch.uint8)], **kw)
    with pytest.raises(ValueError, match="one device"):
        fused_theta_update_multi_(p, [p[0], torch.zeros(3, 3, device="meta")], bits, **kw)
    with pytest.raises(ValueError, match="state"):
        fused_theta_update_multi_(
            p, p, bits, rule="momentum", exp_avgs=[p[0].half(), p[1]], **THETA_KW
        )
    with pytest.raises(ValueError, match="needs exp_avg"):
        fused_theta_update_multi_(p, p, bits, rule="adamw", **THETA_KW)


def test_checked_tensors_are_checked_again_once_replaced() -> None:
    """Lasting tensors are checked once per set; a step's gradients and any replaced tensor (a
    reloaded state, re-packed bits, a param's swapped .data) are checked every time."""
    shapes = [(8, 6), (3, 3)]
    p, g, m, v = _lists(shapes, torch.float32, "cpu", 4)
    bits = [pack_bits(s) for s in _bools("random", shapes, "cpu")]
    kw = dict(rule="adamw", **THETA_KW)
    fused_theta_update_multi_(p, g, bits, exp_avgs=m, exp_avg_sqs=v, **kw)  # checked, cached
    with pytest.raises(ValueError, match="shape"):
        fused_theta_update_multi_(p, [g[0], torch.zeros(9)], bits, exp_avgs=m, exp_avg_sqs=v, **kw)
    with pytest.raises(ValueError, match="state"):
        fused_theta_update_multi_(p, g, bits, exp_avgs=[m[0].half(), m[1]], exp_avg_sqs=v, **kw)
    with pytest.raises(ValueError, match="bytes"):
        short = [bits[0], torch.zeros(1, dtype=torch.uint8)]
        fused_theta_update_multi_(p, g, short, exp_avgs=m, exp_avg_sqs=v, **kw)
    p[1].data = torch.zeros(9)  # same tensor object, new storage and shape
    with pytest.raises(ValueError, match="shape"):
        fused_theta_update_multi_(p, g, bits, exp_avgs=m, exp_avg_sqs=v, **kw)


ADAM_CONFIGS = {
    "adamw": dict(weight_decay=1e-1, decoupled_weight_decay=True, maximize=False, beta1=0.9),
    "adam_l2_max": dict(weight_decay=1e-2, decoupled_weight_decay=False, maximize=True, beta1=0.3),
}
SGD_CONFIGS = {
    "plain": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "nesterov_wd": dict(
        momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False
    ),
}


def _masks(kind, shapes, device):
    if kind == "none":
        return None, None
    masks = _bools("random", shapes, device, seed=3)
    return masks, [pack_bits(m) for m in masks]


def _check_adam(shapes, dtype, mask_kind, name, device) -> None:
    masks, bits = _masks(mask_kind, shapes, device)
    p, g, m, v = _lists(shapes, dtype, device, 4)
    want, single, ours = _clone([p, m, v]), _clone([p, m, v]), _clone([p, m, v])
    kw = dict(step=3, lr=1e-2, beta2=0.999, eps=1e-8, **ADAM_CONFIGS[name])
    for i in range(len(shapes)):
        b = None if bits is None else bits[i]
        reference.masked_adam_(want[0][i], g[i], want[1][i], want[2][i], b, **kw)
        fused_masked_adam_(single[0][i], g[i], single[1][i], single[2][i], b, **kw)
    fused_masked_adam_multi_(ours[0], g, ours[1], ours[2], bits, **kw)
    _assert_lists_close(ours, want, dtype)
    _assert_lists_equal(ours, single)
    if masks is not None:
        for row in ours:
            for t, mask in zip(row, masks, strict=True):
                assert not t[~mask].any()


def _check_sgd(shapes, dtype, mask_kind, name, first_step, device) -> None:
    _, bits = _masks(mask_kind, shapes, device)
    p, g, buf = _lists(shapes, dtype, device, 3)
    want, single, ours = _clone([p, buf]), _clone([p, buf]), _clone([p, buf])
    kw = dict(lr=0.05, first_step=first_step, **SGD_CONFIGS[name])
    for i in range(len(shapes)):
        b = None if bits is None else bits[i]
        reference.masked_sgd_(want[0][i], g[i], want[1][i], b, **kw)
        fused_masked_sgd_(single[0][i], g[i], single[1][i], b, **kw)
    fused_masked_sgd_multi_(ours[0], g, ours[1], bits, **kw)
    _assert_lists_close(ours, want, dtype)
    _assert_lists_equal(ours, single)


@pytest.mark.parametrize("name", list(ADAM_CONFIGS))
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_adam_multi(dtype, mask_kind, name) -> None:
    _check_adam(ODD_SHAPES, dtype, mask_kind, name, "cpu")


@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", list(SGD_CONFIGS))
@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_sgd_multi(mask_kind, name, first_step) -> None:
    _check_sgd(ODD_SHAPES, torch.float16, mask_kind, name, first_step, "cpu")


def test_multi_grad_dtype_may_differ_from_param() -> None:
    """fp32 gradients with fp16 weights and states, as in the per-tensor kernels."""
    shapes = [(5, 37), (3, 1500)]
    _, bits = _masks("random", shapes, "cpu")
    p, _, m, v = _lists(shapes, torch.float16, "cpu", 4)
    g = [torch.randn(s) for s in shapes]
    want, ours = _clone([p, m, v]), _clone([p, m, v])
    kw = dict(step=1, lr=1e-2, beta2=0.999, eps=1e-8, **ADAM_CONFIGS["adamw"])
    for i in range(len(shapes)):
        reference.masked_adam_(want[0][i], g[i], want[1][i], want[2][i], bits[i], **kw)
    fused_masked_adam_multi_(ours[0], g, ours[1], ours[2], bits, **kw)
    _assert_lists_close(ours, want, torch.float16)


def test_sgd_multi_without_momentum_takes_no_buffers() -> None:
    shapes = [(5, 37), (1, 1)]
    p, g = _lists(shapes, torch.float32, "cpu", 2)
    want = [t.clone() for t in p]
    kw = dict(lr=0.05, first_step=False, **SGD_CONFIGS["plain"])
    for i in range(len(shapes)):
        reference.masked_sgd_(want[i], g[i], None, None, **kw)
    fused_masked_sgd_multi_(p, g, None, None, **kw)
    _assert_lists_close([p], [want], torch.float32)


GPU_SHAPES = [*ODD_SHAPES, (768, 2304), (3072, 768), (1024, 4097)]


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("sel_kind", ["random", "all", "none"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shapes", [GPU_SHAPES, ALIGNED_SHAPES], ids=["odd", "aligned"])
def test_theta_multi_gpu(shapes, dtype, sel_kind, rule) -> None:
    _check_theta(shapes, dtype, sel_kind, rule, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", list(ADAM_CONFIGS))
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shapes", [GPU_SHAPES, ALIGNED_SHAPES], ids=["odd", "aligned"])
def test_adam_multi_gpu(shapes, dtype, mask_kind, name) -> None:
    _check_adam(shapes, dtype, mask_kind, name, "cuda")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("name", list(SGD_CONFIGS))
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_sgd_multi_gpu(dtype, mask_kind, name, first_step) -> None:
    _check_sgd(GPU_SHAPES, dtype, mask_kind, name, first_step, "cuda")


# ----- found_inf: a device-side flag that skips the whole step (no host sync) -----

FOUND_INF_SHAPES = [(5, 37), (1, 1), (3, 1500)]
FOUND_INF_KINDS = ["sgd", "adam", "theta"]
FOUND_INF_IMPLS = ["multi", "fused", "reference"]
# Set: skip the step. Clear: run it. fp32 of shape [1] and bool of shape [] both count as 1 element.
FOUND_INF_SET = {
    "one": lambda: torch.ones(1),
    "nan": lambda: torch.full((1,), float("nan")),
    "true": lambda: torch.tensor(True),
}
FOUND_INF_CLEAR = {
    "zero": lambda: torch.zeros(1),
    "neg_zero": lambda: torch.full((1,), -0.0),
    "false": lambda: torch.tensor(False),
}


def _found_inf_case(kind: str, dtype, device):
    """The tensors a ``kind`` step writes (param first, then its states), its grads and bits."""
    _, bits = _masks("random", FOUND_INF_SHAPES, device)
    count = {"sgd": 3, "adam": 4, "theta": 4}[kind]
    p, g, *states = _lists(FOUND_INF_SHAPES, dtype, device, count)
    return [p, *states], g, bits


def _found_inf_step(kind: str, impl: str, rows, g, bits, found_inf) -> None:
    """One ``kind`` step through ``impl``; ``found_inf=None`` leaves the argument out entirely."""
    extra = {} if found_inf is None else {"found_inf": found_inf}
    if kind == "sgd":
        fns = (fused_masked_sgd_multi_, fused_masked_sgd_, reference.masked_sgd_)
        kw = dict(lr=0.05, first_step=False, **SGD_CONFIGS["nesterov_wd"], **extra)
    elif kind == "adam":
        fns = (fused_masked_adam_multi_, fused_masked_adam_, reference.masked_adam_)
        kw = dict(step=3, lr=1e-2, beta2=0.999, eps=1e-8, **ADAM_CONFIGS["adamw"], **extra)
    else:
        p, m, v = rows
        kw = dict(rule="adamw", **THETA_KW, **extra)
        if impl == "multi":
            fused_theta_update_multi_(p, g, bits, exp_avgs=m, exp_avg_sqs=v, **kw)
        else:
            fn = fused_theta_update_ if impl == "fused" else reference.theta_update_
            for i in range(len(p)):
                fn(p[i], g[i], bits[i], exp_avg=m[i], exp_avg_sq=v[i], **kw)
        return
    multi, fused, ref = fns
    if impl == "multi":
        multi(*rows[:1], g, *rows[1:], bits, **kw)
    else:
        fn = fused if impl == "fused" else ref
        for i in range(len(g)):
            fn(*_at(rows[:1], i), g[i], *_at(rows[1:], i), bits[i], **kw)


def _assert_lists_bitwise_equal(got, want) -> None:
    for got_row, want_row in zip(got, want, strict=True):
        for a, b in zip(got_row, want_row, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _check_found_inf(kind, impl, flag, dtype, device) -> None:
    rows, g, bits = _found_inf_case(kind, dtype, device)
    before, g_before = _clone(rows), _clone([g])
    skipped, ran, plain = _clone(rows), _clone(rows), _clone(rows)
    set_flag = FOUND_INF_SET[flag[0]]().to(device)
    clear_flag = FOUND_INF_CLEAR[flag[1]]().to(device)
    _found_inf_step(kind, impl, skipped, g, bits, set_flag)
    _found_inf_step(kind, impl, ran, g, bits, clear_flag)
    _found_inf_step(kind, impl, plain, g, bits, None)
    _assert_lists_bitwise_equal(skipped, before)  # not even pruned coordinates zeroed
    _assert_lists_bitwise_equal(ran, plain)
    _assert_lists_bitwise_equal([g], g_before)
    for plain_row, before_row in zip(plain, before, strict=True):  # the step does move every row
        assert any(not torch.equal(a, b) for a, b in zip(plain_row, before_row, strict=True))


@pytest.mark.parametrize(
    "flag", list(zip(FOUND_INF_SET, FOUND_INF_CLEAR, strict=True)), ids=lambda f: "-".join(f)
)
@pytest.mark.parametrize("impl", FOUND_INF_IMPLS)
@pytest.mark.parametrize("kind", FOUND_INF_KINDS)
def test_found_inf_skips_or_steps(kind, impl, flag) -> None:
    """Set: every param and state keeps its bits. Clear: the very result of a call without it."""
    _check_found_inf(kind, impl, flag, torch.float16, "cpu")


def test_found_inf_rejects_bad_flags() -> None:
    rows, g, bits = _found_inf_case("adam", torch.float32, "cpu")
    for bad, match in (
        (torch.zeros(1, dtype=torch.float16), "float32 or bool"),
        (torch.zeros(2), "1-element"),
        (torch.zeros(1, device="meta"), "device"),
    ):
        for impl in ("multi", "fused"):
            with pytest.raises(ValueError, match=match):
                _found_inf_step("adam", impl, rows, g, bits, bad)


def test_found_inf_with_empty_lists_is_a_no_op() -> None:
    flag = torch.ones(1)
    kw = dict(step=1, lr=1e-2, beta2=0.999, eps=1e-8, **ADAM_CONFIGS["adamw"])
    fused_masked_adam_multi_([], [], [], [], None, found_inf=flag, **kw)
    fused_theta_update_multi_([], [], [], rule="sgd", found_inf=flag, **THETA_KW)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "flag", list(zip(FOUND_INF_SET, FOUND_INF_CLEAR, strict=True)), ids=lambda f: "-".join(f)
)
@pytest.mark.parametrize("impl", ["multi", "fused"])
@pytest.mark.parametrize("kind", FOUND_INF_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_gpu(dtype, kind, impl, flag) -> None:
    _check_found_inf(kind, impl, flag, dtype, "cuda")
