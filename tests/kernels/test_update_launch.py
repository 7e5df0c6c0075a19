"""The launch machinery every update kernel shares: alignment hints, cached tables, checks of the
lists (once per set of lasting tensors, every step for gradients), and ``found_inf``, a device flag
that skips the whole step without a host sync."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels import launch
from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.masked_adam import masked_adam_reference_
from resu_compile.kernels.masked_sgd import masked_sgd_reference_
from resu_compile.kernels.theta_update import theta_update_reference_
from resu_compile.kernels.triton.masked_adam import masked_adam_triton_
from resu_compile.kernels.triton.masked_sgd import masked_sgd_triton_
from resu_compile.kernels.triton.theta_update import theta_update_triton_
from tests.kernels.update_cases import (
    ALIGNED_SHAPES,
    CUDA,
    ODD_SHAPES,
    THETA_KW,
    assert_lists_bitwise_equal,
    at,
    bools,
    clone,
    lists,
    masks,
)

ADAMW = dict(
    step=3,
    lr=1e-2,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=1e-1,
    decoupled_weight_decay=True,
    maximize=False,
)
SGD_NESTEROV = dict(
    lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False
)


def _launch(params, grads):
    return launch.update_launch("test", params, grads, [], [])


def test_alignment_hint_only_when_every_tensor_allows_it() -> None:
    aligned = [torch.zeros(s) for s in ALIGNED_SHAPES]
    run = _launch(aligned, aligned)
    assert run is not None and run.aligned
    odd = [torch.zeros(s) for s in ODD_SHAPES]
    run = _launch(odd, odd)
    assert run is not None and not run.aligned
    shifted = torch.zeros(4097)[1:].view(64, 64)  # contiguous, 4 bytes off a 16-byte boundary
    run = _launch([*aligned, shifted], [*aligned, shifted])
    assert run is not None and not run.aligned


def test_steady_state_reuses_the_tables() -> None:
    """Same shapes: the block table is cached; same tensors: the address table too."""
    shapes = [(5, 37), (3, 1500)]
    p, g, m, v = lists(shapes, torch.float32, "cpu", 4)
    bits = [pack_bits(s) for s in bools("random", shapes, "cpu")]
    launch._chunk_tables.cache_clear()
    launch._addresses.cache_clear()
    kw = dict(rule="adamw", exp_avgs=m, exp_avg_sqs=v, **THETA_KW)
    for _ in range(3):
        theta_update_triton_(p, g, bits, **kw)
    assert (launch._chunk_tables.cache_info().misses, launch._addresses.cache_info().misses) == (
        1,
        1,
    )
    theta_update_triton_(p, [t.clone() for t in g], bits, **kw)  # new grads, same shapes
    assert (launch._chunk_tables.cache_info().misses, launch._addresses.cache_info().misses) == (
        1,
        2,
    )


def test_rejects_what_the_kernel_would_get_wrong() -> None:
    p = [torch.zeros(8, 6), torch.zeros(3, 3)]
    bits = [pack_bits(torch.ones(t.shape, dtype=torch.bool)) for t in p]
    kw = dict(rule="sgd", **THETA_KW)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        theta_update_triton_(p, p[:1], bits, **kw)
    with pytest.raises(TypeError, match="share one dtype"):
        theta_update_triton_([p[0], p[1].half()], p, bits, **kw)
    with pytest.raises(ValueError, match="contiguous"):
        theta_update_triton_([p[0].t(), p[1]], p, bits, **kw)
    with pytest.raises(ValueError, match="shape"):
        theta_update_triton_(p, [p[0], torch.zeros(9)], bits, **kw)
    with pytest.raises(ValueError, match="bytes"):
        theta_update_triton_(p, p, [bits[0], torch.zeros(5, dtype=torch.uint8)], **kw)
    with pytest.raises(ValueError, match="one device"):
        theta_update_triton_(p, [p[0], torch.zeros(3, 3, device="meta")], bits, **kw)
    with pytest.raises(ValueError, match="state"):
        theta_update_triton_(p, p, bits, rule="momentum", exp_avgs=[p[0].half(), p[1]], **THETA_KW)
    with pytest.raises(ValueError, match="needs exp_avg"):
        theta_update_triton_(p, p, bits, rule="adamw", **THETA_KW)


def test_checked_tensors_are_checked_again_once_replaced() -> None:
    """Lasting tensors are checked once per set; a step's gradients and any replaced tensor (a
    reloaded state, re-packed bits, a param's swapped .data) are checked every time."""
    shapes = [(8, 6), (3, 3)]
    p, g, m, v = lists(shapes, torch.float32, "cpu", 4)
    bits = [pack_bits(s) for s in bools("random", shapes, "cpu")]
    kw = dict(rule="adamw", **THETA_KW)
    theta_update_triton_(p, g, bits, exp_avgs=m, exp_avg_sqs=v, **kw)  # checked, cached
    with pytest.raises(ValueError, match="shape"):
        theta_update_triton_(p, [g[0], torch.zeros(9)], bits, exp_avgs=m, exp_avg_sqs=v, **kw)
    with pytest.raises(ValueError, match="state"):
        theta_update_triton_(p, g, bits, exp_avgs=[m[0].half(), m[1]], exp_avg_sqs=v, **kw)
    with pytest.raises(ValueError, match="bytes"):
        short = [bits[0], torch.zeros(1, dtype=torch.uint8)]
        theta_update_triton_(p, g, short, exp_avgs=m, exp_avg_sqs=v, **kw)
    p[1].data = torch.zeros(9)  # same tensor object, new storage and shape
    with pytest.raises(ValueError, match="shape"):
        theta_update_triton_(p, g, bits, exp_avgs=m, exp_avg_sqs=v, **kw)


FOUND_INF_SHAPES = [(5, 37), (1, 1), (3, 1500)]
FOUND_INF_KINDS = ["sgd", "adam", "theta"]
# One launch over every weight, a launch per weight, the reference.
FOUND_INF_IMPLS = ["kernel", "kernel_per_weight", "reference"]
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
    _, bits = masks("random", FOUND_INF_SHAPES, device)
    count = {"sgd": 3, "adam": 4, "theta": 4}[kind]
    p, g, *states = lists(FOUND_INF_SHAPES, dtype, device, count)
    return [p, *states], g, bits


def _one_weight(kernel):
    """``kernel`` (a list launch) called on one weight's tensors, as lists of one."""
    return lambda *tensors, **kw: kernel(*([t] for t in tensors), **kw)


def _found_inf_step(kind: str, impl: str, rows, g, bits, found_inf) -> None:
    """One ``kind`` step through ``impl``; ``found_inf=None`` leaves the argument out entirely."""
    extra = {} if found_inf is None else {"found_inf": found_inf}
    if kind == "theta":
        p, m, v = rows
        kw = dict(rule="adamw", **THETA_KW, **extra)
        if impl == "kernel":
            theta_update_triton_(p, g, bits, exp_avgs=m, exp_avg_sqs=v, **kw)
            return
        for i in range(len(p)):
            if impl == "reference":
                theta_update_reference_(p[i], g[i], bits[i], exp_avg=m[i], exp_avg_sq=v[i], **kw)
            else:
                theta_update_triton_(
                    [p[i]], [g[i]], [bits[i]], exp_avgs=[m[i]], exp_avg_sqs=[v[i]], **kw
                )
        return
    if kind == "sgd":
        fns = (masked_sgd_triton_, masked_sgd_reference_)
        kw = dict(first_step=False, **SGD_NESTEROV, **extra)
    else:
        fns = (masked_adam_triton_, masked_adam_reference_)
        kw = dict(ADAMW, **extra)
    kernel, reference = fns
    if impl == "kernel":
        kernel(*rows[:1], g, *rows[1:], bits, **kw)
        return
    fn = reference if impl == "reference" else _one_weight(kernel)
    for i in range(len(g)):
        fn(*at(rows[:1], i), g[i], *at(rows[1:], i), bits[i], **kw)


def _check_found_inf(kind, impl, flag, dtype, device) -> None:
    rows, g, bits = _found_inf_case(kind, dtype, device)
    before, g_before = clone(rows), clone([g])
    skipped, ran, plain = clone(rows), clone(rows), clone(rows)
    set_flag = FOUND_INF_SET[flag[0]]().to(device)
    clear_flag = FOUND_INF_CLEAR[flag[1]]().to(device)
    _found_inf_step(kind, impl, skipped, g, bits, set_flag)
    _found_inf_step(kind, impl, ran, g, bits, clear_flag)
    _found_inf_step(kind, impl, plain, g, bits, None)
    assert_lists_bitwise_equal(skipped, before)  # not even pruned coordinates zeroed
    assert_lists_bitwise_equal(ran, plain)
    assert_lists_bitwise_equal([g], g_before)
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
        for impl in ("kernel", "kernel_per_weight"):
            with pytest.raises(ValueError, match=match):
                _found_inf_step("adam", impl, rows, g, bits, bad)


def test_found_inf_with_empty_lists_is_a_no_op() -> None:
    flag = torch.ones(1)
    masked_adam_triton_([], [], [], [], None, found_inf=flag, **ADAMW)
    theta_update_triton_([], [], [], rule="sgd", found_inf=flag, **THETA_KW)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize(
    "flag", list(zip(FOUND_INF_SET, FOUND_INF_CLEAR, strict=True)), ids=lambda f: "-".join(f)
)
@pytest.mark.parametrize("impl", ["kernel", "kernel_per_weight"])
@pytest.mark.parametrize("kind", FOUND_INF_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_gpu(dtype, kind, impl, flag) -> None:
    _check_found_inf(kind, impl, flag, dtype, "cuda")
