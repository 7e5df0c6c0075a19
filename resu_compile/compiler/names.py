"""Parameter names from Dynamo's sources, resolved against the traced frame's locals.

Names must come from the module (``model.named_parameters()``), never from the graph's placeholder
order: a ``forward`` wrapped by a ``*args, **kwargs`` decorator (HF's ``deprecate_kwarg``) puts
the model at ``args[0]``, and a name read off the placeholders would be ``0.lm_head.weight``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

_CONTAINERS = ("_modules", "_parameters", "_buffers")


def _chain(source: Any) -> list[Any]:
    """The sources from the frame's local (first) to ``source`` (last)."""
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    return chain[::-1]


def _step(value: Any, source: Any) -> Any:
    """The object ``source`` names, given the object its base names."""
    member = getattr(source, "member", None)
    if member is not None:
        return getattr(value, member)
    index = getattr(source, "index", None)
    if index is not None:
        return value[index]
    return value  # a wrapper source (NNModuleSource, ...) names its base's object


def _resolve(source: Any, f_locals: dict[str, Any]) -> tuple[torch.nn.Module | None, int]:
    """The outermost module on ``source``'s chain, evaluated from the frame's locals, and the
    chain position just past it (the local itself when nothing resolves).

    A ``forward`` wrapped by a ``*args, **kwargs`` decorator (transformers' ``deprecate_kwarg``)
    is traced as the wrapper's frame, so the module is ``args[0]``, not a local of its own.
    """
    chain = _chain(source)
    local = getattr(chain[0], "local_name", None) if chain else None
    if local is None or local not in f_locals:
        return None, 1
    value = f_locals[local]
    for position in range(1, len(chain) + 1):
        if isinstance(value, torch.nn.Module):
            return value, position
        if position == len(chain):
            break
        try:
            value = _step(value, chain[position])
        except Exception:  # a source kind this walk does not know: no module found on it
            break
    return None, 1


def frame_locals() -> dict[str, Any]:
    """Locals of the frame Dynamo is tracing (empty outside a Dynamo trace)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return dict(InstructionTranslator.current_tx().f_locals)
    except Exception:
        return {}


def source_name(source: Any, f_locals: dict[str, Any] | None = None) -> str | None:
    """Dotted parameter name (``layers.0.weight``) from a Dynamo source chain.

    With the traced frame's ``f_locals`` the name starts at the outermost module on the chain
    (``lm_head.weight`` for ``args[0].lm_head.weight``); without them, at the frame's local.
    """
    chain = _chain(source)
    _, start = _resolve(source, f_locals or {})
    parts = []
    for link in chain[start:]:
        member = getattr(link, "member", None)
        part = member if member is not None else getattr(link, "index", None)
        if part is not None and part not in _CONTAINERS:
            parts.append(str(part))
    return ".".join(parts) or None


def root_module(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The module whose forward Dynamo is tracing (the graph's parameters hang off it)."""
    f_locals = frame_locals()
    for node in gm.graph.nodes:
        source = getattr(node, "_dynamo_source", None)
        if node.op == "placeholder" and source is not None:
            root, _ = _resolve(source, f_locals)
            if root is not None:
                return root
    return None
