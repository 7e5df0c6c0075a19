"""State survives save and load: a run resumed from a checkpoint continues bit for bit."""

from __future__ import annotations

import io

import pytest
import torch

import resu_compile as resu
from tests.zoo import ZOO_BY_NAME

OPTIONS = {"sparsity": 0.6, "cycles": 2, "steps_per_cycle": 10, "compiler": "aot_eager"}


def _build(theta_optimizer: str, seed_offset: int = 0):
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    if seed_offset:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(float(seed_offset))  # a different starting point, overwritten by load
    compiled = resu.compile(model, theta_optimizer=theta_optimizer, **OPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return entry, model, compiled, optimizer


def _train(entry, compiled, optimizer, steps: range) -> None:
    for step in steps:
        loss = entry.loss_fn(compiled(*entry.make_batch(step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        compiled.resu.step(optimizer)


def _roundtrip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("theta_optimizer", ["sgd", "adamw"])
# Every phase boundary of cycle 0 (prune after step 6, RESU entry after 7, commit after 10), a
# mid-RESU step, and a mid-TRAIN step of cycle 1.
@pytest.mark.parametrize("save_at", [6, 7, 8, 10, 16])
def test_resume_from_checkpoint_is_bit_identical(theta_optimizer: str, save_at: int) -> None:
    entry, model, compiled, optimizer = _build(theta_optimizer)
    _train(entry, compiled, optimizer, range(save_at))
    if save_at == 8:
        assert compiled.resu.phase is resu.Phase.RESU
    checkpoint = _roundtrip(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "resu": compiled.resu.state_dict(),
        }
    )
    _train(entry, compiled, optimizer, range(save_at, 20))

    torch._dynamo.reset()
    _, fresh_model, fresh, fresh_optimizer = _build(theta_optimizer, seed_offset=1)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    fresh.resu.load_state_dict(checkpoint["resu"])
    _train(entry, fresh, fresh_optimizer, range(save_at, 20))

    for (name, expected), (_, got) in zip(
        model.named_parameters(), fresh_model.named_parameters(), strict=True
    ):
        assert torch.equal(got, expected), name
    assert fresh.resu.masks().keys() == compiled.resu.masks().keys()
    for name, mask in compiled.resu.masks().items():
        assert torch.equal(fresh.resu.masks()[name], mask)
    assert fresh.resu.history == compiled.resu.history
    assert fresh.resu.phase is resu.Phase.DONE


def test_loading_a_checkpoint_of_another_method_fails_and_changes_nothing() -> None:
    entry, _, compiled, optimizer = _build("sgd")
    _train(entry, compiled, optimizer, range(8))
    state = compiled.resu.state_dict()
    torch._dynamo.reset()
    entry = ZOO_BY_NAME["mlp"]
    other = resu.compile(
        entry.build(), sparsity=0.5, cycles=2, steps_per_cycle=10, compiler="aot_eager"
    )
    other(*entry.make_batch(0))
    with pytest.raises(ValueError, match="option 'sparsity' differs"):
        other.resu.load_state_dict(state)
    assert other.resu.phase is resu.Phase.TRAIN and other.resu.step_count == 0
    assert all(mask is None for mask in other.resu.masks().values())


def test_loading_a_checkpoint_of_another_managed_set_fails_and_changes_nothing() -> None:
    entry, _, compiled, optimizer = _build("sgd")
    _train(entry, compiled, optimizer, range(8))
    state = compiled.resu.state_dict()
    state["weights"]["head.weight"] = state["weights"].pop("fc3.weight")
    torch._dynamo.reset()
    _, _, fresh, _ = _build("sgd")
    fresh(*entry.make_batch(0))
    with pytest.raises(ValueError, match=r"'fc3\.weight'|'head\.weight'"):
        fresh.resu.load_state_dict(state)
    assert fresh.resu.phase is resu.Phase.TRAIN
    assert all(mask is None for mask in fresh.resu.masks().values())


def test_loading_a_checkpoint_with_other_shapes_fails_and_changes_nothing() -> None:
    entry, _, compiled, optimizer = _build("sgd")
    _train(entry, compiled, optimizer, range(8))
    state = compiled.resu.state_dict()
    state["weights"]["fc2.weight"]["shape"] = [3, 3]
    torch._dynamo.reset()
    _, _, fresh, _ = _build("sgd")
    fresh(*entry.make_batch(0))
    with pytest.raises(ValueError, match=r"shape mismatch for 'fc2\.weight'"):
        fresh.resu.load_state_dict(state)
    assert all(mask is None for mask in fresh.resu.masks().values())
