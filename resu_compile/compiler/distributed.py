"""Where Dynamo can see the weights of a distributed model: DDP's inner module, FSDP2's forwards.

- ``DistributedDataParallel``: Dynamo traces DDP's own ``forward`` and graph-breaks inside it; the
  inner module's call then runs in a ``torch.nn`` frame, which Dynamo skips for the classes of
  ``torch.nn`` itself (``nn.Sequential``: nothing captured). Compiling the inner module in place
  gives what ``DDP(resu.compile(model))`` gives.
- FSDP2 (``fully_shard``): the parameters are DTensor shards, and FSDP's pre- and post-forward hooks
  are ``torch._dynamo.disable``-d, so a graph of the whole model breaks at every sharded module and
  the layers inside run eagerly. Compiling each sharded module's ``forward`` (which runs between
  its hooks, once the unsharded parameters are in place), and that of each module owning a
  weight (:func:`compile_sharded_forwards`), lets the matcher see the Linear weights:
  plain ``nn.Parameter`` objects that FSDP keeps from one all-gather to the next. The state is kept
  for the sharded parameter each one is gathered from (:func:`sharded_parameter`): the optimizer
  steps that one, and its gradient is the reduce-scattered shard.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
except ImportError:  # a torch built without torch.distributed
    FSDPModule = DistributedDataParallel = None  # type: ignore[assignment,misc]


def ddp_inner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module a ``DistributedDataParallel`` wraps, or None for anything else."""
    if DistributedDataParallel is not None and isinstance(model, DistributedDataParallel):
        return model.module
    return None


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was sharded with FSDP2's ``fully_shard``."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def _call_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A frame of our own around the class's ``forward``, so Dynamo traces it (and inlines the
    ``torch.nn`` layers it calls): Dynamo skips the frames of ``torch.nn``'s own classes."""
    return type(module).forward(module, *args, **kwargs)


def _frame_for(cls: type) -> Callable[..., Any]:
    """:func:`_call_forward` with a code object of its own: Dynamo keeps its compiled entries (at
    most ``recompile_limit``) per code object, and each class and model needs its own."""
    code = _call_forward.__code__.replace(co_name=f"_call_forward_{cls.__name__}")
    return types.FunctionType(code, _call_forward.__globals__, code.co_name)


def compile_sharded_forwards(
    model: torch.nn.Module, backend: Callable[..., Any], **options: Any
) -> None:
    """Compile, in place, the ``forward`` of ``model``, of every FSDP2 module inside it and of
    every module that owns a weight (2+ dims) itself.

    FSDP's hooks stay outside, in ``_call_impl``. A class of the user's own compiles its
    ``forward`` itself, so a graph break at a sharded child's hook resumes inside it and the
    layers after the child are still captured; a class of ``torch.nn`` goes through
    :func:`_call_forward`. A graph break in a loop makes Dynamo skip the whole frame (the usual
    ``for block in self.blocks`` of a root), so every module that owns a weight itself (the root's
    embedding, head) gets a compiled forward too: run eagerly by a skipped frame, it is still
    captured; inlined in a graph, it is part of that graph. One compiled function per class serves
    every module of it: Dynamo passes their parameters as inputs, so identical blocks compile once.
    """
    by_class: dict[type, Callable[..., Any]] = {}
    for module in model.modules():
        owns_weights = any(p.dim() >= 2 for p in module.parameters(recurse=False))
        if module is not model and not isinstance(module, FSDPModule) and not owns_weights:
            continue
        cls = type(module)
        if cls not in by_class:
            forward = cls.forward
            if forward.__module__.startswith("torch.nn."):
                forward = _frame_for(cls)
            by_class[cls] = torch.compile(forward, backend=backend, **options)
        module.forward = functools.partial(by_class[cls], module)


def sharded_parameter(model: torch.nn.Module | None, param: torch.Tensor) -> torch.Tensor | None:
    """The sharded parameter (a DTensor) that FSDP2 gathers ``param`` from, or None.

    Read from FSDP's per-parameter records: the unsharded parameter is created at the first
    all-gather and kept (its storage is freed and refilled) for the rest of the run.
    """
    if model is None or FSDPModule is None:
        return None
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in _param_groups(module._get_fsdp_state()):
            for fsdp_param in group.fsdp_params:
                if getattr(fsdp_param, "_unsharded_param", None) is param:
                    return fsdp_param.sharded_param
    return None


def _param_groups(state: Any) -> list[Any]:
    """An FSDP state's parameter groups: a list in newer torch (one group per mesh), a single
    optional group before (torch 2.11)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]
