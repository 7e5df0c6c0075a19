"""On CUDA the transitions run as batched Triton kernels; the same transitions through the
per-weight references on the same device (same seeded draws) must give the same masks, selections,
resurrections and telemetry, and weights equal up to the summation order of sigma_A."""

from __future__ import annotations

import pytest
import torch

from resu_compile.config import ResuConfig
from resu_compile.kernels import commit_bits, masked_zero, segmented_topk, theta_entry
from resu_compile.runtime.controller import PhaseController

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SHAPES = [(96, 64), (64, 96), (5, 37 * 23), (300, 17)]
KERNEL_MODULES = (commit_bits, masked_zero, segmented_topk, theta_entry)


def _cycle(dtype: torch.dtype, options: dict) -> tuple[PhaseController, list[torch.Tensor]]:
    """Two prune / RESU entry / step / commit cycles on a manual controller."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in SHAPES]
    controller = PhaseController(ResuConfig(sparsity=0.7, manual=True, **options))
    for i, param in enumerate(params):
        controller.state.register(param, f"w{i}").input_dim = 1
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    controller.attach(optimizer)
    for sparsity in (0.5, 0.7):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()  # dense step: the state exists before the first prune
        controller.prune(sparsity)
        controller.enter_resu()
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()
        controller.commit()
    return controller, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"selection": "all"},
        {"selection": "topk"},
        {"amnesty_score": "gradient"},
        {"amnesty": False},
        {"criterion": "random", "carry_theta_state": True},
    ],
    ids=str,
)
def test_kernels_match_the_references(
    dtype: torch.dtype, options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused, fused_params = _cycle(dtype, options)
    for module in KERNEL_MODULES:  # every dispatcher now takes its reference path
        monkeypatch.setattr(module, "on_gpu", lambda tensors: False)
    reference, reference_params = _cycle(dtype, options)
    for a, b in zip(fused.state, reference.state, strict=True):
        assert torch.equal(a.mask_bits, b.mask_bits), a.name
        assert torch.equal(a.revived_bits, b.revived_bits), a.name
    assert fused.history == reference.history
    for a, b in zip(fused_params, reference_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
