"""The matcher knows every spelling of a transpose that torch 2.5 .. 2.14 puts in a Dynamo graph,
and tells convolution kernels from other convolution operands."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import resu_compile as resu
from resu_compile.compiler.passes.match import find_weight_candidates

OPTIONS = {"sparsity": 0.5, "manual": True, "compiler": "aot_eager"}

# Each spells ``W.T`` for a 2-D (out, in) weight, so ``x @ spell(W)`` is ``linear(x, W)``.
SPELLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "T": lambda w: w.T,
    "t()": lambda w: w.t(),
    "torch.t": torch.t,
    "transpose(0, 1)": lambda w: w.transpose(0, 1),
    "torch.transpose(-1, -2)": lambda w: torch.transpose(w, -1, -2),
    "permute(1, 0)": lambda w: w.permute(1, 0),
    "torch.permute": lambda w: torch.permute(w, (1, 0)),
    "mT": lambda w: w.mT,
    "swapaxes": lambda w: w.swapaxes(0, 1),
    "swapdims": lambda w: w.swapdims(-1, -2),
    "torch.swapaxes": lambda w: torch.swapaxes(w, 0, 1),
    "mH": lambda w: w.mH,
    "H": lambda w: w.H,
    "adjoint()": lambda w: w.adjoint(),
    "torch.adjoint": torch.adjoint,
    "t().t().T": lambda w: w.t().t().T,
    "to().contiguous().T": lambda w: w.to(torch.float32).contiguous().T,
}


class Spelled(nn.Module):
    def __init__(self, spell: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.spell = spell
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.spell(self.w)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=list(SPELLINGS))
def test_every_transpose_spelling_is_a_managed_matmul_weight(spelling: str) -> None:
    model = Spelled(SPELLINGS[spelling])
    compiled = resu.compile(model, **OPTIONS)
    x = torch.randn(3, 4)
    with compiled.resu.calibrate():
        torch.testing.assert_close(compiled(x), x @ model.w.T)
    assert compiled.resu.state.names() == ["w"]
    weight = compiled.resu.state.by_name("w")
    assert weight.input_dim == 1  # (out, in): the transposed weight multiplies x's features
    torch.testing.assert_close(compiled.resu.input_norms("w"), x.square().sum(0).sqrt())


def test_permutations_that_move_other_dims_are_not_the_same_weight() -> None:
    class Batched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.swapped = nn.Parameter(torch.randn(2, 4, 4))
            self.moved = nn.Parameter(torch.randn(4, 2, 4))
            self.reversed = nn.Parameter(torch.randn(4, 4, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.bmm(x, self.swapped.permute(0, 2, 1))
            y = torch.bmm(y, self.moved.permute(1, 0, 2))
            return torch.bmm(y, self.reversed.permute(2, 1, 0))

    compiled = resu.compile(Batched(), **OPTIONS)
    compiled(torch.randn(2, 3, 4))
    assert compiled.resu.state.names() == ["swapped"]
    reasons = {s.name: s.reason for s in compiled.resu.state.skipped()}
    assert reasons == {
        "moved": "has non-matmul users (permute)",
        "reversed": "has non-matmul users (permute)",
    }


def _graph(spell: Callable[[fx.Graph, fx.Node], fx.Node], weight: nn.Parameter) -> fx.GraphModule:
    """``x @ spell(W)`` as a hand-built graph with Dynamo's example values on the nodes."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.placeholder("w")
    x.meta["example_value"] = torch.randn(3, weight.shape[1])
    w.meta["example_value"] = weight
    spelled = spell(graph, w)
    spelled.meta["example_value"] = weight.detach().T
    graph.output(graph.call_function(operator.matmul, (x, spelled)))
    return fx.GraphModule(nn.Module(), graph)


# torch 2.14 traces ``W.T`` on a raw Parameter as ``torch.ops.aten.numpy_T(W)``, and ``.mT``,
# ``.mH``, ``.H`` as aten packets too; older versions as ``getattr`` or Tensor methods.
ATEN_SPELLINGS: dict[str, Callable[[fx.Graph, fx.Node], fx.Node]] = {
    "aten.numpy_T": lambda g, w: g.call_function(torch.ops.aten.numpy_T, (w,)),
    "aten.numpy_T.default": lambda g, w: g.call_function(torch.ops.aten.numpy_T.default, (w,)),
    "aten.mT": lambda g, w: g.call_function(torch.ops.aten.mT, (w,)),
    "aten.mH": lambda g, w: g.call_function(torch.ops.aten.mH, (w,)),
    "aten.matrix_H": lambda g, w: g.call_function(torch.ops.aten.matrix_H, (w,)),
    "aten.adjoint": lambda g, w: g.call_function(torch.ops.aten.adjoint, (w,)),
    "aten.t": lambda g, w: g.call_function(torch.ops.aten.t, (w,)),
    "aten.transpose.int": lambda g, w: g.call_function(torch.ops.aten.transpose.int, (w, 0, 1)),
    "aten.permute": lambda g, w: g.call_function(torch.ops.aten.permute, (w, [1, 0])),
    "method numpy_T": lambda g, w: g.call_method("numpy_T", (w,)),
    "getattr T": lambda g, w: g.call_function(getattr, (w, "T")),
}


@pytest.mark.parametrize("spelling", ATEN_SPELLINGS, ids=list(ATEN_SPELLINGS))
def test_aten_and_method_spellings_of_a_transpose_are_matched(spelling: str) -> None:
    weight = nn.Parameter(torch.randn(6, 4))
    gm = _graph(ATEN_SPELLINGS[spelling], weight)
    (candidate,) = find_weight_candidates(gm, [torch.randn(3, 4), weight])
    assert candidate.weight_ops == ["matmul"]
    assert not candidate.other_uses
    assert candidate.input_dim == 1


def test_an_unknown_aten_op_on_the_weight_is_an_other_use_named_by_its_op() -> None:
    weight = nn.Parameter(torch.randn(4, 4))
    gm = _graph(lambda g, w: g.call_function(torch.ops.aten.tril, (w,)), weight)
    (candidate,) = find_weight_candidates(gm, [torch.randn(3, 4), weight])
    assert candidate.other_uses == ["tril"]


def test_convolution_operands_other_than_the_kernel_are_not_managed() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 2)
            self.flipped = nn.Parameter(torch.randn(2, 2, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.conv2d(self.up(x), self.flipped.transpose(0, 1))
            return h.flatten(1)

    compiled = resu.compile(Odd(), **OPTIONS, exclude="*bias")
    compiled(torch.randn(1, 2, 4, 4))
    reasons = {s.name: s.reason for s in compiled.resu.state.skipped()}
    assert reasons["up.weight"] == "has non-matmul users (conv_transpose2d)"
    assert reasons["flipped"] == "has non-matmul users (transpose)"
    assert compiled.resu.state.names() == []
