"""Property tests: METHOD.md's invariants and the per-cycle active counts over random runs.

Each example builds and compiles a fresh random-width MLP, drives it through a short automatic
schedule, and checks, right after every transition (the controller's ``_prune`` / ``_commit`` are
wrapped on the instance) and after every optimizer step, that:

- the invariants of ``tests/invariants.py`` hold (sparse phases and the RESU phase);
- every managed layer's active count is exactly ``int((1 - s_c) * N)`` after each prune and commit;
- optimizer state shaped like W is 0 on every pruned coordinate and on every coordinate a commit
  brought back (so nothing a coordinate accumulated while pruned survives into its active life).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import resu_compile as resu
from resu_compile.optim.updates import weight_shaped_state
from tests.invariants import CheckedStepper, assert_exact_counts

OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw_wd": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def _mlp(widths: list[int], seed: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(widths[0], widths[1]),
            nn.ReLU(),
            nn.Linear(widths[1], widths[2]),
            nn.ReLU(),
            nn.Linear(widths[2], widths[3]),
        )


def _state_zero_on(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor):
    return all(torch.count_nonzero(s[where]) == 0 for s in weight_shaped_state(optimizer, param))


def _check_counts(controller: resu.PhaseController, event: str) -> None:
    assert_exact_counts(controller, controller.target_sparsity)
    for weight in controller.state:
        mask = weight.mask()
        assert torch.count_nonzero(weight.param.detach()[~mask]) == 0, f"{weight.name}: W[P] != 0"


def _checked_run(
    widths: list[int],
    seed: int,
    optimizer_name: str,
    steps: int,
    instrument: bool = True,
    **options: object,
) -> tuple[resu.PhaseController, list[str]]:
    """Compile a seeded MLP with ``options`` and train it ``steps`` steps on seeded random inputs,
    the invariants checked after each step (and, with ``instrument``, the counts and state after
    each prune and commit). Returns the controller and the transitions seen."""
    torch._dynamo.reset()
    model = _mlp(widths, seed)
    compiled = resu.compile(model, seed=seed, compiler="aot_eager", **options)
    log: list[str] = []
    if instrument:
        _instrument(compiled.resu, log)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    generator = torch.Generator().manual_seed(seed)
    stepper = CheckedStepper(compiled.resu, optimizer)
    for _ in range(steps):
        loss = compiled(torch.randn(6, widths[0], generator=generator)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()
    return compiled.resu, log


def _instrument(controller: resu.PhaseController, log: list[str]) -> None:
    """Check the counts and the optimizer state right after each prune and commit."""
    prune, commit = controller._prune, controller._commit

    def checked_prune(*args: object) -> None:
        prune(*args)
        _check_counts(controller, "prune")
        optimizer = controller.optimizer
        for weight in controller.state:
            assert _state_zero_on(optimizer, weight.param, ~weight.mask()), (
                f"after prune: {weight.name} optimizer state != 0 on P"
            )
        log.append("prune")

    def checked_commit() -> None:
        old = {w.name: w.mask() for w in controller.state}
        commit()
        _check_counts(controller, "commit")
        optimizer = controller.optimizer
        for weight in controller.state:
            new = weight.mask()
            assert _state_zero_on(optimizer, weight.param, ~new), (
                f"after commit: {weight.name} optimizer state != 0 on the new P"
            )
            assert _state_zero_on(optimizer, weight.param, new & ~old[weight.name]), (
                f"after commit: {weight.name} resurrected coordinates kept optimizer state"
            )
        log.append("commit")

    controller._prune = checked_prune
    controller._commit = checked_commit


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(3, 24), min_size=4, max_size=4),
    sparsity=st.floats(0.0, 0.95),
    cycles=st.integers(1, 3),
    steps_per_cycle=st.integers(3, 8),
    seed=st.integers(0, 2**16),
    optimizer_name=st.sampled_from(sorted(OPTIMIZERS)),
)
def test_random_runs_keep_invariants_and_counts(
    widths: list[int],
    sparsity: float,
    cycles: int,
    steps_per_cycle: int,
    seed: int,
    optimizer_name: str,
) -> None:
    controller, log = _checked_run(
        widths,
        seed,
        optimizer_name,
        cycles * steps_per_cycle,
        sparsity=sparsity,
        cycles=cycles,
        steps_per_cycle=steps_per_cycle,
        theta_lr=1e-2,
    )
    assert controller.phase is resu.Phase.DONE
    assert log == ["prune", "commit"] * cycles
    assert len(controller.state) == 3


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(3, 16), min_size=4, max_size=4),
    sparsity=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
    selection=st.sampled_from(["random", "all", "topk", "consistency"]),
    frozen=st.booleans(),
    theta_optimizer=st.sampled_from(["sgd", "momentum", "adamw"]),
    amnesty_score=st.sampled_from(["magnitude", "gradient"]),
    optimizer_name=st.sampled_from(sorted(OPTIMIZERS)),
)
def test_random_resu_options_keep_invariants_and_counts(
    widths: list[int],
    sparsity: float,
    seed: int,
    selection: str,
    frozen: bool,
    theta_optimizer: str,
    amnesty_score: str,
    optimizer_name: str,
) -> None:
    controller, log = _checked_run(
        widths,
        seed,
        optimizer_name,
        12,
        sparsity=sparsity,
        cycles=2,
        steps_per_cycle=6,
        theta_lr=1e-2,
        selection=selection,
        refresh=2 if selection == "topk" else 0,
        freeze_active=frozen,
        freeze_others=frozen,
        theta_optimizer=theta_optimizer,
        amnesty_score=amnesty_score,
    )
    assert controller.phase is resu.Phase.DONE
    assert log == ["prune", "commit"] * 2


@settings(max_examples=10, deadline=None)
@given(
    widths=st.lists(st.integers(3, 16), min_size=4, max_size=4),
    sparsity=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["oneshot", "gmp", "rigl"]),
    optimizer_name=st.sampled_from(sorted(OPTIMIZERS)),
)
def test_baselines_keep_the_sparse_invariant_and_the_total_count(
    widths: list[int], sparsity: float, seed: int, method: str, optimizer_name: str
) -> None:
    controller, _ = _checked_run(  # W[P] == 0 and state 0 on P after every step
        widths,
        seed,
        optimizer_name,
        12,
        instrument=False,  # the counts are checked below, the sum where layers differ
        sparsity=sparsity,
        method=method,
        cycles=2,
        steps_per_cycle=6,
        rigl_interval=2,
    )
    weights = list(controller.state)
    actives = [w.active_count() for w in weights]
    if controller.config.distribution != "uniform":  # per-layer counts differ, the sum is exact
        assert sum(actives) == int((1 - sparsity) * sum(w.numel for w in weights))
    else:
        assert actives == [int((1 - sparsity) * w.numel) for w in weights]
