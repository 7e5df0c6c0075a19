"""Compile the transition kernels before the first transition needs them.

The Triton kernels of a prune, a RESU entry and a commit compile on first use (seconds per
process, against milliseconds a transition later). The first forward pass already stalls while
Inductor compiles the model, so the transitions of the controller's method run there once, on
small scratch weights of the same devices and dtypes: the kernels the real transitions launch
are then in Triton's cache, and the page-locked buffers a commit copies into are taken ahead
(:func:`~resu_compile.runtime.transitions.reserve_host_buffers`), so the first prune, RESU entry
and commit cost what later ones do. Nothing of the scratch run reaches the controller (its own
weights, history, counters and random draws).

The kernels compile once for any number of tensors (they do not specialize on it, see
:mod:`resu_compile.kernels.triton.common`), so two scratch weights stand for any managed set; a
graph that adds managed weights runs the warm-up again, at the cost of cache hits.
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
    reserve_host_buffers,
)
from resu_compile.state import ManagedWeight

#: Scratch weights per (device, dtype): two, so that a global threshold spans layers.
SCRATCH_WEIGHTS = 2
#: Side of the square scratch weights: a whole number of the transition kernels' tiles and of
#: any N:M group, and small enough to cost nothing.
SCRATCH_SIDE = 64


def warm_up_transitions(
    config: ResuConfig, weights: list[ManagedWeight], device_types: tuple[str, ...] = ("cuda",)
) -> None:
    """Run the transitions ``config.method`` schedules once on scratch copies of ``weights``'
    kinds, one group per (device, dtype). Only on ``device_types`` (where kernels compile), and
    not for FSDP2 shards (their transitions communicate, so every rank would have to join)."""
    if config.method == "dense":
        return
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
        scratch = [_scratch(w, i, device, dtype) for i, w in enumerate(group[:SCRATCH_WEIGHTS])]
        _run_transitions(config, scratch)
    if config.method == "resu":
        reserve_host_buffers([w for w in weights if w.param.is_cuda and w.shard is None])


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
