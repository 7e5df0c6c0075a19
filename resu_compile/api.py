"""``resu.compile(model, sparsity=0.7, **options)``: the one-call front end."""

from __future__ import annotations

from typing import Any

import torch

from resu_compile.compiler.backend import ResuBackend
from resu_compile.compiler.distributed import compile_sharded_forwards, ddp_inner, is_sharded
from resu_compile.compiler.passes.eligibility import lora_adapter_ids, param_skip_reason
from resu_compile.compiler.registry import find_controller, track
from resu_compile.config import ResuConfig
from resu_compile.runtime.controller import PhaseController
from resu_compile.runtime.sharded import check_sharded_config


def compile(
    model: torch.nn.Module,
    sparsity: float | None = None,
    *,
    config: ResuConfig | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    inplace: bool = False,
    **options: Any,
) -> torch.nn.Module:
    """Compile ``model`` for RESU training; returns the compiled module with a ``.resu`` handle.

    ``options`` are :class:`ResuConfig` fields (or pass ``config=``). Validation happens before
    anything is changed: a bad option, a model without parameters, a filter that names a
    non-floating-point weight, or a filter that selects only weights that cannot be managed
    (listed with their reasons) raises ``ValueError`` and leaves ``model`` as it was.

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
    if not isinstance(inplace, bool):
        raise TypeError(f"resu.compile: inplace must be a bool, got {inplace!r}")
    inner = ddp_inner(model)
    target = inner if inner is not None else model
    if find_controller(model) is not None or find_controller(target) is not None:
        raise ValueError("resu.compile: model is already compiled by resu-compile")
    if config is not None and (options or sparsity is not None):
        raise ValueError("resu.compile: pass either config= or sparsity/options, not both")
    if config is None:
        if sparsity is not None:
            options["sparsity"] = sparsity
        config = ResuConfig.from_options(options)
    _check_model(target, config)
    sharded = is_sharded(target)
    if sharded:
        check_sharded_config(config)
    controller = PhaseController(config, {id(p): n for n, p in target.named_parameters()}, target)
    track(controller, target)
    backend = ResuBackend(controller)
    if inner is not None or sharded:
        if sharded:
            compile_sharded_forwards(target, backend, dynamic=dynamic, fullgraph=fullgraph)
        else:
            _compile_in_place(target, backend, dynamic=dynamic, fullgraph=fullgraph)
        compiled = model
    elif inplace:
        _compile_in_place(model, backend, dynamic=dynamic, fullgraph=fullgraph)
        compiled = model
    else:
        compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    compiled.resu = controller
    return compiled


def _compile_in_place(model: torch.nn.Module, backend: ResuBackend, **options: Any) -> None:
    """What ``nn.Module.compile`` does, through a frame of our own.

    ``nn.Module.compile`` compiles ``_call_impl`` directly, and Dynamo skips that frame for the
    classes of ``torch.nn`` itself (``nn.Sequential``: nothing is ever captured, silently). A
    wrapper defined here is traced and inlines the module's call, hooks included, for any class.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return model._call_impl(*args, **kwargs)

    model._compiled_call_impl = torch.compile(call, backend=backend, **options)


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
