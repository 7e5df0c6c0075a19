"""Find the Parameters that a Dynamo graph uses only as matmul or convolution weights.

Dynamo (torch >= 2.5) hands parameters to the backend as placeholders whose example inputs are the
real ``nn.Parameter`` objects. From each such placeholder we follow its users through view-like ops
(transposes in every spelling torch 2.5 .. 2.14 emits, dtype casts, ``contiguous``) to the ops that
consume it. A parameter is a candidate for management when every consumer is a matmul-like op or a
convolution that takes it as the weight operand; any other consumer (an embedding lookup, an add,
a transposed convolution) is recorded as the reason to skip it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

# Ops through which a weight stays "the same weight", cast or copied but not moved.
_KEEP_METHODS = {"to", "contiguous", "float", "half", "bfloat16", "double", "type"}

# Every spelling of a dim permutation a Dynamo graph holds, by its normalized name:
# getattr attributes, Tensor methods, torch functions and (torch 2.14) aten overload packets:
# there ``W.T`` is ``aten.numpy_T``, ``W.mT`` ``aten.mT``, ``W.mH`` ``aten.mH``, ``W.H``
# ``aten.matrix_H``.
_PERMUTE_ATTRS = {"T": "numpy_T", "mT": "mT", "H": "H", "mH": "adjoint"}
_PERMUTE_METHODS = {
    "t": "t",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "permute": "permute",
    "adjoint": "adjoint",
    "numpy_T": "numpy_T",
    "mT": "mT",
    "mH": "adjoint",
    "H": "H",
    "matrix_H": "H",
}
_PERMUTE_FUNCTIONS = {
    torch.t: "t",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.permute: "permute",
    torch.adjoint: "adjoint",
}
# The spellings that also conjugate: the same weight only for real dtypes.
_CONJUGATING = {"H", "adjoint"}

# Convolutions whose operand 1 is a (out, in / groups, *kernel) weight, by their op name.
_CONVOLUTIONS = {
    torch.conv1d: "conv1d",
    torch.conv2d: "conv2d",
    torch.conv3d: "conv3d",
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
}


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


@dataclass(frozen=True)
class ConvUse:
    """One use of a weight as the kernel of an ungrouped convolution of input ``x``.

    ``channel_dim`` is the input-channel dim of ``x`` (1 for a batch, 0 for an unbatched input):
    the calibrate variant records the squared norm of each input channel over every other dim.
    """

    node: fx.Node
    x: fx.Node
    weight_expr: fx.Node
    channel_dim: int


@dataclass
class WeightCandidate:
    """A Parameter placeholder and everything the graph does with it.

    ``weight_ops`` names each consumer that takes it as a weight ("linear", "matmul", "conv2d",
    ...); ``grouped_conv`` is set when one of them is a grouped or depthwise convolution, whose
    kernel rows read different input channels.
    """

    placeholder: fx.Node
    param: torch.nn.Parameter
    weight_ops: list[str] = field(default_factory=list)
    linear_uses: list[LinearUse] = field(default_factory=list)
    conv_uses: list[ConvUse] = field(default_factory=list)
    other_uses: list[str] = field(default_factory=list)
    input_dims: set[int] = field(default_factory=set)
    grouped_conv: bool = False

    @property
    def input_dim(self) -> int | None:
        """Dimension of the Parameter that multiplies the input features, when unambiguous."""
        return next(iter(self.input_dims)) if len(self.input_dims) == 1 else None

    @property
    def graph_uses(self) -> list[LinearUse | ConvUse]:
        """The uses the calibrate variant records input norms for (and ``resu_linear`` rewrites,
        the linear ones)."""
        return [*self.linear_uses, *self.conv_uses]


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


def _convolution(node: fx.Node) -> str | None:
    """The op name of a (non-transposed) convolution node, else None."""
    if node.op != "call_function":
        return None
    name = _CONVOLUTIONS.get(node.target)  # type: ignore[arg-type]
    if name is not None:
        return name
    if node.target in (torch.convolution, torch._convolution):
        return None if _arg(node, 6, "transposed") else "convolution"
    return None


def _arg(node: fx.Node, index: int, name: str) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _aten_name(target: object) -> str | None:
    """``numpy_T`` for ``torch.ops.aten.numpy_T`` (packet) or one of its overloads, else None."""
    packet = getattr(target, "overloadpacket", target)
    qualified = getattr(packet, "_qualified_op_name", None)
    if isinstance(qualified, str) and qualified.startswith("aten::"):
        return qualified.removeprefix("aten::")
    return None


def _permute_spelling(node: fx.Node, source: fx.Node) -> tuple[str, tuple] | None:
    """``(normalized name, dim args)`` if ``node`` permutes the dims of ``source``, else None."""
    if not node.args or node.args[0] is not source:
        return None
    rest = tuple(node.args[1:])
    if node.op == "call_function" and node.target is getattr:
        attr = node.args[1]
        return (_PERMUTE_ATTRS[attr], ()) if attr in _PERMUTE_ATTRS else None
    if node.op == "call_method":
        name = _PERMUTE_METHODS.get(str(node.target))
        return (name, rest) if name is not None else None
    if node.op == "call_function":
        name = _PERMUTE_FUNCTIONS.get(node.target)  # type: ignore[arg-type]
        if name is None:
            name = _PERMUTE_METHODS.get(_aten_name(node.target) or "")
        return (name, rest) if name is not None else None
    return None


def _permutation(name: str, dims: tuple, ndim: int) -> tuple[int, ...] | None:
    """The order of the source dims after the op ``name`` with ``dims``; None if not static."""
    order = list(range(ndim))
    if name == "t" and ndim < 2:
        return tuple(order)
    if name in ("t", "H"):
        return tuple(reversed(order)) if ndim == 2 else None
    if name == "numpy_T":
        return tuple(reversed(order))
    if name in ("mT", "adjoint"):
        if ndim < 2:
            return None
        order[-2], order[-1] = order[-1], order[-2]
        return tuple(order)
    if name == "transpose":
        if len(dims) != 2 or not all(isinstance(d, int) for d in dims) or ndim == 0:
            return None
        a, b = (d % ndim for d in dims)
        order[a], order[b] = order[b], order[a]
        return tuple(order)
    if name == "permute":
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims) or ndim == 0:
            return None
        return tuple(d % ndim for d in dims)
    return None


def _view_step(node: fx.Node, source: fx.Node, param: torch.Tensor) -> bool | None:
    """If ``node`` is a view-like op of ``source``: whether it swaps the last two dims. Else None.

    A permutation that moves other dims too (``numpy_T`` of a 3-D weight, ``permute(2, 0, 1)``)
    is not a view of "the same weight" and ends the walk as an other use.
    """
    if node.op == "call_method" and node.target in _KEEP_METHODS and node.args[0] is source:
        return False
    spelling = _permute_spelling(node, source)
    if spelling is None:
        return None
    name, dims = spelling
    if name in _CONJUGATING and param.is_complex():
        return None
    ndim = _ndim(source)
    order = _permutation(name, dims, ndim) if ndim is not None else None
    if order is None:
        return None
    identity = tuple(range(ndim))
    if order == identity:
        return False
    swapped = (*identity[:-2], ndim - 1, ndim - 2)
    return True if order == swapped else None


def _ndim(node: fx.Node) -> int | None:
    value = node.meta.get("example_value")
    return value.dim() if isinstance(value, torch.Tensor) else None


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    return _aten_name(target) or getattr(target, "__name__", str(target))


def _classify_use(
    candidate: WeightCandidate, user: fx.Node, expr: fx.Node, parity: bool, weight_ndim: int
) -> None:
    """Record how ``user`` consumes ``expr`` (the weight after view ops of total ``parity``)."""
    if _is_linear(user) and _arg(user, 1, "weight") is expr and _arg(user, 0, "input") is not expr:
        candidate.weight_ops.append("linear")
        candidate.input_dims.add(0 if parity else 1)
        bias = _arg(user, 2, "bias")
        candidate.linear_uses.append(LinearUse(user, user.args[0], expr, bias, False))
        return
    if (_is_matmul(user) or _is_mm(user)) and len(user.args) == 2 and not user.kwargs:
        x, weight = user.args
        if weight is expr and x is not expr and weight_ndim == 2:
            candidate.weight_ops.append("matmul")
            candidate.input_dims.add(1 if parity else 0)
            candidate.linear_uses.append(LinearUse(user, x, expr, None, True))
            return
        candidate.weight_ops.append("matmul (weight on the left)")
        return
    if _is_addmm(user) and len(user.args) == 3 and not user.kwargs:
        bias, x, weight = user.args
        if weight is expr and x is not expr and bias is not expr:
            candidate.weight_ops.append("addmm")
            candidate.input_dims.add(1 if parity else 0)
            candidate.linear_uses.append(LinearUse(user, x, expr, bias, True))
            return
    conv = _convolution(user)
    if conv is not None:
        _classify_conv(candidate, user, expr, parity, conv)
        return
    other = _is_other_matmul(user)
    if other is not None:
        candidate.weight_ops.append(other)
        return
    candidate.other_uses.append(_describe(user))


def _classify_conv(
    candidate: WeightCandidate, user: fx.Node, expr: fx.Node, parity: bool, conv: str
) -> None:
    """A convolution takes its kernel as operand 1, untransposed; the input dim is 1."""
    x = _arg(user, 0, "input")
    if parity or _arg(user, 1, "weight") is not expr or x is expr or not isinstance(x, fx.Node):
        candidate.other_uses.append(f"{conv} (not as its weight)")
        return
    candidate.weight_ops.append(conv)
    x_ndim, w_ndim = _ndim(x), _ndim(expr)
    if x_ndim is None or w_ndim is None:
        candidate.other_uses.append(f"{conv} (input of unknown shape)")
        return
    channel_dim = x_ndim - w_ndim + 1  # 1 for a batch, 0 for an unbatched input
    channels = x.meta["example_value"].shape[channel_dim]
    if channels != candidate.param.shape[1]:
        candidate.grouped_conv = True  # each group's rows read their own input channels
        return
    candidate.input_dims.add(1)
    candidate.conv_uses.append(ConvUse(user, x, expr, channel_dim))


def _walk(candidate: WeightCandidate, expr: fx.Node, parity: bool, weight_ndim: int) -> None:
    for user in list(expr.users):
        step = _view_step(user, expr, candidate.param)
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
