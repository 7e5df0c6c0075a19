"""The consistency mode's statistics kernel and the consistency-weighted theta step, each against
its reference: exact on the CPU interpreter (fp32, fp16), and on the GPU with bf16 added."""

from __future__ import annotations

import pytest
import torch

from resu_compile.kernels.bits import pack_bits
from resu_compile.kernels.consistency import (
    consistency_statistics_,
    consistency_statistics_reference_,
)
from resu_compile.kernels.theta_update import theta_update_reference_
from resu_compile.kernels.triton.consistency import consistency_statistics_triton_
from resu_compile.kernels.triton.theta_update import theta_update_triton_
from tests.kernels.segment_cases import DEVICES, DTYPES, GPU_DTYPES, MASK_KINDS, SHAPES, mask

CASES = [(shape, kind) for shape in SHAPES for kind in MASK_KINDS]
BETA, TAU = 0.8, 0.3
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def _inputs(device: str, dtype: torch.dtype, seed: int = 0):
    """Gradients with a sign that mostly persists (so C spans [0, 1)), statistics, masks."""
    g = torch.Generator().manual_seed(seed)
    grads, ms, vs, bits = [], [], [], []
    for i, (shape, kind) in enumerate(CASES):
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        grads.append((sign * torch.rand(shape, generator=g)).to(device, dtype))
        ms.append((sign * torch.rand(shape, generator=g) * 0.5).to(device, dtype))
        vs.append((torch.rand(shape, generator=g) * 0.6).to(device, dtype))
        bits.append(pack_bits(mask(shape, kind, seed + i)).to(device))
    return grads, ms, vs, bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("skip", [None, 0.0, 1.0])
def test_statistics_match_the_reference(device: str, skip: float | None) -> None:
    for dtype in DTYPES if device == "cpu" else GPU_DTYPES:
        grads, ms, vs, bits = _inputs(device, dtype)
        ref_ms, ref_vs = [m.clone() for m in ms], [v.clone() for v in vs]
        flag = None if skip is None else torch.tensor([skip], device=device)
        expected = [
            consistency_statistics_reference_(g, m, v, b, beta=BETA, tau=TAU, found_inf=flag)
            for g, m, v, b in zip(grads, ref_ms, ref_vs, bits, strict=True)
        ]
        run = consistency_statistics_triton_ if device == "cpu" else consistency_statistics_
        found = run(grads, ms, vs, bits, beta=BETA, tau=TAU, found_inf=flag)
        for a, b in zip(found, expected, strict=True):
            assert torch.equal(a, b), dtype
        for rows in ((ms, ref_ms), (vs, ref_vs)):
            assert all(torch.equal(a, b) for a, b in zip(*rows, strict=True)), dtype
        selected = sum(int(b.sum()) for b in expected)
        assert (selected == 0) == (skip == 1.0)  # the case is not vacuous


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_intersected_with_a_screen(device: str) -> None:
    """``within``: the same statistics, the chosen bits limited to the screen's."""
    grads, ms, vs, bits = _inputs(device, torch.float32)
    within = [pack_bits(mask(g.shape, "random", 7 + i)).to(device) for i, g in enumerate(grads)]
    ref_ms, ref_vs = [m.clone() for m in ms], [v.clone() for v in vs]
    plain = [
        consistency_statistics_reference_(g, m, v, b, beta=BETA, tau=TAU)
        for g, m, v, b in zip(grads, ref_ms, ref_vs, bits, strict=True)
    ]
    run = consistency_statistics_triton_ if device == "cpu" else consistency_statistics_
    found = run(grads, ms, vs, bits, beta=BETA, tau=TAU, within=within)
    for a, b, w in zip(found, plain, within, strict=True):
        assert torch.equal(a, b & w)
    assert all(torch.equal(a, b) for a, b in zip(ms + vs, ref_ms + ref_vs, strict=True))
    assert 0 < sum(int(a.sum()) for a in found) < sum(int(b.sum()) for b in plain)


@pytest.mark.parametrize("device", DEVICES)
def test_consistency_weighted_theta_step_matches_the_reference(device: str) -> None:
    for dtype in DTYPES if device == "cpu" else GPU_DTYPES:
        grads, ms, vs, sel = _inputs(device, dtype, seed=1)
        g = torch.Generator().manual_seed(2)
        params = [torch.randn(t.shape, generator=g).to(device, dtype) for t in grads]
        moments = [
            [torch.rand(t.shape, generator=g).to(device, dtype) for t in grads] for _ in "mv"
        ]
        kw = dict(rule="adamw", lr=1e-2, step=3, weight_decay=1e-2)
        want = [t.clone() for t in params]
        want_m, want_v = ([t.clone() for t in row] for row in moments)
        for i in range(len(params)):
            theta_update_reference_(
                want[i], grads[i], sel[i], exp_avg=want_m[i], exp_avg_sq=want_v[i],
                consistency_m=ms[i], consistency_v=vs[i], **kw,
            )  # fmt: skip
        theta_update_triton_(
            params, grads, sel, exp_avgs=moments[0], exp_avg_sqs=moments[1],
            consistency_ms=ms, consistency_vs=vs, **kw,
        )  # fmt: skip
        for got, expected in ((params, want), (moments[0], want_m), (moments[1], want_v)):
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, **TOL[dtype])  # torch's ops round apart
        unweighted = [t.clone() for t in params]
        theta_update_reference_(
            unweighted[0], grads[0], sel[0], exp_avg=moments[0][0].clone(),
            exp_avg_sq=moments[1][0].clone(), **kw,
        )  # fmt: skip
        assert not torch.equal(unweighted[0], want[0])  # C did weigh the step


def test_consistency_weighting_changes_the_step_and_needs_both_statistics() -> None:
    param, grad = torch.ones(16), torch.full((16,), 0.5)
    bits = pack_bits(torch.ones(16, dtype=torch.bool))
    m, v = torch.full((16,), 0.25), torch.full((16,), 0.5)
    plain, weighted = param.clone(), param.clone()
    theta_update_reference_(plain, grad, bits, rule="sgd", lr=1.0, step=1)
    theta_update_reference_(
        weighted, grad, bits, rule="sgd", lr=1.0, step=1, consistency_m=m, consistency_v=v
    )
    assert torch.allclose(1 - plain, torch.full((16,), 0.5))
    assert torch.allclose(1 - weighted, torch.full((16,), 0.5 * 0.25 / (0.5 + 1e-8)))
    with pytest.raises(ValueError, match="together"):
        theta_update_reference_(param, grad, bits, rule="sgd", lr=1.0, step=1, consistency_m=m)
