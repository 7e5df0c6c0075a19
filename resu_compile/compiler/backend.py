"""The torch.compile backend "resu": match, register, rewrite, hand off to the inner compiler.

For every graph Dynamo captures, the backend finds the managed weights (``passes.match`` /
``passes.eligibility``), registers them with the controller's StateManager, and returns a
:class:`GraphDispatcher`: a callable that runs, per call, the compiled variant the controller's
current phase needs. Variants are compiled once and cached; a phase switch is a dictionary lookup.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from resu_compile.compiler.distributed import sharded_parameter
from resu_compile.compiler.names import frame_locals, root_module, source_name
from resu_compile.compiler.passes.eligibility import is_lora_name, lora_adapter_ids, skip_reason
from resu_compile.compiler.passes.match import WeightCandidate, find_weight_candidates
from resu_compile.compiler.passes.rewrite import VariantSpec, build_variant, semi_sparse_fallback
from resu_compile.compiler.registry import (
    holder_of,
    module_of,
    new_controller,
    owner_of,
    registered,
)
from resu_compile.config import ResuConfig
from resu_compile.runtime.controller import PhaseController
from resu_compile.runtime.warmup import warm_up_transitions
from resu_compile.shards import shard_layout
from resu_compile.state import ManagedWeight


def inner_compiler(
    name: str, cuda_graphs: bool = False
) -> Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]:
    """The compiler each variant is handed to after the rewrite; ``cuda_graphs``: Inductor's
    CUDA graphs (``mode="reduce-overhead"``), which the 2:4 products need (their per-call host
    set-up is paid once, at capture)."""
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        if cuda_graphs:
            return functools.partial(compile_fx, config_patches={"triton.cudagraphs": True})
        return compile_fx
    if name == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")
    return lambda gm, example_inputs: gm.forward


# The variants a graph can run, by the name PhaseController.graph_variant() returns.
VARIANTS = {
    "dense": VariantSpec(),
    "sparse": VariantSpec(mask_gradients=True),
    "semi_sparse": VariantSpec(semi_sparse=True),
    "semi_sparse_masked": VariantSpec(mask_gradients=True, semi_sparse=True),
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
        sharded: list[tuple[int, WeightCandidate, ManagedWeight]] | None = None,
    ) -> None:
        self._gm = gm
        self._example_inputs = list(example_inputs)
        self._config = controller.config
        self._slots = managed
        self._placeholders = [candidate.placeholder for _, candidate, _ in managed]
        self._uses = [use for _, candidate, _ in managed for use in candidate.graph_uses]
        self._bindings: dict[int, tuple[PhaseController, list[ManagedWeight]]] = {}
        if managed:
            self._bindings[id(example_inputs[managed[0][0]])] = (
                controller,
                [w for _, _, w in managed],
            )
        # Weights gathered by FSDP2: registered (for every module whose forward reuses this
        # graph) but not rewritten, since each rank holds the mask of its shard only.
        self._controller = controller
        self._sharded = sharded or []
        self._bound_sharded: set[int] = set()
        if self._sharded:
            self._bound_sharded.add(id(example_inputs[self._sharded[0][0]]))
        if self._config.semi_sparse:
            for _, candidate, weight in managed:
                weight.semi_sparse_products = semi_sparse_products(
                    candidate, self._config.transposable
                )
        self._tracing_context = torch._guards.TracingContext.try_get()
        self._variants: dict[str, Callable[..., Any]] = {}
        self._variant(
            controller.graph_variant() if managed else "dense", [w for _, _, w in managed]
        )

    def __call__(self, *args: Any) -> Any:
        if self._sharded and id(args[self._sharded[0][0]]) not in self._bound_sharded:
            self._bind_sharded(args)
        if not self._slots:
            return self._variants["dense"](*args)
        controller, weights = self._binding(args)
        name = controller.graph_variant()
        controller.record_forward(VARIANTS[name].mask_gradients)
        return self._variant(name, weights)(*args, *_extra_inputs(VARIANTS[name], weights))

    def _variant(self, name: str, weights: list[ManagedWeight]) -> Callable[..., Any]:
        compiled = self._variants.get(name)
        if compiled is None:
            spec = VARIANTS[name]
            variant = build_variant(
                self._gm,
                self._placeholders,
                self._uses,
                spec,
                transposable=self._config.transposable,
            )
            inner = inner_compiler(self._config.compiler, cuda_graphs=spec.semi_sparse)
            inputs = [*self._example_inputs, *_extra_inputs(spec, weights)]
            with contextlib.ExitStack() as stack:
                if (
                    self._tracing_context is not None
                    and torch._guards.TracingContext.try_get() is None
                ):
                    stack.enter_context(torch._guards.tracing(self._tracing_context))
                compiled = self._variants[name] = inner(variant, inputs)
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
            controller = owner_of(first) or new_controller(self._config)
            weights = []
            for index, _, template in self._slots:
                weight = controller.state.register(args[index], template.name)
                weight.ops, weight.input_dim = template.ops, template.input_dim
                weights.append(weight)
            binding = self._bindings[id(first)] = (controller, weights)
        return binding

    def _bind_sharded(self, args: tuple[Any, ...]) -> None:
        """Register the sharded weights of another module whose forward runs this graph."""
        controller = self._controller
        module = module_of(controller)
        for index, candidate, template in self._sharded:
            param = sharded_parameter(module, args[index])
            if param is None:
                raise RuntimeError(
                    "resu: a graph compiled for FSDP2-sharded weights received a parameter that "
                    "no fully_shard-ed module of this model gathers"
                )
            register_sharded(controller, param, controller.name_of(param, template.name), candidate)
        self._bound_sharded.add(id(args[self._sharded[0][0]]))


def register_sharded(
    controller: PhaseController, param: torch.Tensor, name: str, candidate: WeightCandidate
) -> ManagedWeight:
    """Register FSDP2's sharded ``param`` (``candidate`` is its gathered form in a graph): its
    state is that of the local shard, and the optimizer step (never the graph) applies its mask."""
    weight = controller.state.register(param, name)
    if weight.shard is None:
        weight.shard = shard_layout(param, name)
    weight.graph_masked = False
    weight.ops = sorted(set(weight.ops) | set(candidate.weight_ops))
    if weight.input_dim is None:
        weight.input_dim = candidate.input_dim
    return weight


def semi_sparse_products(candidate: WeightCandidate, transposable: bool) -> str:
    """What the report says of a weight's products in the semi-sparse variants."""
    reasons = [semi_sparse_fallback(use) for use in candidate.graph_uses]
    dense = "; ".join(sorted({r for r in reasons if r is not None}))
    if None not in reasons:
        return f"dense: {dense or 'no linear use'}"
    sparse = (
        "forward and input gradient on 2:4 cores"
        if transposable
        else "forward on 2:4 cores (input gradient dense: mask not transposable)"
    )
    return f"{sparse}; elsewhere dense: {dense}" if dense else sparse


def _extra_inputs(spec: VariantSpec, weights: list[ManagedWeight]) -> list[torch.Tensor]:
    """The per-weight tensors a variant takes after Dynamo's inputs."""
    extra: list[torch.Tensor] = []
    for kind in spec.extra_inputs:
        if kind == "mask_bits":
            extra += [w.mask_bits_or_all_active() for w in weights]
        else:
            extra += [w.input_norm_buffer() for w in weights]
    return extra


def compile_graph(
    controller: PhaseController, gm: fx.GraphModule, example_inputs: list[Any]
) -> GraphDispatcher:
    """Match, register and rewrite one Dynamo graph for ``controller``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {id(node): i for i, node in enumerate(placeholders)}
    f_locals = frame_locals()
    module = module_of(controller)
    adapters = lora_adapter_ids(module) if module is not None else None
    managed, sharded = [], []
    known_before = len(controller.state)
    for candidate in find_weight_candidates(gm, example_inputs):
        shard_of = sharded_parameter(module, candidate.param)
        param = shard_of if shard_of is not None else candidate.param
        fallback = source_name(getattr(candidate.placeholder, "_dynamo_source", None), f_locals)
        name = controller.name_of(param, fallback or candidate.placeholder.name)
        lora = id(param) in adapters if adapters is not None else is_lora_name(name)
        reason = skip_reason(candidate, name, controller.config, lora)
        if reason is not None:
            # A weight managed from an earlier graph stays managed but is not rewritten here, so
            # this graph's gradient contribution is not masked: the optimizer step masks it.
            known = controller.state.get(param)
            if known is not None:
                known.graph_masked = False
            controller.state.skip(name, param, reason)
            continue
        if shard_of is not None:
            weight = register_sharded(controller, shard_of, name, candidate)
            sharded.append((index_of[id(candidate.placeholder)], candidate, weight))
            continue
        weight = controller.state.register(candidate.param, name)
        weight.ops = sorted(set(weight.ops) | set(candidate.weight_ops))
        if weight.input_dim is None:
            weight.input_dim = candidate.input_dim
        managed.append((index_of[id(candidate.placeholder)], candidate, weight))
    if len(controller.state) > known_before:
        warm_up_transitions(controller.config, list(controller.state))
    return GraphDispatcher(controller, gm, example_inputs, managed, sharded)


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
    root = root_module(gm)
    controller = registered(root) if root is not None else None
    if controller is None:
        controller = holder_of([v for v in example_inputs if isinstance(v, torch.nn.Parameter)])
    if controller is None:
        controller = new_controller(ResuConfig.from_options(options), root)
    elif options is not None:
        asked, current = ResuConfig.from_options(options).to_dict(), controller.config.to_dict()
        differ = sorted(k for k, v in asked.items() if current[k] != v)
        if differ:
            raise ValueError(
                f"torch.compile(backend='resu'): this model is already managed with other "
                f"options ({', '.join(differ)} differ); its options cannot change after "
                "compilation: build a fresh model, or load a checkpoint into one"
            )
    return compile_graph(controller, gm, example_inputs)


def register() -> None:
    """Register the "resu" name unless the entry point already did (avoids a duplicate-name error)."""
    from torch._dynamo import list_backends, register_backend

    if "resu" not in list_backends(exclude_tags=()):
        register_backend(resu_backend, name="resu")
