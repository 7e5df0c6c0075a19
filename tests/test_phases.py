"""Phase switching: graph variants, zero recompiles, manual control and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resu_compile as resu
import resu_compile.compiler.backend as backend
from resu_compile.kernels.graph_ops import accumulate_input_sq_norms, mask_gradient
from tests.invariants import assert_exact_counts
from tests.zoo import ZOO_BY_NAME


def _train_step(compiled, model, optimizer, batch) -> None:
    loss = compiled(*batch).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    compiled.resu.step(optimizer)


def _cycle(compiled, model, optimizer, batch) -> None:
    controller = compiled.resu
    _train_step(compiled, model, optimizer, batch)
    controller.prune()
    _train_step(compiled, model, optimizer, batch)
    controller.enter_resu()
    _train_step(compiled, model, optimizer, batch)
    with controller.calibrate():
        compiled(*batch)
    controller.commit()
    _train_step(compiled, model, optimizer, batch)


@pytest.mark.parametrize("name", ["mlp", "transformer", "graph_break"])
def test_cycling_every_phase_twice_after_warmup_never_recompiles(name: str) -> None:
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, cycles=3, manual=True, compiler="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batch = entry.make_batch(0)
    _cycle(compiled, model, optimizer, batch)  # warm-up: every variant compiled once
    with torch.compiler.set_stance("fail_on_recompile"):
        _cycle(compiled, model, optimizer, batch)
        _cycle(compiled, model, optimizer, batch)


def _record_variants(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, object]]:
    built = []
    original = backend.build_variant

    def recording(gm, weights, uses, spec, **options):
        variant = original(gm, weights, uses, spec, **options)
        built.append((variant, spec))
        return variant

    monkeypatch.setattr(backend, "build_variant", recording)
    return built


def _targets(variant) -> list[object]:
    return [n.target for n in variant.graph.nodes if n.op == "call_function"]


def test_each_variant_compiles_once_with_its_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    built = _record_variants(monkeypatch)
    entry = ZOO_BY_NAME["conv1d_gpt2"]
    model = entry.build()
    compiled = resu.compile(
        model, sparsity=0.5, manual=True, compiler="aot_eager", gradient_mask="graph"
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        _train_step(compiled, model, optimizer, entry.make_batch(0))
        with compiled.resu.calibrate():
            compiled(*entry.make_batch(0))
        compiled.resu.prune()
        _train_step(compiled, model, optimizer, entry.make_batch(0))
        compiled.resu.set_phase("train")
    specs = [spec for _, spec in built]
    assert specs == [
        backend.VARIANTS["dense"],
        backend.VARIANTS["calibrate"],
        backend.VARIANTS["sparse"],
    ]
    dense, calibrate, sparse = (variant for variant, _ in built)
    assert mask_gradient not in _targets(dense) and torch.addmm in _targets(dense)
    assert _targets(calibrate).count(accumulate_input_sq_norms) == 2
    assert _targets(sparse).count(mask_gradient) == 2


def test_calibrate_records_input_column_norms_of_every_token() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    batches = [entry.make_batch(0), entry.make_batch(1)]
    compiled(*batches[0])
    with compiled.resu.calibrate():
        for batch in batches:
            compiled(*batch)
    inputs = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(compiled.resu.input_norms("fc1.weight"), inputs.pow(2).sum(0).sqrt())
    hidden = F.relu(model.fc1(inputs))
    torch.testing.assert_close(
        compiled.resu.input_norms("fc2.weight"),
        hidden.detach().pow(2).sum(0).sqrt(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gpt2_conv1d_input_norms_follow_the_in_out_storage() -> None:
    entry = ZOO_BY_NAME["conv1d_gpt2"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    (x,) = entry.make_batch(0)
    compiled(x)
    with compiled.resu.calibrate():
        compiled(x)
    weight = compiled.resu.state.by_name("c_fc.weight")
    assert weight.input_dim == 0  # Conv1D stores (in, out)
    torch.testing.assert_close(
        compiled.resu.input_norms("c_fc.weight"), x.reshape(-1, x.shape[-1]).pow(2).sum(0).sqrt()
    )


def test_manual_methods_called_out_of_order_raise_and_change_nothing() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    compiled(*entry.make_batch(0))
    controller = compiled.resu
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="nothing is pruned"):
        controller.enter_resu()
    with pytest.raises(RuntimeError, match="only valid in the RESU phase"):
        controller.commit()
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        controller.prune(1.5)
    with pytest.raises(ValueError, match="phase must be one of"):
        controller.set_phase("pruning")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
    assert controller.phase is resu.Phase.TRAIN and all(
        m is None for m in controller.masks().values()
    )
    controller.prune()
    controller.enter_resu()
    with pytest.raises(RuntimeError, match="already running"):
        controller.enter_resu()
    with pytest.raises(RuntimeError, match="call commit"):
        controller.prune()
    with pytest.raises(RuntimeError, match="call commit"):
        controller.set_phase(resu.Phase.TRAIN)


def test_automatic_schedule_refuses_manual_calls() -> None:
    entry = ZOO_BY_NAME["mlp"]
    compiled = resu.compile(entry.build(), sparsity=0.5, steps_per_cycle=10, compiler="aot_eager")
    compiled(*entry.make_batch(0))
    with pytest.raises(RuntimeError, match="manual=True"):
        compiled.resu.prune()


def test_automatic_schedule_runs_the_phases_at_the_configured_steps() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.6, cycles=2, steps_per_cycle=10, compiler="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    phases = []
    for _ in range(20):
        _train_step(compiled, model, optimizer, entry.make_batch(0))
        phases.append(compiled.resu.phase.value)
    # 60 / 10 / 30 % of 10 steps: prune after step 6, RESU after step 7, commit after step 10.
    expected = ["train"] * 5 + ["stabilize"] + ["resu"] * 3 + ["train"]
    expected += ["train"] * 5 + ["stabilize"] + ["resu"] * 3 + ["done"]
    assert phases == expected
    events = [(e["event"], e["step"]) for e in compiled.resu.history]
    assert events == [
        ("prune", 6),
        ("resu", 7),
        ("commit", 10),
        ("prune", 16),
        ("resu", 17),
        ("commit", 20),
    ]
    assert_exact_counts(compiled.resu, 0.6)


def test_without_amnesty_the_last_merge_is_re_pruned_to_the_target() -> None:
    """METHOD.md: without amnesty all theta merge and the next PRUNE re-prunes; after the last
    cycle that PRUNE runs at the commit, so the run ends at its sparsity, not denser."""
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(
        model, sparsity=0.6, cycles=2, steps_per_cycle=10, amnesty=False, compiler="aot_eager"
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        _train_step(compiled, model, optimizer, entry.make_batch(0))
    events = [(e["event"], e["step"]) for e in compiled.resu.history]
    assert events[-2:] == [("commit", 20), ("prune", 20)]
    first_commit = next(e for e in compiled.resu.history if e["event"] == "commit")
    assert any(layer["resurrected"] > 0 for layer in first_commit["layers"].values())
    assert_exact_counts(compiled.resu, 0.6)
    for weight in compiled.resu.state:
        assert torch.all(weight.param.detach()[~weight.mask()] == 0)


class _SharedInput(torch.nn.Module):
    """q, k and v read one input; the output projection reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16, bias=False) for _ in range(3))
        self.out = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.q(x) * self.k(x) + self.v(x))


def test_weights_reading_one_input_share_its_norm_reduction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = _record_variants(monkeypatch)
    torch.manual_seed(0)
    model = _SharedInput()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    x = torch.randn(4, 8, 16)
    compiled(x)
    with compiled.resu.calibrate():
        compiled(x)
    calibrate = next(v for v, spec in built if spec == backend.VARIANTS["calibrate"])
    calls = [n for n in calibrate.graph.nodes if n.target is accumulate_input_sq_norms]
    assert sorted(len(n.args) - 1 for n in calls) == [1, 3]  # (x: q, k, v), (hidden: out)
    expected = x.reshape(-1, 16).pow(2).sum(0).sqrt()
    for name in ("q.weight", "k.weight", "v.weight"):
        torch.testing.assert_close(compiled.resu.input_norms(name), expected)
    hidden = (model.q(x) * model.k(x) + model.v(x)).detach().reshape(-1, 16)
    torch.testing.assert_close(
        compiled.resu.input_norms("out.weight"), hidden.pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-5
    )
