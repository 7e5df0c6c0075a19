"""2:4 phases on the sparse tensor cores: the transposable mask rule, the semi-sparse linear
against ``F.linear``, the rewrite that routes linear uses to it, and the whole cycle on CUDA."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resu_compile as resu
from resu_compile.compiler.passes import rewrite
from resu_compile.config import ResuConfig
from resu_compile.kernels.semi_sparse import (
    semi_sparse_linear,
    semi_sparse_mm_t,
    semi_sparse_mm_t_reference,
)
from resu_compile.method.pruning import transposable_nm_mask

gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _is_transposable(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    rows, cols = mask.shape
    blocks = mask.reshape(rows // m, m, cols // m, m).int()
    return bool((blocks.sum(dim=3) == n).all() and (blocks.sum(dim=1) == n).all())


def _best_block_sum(block: torch.Tensor, n: int, m: int) -> float:
    """The largest score sum of any n-per-row-and-column subset, by brute force over subsets."""
    best = -float("inf")
    for cells in itertools.combinations(range(m * m), n * m):
        mask = torch.zeros(m * m, dtype=torch.bool)
        mask[list(cells)] = True
        mask = mask.reshape(m, m)
        if (mask.sum(0) == n).all() and (mask.sum(1) == n).all():
            best = max(best, float(block[mask].double().sum()))
    return best


@pytest.mark.parametrize("n", [1, 2, 3])
def test_transposable_mask_keeps_the_best_pattern_of_every_block(n: int) -> None:
    torch.manual_seed(n)
    scores = torch.rand(8, 12)
    mask = transposable_nm_mask(scores, n, 4)
    assert _is_transposable(mask, n)
    for i, j in itertools.product(range(0, 8, 4), range(0, 12, 4)):
        block, kept = scores[i : i + 4, j : j + 4], mask[i : i + 4, j : j + 4]
        assert float(block[kept].double().sum()) == pytest.approx(_best_block_sum(block, n, 4))


def test_transposable_mask_refuses_what_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="2-D"):
        transposable_nm_mask(torch.rand(4, 4, 3), 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        transposable_nm_mask(torch.rand(6, 8), 2, 4)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"transposable": True}, "transposable"),
        ({"semi_sparse": True}, "semi_sparse"),
        ({"pattern": "1:4", "sparsity": 0.75, "semi_sparse": True}, "semi_sparse"),
        ({"pattern": "2:8", "sparsity": 0.75, "transposable": True}, "transposable"),
    ],
)
def test_options_that_need_a_pattern_name_themselves(options: dict, option: str) -> None:
    with pytest.raises(ValueError, match=f"option '{option}'"):
        ResuConfig(**options)


def test_a_transposable_run_keeps_transposable_masks_through_prune_and_commit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    compiled = resu.compile(
        model, sparsity=0.5, pattern="2:4", transposable=True, compiler="eager", total_steps=40
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = set()
    for _ in range(40):
        compiled(torch.randn(4, 16)).square().mean().backward()
        compiled.resu.step(optimizer)
        optimizer.zero_grad()
        for weight in compiled.resu.state:
            if weight.mask_bits is not None and compiled.resu.phase.name != "RESU":
                assert _is_transposable(weight.mask())
                assert not weight.param.detach()[~weight.mask()].any()
                seen.add(compiled.resu.phase.name)
    assert {"TRAIN", "STABILIZE"} <= seen


@pytest.mark.parametrize("transposable", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_semi_sparse_linear_reference_matches_linear(transposable: bool, bias: bool) -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 16)
    weight = (weight * transposable_nm_mask(weight.abs(), 2, 4)).requires_grad_()
    b = torch.randn(32, requires_grad=True) if bias else None
    x = torch.randn(3, 5, 16, requires_grad=True)
    ours = semi_sparse_linear(x, weight, b, transposable)
    ref = F.linear(x, weight, b)
    torch.testing.assert_close(ours, ref)
    grad = torch.randn_like(ref)
    inputs = (x, weight, b) if bias else (x, weight)
    for got, want in zip(
        torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad), strict=True
    ):
        torch.testing.assert_close(got, want)


class _Uses(nn.Module):
    """A weight used by linear, one by matmul of an ``(in, out)`` weight, one by addmm (GPT-2's
    Conv1D)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Parameter(torch.randn(16, 32) * 0.1)
        self.c = nn.Parameter(torch.randn(32, 16) * 0.1)
        self.c_bias = nn.Parameter(torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + x @ self.b
        return torch.addmm(self.c_bias, h.reshape(-1, 32), self.c)


def test_the_rewrite_routes_every_linear_use_to_the_semi_sparse_linear(monkeypatch) -> None:
    """On the CPU (where the op runs its reference) with the device rule lifted: the variant
    computes what the dense graph does, and each of the three uses became a semi-sparse linear."""
    monkeypatch.setattr(rewrite, "semi_sparse_reason", lambda *args: None)
    captured = []

    def backend(gm, example_inputs):
        from resu_compile.compiler.passes.match import find_weight_candidates

        candidates = find_weight_candidates(gm, example_inputs)
        uses = [u for c in candidates for u in c.graph_uses]
        placeholders = [c.placeholder for c in candidates]
        variant = rewrite.build_variant(
            gm, placeholders, uses, rewrite.VariantSpec(semi_sparse=True), transposable=True
        )
        captured.append(variant)
        return variant.forward

    torch.manual_seed(0)
    model = _Uses()
    x = torch.randn(4, 16)
    want = model(x)
    got = torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, want)
    (variant,) = captured
    calls = [n for n in variant.graph.nodes if n.target is semi_sparse_linear]
    assert len(calls) == 3


def test_the_rewrite_leaves_what_the_sparse_cores_cannot_take() -> None:
    """On the CPU the device rule keeps every product dense, and says why."""
    reasons = []

    def backend(gm, example_inputs):
        from resu_compile.compiler.passes.match import find_weight_candidates

        for candidate in find_weight_candidates(gm, example_inputs):
            reasons.extend(rewrite.semi_sparse_fallback(u) for u in candidate.graph_uses)
        return gm.forward

    torch.compile(_Uses(), backend=backend, fullgraph=True)(torch.randn(4, 16))
    assert reasons and all(r == "on cpu, not CUDA" for r in reasons)


@pytest.mark.parametrize("shape", [(64, 32, 40), (32, 64, 8), (48, 16, 13)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cusparselt_product_matches_the_reference(shape, dtype) -> None:
    rows, inner, columns = shape
    torch.manual_seed(0)
    sparse = torch.randn(rows, inner, device="cuda")
    sparse = (sparse * transposable_nm_mask(sparse.abs(), 2, 4)).to(dtype)
    dense = torch.randn(columns, inner, device="cuda", dtype=dtype).t()  # column-major, as used
    got = semi_sparse_mm_t(sparse, dense)
    want = semi_sparse_mm_t_reference(sparse.float(), dense.float())
    assert got.shape == (columns, rows) and got.is_contiguous()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)  # 10 outputs: not a multiple of 16, stays dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(F.gelu(self.up(x))))


def _train(
    semi_sparse: bool, transposable: bool, steps: int
) -> tuple[list[float], nn.Module, set[str]]:
    torch.manual_seed(0)
    model = _MLP().cuda()
    compiled = resu.compile(
        model,
        sparsity=0.5,
        pattern="2:4",
        transposable=transposable,
        semi_sparse=semi_sparse,
        total_steps=steps,
        cycles=2,
        exclude="head*",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    data = torch.randn(steps, 256, 64, device="cuda")
    losses, variants = [], set()
    for i in range(steps):
        variants.add(compiled.resu.graph_variant())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(data[i]).float().square().mean()
        loss.backward()
        compiled.resu.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, compiled, variants


@pytest.mark.parametrize("transposable", [True, False])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_sparse_training_follows_the_dense_product_run(transposable: bool) -> None:
    steps = 40
    dense_losses, _, _ = _train(False, transposable, steps)
    losses, compiled, variants = _train(True, transposable, steps)
    assert "semi_sparse" in variants
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(dense_losses), rtol=3e-2, atol=1e-3
    )
    products = {w.name: w.semi_sparse_products for w in compiled.resu.state}
    expected = "forward and input gradient" if transposable else "forward on 2:4 cores"
    assert all(p.startswith(expected) for p in products.values()), products
    assert "2:4 phases' products" in compiled.resu.report()
    for weight in compiled.resu.state:
        if transposable:
            assert _is_transposable(weight.mask().cpu())
        assert not (weight.param.detach()[~weight.mask()]).any()


@pytest.mark.parametrize(
    ("gradient_mask", "variant"), [("graph", "semi_sparse_masked"), ("optimizer", "semi_sparse")]
)
def test_the_2_4_phases_run_the_semi_sparse_variant_and_the_resu_phase_runs_dense(
    gradient_mask: str, variant: str
) -> None:
    """On the CPU every product falls back (and the report says why); the phase picks the
    variant, and with the graph mask its backward still zeroes the pruned gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    compiled = resu.compile(
        model,
        sparsity=0.5,
        pattern="2:4",
        semi_sparse=True,
        manual=True,
        compiler="aot_eager",
        gradient_mask=gradient_mask,
    )
    x = torch.randn(4, 16)
    compiled(x).sum().backward()
    assert compiled.resu.graph_variant() == "dense"  # nothing pruned yet
    compiled.resu.prune()
    assert compiled.resu.graph_variant() == variant
    model.zero_grad()
    compiled(x).sum().backward()
    if gradient_mask == "graph":
        for weight in compiled.resu.state:
            assert not weight.param.grad[~weight.mask()].any()
    assert "dense: on cpu, not CUDA" in compiled.resu.report()
    compiled.resu.enter_resu()
    assert compiled.resu.graph_variant() == "dense"
