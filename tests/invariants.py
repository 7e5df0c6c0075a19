"""Checks of METHOD.md's invariants, shared by the tests that train."""

from __future__ import annotations

import copy
from typing import Any

import torch

import resu_compile as resu
from resu_compile.method.schedule import keep_count
from resu_compile.optim.updates import weight_shaped_state


def assert_exact_counts(controller: resu.PhaseController, sparsity: float) -> None:
    """The actives the layer distribution promises at ``sparsity``, counted from the masks:
    ``int((1 - s) * N)`` in every layer (uniform, N:M), or in all layers together (global, ERK)
    with every layer at the share its prune gave it."""
    weights = [w for w in controller.state if w.mask() is not None]
    assert weights, "no weight was pruned"
    for weight in weights:
        assert int(weight.mask().sum()) == weight.active_count(), weight.name
    if controller.config.distribution == "uniform" or controller.config.nm is not None:
        for weight in weights:
            expected = keep_count(weight.numel, sparsity)
            assert weight.active_count() == expected, (weight.name, weight.active_count(), expected)
        return
    total = sum(w.numel for w in weights)
    assert sum(w.active_count() for w in weights) == keep_count(total, sparsity)
    for weight in weights:
        assert weight.active_count() == weight.keep_target, weight.name


def assert_sparse_invariants(
    controller: resu.PhaseController, optimizer: torch.optim.Optimizer
) -> None:
    """SPARSE phases: ``W[P] == 0`` and every optimizer state tensor shaped like W is 0 on P."""
    for weight in controller.state:
        mask = weight.mask()
        if mask is None:
            continue
        pruned = ~mask
        assert torch.count_nonzero(weight.param.detach()[pruned]) == 0, f"{weight.name}: W[P] != 0"
        for state in weight_shaped_state(optimizer, weight.param):
            assert torch.count_nonzero(state[pruned]) == 0, (
                f"{weight.name}: optimizer state != 0 on P"
            )


def snapshot_active(controller: resu.PhaseController) -> dict[str, torch.Tensor]:
    """Active values of every managed weight (to compare bit for bit across the RESU phase)."""
    return {w.name: w.param.detach()[w.mask()].clone() for w in controller.state}


def assert_resu_invariants(
    controller: resu.PhaseController,
    active_at_entry: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> None:
    """RESU phase: pruned coordinates outside S are 0 in W and (theta's moments living on S of the
    optimizer's slots) in every optimizer state tensor; ``W[A]`` unchanged bit for bit with
    ``freeze_active``. The consistency mode keeps its statistics on all of P, so only W is
    checked there."""
    config = controller.config
    for weight in controller.state:
        mask, selection = weight.mask(), weight.selection()
        values = weight.param.detach()
        if config.freeze_active:
            assert torch.equal(values[mask], active_at_entry[weight.name]), (
                f"{weight.name}: W[A] changed"
            )
        outside = ~mask & ~selection
        assert torch.count_nonzero(values[outside]) == 0, f"{weight.name}: W[P \\ S] != 0"
        if config.selection != "consistency":
            for state in weight_shaped_state(optimizer, weight.param):
                assert torch.count_nonzero(state[outside]) == 0, (
                    f"{weight.name}: optimizer state != 0 on P \\ S"
                )


class CheckedStepper:
    """``step()`` runs ``controller.step(optimizer)`` and then checks the phase's invariants.

    ``W[A]`` is snapshotted when the RESU phase begins, so every RESU step compares with it.
    """

    def __init__(self, controller: resu.PhaseController, optimizer: torch.optim.Optimizer) -> None:
        self.controller = controller
        self.optimizer = optimizer
        self._active_at_entry: dict[str, torch.Tensor] | None = None

    def step(self) -> None:
        before = self.controller.phase
        self.controller.step(self.optimizer)
        if self.controller.phase is resu.Phase.RESU:
            if before is not resu.Phase.RESU or self._active_at_entry is None:
                self._active_at_entry = snapshot_active(self.controller)
            assert_resu_invariants(self.controller, self._active_at_entry, self.optimizer)
        else:
            assert_sparse_invariants(self.controller, self.optimizer)


def snapshot_run(compiled: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a refused call must leave as it was."""
    controller = compiled.resu
    return {
        "params": {n: p.detach().clone() for n, p in controller.module().named_parameters()},
        "masks": {n: None if m is None else m.clone() for n, m in controller.masks().items()},
        "selections": {w.name: w.selection() for w in controller.state},
        "optimizer": copy.deepcopy(optimizer.state_dict()["state"]),
        "phase": controller.phase,
        "step": controller.step_count,
    }


def assert_run_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["phase"] is before["phase"] and after["step"] == before["step"]
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name
    for kind in ("masks", "selections"):
        for name, bits in before[kind].items():
            got = after[kind][name]
            assert (got is None and bits is None) or torch.equal(got, bits), (kind, name)
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for index, state in before["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(after["optimizer"][index][key], value), (index, key)
