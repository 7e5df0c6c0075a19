"""Managed weights are named as in ``module.named_parameters()`` through both front ends, also when
``forward`` is wrapped by a ``*args, **kwargs`` decorator (transformers' ``deprecate_kwarg``) and
when a graph is traced in a submodule's frame after a graph break."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resu_compile as resu

OPTIONS = {"sparsity": 0.5, "manual": True, "compiler": "aot_eager"}


def deprecate_kwarg(old: str, new: str) -> Callable:
    """transformers' ``deprecate_kwarg`` in miniature: renames a keyword, forwards the rest."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorator


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.scale.T + self.proj(x))


class WrappedLM(nn.Module):
    """A body and an lm_head, with ``forward`` wrapped as HF wraps Llama's."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Inner()
        self.lm_head = nn.Linear(8, 4, bias=False)

    @deprecate_kwarg("inputs", "x")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.body(x))


EXPECTED = {"body.proj.weight", "body.scale", "lm_head.weight"}


def _compile(front_end: str, model: nn.Module, **options) -> tuple[nn.Module, resu.PhaseController]:
    if front_end == "resu.compile":
        compiled = resu.compile(model, **OPTIONS, **options)
    else:
        compiled = torch.compile(model, backend="resu", options={**OPTIONS, **options})
    compiled(torch.randn(2, 8)).sum().backward()
    return compiled, resu.controller(compiled)


@pytest.mark.parametrize("front_end", ["resu.compile", "backend"])
def test_names_through_a_wrapped_forward_are_the_module_names(front_end: str) -> None:
    model = WrappedLM()
    compiled, controller = _compile(front_end, model)
    names = dict(model.named_parameters())
    assert set(controller.state.names()) == EXPECTED
    assert set(controller.masks()) == EXPECTED
    assert {s.name for s in controller.state.skipped()} == {"body.proj.bias"}
    controller.prune(0.5)
    exported = controller.export()  # no argument: the module is known on both front ends
    assert exported.keys() == names.keys()
    for name in EXPECTED:
        mask = controller.masks()[name]
        assert torch.equal(exported[name], names[name].detach().masked_fill(~mask, 0))
    with controller.calibrate():
        compiled(torch.randn(2, 8))
    assert controller.input_norms("lm_head.weight").shape == (8,)


@pytest.mark.parametrize("front_end", ["resu.compile", "backend"])
def test_include_globs_match_the_module_names_of_a_wrapped_forward(front_end: str) -> None:
    _, controller = _compile(front_end, WrappedLM(), include=["lm_head.*", "body.scale"])
    assert controller.state.names() == ["body.scale", "lm_head.weight"]


class BreakInSubmodule(nn.Module):
    """A graph break inside a submodule: Dynamo traces the rest of it in the submodule's frame."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.inner = BreakingInner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.stem(x))


class BreakingInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.fc2(h)


def test_backend_names_of_a_graph_traced_in_a_submodule_frame_are_full_names() -> None:
    model = BreakInSubmodule()
    compiled = torch.compile(model, backend="resu", options=OPTIONS)
    compiled(torch.randn(2, 8)).sum().backward()
    controller = resu.controller(model)
    assert set(controller.state.names()) == {"stem.weight", "inner.fc1.weight", "inner.fc2.weight"}
    assert resu.controller(model.inner) is controller


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
        use_cache=False,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("front_end", ["resu.compile", "backend"])
def test_tiny_hf_llama_names_globs_and_export(front_end: str) -> None:
    model = _tiny_llama()
    options = {**OPTIONS, "include": ["lm_head.weight", "*.mlp.*"]}
    if front_end == "resu.compile":
        compiled = resu.compile(model, **options)
    else:
        compiled = torch.compile(model, backend="resu", options=options)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled(ids).logits.pow(2).mean().backward()
    controller = resu.controller(compiled)
    expected = {"lm_head.weight"} | {
        f"model.layers.{i}.mlp.{p}.weight"
        for i in range(2)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert set(controller.state.names()) == expected
    assert set(controller.masks()) <= set(dict(model.named_parameters()))
    controller.prune(0.5)
    assert controller.export().keys() == model.state_dict().keys()
