"""Which controller owns which model: by root module, and by parameter identity.

The graphs of one model (graph breaks, DDP buckets) and a second instance of its class (Dynamo
reuses compiled code for it) must all find the controller that manages their parameters.
"""

from __future__ import annotations

import weakref

import torch

from resu_compile.config import ResuConfig
from resu_compile.runtime.controller import PhaseController

# Controllers created by the "resu" backend name, per root module (graphs of one model, split by
# graph breaks, share one controller); every live controller, for lookups by parameter.
_BY_MODULE: weakref.WeakKeyDictionary[torch.nn.Module, PhaseController] = (
    weakref.WeakKeyDictionary()
)
_ALL: weakref.WeakSet[PhaseController] = weakref.WeakSet()


def track(controller: PhaseController, module: torch.nn.Module | None = None) -> None:
    """Make ``controller`` findable by :func:`find_controller`."""
    _ALL.add(controller)
    if module is not None:
        _BY_MODULE[module] = controller


def untrack(controller: PhaseController) -> None:
    """Forget ``controller`` (a compile that failed after it was tracked)."""
    _ALL.discard(controller)
    for module, owner in list(_BY_MODULE.items()):
        if owner is controller:
            del _BY_MODULE[module]


def registered(module: torch.nn.Module) -> PhaseController | None:
    """The controller created for ``module`` itself, if any."""
    return _BY_MODULE.get(module)


def find_controller(model: torch.nn.Module) -> PhaseController | None:
    """The controller managing ``model`` (a compiled or original module), if any."""
    handle = getattr(model, "__dict__", {}).get("resu")
    if isinstance(handle, PhaseController):
        return handle
    original = getattr(model, "_orig_mod", model)
    if original in _BY_MODULE:
        return _BY_MODULE[original]
    for param in original.parameters():
        controller = owner_of(param)
        if controller is not None:
            return controller
    return None


def owner_of(param: torch.Tensor) -> PhaseController | None:
    """The live controller that manages ``param``, if any."""
    for controller in list(_ALL):
        if controller.state.get(param) is not None:
            return controller
    return None


def holder_of(params: list[torch.nn.Parameter]) -> PhaseController | None:
    """The live controller that manages one of ``params`` or whose module holds one (a graph
    traced in a submodule's frame, after a graph break there, belongs to the whole model)."""
    for param in params:
        controller = owner_of(param)
        if controller is not None:
            return controller
    wanted = {id(p) for p in params}
    for module, controller in list(_BY_MODULE.items()):
        if any(id(p) in wanted for p in module.parameters()):
            return controller
    return None


def shared_parameter(
    model: torch.nn.Module,
) -> tuple[str, PhaseController, torch.nn.Module | None] | None:
    """A parameter of ``model`` that another model's controller already holds (managed, or in the
    module it was created for), as (name in ``model``, that controller, its module)."""
    model = getattr(model, "_orig_mod", model)
    others = [
        (module, controller, {id(p) for p in module.parameters()})
        for module, controller in list(_BY_MODULE.items())
        if module is not model
    ]
    for name, param in model.named_parameters():
        owner = owner_of(param)
        if owner is not None and module_of(owner) is not model:
            return name, owner, module_of(owner)
        for module, controller, held in others:
            if id(param) in held:
                return name, controller, module
    return None


def module_of(controller: PhaseController) -> torch.nn.Module | None:
    """The module ``controller`` was created for, if it is still alive."""
    return next((m for m, c in list(_BY_MODULE.items()) if c is controller), None)


def new_controller(config: ResuConfig, module: torch.nn.Module | None = None) -> PhaseController:
    names = {id(p): n for n, p in module.named_parameters()} if module is not None else None
    controller = PhaseController(config, names, module)
    track(controller, module)
    return controller
