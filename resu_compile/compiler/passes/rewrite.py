"""Rewrite a Dynamo graph into the phase variants the dispatcher runs.

Variants differ only in what sits between a managed weight and its consumers:

- ``dense``: nothing (in-place storage: the weight already is ``W_eff``);
- ``sparse``: ``mask_gradient(W, bits)`` so the weight gradient is 0 on the pruned set, fused by
  Inductor into the kernel that already writes that gradient;
- ``calibrate``: the input-column norms of every linear use (the input-channel norms of every
  ungrouped convolution) are accumulated into a buffer.

Dynamo's own ``GraphModule`` is never mutated (doing so later fails with ``KeyError: grapharg``):
each variant is a fresh graph copied node by node, with the Dynamo metadata carried over. Extra
inputs (mask bits, norm buffers) are appended after Dynamo's placeholders, one per managed weight
in slot order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from resu_compile.compiler.passes.match import ConvUse, LinearUse
from resu_compile.kernels.graph_ops import accumulate_input_sq_norms, mask_gradient

_DYNAMO_ATTRS = ("_param_name_to_source",)


@dataclass(frozen=True)
class VariantSpec:
    """What a graph variant adds to the captured graph."""

    mask_gradients: bool = False
    record_norms: bool = False

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Kinds of the per-weight inputs the variant takes after Dynamo's, in order."""
        return tuple(
            kind
            for kind, wanted in (
                ("mask_bits", self.mask_gradients),
                ("sq_norms", self.record_norms),
            )
            if wanted
        )


def build_variant(
    gm: fx.GraphModule,
    weights: list[fx.Node],
    uses: list[LinearUse | ConvUse],
    spec: VariantSpec,
) -> fx.GraphModule:
    """A copy of ``gm`` rewritten for ``spec``; ``weights`` are the managed weights' placeholders
    and ``uses`` their linear and convolution uses."""
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, node_map))
    for old, new in node_map.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)  # type: ignore[attr-defined]

    extra = _add_inputs(graph, len(weights), spec.extra_inputs)
    slot_of = {id(node): i for i, node in enumerate(weights)}
    if spec.record_norms:
        # Uses that read the same input (q, k and v; an FFN's gate and up) share one reduction.
        readers: dict[tuple[int, int | None], list[LinearUse | ConvUse]] = {}
        for use in uses:
            channel_dim = use.channel_dim if isinstance(use, ConvUse) else None
            readers.setdefault((id(use.x), channel_dim), []).append(use)
        order = {node: i for i, node in enumerate(graph.nodes)}
        for (_, channel_dim), group in readers.items():
            buffers = [
                extra["sq_norms"][slot_of[id(_weight_placeholder(u.weight_expr))]] for u in group
            ]
            first = min((node_map[u.node] for u in group), key=order.__getitem__)
            with graph.inserting_before(first):
                features = node_map[group[0].x]
                if channel_dim is not None:  # input channels last, as for a linear input
                    features = graph.call_function(torch.movedim, (features, channel_dim, -1))
                graph.call_function(accumulate_input_sq_norms, (features, *buffers))
    if spec.mask_gradients:
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for slot, placeholder in enumerate(weights):
            _mask_weight(graph, node_map[placeholder], extra["mask_bits"][slot], last_input)

    graph.lint()
    variant = fx.GraphModule(gm, graph)
    variant.meta.update(gm.meta)
    for attr in _DYNAMO_ATTRS:
        if hasattr(gm, attr):
            setattr(variant, attr, getattr(gm, attr))
    return variant


def _add_inputs(graph: fx.Graph, count: int, kinds: tuple[str, ...]) -> dict[str, list[fx.Node]]:
    """Append ``count`` placeholders per kind after the existing ones."""
    added: dict[str, list[fx.Node]] = {}
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for kind in kinds:
        added[kind] = []
        for slot in range(count):
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"resu_{kind}_{slot}")
            anchor._dynamo_source = None  # type: ignore[attr-defined]
            added[kind].append(anchor)
    return added


def _weight_placeholder(node: fx.Node) -> fx.Node:
    while node.op != "placeholder":
        node = node.args[0]  # type: ignore[assignment]
    return node


def _mask_weight(graph: fx.Graph, weight: fx.Node, bits: fx.Node, last_input: fx.Node) -> None:
    """Route every use of ``weight`` through ``mask_gradient(weight, bits)``."""
    users = list(weight.users)
    with graph.inserting_after(last_input):
        masked = graph.call_function(mask_gradient, (weight, bits))
    masked.meta.update(weight.meta)
    for user in users:
        user.replace_input_with(weight, masked)
