"""Every zoo model compiles through both front ends, with exactly the expected managed set, and
compiled forward + backward match eager in every phase."""

from __future__ import annotations

import copy

import pytest
import torch

import resu_compile as resu
from tests.zoo import ZOO, ZooEntry

OPTIONS = {"sparsity": 0.5, "manual": True, "compiler": "aot_eager"}


def _batches(entry: ZooEntry) -> list[tuple[torch.Tensor, ...]]:
    # Two seeds: the control-flow model takes one branch per seed.
    return [entry.make_batch(0), entry.make_batch(1)]


def _require(entry: ZooEntry) -> None:
    for package in entry.requires:
        pytest.importorskip(package)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_matches_eager(
    entry: ZooEntry, compiled: torch.nn.Module, model: torch.nn.Module
) -> None:
    """Compiled and eager runs of the same parameters agree in value and in every gradient.

    In sparse phases the compiled backward zeroes managed weights' gradients on the pruned set
    (that is how the mask reaches the optimizer), so those are compared with the masked eager
    gradient.
    """
    controller = resu.controller(compiled)
    masked = {}
    if controller.graph_variant() == "sparse":
        masked = {w.name: w.mask() for w in controller.state}
    for batch in _batches(entry):
        model.zero_grad(set_to_none=True)
        eager_loss = entry.loss_fn(model(*batch))
        eager_loss.backward()
        eager_grads = _grads(model)
        model.zero_grad(set_to_none=True)
        compiled_loss = entry.loss_fn(compiled(*batch))
        compiled_loss.backward()
        compiled_grads = _grads(model)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == eager_grads.keys()
        for name, grad in eager_grads.items():
            if name in masked:
                grad = torch.where(masked[name], grad, torch.zeros_like(grad))
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("gradient_mask", ["optimizer", "graph"])
@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_resu_compile_manages_expected_set_and_matches_eager_in_every_phase(
    entry: ZooEntry, gradient_mask: str
) -> None:
    _require(entry)
    model = entry.build()
    compiled = resu.compile(model, gradient_mask=gradient_mask, **OPTIONS)
    _assert_matches_eager(entry, compiled, model)  # dense, and registers every graph
    controller = compiled.resu
    assert set(controller.state.names()) == entry.expected_managed
    skipped = {s.name for s in controller.state.skipped()}
    assert not skipped & entry.expected_managed
    controller.prune()
    _assert_matches_eager(entry, compiled, model)
    controller.enter_resu()
    _assert_matches_eager(entry, compiled, model)
    controller.commit()
    _assert_matches_eager(entry, compiled, model)
    report = controller.report()
    for name in entry.expected_managed:
        assert name in report


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_backend_name_manages_expected_set(entry: ZooEntry) -> None:
    _require(entry)
    model = entry.build()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="resu", options=OPTIONS)
    for batch in _batches(entry):
        torch.testing.assert_close(
            entry.loss_fn(compiled(*batch)), entry.loss_fn(reference(*batch)), rtol=1e-5, atol=1e-6
        )
    controller = resu.controller(compiled)
    assert controller is resu.controller(model)
    assert set(controller.state.names()) == entry.expected_managed


def test_skipped_candidates_are_reported_with_reasons() -> None:
    entry = next(e for e in ZOO if e.name == "transformer")
    model = entry.build()
    compiled = resu.compile(model, **OPTIONS)
    compiled(*entry.make_batch(0))
    reasons = {s.name: s.reason for s in compiled.resu.state.skipped()}
    assert "non-matmul" in reasons["tok_emb.weight"]
    assert reasons["blocks.0.ln1.weight"] == "1-D parameter"


def test_include_and_exclude_filters_select_by_name() -> None:
    entry = next(e for e in ZOO if e.name == "mlp")
    only_fc1 = resu.compile(entry.build(), include="fc1.*", **OPTIONS)
    only_fc1(*entry.make_batch(0))
    assert only_fc1.resu.state.names() == ["fc1.weight"]
    torch._dynamo.reset()
    not_fc3 = resu.compile(entry.build(), exclude=lambda name, p: name.startswith("fc3"), **OPTIONS)
    not_fc3(*entry.make_batch(0))
    assert not_fc3.resu.state.names() == ["fc1.weight", "fc2.weight"]
    reasons = {s.name: s.reason for s in not_fc3.resu.state.skipped()}
    assert "filter" in reasons["fc3.weight"]


def test_tied_weight_used_twice_as_matmul_weight_is_one_managed_weight() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)
            self.b = torch.nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    compiled = resu.compile(model, **OPTIONS)
    compiled(torch.randn(2, 8))
    assert compiled.resu.state.names() == ["a.weight"]
    compiled.resu.prune(0.5)
    assert compiled.resu.masks()["a.weight"].sum() == 32


def test_two_models_compiled_with_the_same_backend_options_get_separate_controllers() -> None:
    # Dynamo shares compiled code between equal backends; each model still gets its own state.
    options = {"compiler": "aot_eager", "manual": True}
    first, second = (
        torch.nn.Sequential(torch.nn.Linear(4, 4)),
        torch.nn.Sequential(torch.nn.Linear(4, 4)),
    )
    torch.compile(first, backend="resu", options=options)(torch.randn(2, 4))
    torch.compile(second, backend="resu", options=options)(torch.randn(2, 4))
    controller_a, controller_b = resu.controller(first), resu.controller(second)
    assert controller_a is not controller_b
    assert controller_b.state.get(second[0].weight) is not None
    controller_a.prune(0.5)
    assert controller_b.masks() == {"0.weight": None}
