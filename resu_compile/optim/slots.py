"""Where a managed weight's optimizer state lives, and how transitions reset it.

The user's optimizer keeps its state in ``optimizer.state[param]`` under torch's names. RESU reuses
those weight-shaped slots on the pruned coordinates (the sparse invariant keeps them at 0 there), so
theta's moments and the consistency statistics cost no memory of their own unless a slot is taken:

- theta's moments: the optimizer's ``exp_avg`` / ``momentum_buffer`` and ``exp_avg_sq``;
- the consistency statistics ``m`` and ``v``: those same slots, theta's moments then move to
  buffers of the weight's own (``ManagedWeight.theta_buffers``);
- a weight whose actives step through the re-masking fallback (which zeroes every pruned slot)
  keeps all of theta's state in its own buffers (``ManagedWeight.theta_private``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resu_compile.kernels.bits import unpack_bits
from resu_compile.kernels.masked_zero import zero_where_clear_
from resu_compile.optim.updates import weight_shaped_state
from resu_compile.shards import local
from resu_compile.state import ManagedWeight

# Names under which torch.optim keeps first / second moments.
FIRST_MOMENT_SLOTS = ("exp_avg", "momentum_buffer")
SECOND_MOMENT_SLOTS = ("exp_avg_sq",)

Slots = tuple[torch.Tensor | None, torch.Tensor | None]


def optimizer_slots(optimizer: torch.optim.Optimizer | None, weight: ManagedWeight) -> Slots:
    """The user's optimizer's first / second moment tensors of ``weight`` (None where absent)."""
    state = optimizer.state.get(weight.param, {}) if optimizer is not None else {}

    def find(names: tuple[str, ...]) -> torch.Tensor | None:
        for name in names:
            value = state.get(name)
            if isinstance(value, torch.Tensor) and value.shape == weight.param.shape:
                return local(value)
        return None

    return find(FIRST_MOMENT_SLOTS), find(SECOND_MOMENT_SLOTS)


def own_buffer(weight: ManagedWeight, key: str) -> torch.Tensor:
    """A weight-shaped zero buffer of ``weight``'s own, created on first use."""
    if key not in weight.theta_buffers:
        weight.theta_buffers[key] = torch.zeros_like(local(weight.param.detach()))
    return weight.theta_buffers[key]


def consistency_statistics(
    optimizer: torch.optim.Optimizer | None, weight: ManagedWeight
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the consistency mode keeps ``m`` and ``v``."""
    first, second = (None, None) if weight.theta_private else optimizer_slots(optimizer, weight)
    return (
        first if first is not None else own_buffer(weight, "consistency_m"),
        second if second is not None else own_buffer(weight, "consistency_v"),
    )


def theta_moments(
    optimizer: torch.optim.Optimizer | None, weight: ManagedWeight, rule: str, selection: str
) -> Slots:
    """Where theta's ``rule`` keeps its first / second moments (None where the rule has none)."""
    if rule == "sgd":
        return None, None
    shared = not weight.theta_private and selection != "consistency"
    first, second = optimizer_slots(optimizer, weight) if shared else (None, None)
    first = first if first is not None else own_buffer(weight, "exp_avg")
    if rule != "adamw":
        return first, None
    return first, second if second is not None else own_buffer(weight, "exp_avg_sq")


def clear_pruned_slots(optimizer: torch.optim.Optimizer, weights: Sequence[ManagedWeight]) -> None:
    """At the RESU phase's first step: the shared slots must hold 0 on P (the sparse invariant
    says they do; this makes sure of it whatever the optimizer did), so theta starts from zero."""
    for weight in weights:
        if weight.mask_bits is not None and not weight.theta_private:
            pruned = ~weight.mask()
            for slot in optimizer_slots(optimizer, weight):
                if slot is not None:
                    slot.masked_fill_(pruned, 0)


def zero_where_pruned(
    optimizer: torch.optim.Optimizer | None,
    weights: Sequence[ManagedWeight],
    state_bits: Sequence[torch.Tensor] | None = None,
) -> None:
    """Every weight, and every optimizer state tensor shaped like it, becomes 0 where its mask
    bit is clear (the states: where their ``state_bits[i]`` bit is clear, when given). One
    Triton launch per dtype on the GPU (:func:`zero_where_clear_`)."""
    tensors, bits = [], []
    for i, weight in enumerate(weights):
        if weight.mask_bits is None:
            continue
        tensors.append(local(weight.param.data))
        bits.append(weight.mask_bits)
        for value in weight_shaped_state(optimizer, weight.param) if optimizer else []:
            tensors.append(value)
            bits.append(weight.mask_bits if state_bits is None else state_bits[i])
    zero_where_clear_(tensors, bits)


def reapply_masks(
    optimizer: torch.optim.Optimizer | None, weights: Sequence[ManagedWeight]
) -> list[str]:
    """:func:`zero_where_pruned` after something outside the managed step may have written the
    pruned coordinates (a plain ``optimizer.step()``); returns the names of the weights whose
    value or state was nonzero there (a host sync per tensor: for rare events only)."""
    dirty = []
    for weight in weights:
        if weight.mask_bits is None:
            continue
        pruned = ~weight.mask()
        tensors = [
            weight.param,
            *(weight_shaped_state(optimizer, weight.param) if optimizer else []),
        ]
        if any(bool(t.detach().masked_select(pruned).any()) for t in tensors):
            dirty.append(weight.name)
    with torch.no_grad():
        zero_where_pruned(optimizer, weights)
    return dirty


def zero_coordinates(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, where: torch.Tensor
) -> None:
    """``param`` and every optimizer state tensor shaped like it become 0 where ``where``."""
    param.data.masked_fill_(where, 0)
    if optimizer is not None:
        for value in weight_shaped_state(optimizer, param):
            value.masked_fill_(where, 0)


@torch.no_grad()
def restart_resurrected_state(
    optimizer: torch.optim.Optimizer | None,
    weight: ManagedWeight,
    old_mask_bits: torch.Tensor,
    *,
    carry: bool,
    rule: str,
    selection: str,
) -> None:
    """A weight resurrected by a commit: its optimizer state becomes 0, or (``carry``) theta's own
    moments (METHOD.md section 5's option)."""
    resurrected = weight.mask() & ~unpack_bits(old_mask_bits, weight.shape)
    first, second = optimizer_slots(optimizer, weight)
    theta = theta_moments(optimizer, weight, rule, selection) if carry else (None, None)
    for value in weight_shaped_state(optimizer, weight.param) if optimizer else []:
        source = theta[0] if value is first else theta[1] if value is second else None
        if source is value:
            continue  # theta's moments already live there
        if source is None:
            value.masked_fill_(resurrected, 0)
        else:
            value.copy_(torch.where(resurrected, source, value))
    if not carry:
        for buffer in weight.theta_buffers.values():
            buffer.masked_fill_(resurrected, 0)
