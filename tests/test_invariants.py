"""METHOD.md's invariants, bit for bit, after every optimizer step of multi-cycle runs."""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
from tests.invariants import CheckedStepper, assert_exact_counts
from tests.zoo import ZOO_BY_NAME

OPTIMIZERS = {
    "adamw_wd": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.01),
    "sgd_momentum_wd": lambda params: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, weight_decay=1e-3
    ),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop_fallback": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5),
}


# Each user optimizer once, and each theta-optimizer both with and without free state slots, with
# the default RESU phase (actives training); the last two cases run METHOD.md's frozen phase. The
# "optimizer" gradient mask runs our masked kernels instead of the graph mask.
CASES = [
    ("adamw_wd", "adamw", "graph", False),
    ("adam_l2", "momentum", "graph", False),
    ("sgd_momentum_wd", "momentum", "graph", False),
    ("sgd_nesterov", "adamw", "graph", False),
    ("rmsprop_fallback", "sgd", "graph", False),
    ("rmsprop_fallback", "adamw", "optimizer", False),  # theta's moments in private buffers
    ("adamw_wd", "sgd", "optimizer", False),
    ("sgd_nesterov", "momentum", "optimizer", False),
    ("adamw_wd", "adamw", "optimizer", True),
    ("rmsprop_fallback", "momentum", "graph", True),
]


@pytest.mark.parametrize(("optimizer_name", "theta_optimizer", "gradient_mask", "frozen"), CASES)
def test_invariants_hold_after_every_step(
    optimizer_name: str, theta_optimizer: str, gradient_mask: str, frozen: bool
) -> None:
    entry = ZOO_BY_NAME["transformer"]
    model = entry.build()
    compiled = resu.compile(
        model,
        sparsity=0.7,
        cycles=3,
        steps_per_cycle=10,
        theta_optimizer=theta_optimizer,
        theta_lr=1e-2,
        compiler="aot_eager",
        gradient_mask=gradient_mask,
        freeze_active=frozen,
        freeze_others=frozen,
    )
    controller = compiled.resu
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    stepper = CheckedStepper(controller, optimizer)
    for step in range(30):
        loss = entry.loss_fn(compiled(*entry.make_batch(step)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()
    assert len(controller.resurrected_per_cycle()) == 3
    assert controller.phase is resu.Phase.DONE
    assert all(count > 0 for count in controller.resurrected_per_cycle())
    assert_exact_counts(controller, 0.7)


def test_resu_phase_moves_only_selected_theta_and_freezes_everything_else() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(
        model,
        sparsity=0.5,
        manual=True,
        theta_lr=0.1,
        compiler="aot_eager",
        freeze_active=True,
        freeze_others=True,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    compiled(*entry.make_batch(0))
    compiled.resu.prune()
    compiled.resu.enter_resu()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        loss = entry.loss_fn(compiled(*entry.make_batch(step)))
        optimizer.zero_grad()
        loss.backward()
        compiled.resu.step(optimizer)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(param, before[name]), f"{name} moved although freeze_others=True"
    for weight in compiled.resu.state:
        moved = weight.param.detach() != before[weight.name]
        assert moved.any()
        assert not (moved & ~weight.selection()).any(), "a coordinate outside S moved"


def test_mask_is_never_rebuilt_from_zero_values() -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    compiled(*entry.make_batch(0))
    compiled.resu.prune()
    weight = compiled.resu.state.by_name("fc1.weight")
    mask = weight.mask()
    active_index = mask.reshape(-1).nonzero()[0]
    with torch.no_grad():
        weight.param.view(-1)[active_index] = 0.0  # a trained weight that happens to be exactly 0
    loss = entry.loss_fn(compiled(*entry.make_batch(0)))
    loss.backward()
    compiled.resu.step(optimizer)
    assert torch.equal(weight.mask(), mask)


@pytest.mark.parametrize("precision", ["bf16_weights", "bf16_autocast"])
def test_invariants_hold_in_bfloat16(precision: str) -> None:
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    if precision == "bf16_weights":
        model = model.to(torch.bfloat16)
    compiled = resu.compile(
        model, sparsity=0.7, cycles=2, steps_per_cycle=10, theta_lr=1e-2, compiler="aot_eager"
    )
    controller = compiled.resu
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    stepper = CheckedStepper(controller, optimizer)
    for step in range(20):
        (x,) = entry.make_batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
            loss = entry.loss_fn(compiled(x.to(next(model.parameters()).dtype))).float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()
    assert_exact_counts(controller, 0.7)
