"""The whole method through the controller: baselines, selective modes, amnesty options, N:M,
densification and pauses, each with METHOD.md's invariants checked after every step."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

import resu_compile as resu
from resu_compile.kernels.segmented_topk import truncated_keys
from resu_compile.method.amnesty import amnesty_mask, amnesty_scores
from resu_compile.method.pruning import layer_keep_counts
from resu_compile.method.schedule import amnesty_budget
from resu_compile.method.topk import topk_mask
from resu_compile.optim.updates import weight_shaped_state
from tests.invariants import CheckedStepper, assert_sparse_invariants
from tests.zoo import ZOO_BY_NAME

ENTRY = ZOO_BY_NAME["mlp"]


def _build(**options: Any) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ENTRY.build()
    options = {"compiler": "aot_eager", "theta_lr": 1e-2, **options}
    compiled = resu.compile(model, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return compiled, model, optimizer


def _backward(compiled: Any, optimizer: torch.optim.Optimizer, step: int) -> None:
    loss = ENTRY.loss_fn(compiled(*ENTRY.make_batch(step)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()


def _train(
    compiled: Any,
    optimizer: torch.optim.Optimizer,
    steps: int,
    after: Callable[[int], None] | None = None,
) -> None:
    stepper = CheckedStepper(compiled.resu, optimizer)
    for step in range(steps):
        _backward(compiled, optimizer, step)
        stepper.step()
        if after is not None:
            after(step)


def _events(controller: resu.PhaseController) -> list[tuple[str, int]]:
    return [(entry["event"], entry["step"]) for entry in controller.history]


# -- baselines on the same compile path ------------------------------------------------------


def test_dense_method_never_prunes() -> None:
    compiled, _, optimizer = _build(method="dense", cycles=2, steps_per_cycle=10)
    _train(compiled, optimizer, 20)
    assert compiled.resu.history == []
    assert all(mask is None for mask in compiled.resu.masks().values())
    assert compiled.resu.phase is resu.Phase.DONE


def test_oneshot_prunes_once_to_the_target_then_fine_tunes() -> None:
    compiled, _, optimizer = _build(method="oneshot", sparsity=0.8, cycles=2, steps_per_cycle=10)
    _train(compiled, optimizer, 20)
    assert _events(compiled.resu) == [("prune", 6)]
    for weight in compiled.resu.state:
        assert weight.active_count() == int((1 - 0.8) * weight.numel)


def test_gmp_prunes_every_cycle_on_the_cubic_schedule_and_masks_only_shrink() -> None:
    compiled, _, optimizer = _build(method="gmp", sparsity=0.8, cycles=3, steps_per_cycle=10)
    masks: list[dict[str, torch.Tensor]] = []

    def record(step: int) -> None:
        if compiled.resu.history and compiled.resu.history[-1]["step"] == step + 1:
            masks.append({n: m.clone() for n, m in compiled.resu.masks().items()})

    _train(compiled, optimizer, 30, after=record)
    assert _events(compiled.resu) == [("prune", 6), ("prune", 16), ("prune", 26)]
    targets = [entry["target"] for entry in compiled.resu.history]
    assert targets == pytest.approx([0.8 * (1 - (1 - (c + 1) / 3) ** 3) for c in range(3)])
    for earlier, later in itertools.pairwise(masks):
        for name in earlier:
            assert not (later[name] & ~earlier[name]).any(), "GMP revived a pruned weight"


def test_rigl_starts_sparse_with_erk_and_updates_on_its_interval() -> None:
    compiled, _, optimizer = _build(
        method="rigl", sparsity=0.7, cycles=2, steps_per_cycle=10, rigl_interval=4
    )
    weights: list[Any] = []
    grown_seen: list[int] = []
    masks_before: dict[str, torch.Tensor] = {}

    def check_growth(step: int) -> None:
        history = compiled.resu.history
        if history[-1]["event"] == "rigl" and history[-1]["step"] == step + 1:
            for weight in compiled.resu.state:
                grown = weight.mask() & ~masks_before[weight.name]
                grown_seen.append(int(grown.sum()))
                # RigL's new connections start at 0 with zero optimizer state.
                assert torch.count_nonzero(weight.param.detach()[grown]) == 0
                for state in weight_shaped_state(optimizer, weight.param):
                    assert torch.count_nonzero(state[grown]) == 0
        masks_before.update({w.name: w.mask().clone() for w in compiled.resu.state})

    _backward(compiled, optimizer, 0)
    weights = list(compiled.resu.state)
    stepper = CheckedStepper(compiled.resu, optimizer)
    stepper.step()
    masks_before.update({w.name: w.mask().clone() for w in weights})
    for step in range(1, 20):
        _backward(compiled, optimizer, step)
        stepper.step()
        check_growth(step)
    # Initial prune before the first update, then every 4 steps until 0.75 * 20 = 15.
    assert _events(compiled.resu) == [("prune", 0), ("rigl", 4), ("rigl", 8), ("rigl", 12)]
    counts = layer_keep_counts(
        [w.numel for w in weights], 0.7, "erk", shapes=[tuple(w.shape) for w in weights]
    )
    assert [w.active_count() for w in weights] == counts
    assert sum(grown_seen) > 0


@pytest.mark.parametrize("gradient_mask", ["graph", "optimizer"])
def test_rigl_grows_from_the_dense_gradient_in_either_mask_placement(gradient_mask: str) -> None:
    compiled, _, optimizer = _build(
        method="rigl",
        sparsity=0.7,
        cycles=1,
        steps_per_cycle=10,
        rigl_interval=3,
        gradient_mask=gradient_mask,
    )
    _train(compiled, optimizer, 4)
    update = compiled.resu.history[-1]
    assert update["event"] == "rigl"
    # Pruned gradients are real on the update step, so growth picks coordinates, not index 0..k.
    assert sum(layer["grown"] for layer in update["layers"].values()) > 0


# -- selective modes ---------------------------------------------------------------------------


def _enter_resu_by_hand(**options: Any) -> tuple[Any, torch.optim.Optimizer]:
    compiled, _, optimizer = _build(manual=True, sparsity=0.6, **options)
    _backward(compiled, optimizer, 0)
    compiled.resu.step(optimizer)
    compiled.resu.prune()
    compiled.resu.enter_resu()
    return compiled, optimizer


def test_topk_selection_is_chosen_from_the_first_resu_gradient() -> None:
    compiled, optimizer = _enter_resu_by_hand(selection="topk", alpha=0.25)
    _backward(compiled, optimizer, 1)
    expected = {}
    for weight in compiled.resu.state:
        pruned = ~weight.mask()
        count = int(0.25 * int(pruned.sum()))
        expected[weight.name] = topk_mask(weight.param.grad.abs(), count, eligible=pruned)
    compiled.resu.step(optimizer)
    for weight in compiled.resu.state:
        assert torch.equal(weight.selection(), expected[weight.name])
        assert torch.count_nonzero(weight.param.detach()[expected[weight.name]]) > 0


def test_topk_refresh_reselects_and_zeroes_what_leaves() -> None:
    compiled, optimizer = _enter_resu_by_hand(selection="topk", refresh=2, alpha=0.25)
    stepper = CheckedStepper(compiled.resu, optimizer)
    selections = []
    for step in range(1, 6):
        _backward(compiled, optimizer, step)
        stepper.step()  # checks W[P \\ S] == 0 and W[A] frozen after every step
        selections.append({w.name: w.selection().clone() for w in compiled.resu.state})
    name = next(iter(selections[0]))
    assert torch.equal(selections[0][name], selections[1][name])  # steps 1-2: no refresh
    assert not torch.equal(selections[1][name], selections[2][name])  # step 3: re-chosen


def test_consistency_updates_only_the_selected_subset_by_c_times_g() -> None:
    compiled, optimizer = _enter_resu_by_hand(
        selection="consistency", theta_optimizer="sgd", theta_lr=0.5, alpha=0.2, freeze_active=True
    )
    _backward(compiled, optimizer, 1)
    before = {w.name: w.param.detach().clone() for w in compiled.resu.state}
    grads = {w.name: w.param.grad.clone() for w in compiled.resu.state}
    compiled.resu.step(optimizer)
    for weight in compiled.resu.state:
        pruned = ~weight.mask()
        p = int(pruned.sum())
        g = grads[weight.name]
        # First step from zero statistics: m = 0.1 g, v = 0.1 |g|, so C = |g| / (|g| + 1e-7).
        c = torch.where(pruned, (0.1 * g).abs() / ((0.1 * g.abs()) + 1e-8), 0.0)
        # Both top-k's rank |g| truncated to bfloat16, ties by index (METHOD.md's threshold rule).
        score = truncated_keys(g.abs(), 16)
        screened = topk_mask(score, int(0.5 * p), eligible=pruned)
        chosen = topk_mask(score, int(0.2 * p), eligible=screened & (c > 0.5))
        assert int(chosen.sum()) == min(int(0.2 * p), int((screened & (c > 0.5)).sum()))
        expected = torch.where(chosen, before[weight.name] - 0.5 * c * g, before[weight.name])
        torch.testing.assert_close(weight.param.detach(), expected)
        assert torch.equal(weight.param.detach()[~pruned], before[weight.name][~pruned])


# -- RESU phase options --------------------------------------------------------------------------


def test_freeze_active_false_trains_actives_and_theta_together() -> None:
    compiled, optimizer = _enter_resu_by_hand(freeze_active=False, theta_optimizer="adamw")
    active = {w.name: w.param.detach()[w.mask()].clone() for w in compiled.resu.state}
    theta = {w.name: w.param.detach()[w.selection()].clone() for w in compiled.resu.state}
    stepper = CheckedStepper(compiled.resu, optimizer)
    for step in range(1, 4):
        _backward(compiled, optimizer, step)
        stepper.step()  # W[P \\ S] == 0 and the user's optimizer state 0 on P
    for weight in compiled.resu.state:
        assert not torch.equal(weight.param.detach()[weight.mask()], active[weight.name])
        assert not torch.equal(weight.param.detach()[weight.selection()], theta[weight.name])


def _theta_after_resu_steps(scale: float | None, **options: Any) -> dict[str, torch.Tensor]:
    """Theta on S after three RESU steps, the optimizer's rate held at ``scale`` of its initial
    one by an LR scheduler (``None``: no scheduler)."""
    compiled, _, optimizer = _build(manual=True, sparsity=0.6, theta_optimizer="sgd", **options)
    scheduler = None
    if scale is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: scale)
    _backward(compiled, optimizer, 0)
    compiled.resu.step(optimizer)
    compiled.resu.prune()
    compiled.resu.enter_resu()
    for step in range(1, 4):
        _backward(compiled, optimizer, step)
        compiled.resu.step(optimizer)
        if scheduler is not None:
            scheduler.step()
    return {w.name: w.param.detach()[w.selection()].clone() for w in compiled.resu.state}


def test_theta_lr_schedule_optimizer_scales_theta_like_the_actives() -> None:
    followed = _theta_after_resu_steps(0.25, theta_lr_schedule="optimizer", theta_lr=1e-2)
    by_hand = _theta_after_resu_steps(0.25, theta_lr_schedule="constant", theta_lr=0.25e-2)
    unscaled = _theta_after_resu_steps(0.25, theta_lr_schedule="constant", theta_lr=1e-2)
    for name, theta in followed.items():
        torch.testing.assert_close(theta, by_hand[name])
        assert not torch.allclose(theta, unscaled[name])


def test_theta_lr_schedule_optimizer_without_a_scheduler_keeps_theta_lr() -> None:
    followed = _theta_after_resu_steps(None, theta_lr_schedule="optimizer", theta_lr=1e-2)
    constant = _theta_after_resu_steps(None, theta_lr_schedule="constant", theta_lr=1e-2)
    for name, theta in followed.items():
        torch.testing.assert_close(theta, constant[name])


def test_theta_follows_the_schedule_of_its_own_param_group() -> None:
    torch.manual_seed(0)
    model = ENTRY.build()
    compiled = resu.compile(
        model, compiler="aot_eager", manual=True, sparsity=0.6, theta_optimizer="sgd", theta_lr=1e-2
    )
    weights = [p for p in model.parameters() if p.dim() == 2]
    first, rest = weights[:1], weights[1:] + [p for p in model.parameters() if p.dim() != 2]
    optimizer = torch.optim.AdamW([{"params": first}, {"params": rest}], lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda _: 1.0, lambda _: 0.5])
    _backward(compiled, optimizer, 0)
    compiled.resu.prune()
    compiled.resu.enter_resu()
    _backward(compiled, optimizer, 1)
    state = list(compiled.resu.state)
    assert len(state) >= 2
    before = {w.name: (w.param.detach().clone(), w.param.grad.clone()) for w in state}
    compiled.resu.step(optimizer)
    for weight in state:
        fraction = 1.0 if weight.param is first[0] else 0.5
        selected = weight.selection()
        theta, grad = before[weight.name]
        expected = theta[selected] - 1e-2 * fraction * grad[selected]
        torch.testing.assert_close(weight.param.detach()[selected], expected)


@pytest.mark.parametrize("carry", [False, True])
def test_resurrected_state_starts_at_zero_or_carries_theta_moments(carry: bool) -> None:
    compiled, optimizer = _enter_resu_by_hand(theta_optimizer="adamw", carry_theta_state=carry)
    for step in range(1, 4):
        _backward(compiled, optimizer, step)
        compiled.resu.step(optimizer)
    old = {w.name: w.mask() for w in compiled.resu.state}
    moments = {
        w.name: optimizer.state[w.param]["exp_avg"].clone() for w in compiled.resu.state
    }  # theta's moments live in AdamW's pruned slots
    compiled.resu.commit()
    for weight in compiled.resu.state:
        resurrected = weight.mask() & ~old[weight.name]
        assert resurrected.any()
        state = optimizer.state[weight.param]["exp_avg"]
        expected = moments[weight.name][resurrected] if carry else torch.zeros(1)
        if carry:
            assert torch.equal(state[resurrected], expected)
            assert torch.count_nonzero(expected) > 0
        else:
            assert torch.count_nonzero(state[resurrected]) == 0


def test_gradient_amnesty_uses_g_of_the_last_resu_step() -> None:
    compiled, optimizer = _enter_resu_by_hand(amnesty_score="gradient")
    for step in range(1, 3):
        _backward(compiled, optimizer, step)
        compiled.resu.step(optimizer)
    budget = amnesty_budget(0, 5, 0.10, 0.02)
    expected = {}
    for weight in compiled.resu.state:
        scores = amnesty_scores(weight.param, "gradient", gradient=weight.param.grad)
        expected[weight.name] = amnesty_mask(
            scores,
            weight.mask(),
            weight.selection(),
            weight.keep_target,
            budget,
            gradient=weight.param.grad,
            active_count=weight.active_count(),
        ).mask
    compiled.resu.commit()
    for weight in compiled.resu.state:
        assert torch.equal(weight.mask(), expected[weight.name])


def test_gradient_amnesty_without_a_gradient_says_when_to_commit() -> None:
    compiled, optimizer = _enter_resu_by_hand(amnesty_score="gradient")
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="after backward"):
        compiled.resu.commit()


def test_wanda_amnesty_needs_calibration() -> None:
    compiled, _ = _enter_resu_by_hand(amnesty_score="wanda")
    with pytest.raises(RuntimeError, match="calibrate"):
        compiled.resu.commit()
    with torch.no_grad(), compiled.resu.calibrate():
        compiled(*ENTRY.make_batch(5))
    compiled.resu.commit()
    assert compiled.resu.history[-1]["event"] == "commit"


# -- N:M, densification, pauses -------------------------------------------------------------------


def _assert_two_of_four(controller: resu.PhaseController) -> None:
    for weight in controller.state:
        groups = weight.mask().reshape(weight.shape[0], -1, 4)
        assert torch.equal(groups.sum(-1), torch.full(groups.shape[:2], 2)), weight.name


def test_n_m_pattern_holds_after_every_prune_and_commit() -> None:
    compiled, _, optimizer = _build(
        sparsity=0.5, pattern="2:4", cycles=2, steps_per_cycle=10, exclude="fc3.*"
    )
    checked = []

    def check(step: int) -> None:
        last = compiled.resu.history[-1] if compiled.resu.history else None
        if last and last["step"] == step + 1 and last["event"] in ("prune", "commit"):
            _assert_two_of_four(compiled.resu)
            checked.append(last["event"])

    _train(compiled, optimizer, 20, after=check)
    assert checked == ["prune", "commit", "prune", "commit"]


def test_n_m_pattern_refuses_layers_whose_inputs_do_not_divide() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    compiled = resu.compile(model, manual=True, sparsity=0.5, pattern="2:4", compiler="aot_eager")
    compiled(torch.randn(2, 8)).sum().backward()
    before = {w.name: w.param.detach().clone() for w in compiled.resu.state}
    with pytest.raises(ValueError, match="6 inputs, not a multiple of 4"):
        compiled.resu.prune()
    assert all(mask is None for mask in compiled.resu.masks().values())
    for weight in compiled.resu.state:
        assert torch.equal(weight.param.detach(), before[weight.name])


def test_densification_list_is_followed_cycle_by_cycle() -> None:
    schedule = [0.8, 0.5, 0.2]
    compiled, _, optimizer = _build(
        sparsity=0.8, schedule=schedule, cycles=3, steps_per_cycle=10, distribution="uniform"
    )
    _train(compiled, optimizer, 30)
    commits = [entry for entry in compiled.resu.history if entry["event"] == "commit"]
    assert [entry["layers"]["fc1.weight"]["target"] for entry in commits] == schedule
    weights = {w.name: w for w in compiled.resu.state}
    for entry, target in zip(commits, schedule, strict=True):
        for name, layer in entry["layers"].items():
            numel = weights[name].numel
            assert layer["sparsity"] == pytest.approx(1 - int((1 - target) * numel) / numel)
    # Densifying: the later commits bring back more weights than they had reserved places for.
    assert commits[-1]["layers"]["fc1.weight"]["resurrected"] > 0


def test_pause_callbacks_run_once_after_their_cycles_and_training_resumes() -> None:
    calls: list[tuple[int, int, str]] = []

    def reinforcement_stage(model: torch.nn.Module, cycle: int) -> None:
        calls.append((cycle, compiled.resu.step_count, compiled.resu.phase.value))
        masks = {n: m.clone() for n, m in compiled.resu.masks().items()}
        for step in range(3):  # the stage trains the (eager) model itself; masks stay enforced
            loss = ENTRY.loss_fn(model(*ENTRY.make_batch(100 + step)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            compiled.resu.step(optimizer)
            assert_sparse_invariants(compiled.resu, optimizer)
        assert all(torch.equal(compiled.resu.masks()[n], m) for n, m in masks.items())

    compiled, _, optimizer = _build(
        cycles=3,
        steps_per_cycle=10,
        pause_after=[0, 2],
        on_pause=reinforcement_stage,
        gradient_mask="graph",
    )
    _train(compiled, optimizer, 30)
    assert calls == [(0, 10, "paused"), (2, 30, "paused")]
    assert compiled.resu.paused_steps == 6
    # The schedule did not move during the pauses: same events as an unpaused run.
    assert [e for e in _events(compiled.resu) if e[0] != "pause"] == [
        ("prune", 6),
        ("resu", 7),
        ("commit", 10),
        ("prune", 16),
        ("resu", 17),
        ("commit", 20),
        ("prune", 26),
        ("resu", 27),
        ("commit", 30),
    ]
    assert compiled.resu.phase is resu.Phase.DONE


def test_pause_without_callback_waits_for_resume() -> None:
    compiled, _, optimizer = _build(cycles=2, steps_per_cycle=10, pause_after=[0])
    _train(compiled, optimizer, 13)
    assert compiled.resu.phase is resu.Phase.PAUSED
    assert compiled.resu.step_count == 10 and compiled.resu.paused_steps == 3
    compiled.resu.resume()
    assert compiled.resu.phase is resu.Phase.TRAIN
    _train(compiled, optimizer, 10)
    assert compiled.resu.phase is resu.Phase.DONE
    with pytest.raises(RuntimeError, match="not paused"):
        compiled.resu.resume()


def test_a_paused_schedule_resumes_from_a_checkpoint() -> None:
    compiled, model, optimizer = _build(cycles=2, steps_per_cycle=10, pause_after=[0])
    _train(compiled, optimizer, 11)
    saved = (model.state_dict(), optimizer.state_dict(), compiled.resu.state_dict())
    torch._dynamo.reset()
    fresh, fresh_model, fresh_optimizer = _build(cycles=2, steps_per_cycle=10, pause_after=[0])
    _backward(fresh, fresh_optimizer, 0)
    fresh_model.load_state_dict(saved[0])
    fresh_optimizer.load_state_dict(saved[1])
    fresh.resu.load_state_dict(saved[2])
    assert fresh.resu.phase is resu.Phase.PAUSED and fresh.resu.paused_steps == 1
    fresh.resu.resume()
    assert fresh.resu.phase is resu.Phase.TRAIN and fresh.resu.step_count == 10


def test_eager_training_in_a_pause_keeps_pruned_weights_at_zero() -> None:
    """After a sparse-variant forward, an eager forward's gradient is not masked by any graph."""

    def eager_stage(model: torch.nn.Module, cycle: int) -> None:
        for step in range(2):
            loss = ENTRY.loss_fn(model(*ENTRY.make_batch(200 + step)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            compiled.resu.step(optimizer)
            assert_sparse_invariants(compiled.resu, optimizer)

    compiled, _, optimizer = _build(
        method="gmp",
        cycles=2,
        steps_per_cycle=10,
        pause_after=[0],
        on_pause=eager_stage,
        gradient_mask="graph",
    )
    _train(compiled, optimizer, 20)
    assert compiled.resu.paused_steps == 2
