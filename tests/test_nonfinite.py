"""A step whose managed gradients hold NaN or Inf never corrupts weights, theta or masks."""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
from tests.zoo import ZOO_BY_NAME


def _setup(phase: str, gradient_mask: str, nan_policy: str = "skip"):
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(
        model,
        sparsity=0.5,
        manual=True,
        compiler="aot_eager",
        gradient_mask=gradient_mask,
        nan_policy=nan_policy,
        theta_optimizer="adamw",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    entry.loss_fn(compiled(*entry.make_batch(0))).backward()
    compiled.resu.step(optimizer)
    compiled.resu.prune()
    if phase == "resu":
        compiled.resu.enter_resu()
    return entry, model, compiled, optimizer


def _poisoned_step(entry, model, compiled, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    entry.loss_fn(compiled(*entry.make_batch(1))).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    model.fc2.weight.grad[1, 1] = float("inf")
    compiled.resu.step(optimizer)


@pytest.mark.parametrize(
    ("phase", "gradient_mask"), [("resu", "optimizer"), ("sparse", "optimizer")]
)
def test_nonfinite_step_is_skipped_and_counted(phase: str, gradient_mask: str) -> None:
    entry, model, compiled, optimizer = _setup(phase, gradient_mask)
    managed = {w.name: w.param.detach().clone() for w in compiled.resu.state}
    masks = compiled.resu.masks()
    _poisoned_step(entry, model, compiled, optimizer)
    for weight in compiled.resu.state:
        assert torch.equal(weight.param.detach(), managed[weight.name]), weight.name
        assert torch.equal(weight.mask(), masks[weight.name])
        assert torch.isfinite(weight.param).all()
    assert compiled.resu.nonfinite_steps == 1
    # The next finite step trains again.
    optimizer.zero_grad(set_to_none=True)
    entry.loss_fn(compiled(*entry.make_batch(2))).backward()
    compiled.resu.step(optimizer)
    assert any(not torch.equal(w.param.detach(), managed[w.name]) for w in compiled.resu.state)


def test_graph_mask_keeps_pruned_slots_zero_under_nonfinite_gradients() -> None:
    entry, _, compiled, optimizer = _setup("sparse", "graph")
    optimizer.zero_grad(set_to_none=True)
    (x,) = entry.make_batch(1)
    x[:, 0] = float("nan")  # every gradient of fc1's input column 0 is NaN
    entry.loss_fn(compiled(x)).backward()
    weight = compiled.resu.state.by_name("fc1.weight")
    pruned = ~weight.mask()
    assert torch.count_nonzero(weight.param.grad[pruned]) == 0  # NaN dropped on P in the graph
    compiled.resu.step(optimizer)
    for managed in compiled.resu.state:
        assert torch.count_nonzero(managed.param.detach()[~managed.mask()]) == 0


def test_nan_policy_raise_raises_and_changes_nothing() -> None:
    entry, model, compiled, optimizer = _setup("resu", "optimizer", nan_policy="raise")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        _poisoned_step(entry, model, compiled, optimizer)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
