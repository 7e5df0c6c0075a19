"""``resu.compile(model, sparsity=0.7, **options)``: the one-call front end."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from resu_compile.compiler.backend import ResuBackend
from resu_compile.compiler.distributed import compile_sharded_forwards, ddp_inner, is_sharded
from resu_compile.compiler.passes.eligibility import lora_adapter_ids, param_skip_reason
from resu_compile.compiler.registry import find_controller, shared_parameter, track, untrack
from resu_compile.config import ResuConfig
from resu_compile.runtime.controller import PhaseController
from resu_compile.runtime.sharded import check_sharded_config


def compile(
    model: torch.nn.Module,
    sparsity: float | None = None,
    *,
    config: ResuConfig | Mapping[str, Any] | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    inplace: bool = False,
    **options: Any,
) -> torch.nn.Module:
    """Compile ``model`` for RESU training; returns the compiled module with a ``.resu`` handle.

    ``options`` are :class:`ResuConfig` fields (or pass ``config=``: a ``ResuConfig`` or a dict
    of its fields). Validation happens before anything is changed: a bad option or argument, a
    model without parameters, a filter that names a non-floating-point weight, a filter that
    selects only weights that cannot be managed (listed with their reasons), a parameter shared
    with a model already managed, or a class whose ``forward`` Dynamo would no longer compile
    (its recompile limit is reached) raises and leaves ``model`` as it was, unregistered.

    ``inplace=True`` compiles ``model`` itself (``nn.Module.compile``) and returns it: its type,
    ``forward`` signature and ``state_dict`` keys stay those of the original class, which is what
    frameworks that inspect the model (the HF ``Trainer``) need.

    Distributed models are compiled where Dynamo can see their weights, and returned themselves
    (as with ``inplace=True``): a ``DistributedDataParallel`` model has its inner ``.module``
    compiled in place (names and masks are those of the inner module, as for
    ``DDP(resu.compile(model))``); a model sharded with FSDP2's ``fully_shard`` has the forward of
    every sharded module compiled in place, between FSDP's hooks (see
    :mod:`resu_compile.compiler.distributed`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"resu.compile: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    _check_flags(inplace=inplace, fullgraph=fullgraph, dynamic=dynamic)
    inner = ddp_inner(model)
    target = inner if inner is not None else model
    shared = shared_parameter(target)
    managed = find_controller(model) is not None or find_controller(target) is not None
    if managed and shared is None:
        raise ValueError("resu.compile: model is already compiled by resu-compile")
    if shared is not None:
        _refuse_shared(shared)
    config = _resolve_config(config, sparsity, options)
    _check_model(target, config)
    sharded = is_sharded(target)
    if sharded:
        check_sharded_config(config)
    in_place = inplace or inner is not None or sharded
    call = _in_place_call(target) if in_place and not sharded else None
    _check_recompile_limit(target, call)
    controller = PhaseController(config, {id(p): n for n, p in target.named_parameters()}, target)
    track(controller, target)
    backend = ResuBackend(controller)
    try:
        if sharded:
            compile_sharded_forwards(target, backend, dynamic=dynamic, fullgraph=fullgraph)
        elif call is not None:
            target._compiled_call_impl = torch.compile(
                call, backend=backend, dynamic=dynamic, fullgraph=fullgraph
            )
        compiled = (
            model
            if in_place
            else torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        )
    except BaseException:
        untrack(controller)
        raise
    compiled.resu = controller
    return compiled


def _check_flags(*, inplace: Any, fullgraph: Any, dynamic: Any) -> None:
    for argument, value, allowed in (
        ("inplace", inplace, (bool,)),
        ("fullgraph", fullgraph, (bool,)),
        ("dynamic", dynamic, (bool, type(None))),
    ):
        if not isinstance(value, allowed):
            words = "a bool or None" if argument == "dynamic" else "a bool"
            raise TypeError(f"resu.compile: {argument} must be {words}, got {value!r}")


def _resolve_config(
    config: ResuConfig | Mapping[str, Any] | None, sparsity: float | None, options: dict[str, Any]
) -> ResuConfig:
    """The one :class:`ResuConfig` from ``config=`` or from ``sparsity`` and the options."""
    if config is not None and (options or sparsity is not None):
        raise ValueError("resu.compile: pass either config= or sparsity/options, not both")
    if config is None:
        if sparsity is not None:
            options["sparsity"] = sparsity
        return ResuConfig.from_options(options)
    if isinstance(config, Mapping):
        return ResuConfig.from_options(config)
    if not isinstance(config, ResuConfig):
        raise TypeError(
            f"resu.compile: config must be a ResuConfig or a dict of its options, got "
            f"{type(config).__name__}"
        )
    return config


def _in_place_call(model: torch.nn.Module) -> Callable[..., Any]:
    """The frame ``inplace=True`` compiles: what ``nn.Module.compile`` does, through a frame of
    our own.

    ``nn.Module.compile`` compiles ``_call_impl`` directly, and Dynamo skips that frame for the
    classes of ``torch.nn`` itself (``nn.Sequential``: nothing is ever captured, silently). A
    wrapper defined here is traced and inlines the module's call, hooks included, for any class.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return model._call_impl(*args, **kwargs)

    return call


def _refuse_shared(shared: tuple[str, PhaseController, torch.nn.Module | None]) -> None:
    """Two controllers must never hold one weight (it would get two masks)."""
    name, _, owner = shared
    holder = type(owner).__name__ if owner is not None else "another model"
    raise ValueError(
        f"resu.compile: parameter {name!r} is shared with a model already managed by "
        f"resu-compile ({holder}); a weight can have only one mask: compile the model that "
        "contains both, or give each model its own copy of the shared module"
    )


def _check_recompile_limit(model: torch.nn.Module, call: Callable[..., Any] | None) -> None:
    """Each ``resu.compile`` is a new backend, so Dynamo keeps one more compiled version of the
    frame it compiles; past ``torch._dynamo.config.recompile_limit`` it silently runs the frame
    uncompiled, and the resu backend would never see a graph."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    code = call.__code__ if call is not None else getattr(type(model).forward, "__code__", None)
    if code is None:
        return
    limit = torch._dynamo.config.recompile_limit
    if len(_debug_get_cache_entry_list(code)) >= limit:
        frame = "the in-place wrapper" if call is not None else f"{type(model).__name__}.forward"
        raise RuntimeError(
            f"resu.compile: Dynamo already holds {limit} compiled versions of {frame} in this "
            f"process (torch._dynamo.config.recompile_limit = {limit}), and each resu.compile "
            "adds one: this model would run uncompiled, unmanaged; call torch._dynamo.reset() "
            "before compiling another model (or raise the limit)"
        )


def controller(model: torch.nn.Module) -> PhaseController:
    """The ``.resu`` handle of a model compiled by ``resu.compile`` or ``backend="resu"``.

    With ``torch.compile(model, backend="resu")`` the handle exists once the model has run a
    forward pass (that is when the backend first sees the graph).
    """
    found = find_controller(model)
    if found is None:
        raise ValueError(
            "resu.controller: this model is not managed by resu-compile (use resu.compile, or run "
            "a forward pass of torch.compile(model, backend='resu') first)"
        )
    return found


def _check_model(model: torch.nn.Module, config: ResuConfig) -> None:
    params = list(model.named_parameters())
    if not params:
        raise ValueError("resu.compile: model has no parameters, so no managed weight can be found")
    for name, param in params:
        if param.device.type == "meta":
            raise ValueError(
                f"resu.compile: parameter {name!r} is on the meta device; materialize the model "
                "(e.g. model.to_empty(device=...) and initialise) before compiling"
            )
        if (
            config.include is not None
            and config.selects(name, param)
            and not param.is_floating_point()
        ):
            raise ValueError(
                f"resu.compile: include selects {name!r} of dtype {param.dtype}; only "
                "floating-point weights can be managed"
            )
    adapters = lora_adapter_ids(model)
    selected = [(n, p) for n, p in params if config.selects(n, p)]
    reasons = {n: param_skip_reason(n, p, config, id(p) in adapters) for n, p in selected}
    if any(reason is None for reason in reasons.values()):
        return
    if config.include is not None and reasons:
        listed = "; ".join(f"{n!r}: {r}" for n, r in reasons.items())
        raise ValueError(
            f"resu.compile: no managed weight can be found: include selects only weights that "
            f"cannot be managed ({listed})"
        )
    raise ValueError(
        "resu.compile: no managed weight can be found: no trainable floating-point parameter "
        "with 2+ dims passes the include / exclude filter (LoRA adapters and frozen weights "
        "count only when include= names them)"
    )
