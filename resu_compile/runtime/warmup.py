"""Compile the transition kernels before the first transition needs them.

The Triton kernels of a prune, a RESU entry and a commit compile on first use (seconds per
process, against milliseconds a transition later). The first forward pass already stalls while
Inductor compiles the model, so the transitions of the controller's method run there once, on
small scratch weights of the same devices and dtypes: the kernels the real transitions launch
are then in Triton's cache, and the first prune costs what a later one does. Nothing of the
scratch run reaches the controller (its own weights, history, counters and random draws).

Triton specializes a kernel on its integer arguments (equal to 1, divisible by 16), and the
multi-tensor kernels take the number of weights as one: the scratch run uses as many weights as
the controller manages, so a managed set that grows over several graphs is warmed again, at the
cost of a cache hit where nothing changed.
"""

from __future__ import annotations

import torch

from resu_compile.config import ResuConfig
from resu_compile.kernels.nonfinite import any_nonfinite
from resu_compile.runtime.transitions import (
    TransitionContext,
    commit_weights,
    enter_resu_weights,
    prune_weights,
    regrow_weights,
)
from resu_compile.state import ManagedWeight

#: Side of the square scratch weights: a whole number of the transition kernels' tiles and of
#: any N:M group, and small enough to cost nothing.
SCRATCH_SIDE = 64


def warm_up_transitions(
    config: ResuConfig, weights: list[ManagedWeight], device_types: tuple[str, ...] = ("cuda",)
) -> None:
    """Run the transitions ``config.method`` schedules once on scratch copies of ``weights``'
    kinds, one group per (device, dtype). Only on ``device_types`` (where kernels compile), and
    not for FSDP2 shards (their transitions communicate, so every rank would have to join)."""
    groups: dict[tuple[torch.device, torch.dtype], list[ManagedWeight]] = {}
    for weight in weights:
        param = weight.param
        if (
            param.device.type in device_types
            and weight.shard is None
            and param.dtype.is_floating_point
        ):
            groups.setdefault((param.device, param.dtype), []).append(weight)
    for (device, dtype), group in groups.items():
        _run_transitions(config, [_scratch(w, i, device, dtype) for i, w in enumerate(group)])


def _scratch(
    weight: ManagedWeight, index: int, device: torch.device, dtype: torch.dtype
) -> ManagedWeight:
    """A small weight like ``weight`` (device, dtype, input dim), with a gradient and input norms
    so that gradient and Wanda scores have something to read."""
    shape = (SCRATCH_SIDE, SCRATCH_SIDE)
    generator = torch.Generator(device=device).manual_seed(index)
    param = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype, generator=generator))
    param.grad = torch.randn(shape, device=device, dtype=dtype, generator=generator)
    scratch = ManagedWeight(name=f"warm-up.{index}", param=param, input_dim=weight.input_dim)
    scratch.input_sq_norms = torch.ones(SCRATCH_SIDE, device=device, dtype=torch.float32)
    return scratch


def _run_transitions(config: ResuConfig, scratch: list[ManagedWeight]) -> None:
    """Two prunes (the first on dense weights, the next on pruned ones, as GMP's cycles do), then
    RESU's entry and commit or RigL's regrowth."""
    if config.method == "dense":
        return
    device = scratch[0].param.device
    context = TransitionContext(
        config,
        optimizer=None,
        generator=lambda weight, purpose: torch.Generator(device=device).manual_seed(0),
    )
    sparsity = config.sparsity
    any_nonfinite([w.param.detach() for w in scratch])  # the check before every transition
    for _ in range(2):
        prune_weights(context, scratch, sparsity, config.criterion)
    if config.method == "resu":
        enter_resu_weights(context, scratch)
        commit_weights(context, scratch, budget=config.r_start, target_sparsity=sparsity)
    elif config.method == "rigl":
        regrow_weights(context, scratch, config.rigl_fraction)
