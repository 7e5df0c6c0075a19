"""Nothing silently wrong: non-finite weights never decide a mask, and reported sparsity is the
masks' own."""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
from tests.zoo import ZOO_BY_NAME

ENTRY = ZOO_BY_NAME["mlp"]


def _compiled(**options: object) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = ENTRY.build()
    compiled = resu.compile(model, compiler="aot_eager", **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return compiled, optimizer


def _train(compiled: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ENTRY.loss_fn(compiled(*ENTRY.make_batch(step))).backward()
        compiled.resu.step(optimizer)


def _poison(compiled: torch.nn.Module) -> str:
    weight = next(iter(compiled.resu.state))
    with torch.no_grad():
        weight.param[0, 0] = float("nan")
    return weight.name


def test_manual_prune_refuses_a_nan_weight_and_changes_nothing() -> None:
    compiled, optimizer = _compiled(sparsity=0.5, manual=True)
    _train(compiled, optimizer, 1)
    name = _poison(compiled)
    before = {n: p.detach().clone() for n, p in compiled.resu.module().named_parameters()}
    with pytest.raises(FloatingPointError, match=name):
        compiled.resu.prune()
    assert all(mask is None for mask in compiled.resu.masks().values())
    assert not compiled.resu.history
    for n, p in compiled.resu.module().named_parameters():
        assert torch.equal(p.detach(), before[n]) or torch.isnan(before[n]).any()


def test_a_scheduled_prune_waits_for_finite_weights_and_then_keeps_exact_counts() -> None:
    compiled, optimizer = _compiled(sparsity=0.5, cycles=1, steps_per_cycle=10)
    _train(compiled, optimizer, 5)  # the prune is due after step 6
    optimizer.zero_grad(set_to_none=True)
    ENTRY.loss_fn(compiled(*ENTRY.make_batch(5))).backward()
    _poison(compiled)  # after backward: the gradients are finite, the weight is not
    with pytest.warns(UserWarning, match="waits for finite weights"):
        compiled.resu.step(optimizer)
    assert compiled.resu.postponed_transitions >= 1
    assert compiled.resu.history[-1]["event"] == "postponed"
    assert all(mask is None for mask in compiled.resu.masks().values())
    with torch.no_grad():
        for weight in compiled.resu.state:
            weight.param.nan_to_num_(0.0)
    _train(compiled, optimizer, 1)
    prunes = [e for e in compiled.resu.history if e["event"] == "prune"]
    assert len(prunes) == 1
    for weight in compiled.resu.state:
        mask = weight.mask()
        assert int(mask.sum()) == weight.numel // 2
        assert weight.sparsity() == pytest.approx(1 - int(mask.sum()) / weight.numel)
        assert prunes[0]["layers"][weight.name] == weight.sparsity()


def test_nan_policy_raise_refuses_the_transition() -> None:
    compiled, optimizer = _compiled(sparsity=0.5, cycles=1, steps_per_cycle=10, nan_policy="raise")
    _train(compiled, optimizer, 5)
    optimizer.zero_grad(set_to_none=True)
    ENTRY.loss_fn(compiled(*ENTRY.make_batch(5))).backward()
    name = _poison(compiled)
    with pytest.raises(FloatingPointError, match=f"prune: managed weight\\(s\\) \\['{name}'\\]"):
        compiled.resu.step(optimizer)
    assert all(mask is None for mask in compiled.resu.masks().values())


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_option_values_are_refused(value: float) -> None:
    for option in ("theta_lr", "theta_weight_decay", "theta_init_eps"):
        with pytest.raises(ValueError, match=f"option '{option}'"):
            resu.ResuConfig.from_options({option: value})


def test_recompiling_a_managed_model_with_other_options_is_refused() -> None:
    model = ENTRY.build()
    first = torch.compile(model, backend="resu", options={"sparsity": 0.5, "compiler": "eager"})
    first(*ENTRY.make_batch(0))
    again = torch.compile(model, backend="resu", options={"sparsity": 0.9, "compiler": "eager"})
    with pytest.raises(Exception, match="sparsity differ"):
        again(*ENTRY.make_batch(1))
    assert resu.controller(model).config.sparsity == 0.5
