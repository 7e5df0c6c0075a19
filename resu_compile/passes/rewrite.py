"""Rewrite a Dynamo graph into a phase variant that calls the resu ops.

Dynamo's own ``GraphModule`` is never mutated (doing so later fails with ``KeyError: grapharg``):
each variant is a fresh graph copied node by node, with the Dynamo metadata carried over.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from resu_compile.kernels import ops  # noqa: F401  (registers torch.ops.resu.*)
from resu_compile.passes.match import LinearUse

_DYNAMO_ATTRS = ("_param_name_to_source",)


def build_variant(
    gm: fx.GraphModule, linear_uses: list[LinearUse], norm_slots: dict[int, int] | None = None
) -> fx.GraphModule:
    """A copy of ``gm`` where every ``linear_uses`` op is ``resu::linear``.

    With ``norm_slots`` (``id(parameter placeholder) -> slot``) the copy is the *calibrate*
    variant: it takes one extra float32 input per slot, and every rewritten linear also adds its
    input's squared column norms into the slot of its weight.
    """
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    output_value = graph.graph_copy(gm.graph, node_map)
    graph.output(output_value)
    for old, new in node_map.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)  # type: ignore[attr-defined]

    norm_inputs = _add_norm_inputs(graph, norm_slots)
    for use in linear_uses:
        _rewrite_linear(graph, node_map, use, norm_inputs, norm_slots)

    graph.lint()
    variant = fx.GraphModule(gm, graph)
    variant.meta.update(gm.meta)
    for attr in _DYNAMO_ATTRS:
        if hasattr(gm, attr):
            setattr(variant, attr, getattr(gm, attr))
    return variant


def _add_norm_inputs(graph: fx.Graph, norm_slots: dict[int, int] | None) -> list[fx.Node]:
    if not norm_slots:
        return []
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs = []
    with graph.inserting_after(last_placeholder):
        for slot in reversed(range(len(set(norm_slots.values())))):
            node = graph.placeholder(f"resu_input_sq_norms_{slot}")
            node._dynamo_source = None  # type: ignore[attr-defined]
            inputs.append(node)
    inputs.reverse()
    return inputs


def _weight_placeholder(node: fx.Node) -> fx.Node:
    while node.op != "placeholder":
        node = node.args[0]  # type: ignore[assignment]
    return node


def _rewrite_linear(
    graph: fx.Graph,
    node_map: dict[fx.Node, fx.Node],
    use: LinearUse,
    norm_inputs: list[fx.Node],
    norm_slots: dict[int, int] | None,
) -> None:
    old = node_map[use.node]
    x = node_map[use.x]
    weight = node_map[use.weight_expr]
    bias = node_map[use.bias] if isinstance(use.bias, fx.Node) else None
    with graph.inserting_before(old):
        if norm_slots:
            slot = norm_slots[id(_weight_placeholder(use.weight_expr))]
            graph.call_function(
                torch.ops.resu.accumulate_input_sq_norms.default, (x, norm_inputs[slot])
            )
        if use.transpose_needed:
            weight = graph.call_function(torch.t, (weight,))
        new = graph.call_function(torch.ops.resu.linear.default, (x, weight, bias))
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
