"""Rewrite a Dynamo graph into the phase variants the dispatcher runs.

Variants differ only in what sits between a managed weight and its consumers:

- ``dense``: nothing (in-place storage: the weight already is ``W_eff``);
- ``sparse``: ``mask_gradient(W, bits)`` so the weight gradient is 0 on the pruned set, fused by
  Inductor into the kernel that already writes that gradient;
- ``semi_sparse`` (``_masked``: with the gradient mask too): every linear use whose weight the
  sparse tensor cores take runs :func:`~resu_compile.kernels.semi_sparse.semi_sparse_linear`
  (the weight's 2:4 mask holds in these phases);
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
from resu_compile.kernels.semi_sparse import semi_sparse_linear, semi_sparse_reason

_DYNAMO_ATTRS = ("_param_name_to_source",)


@dataclass(frozen=True)
class VariantSpec:
    """What a graph variant adds to the captured graph."""

    mask_gradients: bool = False
    record_norms: bool = False
    semi_sparse: bool = False

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
    *,
    transposable: bool = False,
) -> fx.GraphModule:
    """A copy of ``gm`` rewritten for ``spec``; ``weights`` are the managed weights' placeholders
    and ``uses`` their linear and convolution uses; ``transposable``: the masks are 2:4 in both
    directions, so the semi-sparse input gradients run on the sparse tensor cores too."""
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
    if spec.semi_sparse:
        for use in uses:
            if isinstance(use, LinearUse) and semi_sparse_fallback(use) is None:
                _semi_sparse_use(graph, node_map, use, transposable)
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


def semi_sparse_fallback(use: LinearUse | ConvUse) -> str | None:
    """Why ``use`` keeps its dense product in the semi-sparse variants, or None if it runs on the
    sparse tensor cores (from the shapes, dtype and device Dynamo recorded)."""
    if isinstance(use, ConvUse):
        return "a convolution: its products stay dense"
    weight = use.weight_expr.meta.get("example_value")
    out = use.node.meta.get("example_value")
    if not isinstance(weight, torch.Tensor) or not isinstance(out, torch.Tensor):
        return "a product of unknown shape"
    if weight.dim() != 2:
        return f"a {weight.dim()}-D weight"
    out_features, in_features = reversed(weight.shape) if use.transpose_needed else weight.shape
    return semi_sparse_reason(out_features, in_features, out.dtype, out.device.type)


def _semi_sparse_use(
    graph: fx.Graph, node_map: dict[fx.Node, fx.Node], use: LinearUse, transposable: bool
) -> None:
    """Replace the copy of ``use.node`` by ``semi_sparse_linear`` on the same operands."""
    old = node_map[use.node]
    with graph.inserting_before(old):
        weight = node_map[use.weight_expr]
        if use.transpose_needed:
            oriented = graph.call_function(torch.t, (weight,))
            if isinstance(weight.meta.get("example_value"), torch.Tensor):
                oriented.meta["example_value"] = weight.meta["example_value"].t()
            weight = oriented
        bias = node_map[use.bias] if isinstance(use.bias, fx.Node) else use.bias
        new = graph.call_function(semi_sparse_linear, (node_map[use.x], weight, bias, transposable))
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)


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
