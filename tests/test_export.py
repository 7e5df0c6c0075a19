"""``model.resu.export()``: a plain, loadable state dict of the original model, masks applied."""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
from tests.zoo import ZOO_BY_NAME


def _train(entry, compiled, optimizer, steps: int, offset: int = 0) -> None:
    for step in range(steps):
        loss = entry.loss_fn(compiled(*entry.make_batch(offset + step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        compiled.resu.step(optimizer)


def _schedule(name: str):
    """prune -> a few steps -> enter_resu -> a few steps -> commit -> a few sparse steps."""
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.6, manual=True, theta_lr=1e-2, compiler="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    _train(entry, compiled, optimizer, 2)
    compiled.resu.prune()
    _train(entry, compiled, optimizer, 2, offset=2)
    compiled.resu.enter_resu()
    _train(entry, compiled, optimizer, 3, offset=4)
    compiled.resu.commit()
    _train(entry, compiled, optimizer, 2, offset=7)
    return entry, model, compiled, optimizer


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_export_loads_into_a_plain_model_and_matches_the_sparse_outputs(name: str) -> None:
    entry, model, compiled, _ = _schedule(name)
    controller = compiled.resu
    assert controller.phase is resu.Phase.TRAIN
    exported = controller.export()
    assert set(exported) == set(entry.build().state_dict())
    assert not any(key.startswith("_orig_mod.") for key in exported)
    for value in exported.values():
        assert value.device.type == "cpu"
        assert not value.requires_grad
    # Passing the model (original or compiled wrapper) gives the same dict.
    for other in (controller.export(model), controller.export(compiled)):
        assert set(other) == set(exported)
        assert all(torch.equal(other[k], exported[k]) for k in exported)

    fresh = entry.build()
    fresh.load_state_dict(exported, strict=True)
    batch = entry.make_batch(123)
    with torch.no_grad():
        expected = compiled(*batch)
        got = fresh(*batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    managed = {w.name: w for w in controller.state}
    commit = next(e for e in controller.history if e["event"] == "commit")
    resurrected = {
        n: layer["resurrected"] - layer["resurrected_trained"]
        for n, layer in commit["layers"].items()
    }
    assert set(managed) == set(entry.expected_managed)
    for name_, weight in managed.items():
        mask = weight.mask()
        value = exported[name_]
        assert torch.count_nonzero(value[~mask]) == 0
        assert torch.equal(value[mask], weight.param.detach()[mask])
        # An active weight can be exactly 0 (a resurrected untrained zero whose input column is
        # dead), so the nonzero count is that of the live active values, at most the active count.
        nonzero = int(torch.count_nonzero(value))
        assert nonzero == int(torch.count_nonzero(weight.param.detach()[mask]))
        assert nonzero <= weight.active_count()
        assert nonzero >= weight.active_count() - int(resurrected[name_])
    # Unmanaged entries are unchanged, and are clones rather than views of the live tensors.
    live = model.state_dict()
    for key, value in exported.items():
        if key not in managed:
            assert torch.equal(value, live[key])
            assert value.data_ptr() != live[key].data_ptr()


def test_export_mid_resu_drops_theta() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, manual=True, theta_lr=0.1, compiler="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    _train(entry, compiled, optimizer, 1)
    compiled.resu.prune()
    compiled.resu.enter_resu()
    _train(entry, compiled, optimizer, 3, offset=1)
    exported = compiled.resu.export()
    for weight in compiled.resu.state:
        mask, selection = weight.mask(), weight.selection()
        live = weight.param.detach()
        assert torch.count_nonzero(live[selection]) > 0, "theta should be live in W's slots"
        value = exported[weight.name]
        assert torch.count_nonzero(value[~mask]) == 0, "theta leaked into the export"
        assert torch.equal(value[mask], live[mask])
        nonzero = int(torch.count_nonzero(value))
        assert nonzero == int(torch.count_nonzero(live[mask])) == weight.active_count()
    # The live weights still hold theta: export does not modify the model.
    assert all(
        torch.count_nonzero(w.param.detach()[w.selection()]) > 0 for w in compiled.resu.state
    )
    fresh = entry.build()
    fresh.load_state_dict(exported, strict=True)


def test_export_before_prune_is_the_plain_state_dict() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    compiled(*entry.make_batch(0))
    exported = compiled.resu.export()
    live = model.state_dict()
    assert set(exported) == set(live)
    assert all(torch.equal(exported[k], live[k]) for k in live)
