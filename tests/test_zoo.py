"""Sanity checks of the model zoo itself, run eagerly, so a zoo bug is not blamed on the compiler."""

from __future__ import annotations

import pytest
import torch

from tests.zoo import ZOO, ZOO_BY_NAME, ZooEntry


@pytest.fixture(params=ZOO, ids=lambda entry: entry.name)
def entry(request: pytest.FixtureRequest) -> ZooEntry:
    zoo_entry: ZooEntry = request.param
    for module in zoo_entry.requires:
        pytest.importorskip(module)
    return zoo_entry


def test_names_unique() -> None:
    assert len(ZOO_BY_NAME) == len(ZOO)


def test_forward_backward(entry: ZooEntry) -> None:
    model = entry.build()
    loss = entry.loss_fn(model(*entry.make_batch(0)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()

    params = dict(model.named_parameters())
    assert entry.expected_managed <= params.keys()
    for name in entry.expected_managed:
        param = params[name]
        # The structural half of the managed rule; the "only matmul uses" half is the pass's job.
        assert param.dtype.is_floating_point and param.requires_grad and param.dim() >= 2, name
        if entry.name != "control_flow":  # there only the branch taken gets a gradient
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_deterministic(entry: ZooEntry) -> None:
    rng_state = torch.get_rng_state()
    first, second = entry.build(), entry.build()
    assert torch.equal(torch.get_rng_state(), rng_state), "build must not consume the global RNG"
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(entry.make_batch(3), entry.make_batch(3), strict=True):
        assert torch.equal(a, b)


def test_control_flow_seeds_take_both_branches() -> None:
    entry = ZOO_BY_NAME["control_flow"]
    model = entry.build()
    for seed, taken, skipped in ((0, "branch_a", "branch_b"), (1, "branch_b", "branch_a")):
        model.zero_grad(set_to_none=True)
        entry.loss_fn(model(*entry.make_batch(seed))).backward()
        assert getattr(model, taken).weight.grad is not None
        assert getattr(model, skipped).weight.grad is None
