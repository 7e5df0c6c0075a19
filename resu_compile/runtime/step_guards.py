"""Checks the controller runs at the start of a step, before anything in it changes: each says
what is wrong in words a user can act on, or refuses what would fail later in the step."""

from __future__ import annotations

import warnings

import torch

from resu_compile.config import ResuConfig
from resu_compile.kernels.nonfinite import any_nonfinite
from resu_compile.optim.slots import zero_where_pruned
from resu_compile.runtime import checkpoint
from resu_compile.runtime.distributed import any_rank
from resu_compile.runtime.phase import Transition
from resu_compile.runtime.transitions import input_norms
from resu_compile.shards import is_dtensor, local
from resu_compile.state import ManagedWeight


def check_optimizer_state(
    mode: str,
    optimizer: torch.optim.Optimizer,
    weights: list[ManagedWeight],
    *,
    step_count: int,
    in_resu: bool,
) -> None:
    """At the first step of a run (``mode="fresh"``) or the first after a load (``"strict"`` or
    ``"warn"``): the optimizer's state must belong to the resu state
    (:func:`~resu_compile.runtime.checkpoint.optimizer_problems`).

    After a load a problem is refused, or with ``strict=False`` warned about and the masks applied
    to the state; at a fresh start, an optimizer that has stepped already says that a resumed run
    did not load the resu state."""
    trainable = [w for w in weights if w.param.requires_grad]
    if mode == "fresh":
        taken = checkpoint.steps_taken(optimizer, trainable)
        if taken:
            warnings.warn(
                f"step(): the optimizer has taken {taken} steps already but the resu schedule "
                "starts at step 0, dense: if you resumed a run, load model.resu's state_dict "
                "saved with it too",
                stacklevel=4,
            )
        return
    problems = checkpoint.optimizer_problems(
        optimizer, trainable, resumed_at=step_count, in_resu=in_resu
    )
    if not problems:
        return
    message = "step(): " + "; ".join(problems)
    if mode == "strict":
        raise ValueError(message + " (or load the resu state with strict=False)")
    warnings.warn(message + "; continuing (strict=False)", stacklevel=4)
    if not in_resu:
        with torch.no_grad():
            zero_where_pruned(optimizer, trainable)


def check_calibration_for(
    config: ResuConfig, upcoming: Transition | None, weights: list[ManagedWeight]
) -> None:
    """Refuse, before this step's update, a Wanda score that the transition due after the step
    would need without calibrated input norms."""
    if upcoming is None:
        return
    if upcoming.kind == "prune" and upcoming.criterion == "wanda":
        purpose = "criterion 'wanda' (the prune due after this step)"
    elif upcoming.kind == "commit" and config.amnesty and config.amnesty_score == "wanda":
        purpose = "amnesty_score 'wanda' (the commit due after this step)"
    else:
        return
    for weight in weights:
        input_norms(weight, purpose)


def why_no_managed_weight(module: torch.nn.Module | None) -> str:
    """Why no graph registered a weight: no forward yet, or one that bypassed the backend."""
    if module is None or all(p.grad is None for p in module.parameters()):
        return (
            "no forward pass has run through the compiled model yet (attach() may come "
            "before the first forward; step() must follow a forward and backward), or no "
            "weight qualifies"
        )
    return (
        "a backward pass ran, but no graph reached the resu backend: the forward must run "
        "through the module resu.compile returned, not the original model nor a "
        "torch.compile() of the result (that compiles it with another backend); Dynamo also "
        "runs a frame uncompiled past its recompile limit "
        f"({torch._dynamo.config.recompile_limit}, see the warnings)"
    )


def check_not_sharded_after_compile(
    module: torch.nn.Module | None, compiled_params: dict[int, str]
) -> None:
    """FSDP2 replaces a model's parameters with DTensors: sharding after ``resu.compile``
    leaves the compiled model blind to them (FSDP's hooks stop Dynamo in every layer)."""
    if module is not None and any(
        is_dtensor(p) and id(p) not in compiled_params for p in module.parameters()
    ):
        raise ValueError(
            "step(): the model was sharded (fully_shard) after resu.compile, so no managed "
            "weight can be found; apply fully_shard to the layers and the root first, then "
            "call resu.compile(model)"
        )


def weights_finite(weights: list[ManagedWeight], purpose: str, *, raise_: bool) -> bool:
    """Whether every managed weight is finite, checked before a transition reads them (one check
    launch and one host sync; every rank of a sharded model waits, or none). A non-finite one
    raises ``FloatingPointError`` naming it if ``raise_``, else warns so the caller waits."""
    if not weights:
        return True
    values = [local(w.param.detach()) for w in weights]
    if not bool(any_rank(any_nonfinite(values), weights).item()):
        return True
    names = [w.name for w, v in zip(weights, values, strict=True) if not v.isfinite().all()]
    message = (
        f"{purpose}: managed weight(s) {names} hold NaN or Inf, so their masks cannot be "
        "chosen; nothing was changed"
    )
    if raise_:
        raise FloatingPointError(message + " (nan_policy='raise')")
    warnings.warn(message + "; the transition waits for finite weights", stacklevel=4)
    return False
