"""The torch.compile backend "resu": match, register, rewrite, hand off to the inner compiler.

For every graph Dynamo captures, the backend finds the managed weights (``passes.match`` /
``passes.select``), registers them with the controller's StateManager, and returns a
:class:`GraphDispatcher`: a callable that runs, per call, the compiled variant the controller's
current phase needs. Variants are compiled once and cached; a phase switch is a dictionary lookup.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from resu_compile.config import ResuConfig
from resu_compile.passes.match import WeightCandidate, find_weight_candidates
from resu_compile.passes.rewrite import VariantSpec, build_variant
from resu_compile.passes.select import is_lora_name, lora_adapter_ids, skip_reason
from resu_compile.runtime.controller import PhaseController
from resu_compile.state import ManagedWeight

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


def find_controller(model: torch.nn.Module) -> PhaseController | None:
    """The controller managing ``model`` (a compiled or original module), if any."""
    handle = getattr(model, "__dict__", {}).get("resu")
    if isinstance(handle, PhaseController):
        return handle
    original = getattr(model, "_orig_mod", model)
    if original in _BY_MODULE:
        return _BY_MODULE[original]
    for param in original.parameters():
        controller = _owner_of(param)
        if controller is not None:
            return controller
    return None


def inner_compiler(name: str) -> Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]:
    """The compiler each variant is handed to after the rewrite."""
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    if name == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")
    return lambda gm, example_inputs: gm.forward


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


def _frame_locals() -> dict[str, Any]:
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


# The variants a graph can run, by the name PhaseController.graph_variant() returns.
VARIANTS = {
    "dense": VariantSpec(),
    "sparse": VariantSpec(mask_gradients=True),
    "calibrate": VariantSpec(record_norms=True),
}


class GraphDispatcher:
    """What the backend returns for one Dynamo graph: runs the variant the phase needs.

    The first variant (the one for the phase in force) compiles now, inside Dynamo's tracing
    context; the others compile on first use, inside that saved context, and are cached.
    """

    def __init__(
        self,
        controller: PhaseController,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        managed: list[tuple[int, WeightCandidate, ManagedWeight]],
    ) -> None:
        self._gm = gm
        self._example_inputs = list(example_inputs)
        self._config = controller.config
        self._inner = inner_compiler(controller.config.compiler)
        self._slots = managed
        self._placeholders = [candidate.placeholder for _, candidate, _ in managed]
        self._uses = [use for _, candidate, _ in managed for use in candidate.graph_uses]
        self._bindings: dict[int, tuple[PhaseController, list[ManagedWeight]]] = {}
        if managed:
            self._bindings[id(example_inputs[managed[0][0]])] = (
                controller,
                [w for _, _, w in managed],
            )
        self._tracing_context = torch._guards.TracingContext.try_get()
        self._variants: dict[str, Callable[..., Any]] = {}
        self._variant(
            controller.graph_variant() if managed else "dense", [w for _, _, w in managed]
        )

    def __call__(self, *args: Any) -> Any:
        if not self._slots:
            return self._variants["dense"](*args)
        controller, weights = self._binding(args)
        name = controller.graph_variant()
        controller.record_forward(name)
        return self._variant(name, weights)(*args, *_extra_inputs(VARIANTS[name], weights))

    def _variant(self, name: str, weights: list[ManagedWeight]) -> Callable[..., Any]:
        compiled = self._variants.get(name)
        if compiled is None:
            spec = VARIANTS[name]
            variant = build_variant(self._gm, self._placeholders, self._uses, spec)
            inputs = [*self._example_inputs, *_extra_inputs(spec, weights)]
            with contextlib.ExitStack() as stack:
                if (
                    self._tracing_context is not None
                    and torch._guards.TracingContext.try_get() is None
                ):
                    stack.enter_context(torch._guards.tracing(self._tracing_context))
                compiled = self._variants[name] = self._inner(variant, inputs)
        return compiled

    def _binding(self, args: tuple[Any, ...]) -> tuple[PhaseController, list[ManagedWeight]]:
        """Controller and weights for the parameters passed in this call.

        Dynamo reuses compiled code for a second instance of the same model class compiled with
        the same backend options, so the parameters may belong to another model: they are then
        registered with that model's controller (created on first sight).
        """
        first = args[self._slots[0][0]]
        binding = self._bindings.get(id(first))
        if binding is None:
            controller = _owner_of(first) or _new_controller(self._config)
            weights = []
            for index, _, template in self._slots:
                weight = controller.state.register(args[index], template.name)
                weight.ops, weight.input_dim = template.ops, template.input_dim
                weights.append(weight)
            binding = self._bindings[id(first)] = (controller, weights)
        return binding


def _extra_inputs(spec: VariantSpec, weights: list[ManagedWeight]) -> list[torch.Tensor]:
    """The per-weight tensors a variant takes after Dynamo's inputs."""
    extra: list[torch.Tensor] = []
    for kind in spec.extra_inputs:
        if kind == "mask_bits":
            extra += [w.mask_bits_or_all_active() for w in weights]
        else:
            extra += [w.input_norm_buffer() for w in weights]
    return extra


def _owner_of(param: torch.Tensor) -> PhaseController | None:
    """The live controller that manages ``param``, if any."""
    for controller in list(_ALL):
        if controller.state.get(param) is not None:
            return controller
    return None


def _holder_of(params: list[torch.nn.Parameter]) -> PhaseController | None:
    """The live controller that manages one of ``params`` or whose module holds one (a graph
    traced in a submodule's frame, after a graph break there, belongs to the whole model)."""
    for param in params:
        controller = _owner_of(param)
        if controller is not None:
            return controller
    wanted = {id(p) for p in params}
    for module, controller in list(_BY_MODULE.items()):
        if any(id(p) in wanted for p in module.parameters()):
            return controller
    return None


def _module_of(controller: PhaseController) -> torch.nn.Module | None:
    """The module ``controller`` was created for, if it is still alive."""
    return next((m for m, c in list(_BY_MODULE.items()) if c is controller), None)


def _new_controller(config: ResuConfig, module: torch.nn.Module | None = None) -> PhaseController:
    names = {id(p): n for n, p in module.named_parameters()} if module is not None else None
    controller = PhaseController(config, names, module)
    track(controller, module)
    return controller


def compile_graph(
    controller: PhaseController, gm: fx.GraphModule, example_inputs: list[Any]
) -> GraphDispatcher:
    """Match, register and rewrite one Dynamo graph for ``controller``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {id(node): i for i, node in enumerate(placeholders)}
    f_locals = _frame_locals()
    module = _module_of(controller)
    adapters = lora_adapter_ids(module) if module is not None else None
    managed = []
    for candidate in find_weight_candidates(gm, example_inputs):
        fallback = source_name(getattr(candidate.placeholder, "_dynamo_source", None), f_locals)
        name = controller.name_of(candidate.param, fallback or candidate.placeholder.name)
        lora = id(candidate.param) in adapters if adapters is not None else is_lora_name(name)
        reason = skip_reason(candidate, name, controller.config, lora)
        if reason is not None:
            # A weight managed from an earlier graph stays managed but is not rewritten here, so
            # this graph's gradient contribution is not masked: the optimizer step masks it.
            known = controller.state.get(candidate.param)
            if known is not None:
                known.graph_masked = False
            controller.state.skip(name, candidate.param, reason)
            continue
        weight = controller.state.register(candidate.param, name)
        weight.ops = sorted(set(weight.ops) | set(candidate.weight_ops))
        if weight.input_dim is None:
            weight.input_dim = candidate.input_dim
        managed.append((index_of[id(candidate.placeholder)], candidate, weight))
    return GraphDispatcher(controller, gm, example_inputs, managed)


class ResuBackend:
    """A torch.compile backend bound to one controller (what :func:`resu.compile` uses)."""

    def __init__(self, controller: PhaseController) -> None:
        self.controller = controller

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **_: Any) -> GraphDispatcher:
        return compile_graph(self.controller, gm, example_inputs)


def resu_backend(
    gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None, **_: Any
) -> GraphDispatcher:
    """``torch.compile(model, backend="resu", options={...})``: options are ResuConfig fields."""
    root = _root_module(gm)
    controller = _BY_MODULE.get(root) if root is not None else None
    if controller is None:
        controller = _holder_of([v for v in example_inputs if isinstance(v, torch.nn.Parameter)])
    if controller is None:
        controller = _new_controller(ResuConfig.from_options(options), root)
    return compile_graph(controller, gm, example_inputs)


def _root_module(gm: fx.GraphModule) -> torch.nn.Module | None:
    """The module whose forward Dynamo is tracing (the graph's parameters hang off it)."""
    f_locals = _frame_locals()
    for node in gm.graph.nodes:
        source = getattr(node, "_dynamo_source", None)
        if node.op == "placeholder" and source is not None:
            root, _ = _resolve(source, f_locals)
            if root is not None:
                return root
    return None


def register() -> None:
    """Register the "resu" name unless the entry point already did (avoids a duplicate-name error)."""
    from torch._dynamo import list_backends, register_backend

    if "resu" not in list_backends(exclude_tags=()):
        register_backend(resu_backend, name="resu")
