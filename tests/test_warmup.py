"""The transition warm-up: it runs for every method and option that changes a transition's code
path without touching the real weights, and on CUDA it leaves the first real transitions nothing
to compile."""

from __future__ import annotations

import copy

import pytest
import torch

import resu_compile as resu
from resu_compile.config import ResuConfig
from resu_compile.runtime.warmup import warm_up_transitions
from resu_compile.state import ManagedWeight

CONFIGS = [
    {"method": "resu"},
    {"method": "resu", "distribution": "uniform", "selection": "all", "amnesty": False},
    {"method": "resu", "distribution": "erk", "selection": "topk", "amnesty_score": "gradient"},
    {"method": "resu", "selection": "consistency", "carry_theta_state": True},
    {"method": "resu", "criterion": "wanda", "amnesty_score": "wanda"},
    {"method": "resu", "pattern": "2:4", "sparsity": 0.5},
    {"method": "resu", "pattern": "2:4", "sparsity": 0.5, "transposable": True},
    {"method": "gmp"},
    {"method": "oneshot", "criterion": "random"},
    {"method": "rigl"},
    {"method": "dense"},
]


def _weights() -> list[ManagedWeight]:
    torch.manual_seed(0)
    shapes = [(32, 48), (48, 16), (8, 4, 3, 3)]
    weights = [
        ManagedWeight(f"w{i}", torch.nn.Parameter(torch.randn(s))) for i, s in enumerate(shapes)
    ]
    for weight in weights:
        weight.input_dim = 1
        weight.param.grad = torch.randn_like(weight.param)
    return weights


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(map(str, o.values())))
def test_warm_up_runs_every_method_and_leaves_the_weights_and_the_rng_alone(options: dict) -> None:
    weights = _weights()
    before = copy.deepcopy([(w.param.detach(), w.param.grad, w.mask_bits) for w in weights])
    rng = torch.get_rng_state()
    with torch.inference_mode():  # a first forward may come under it (an evaluation first)
        warm_up_transitions(ResuConfig(**options), weights, device_types=("cpu",))
    assert torch.equal(torch.get_rng_state(), rng)  # the user's random stream is not drawn from
    for weight, (param, grad, bits) in zip(weights, before, strict=True):
        assert torch.equal(weight.param.detach(), param)
        assert torch.equal(weight.param.grad, grad)
        assert weight.mask_bits is bits is None
        assert weight.select_bits is None and not weight.theta_buffers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_after_the_first_forward_the_first_transitions_compile_no_triton_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from triton.runtime import jit

    if not hasattr(jit.JITFunction, "_do_compile"):
        pytest.skip("this Triton has no JITFunction._do_compile to count compilations with")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)
    ).cuda()
    compiled = resu.compile(model, sparsity=0.7, manual=True)
    compiled(torch.randn(32, 256, device="cuda")).sum().backward()

    compiled_kernels: list[str] = []
    original = jit.JITFunction._do_compile

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        compiled_kernels.append(self.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(jit.JITFunction, "_do_compile", counting)
    controller = compiled.resu
    controller.prune()
    controller.enter_resu()
    controller.commit()
    torch.cuda.synchronize()
    assert compiled_kernels == []
