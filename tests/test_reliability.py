"""Nothing silently wrong: non-finite weights never decide a mask, and reported sparsity is the
masks' own."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import resu_compile as resu
from resu_compile.compiler import registry
from resu_compile.optim import updates
from tests.invariants import (
    assert_exact_counts,
    assert_run_unchanged,
    assert_sparse_invariants,
    snapshot_run,
)
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
    assert_exact_counts(compiled.resu, 0.5)
    for weight in compiled.resu.state:
        mask = weight.mask()
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


def test_adam_bias_correction_uses_the_optimizers_own_step_with_a_graph_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Torch's AdamW steps the managed weights in the sparse phases (the graph masks their
    gradient) and advances their step counters there; our kernel must count from those."""
    compiled, optimizer = _compiled(
        sparsity=0.5, cycles=2, steps_per_cycle=10, gradient_mask="graph"
    )
    used: list[tuple[int, list[int]]] = []
    kernel = updates.masked_adam_

    def spy(params: list[torch.Tensor], *args: object, step: int, **kwargs: object) -> None:
        used.append((step, [int(optimizer.state[p]["step"]) for p in params]))
        kernel(params, *args, step=step, **kwargs)

    monkeypatch.setattr(updates, "masked_adam_", spy)
    _train(compiled, optimizer, 20)
    assert {step for step, _ in used} >= {18, 19}  # the RESU phase of cycle 1 ran our kernel
    for step, expected in used:
        assert expected == [step] * len(expected)


def test_a_pause_callback_stepping_outside_resu_leaves_the_masks_enforced() -> None:
    def plain_stage(model: torch.nn.Module, cycle: int) -> None:
        for step in range(3):
            optimizer.zero_grad(set_to_none=True)
            ENTRY.loss_fn(model(*ENTRY.make_batch(100 + step))).backward()
            optimizer.step()  # not through resu: dense updates of the pruned coordinates
        dirty = [w for w in compiled.resu.state if w.param.detach()[~w.mask()].any()]
        assert dirty  # what the controller must repair

    compiled, optimizer = _compiled(
        sparsity=0.5, cycles=2, steps_per_cycle=10, pause_after=[0], on_pause=plain_stage
    )
    with pytest.warns(UserWarning, match="stepped the optimizer outside resu"):
        _train(compiled, optimizer, 10)
    assert compiled.resu.phase is resu.Phase.TRAIN
    assert_sparse_invariants(compiled.resu, optimizer)
    _train(compiled, optimizer, 10)
    assert compiled.resu.phase is resu.Phase.DONE
    assert_sparse_invariants(compiled.resu, optimizer)


class _Pair(torch.nn.Module):
    def __init__(self, shared: torch.nn.Linear) -> None:
        super().__init__()
        self.shared = shared
        self.own = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.own(self.shared(x))


@pytest.mark.parametrize("first_ran_a_forward", [False, True])
def test_compiling_a_second_model_sharing_a_submodule_is_refused(first_ran_a_forward: bool) -> None:
    shared = torch.nn.Linear(8, 8)
    first, second = _Pair(shared), _Pair(shared)
    compiled = resu.compile(first, sparsity=0.5, compiler="aot_eager")
    if first_ran_a_forward:
        compiled(torch.randn(2, 8))
    controllers = len(registry._ALL)
    with pytest.raises(ValueError, match=r"parameter 'shared\.weight' is shared .*\(_Pair\)"):
        resu.compile(second, sparsity=0.5, compiler="aot_eager")
    assert len(registry._ALL) == controllers
    assert registry.registered(second) is None and "resu" not in second.__dict__


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"dynamic": "x"}, TypeError, "dynamic must be a bool or None, got 'x'"),
        ({"fullgraph": "yes"}, TypeError, "fullgraph must be a bool, got 'yes'"),
        ({"inplace": 1}, TypeError, "inplace must be a bool, got 1"),
        ({"config": 0.5}, TypeError, "config must be a ResuConfig or a dict"),
        ({"config": {"sparsity": 2.0}}, ValueError, "option 'sparsity'"),
    ],
)
def test_bad_compile_arguments_are_refused_and_leave_the_model_unregistered(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    model = ENTRY.build()
    options = {} if "config" in arguments else {"compiler": "aot_eager"}
    with pytest.raises(error, match=message):
        resu.compile(model, **options, **arguments)
    assert registry.find_controller(model) is None
    compiled = resu.compile(model, sparsity=0.5, compiler="aot_eager")  # a retry works
    assert compiled.resu.config.sparsity == 0.5


def test_a_config_dict_is_read_as_options() -> None:
    compiled = resu.compile(ENTRY.build(), config={"sparsity": 0.5, "compiler": "aot_eager"})
    assert compiled.resu.config == resu.ResuConfig(sparsity=0.5, compiler="aot_eager")


def test_a_compile_past_dynamos_recompile_limit_is_refused() -> None:
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(2):
            compiled, optimizer = _compiled(sparsity=0.5)
            _train(compiled, optimizer, 1)
        model = ENTRY.build()
        with pytest.raises(RuntimeError, match=r"2 compiled versions of MLP\.forward"):
            resu.compile(model, compiler="aot_eager")
        assert registry.find_controller(model) is None


def _step_before_any_forward() -> None:
    model = ENTRY.build()
    compiled = resu.compile(model, compiler="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters())
    compiled.resu.attach(optimizer)
    optimizer.step()


def _step_after_another_backend() -> None:
    model = ENTRY.build()
    compiled = resu.compile(model, compiler="aot_eager")
    wrapped = torch.compile(compiled, backend="aot_eager")
    ENTRY.loss_fn(wrapped(*ENTRY.make_batch(0))).backward()
    compiled.resu.step(torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (_step_before_any_forward, "no forward pass has run through the compiled model yet"),
        (_step_after_another_backend, r"no graph reached the resu backend.*torch\.compile\(\)"),
    ],
)
def test_a_step_without_managed_weights_says_why(call: Callable[[], None], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_reloading_the_live_optimizer_after_a_prune_keeps_training_sparse() -> None:
    compiled, optimizer = _compiled(sparsity=0.5, cycles=1, steps_per_cycle=10)
    _train(compiled, optimizer, 7)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(compiled, optimizer, 3)
    assert compiled.resu.phase is resu.Phase.DONE
    assert_sparse_invariants(compiled.resu, optimizer)


def test_a_weight_first_used_in_the_resu_phase_trains_dense_until_the_commit() -> None:
    entry = ZOO_BY_NAME["control_flow"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, cycles=2, steps_per_cycle=10, compiler="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train(batches: range) -> None:
        for seed in batches:
            optimizer.zero_grad(set_to_none=True)
            entry.loss_fn(compiled(*entry.make_batch(seed))).backward()
            compiled.resu.step(optimizer)

    train(range(0, 16, 2))  # 8 steps on branch_a only: the RESU phase runs
    assert compiled.resu.phase is resu.Phase.RESU
    before = model.branch_b.weight.detach().clone()
    train(range(1, 2))  # branch_b's first use, in the RESU phase: no mask, no selection
    assert compiled.resu.state.by_name("branch_b.weight").mask() is None
    assert not torch.equal(model.branch_b.weight.detach(), before)  # it trained
    train(range(3, 25, 2))
    assert compiled.resu.phase is resu.Phase.DONE
    assert compiled.resu.masks()["branch_b.weight"] is not None
    assert_sparse_invariants(compiled.resu, optimizer)


@pytest.mark.parametrize(
    ("options", "steps", "message"),
    [
        ({"pattern": "3:7", "sparsity": 1 - 3 / 7}, 0, "16 inputs, not a multiple of 7"),
        ({"criterion": "wanda"}, 5, "criterion 'wanda' .*no calibrate pass"),
        (
            {"amnesty_score": "wanda"},
            9,
            "amnesty_score 'wanda' .*no calibrate pass",
        ),
    ],
)
def test_a_transition_that_cannot_run_is_refused_before_the_steps_update(
    options: dict[str, object], steps: int, message: str
) -> None:
    compiled, optimizer = _compiled(cycles=1, steps_per_cycle=10, **options)
    if options.get("amnesty_score") == "wanda":  # norms for the prune, none at the commit
        _train(compiled, optimizer, 1)
        compiled.resu.state.by_name("fc1.weight").input_sq_norms = None
    _train(compiled, optimizer, steps - (1 if options.get("amnesty_score") else 0))
    optimizer.zero_grad(set_to_none=True)
    ENTRY.loss_fn(compiled(*ENTRY.make_batch(steps))).backward()
    before = snapshot_run(compiled, optimizer)
    with pytest.raises((ValueError, RuntimeError), match=message):
        compiled.resu.step(optimizer)
    assert_run_unchanged(before, snapshot_run(compiled, optimizer))


@pytest.mark.parametrize("theta_optimizer", ["sgd", "adamw"])
def test_clipping_with_the_optimizer_mask_matches_the_graph_mask(theta_optimizer: str) -> None:
    """The norm must not count the dense gradient of pruned coordinates that ``.grad`` holds in
    the sparse phases with ``gradient_mask="optimizer"``."""
    runs = {}
    for mask, clip in [
        ("graph", lambda m, c: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.005)),
        ("optimizer", lambda m, c: c.resu.clip_grad_norm_(0.005)),
    ]:
        torch._dynamo.reset()
        model = ENTRY.build()
        compiled = resu.compile(
            model,
            sparsity=0.5,
            cycles=2,
            steps_per_cycle=10,
            gradient_mask=mask,
            theta_optimizer=theta_optimizer,
            compiler="aot_eager",
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        norms = []
        for step in range(20):
            optimizer.zero_grad(set_to_none=True)
            ENTRY.loss_fn(compiled(*ENTRY.make_batch(step))).backward()
            norms.append(float(clip(model, compiled)))
            compiled.resu.step(optimizer)
        runs[mask] = (norms, {n: p.detach().clone() for n, p in model.named_parameters()})
    (graph_norms, graph_params), (norms, params) = runs["graph"], runs["optimizer"]
    assert min(graph_norms) > 0.005  # every step clipped
    assert norms == pytest.approx(graph_norms, rel=1e-5)
    for name, value in graph_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)
