"""Every public entry point, given invalid arguments, raises a clear error and changes nothing.

One table: (description, the call, the exception, a fragment of the message). Each row runs on a
freshly compiled model that has seen a forward pass, and the model's parameters, masks, phase and
step count are compared before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import resu_compile as resu
from tests.invariants import assert_exact_counts
from tests.zoo import ZOO_BY_NAME


@dataclass
class Env:
    model: torch.nn.Module
    compiled: torch.nn.Module
    optimizer: torch.optim.Optimizer


def _env(manual: bool = True) -> Env:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, manual=manual, compiler="aot_eager")
    entry.loss_fn(compiled(*entry.make_batch(0))).backward()
    return Env(model, compiled, torch.optim.SGD(model.parameters(), lr=0.1))


def _frozen_model() -> torch.nn.Module:
    model = ZOO_BY_NAME["mlp"].build()
    model.requires_grad_(False)
    return model


def _attach_twice(env: Env) -> None:
    env.compiled.resu.attach(env.optimizer)
    env.compiled.resu.attach(torch.optim.SGD(env.model.parameters(), lr=0.1))


def _step_attached(env: Env) -> None:
    env.compiled.resu.attach(env.optimizer)
    env.compiled.resu.step(env.optimizer)


ROWS: list[tuple[str, Callable[[Env], object], type[Exception], str]] = [
    (
        "compile: not a module",
        lambda e: resu.compile("mlp"),
        TypeError,
        "must be a torch.nn.Module",
    ),
    (
        "compile: sparsity type",
        lambda e: resu.compile(ZOO_BY_NAME["mlp"].build(), sparsity="high"),
        ValueError,
        "'sparsity'",
    ),
    (
        "compile: config and options",
        lambda e: resu.compile(ZOO_BY_NAME["mlp"].build(), sparsity=0.5, config=resu.ResuConfig()),
        ValueError,
        "either config=",
    ),
    ("compile: already compiled", lambda e: resu.compile(e.model), ValueError, "already compiled"),
    (
        "compile: wrapper already compiled",
        lambda e: resu.compile(e.compiled),
        ValueError,
        "already compiled",
    ),
    (
        "compile: empty model",
        lambda e: resu.compile(torch.nn.Module()),
        ValueError,
        "no parameters",
    ),
    (
        "compile: no matmul weight",
        lambda e: resu.compile(torch.nn.LayerNorm(4)),
        ValueError,
        "no managed weight",
    ),
    (
        "compile: every weight frozen",
        lambda e: resu.compile(_frozen_model()),
        ValueError,
        "no managed weight",
    ),
    (
        "config: unknown option",
        lambda e: resu.ResuConfig.from_options({"sparsty": 0.5}),
        ValueError,
        "unknown option",
    ),
    ("config: bool for cycles", lambda e: resu.ResuConfig(cycles=True), ValueError, "'cycles'"),
    ("config: seed type", lambda e: resu.ResuConfig(seed=1.5), ValueError, "'seed'"),
    (
        "controller: unmanaged model",
        lambda e: resu.controller(torch.nn.Linear(2, 2)),
        ValueError,
        "not managed",
    ),
    (
        "step: not an optimizer",
        lambda e: e.compiled.resu.step(None),
        TypeError,
        "torch.optim.Optimizer",
    ),
    ("step: attached optimizer", _step_attached, RuntimeError, "attached"),
    (
        "attach: not an optimizer",
        lambda e: e.compiled.resu.attach([]),
        TypeError,
        "torch.optim.Optimizer",
    ),
    ("attach: twice", _attach_twice, RuntimeError, "already attached"),
    ("prune: sparsity 1", lambda e: e.compiled.resu.prune(1.0), ValueError, "sparsity must be"),
    (
        "prune: sparsity type",
        lambda e: e.compiled.resu.prune("0.5"),
        ValueError,
        "sparsity must be",
    ),
    (
        "enter_resu: before prune",
        lambda e: e.compiled.resu.enter_resu(),
        RuntimeError,
        "nothing is pruned",
    ),
    (
        "commit: outside RESU",
        lambda e: e.compiled.resu.commit(),
        RuntimeError,
        "only valid in the RESU",
    ),
    (
        "set_phase: unknown",
        lambda e: e.compiled.resu.set_phase("warmup"),
        ValueError,
        "phase must be one of",
    ),
    (
        "input_norms: not recorded",
        lambda e: e.compiled.resu.input_norms("fc1.weight"),
        RuntimeError,
        "no calibrate pass",
    ),
    (
        "input_norms: unknown name",
        lambda e: e.compiled.resu.input_norms("fc9.weight"),
        KeyError,
        "no managed weight named",
    ),
    (
        "load_state_dict: not a state",
        lambda e: e.compiled.resu.load_state_dict({"phase": "train"}),
        ValueError,
        "not a resu-compile",
    ),
    (
        "load_state_dict: wrong type",
        lambda e: e.compiled.resu.load_state_dict([]),
        ValueError,
        "not a resu-compile",
    ),
]


def _snapshot(env: Env) -> tuple:
    controller = env.compiled.resu
    params = {n: p.detach().clone() for n, p in env.model.named_parameters()}
    masks = {n: None if m is None else m.clone() for n, m in controller.masks().items()}
    return params, masks, controller.phase, controller.step_count, controller.cycle


@pytest.mark.parametrize(
    ("call", "error", "message"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_invalid_call_raises_and_changes_nothing(
    call, error: type[Exception], message: str
) -> None:
    env = _env()
    before = _snapshot(env)
    with pytest.raises(error, match=message):
        call(env)
    params, masks, phase, steps, cycle = _snapshot(env)
    for name, value in before[0].items():
        assert torch.equal(params[name], value), name
    assert masks.keys() == before[1].keys()
    for name, mask in before[1].items():
        assert (mask is None and masks[name] is None) or torch.equal(masks[name], mask)
    assert (phase, steps, cycle) == before[2:]


def test_non_contiguous_and_transposed_weights_train_with_exact_invariants() -> None:
    class Transposed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 8).t())  # (8, 16), non-contiguous
            self.v = torch.nn.Parameter(torch.randn(4, 8).t())  # (8, 4), non-contiguous

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.w) @ self.v

    model = Transposed()
    assert not model.w.is_contiguous()
    compiled = resu.compile(model, sparsity=0.5, cycles=1, steps_per_cycle=10, compiler="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(10):
        loss = (
            compiled(torch.randn(4, 16, generator=torch.Generator().manual_seed(step)))
            .pow(2)
            .mean()
        )
        optimizer.zero_grad()
        loss.backward()
        compiled.resu.step(optimizer)
    assert compiled.resu.phase is resu.Phase.DONE
    assert_exact_counts(compiled.resu, 0.5)
    for weight in compiled.resu.state:
        assert torch.count_nonzero(weight.param.detach()[~weight.mask()]) == 0
