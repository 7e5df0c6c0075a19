"""Find the Parameters that a Dynamo graph uses only as matmul weights.

Dynamo (torch >= 2.5) hands parameters to the backend as placeholders whose example inputs are the
real ``nn.Parameter`` objects. From each such placeholder we follow its users through view-like ops
(transposes, dtype casts, ``contiguous``) to the ops that consume it. A parameter is a candidate for
management when every consumer is a matmul-like op that takes it as the weight operand; any other
consumer (an embedding lookup, an add, a convolution) is recorded as the reason to skip it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

# Ops through which a weight stays "the same weight" (possibly transposed or cast).
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_KEEP_METHODS = {"to", "contiguous", "float", "half", "bfloat16", "type"}
_TRANSPOSE_ATTRS = {"T", "mT"}


@dataclass(frozen=True)
class LinearUse:
    """One use of a weight that can be written as ``linear(x, weight_out_in, bias)``.

    ``weight_expr`` is the graph node holding the weight as the op sees it; ``transpose_needed``
    says whether ``weight_expr`` is in (in, out) orientation and needs a ``.t()`` to be (out, in).
    """

    node: fx.Node
    x: fx.Node
    weight_expr: fx.Node
    bias: fx.Node | None
    transpose_needed: bool


@dataclass
class WeightCandidate:
    """A Parameter placeholder and everything the graph does with it."""

    placeholder: fx.Node
    param: torch.nn.Parameter
    matmul_ops: list[str] = field(default_factory=list)
    linear_uses: list[LinearUse] = field(default_factory=list)
    other_uses: list[str] = field(default_factory=list)
    input_dims: set[int] = field(default_factory=set)

    @property
    def only_matmul(self) -> bool:
        return bool(self.matmul_ops) and not self.other_uses

    @property
    def input_dim(self) -> int | None:
        """Dimension of the Parameter that multiplies the input features, when unambiguous."""
        return next(iter(self.input_dims)) if len(self.input_dims) == 1 else None


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear)


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.matmul, torch.matmul)) or (
        node.op == "call_method" and node.target == "matmul"
    )


def _is_addmm(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.addmm) or (
        node.op == "call_method" and node.target == "addmm"
    )


def _is_mm(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.mm) or (
        node.op == "call_method" and node.target == "mm"
    )


def _is_other_matmul(node: fx.Node) -> str | None:
    """Matmul-like ops we manage but do not rewrite (their weight is used in place)."""
    if node.op == "call_function" and node.target is torch.einsum:
        return "einsum"
    if (node.op == "call_function" and node.target is torch.bmm) or (
        node.op == "call_method" and node.target == "bmm"
    ):
        return "bmm"
    return None


def _arg(node: fx.Node, index: int, name: str) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _transpose_step(node: fx.Node, source: fx.Node) -> bool | None:
    """If ``node`` is a view-like op of ``source``: whether it swaps the last two dims. Else None."""
    if node.op == "call_function" and node.target is getattr and node.args[0] is source:
        attr = node.args[1]
        if attr in _TRANSPOSE_ATTRS:
            return True
        return None
    if node.op == "call_function" and node.target in (torch.t, torch.transpose):
        if node.args[0] is not source:
            return None
        if node.target is torch.t:
            return True
        return _swaps_last_two(source, node.args[1:])
    if node.op != "call_method" or node.args[0] is not source:
        return None
    if node.target in _KEEP_METHODS:
        return False
    if node.target == "t":
        return True
    if node.target == "transpose":
        return _swaps_last_two(source, node.args[1:])
    if node.target == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        return True if tuple(dims) in ((1, 0), (-1, -2)) else None
    return None


def _swaps_last_two(source: fx.Node, dims: tuple) -> bool | None:
    ndim = _ndim(source)
    if ndim is None or len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return None
    normalized = sorted(d % ndim for d in dims)
    return True if normalized == [ndim - 2, ndim - 1] else None


def _ndim(node: fx.Node) -> int | None:
    value = node.meta.get("example_value")
    return value.dim() if isinstance(value, torch.Tensor) else None


def _describe(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)) if node.op != "call_method" else str(target)


def _classify_use(
    candidate: WeightCandidate, user: fx.Node, expr: fx.Node, parity: bool, weight_ndim: int
) -> None:
    """Record how ``user`` consumes ``expr`` (the weight after view ops of total ``parity``)."""
    if _is_linear(user) and _arg(user, 1, "weight") is expr and _arg(user, 0, "input") is not expr:
        candidate.matmul_ops.append("linear")
        candidate.input_dims.add(0 if parity else 1)
        bias = _arg(user, 2, "bias")
        candidate.linear_uses.append(LinearUse(user, user.args[0], expr, bias, False))
        return
    if (_is_matmul(user) or _is_mm(user)) and len(user.args) == 2 and not user.kwargs:
        x, weight = user.args
        if weight is expr and x is not expr and weight_ndim == 2:
            candidate.matmul_ops.append("matmul")
            candidate.input_dims.add(1 if parity else 0)
            candidate.linear_uses.append(LinearUse(user, x, expr, None, True))
            return
        candidate.matmul_ops.append("matmul (weight on the left)")
        return
    if _is_addmm(user) and len(user.args) == 3 and not user.kwargs:
        bias, x, weight = user.args
        if weight is expr and x is not expr and bias is not expr:
            candidate.matmul_ops.append("addmm")
            candidate.input_dims.add(1 if parity else 0)
            candidate.linear_uses.append(LinearUse(user, x, expr, bias, True))
            return
    other = _is_other_matmul(user)
    if other is not None:
        candidate.matmul_ops.append(other)
        return
    candidate.other_uses.append(_describe(user))


def _walk(candidate: WeightCandidate, expr: fx.Node, parity: bool, weight_ndim: int) -> None:
    for user in list(expr.users):
        step = _transpose_step(user, expr)
        if step is not None:
            _walk(candidate, user, parity ^ step, weight_ndim)
        else:
            _classify_use(candidate, user, expr, parity, weight_ndim)


def find_weight_candidates(
    gm: fx.GraphModule, example_inputs: list[object]
) -> list[WeightCandidate]:
    """Every Parameter placeholder of ``gm`` with the record of its uses (one per Parameter)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found: dict[int, WeightCandidate] = {}
    for node, example in zip(placeholders, example_inputs, strict=True):
        if not isinstance(example, torch.nn.Parameter):
            continue
        candidate = found.get(id(example))
        if candidate is None:
            candidate = WeightCandidate(placeholder=node, param=example)
            found[id(example)] = candidate
        _walk(candidate, node, False, example.dim())
    return list(found.values())
