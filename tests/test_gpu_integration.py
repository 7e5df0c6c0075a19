"""The compiled training path on CUDA, where the fused Triton updates replace the references."""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
from resu_compile.kernels import masked_adam, masked_sgd, theta_update
from resu_compile.optim.theta import ThetaSettings
from tests.invariants import CheckedStepper, assert_exact_counts
from tests.zoo import ZOO_BY_NAME

pytestmark = pytest.mark.gpu


def _run(
    entry,
    dtype: torch.dtype,
    make_optimizer,
    compiler: str,
    gradient_mask: str = "graph",
    **options,
):
    model = entry.build().to(device="cuda", dtype=dtype)
    options = {"theta_optimizer": "adamw", **options}
    compiled = resu.compile(
        model,
        sparsity=0.7,
        cycles=2,
        steps_per_cycle=10,
        theta_lr=1e-2,
        compiler=compiler,
        gradient_mask=gradient_mask,
        **options,
    )
    optimizer = make_optimizer(model.parameters())
    controller = compiled.resu
    stepper = CheckedStepper(controller, optimizer)
    for step in range(20):
        batch = tuple(
            t.to("cuda", dtype if t.is_floating_point() else t.dtype)
            for t in entry.make_batch(step)
        )
        loss = entry.loss_fn(compiled(*batch)).float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()
    return model, controller


OPTIMIZERS = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_invariants_hold_with_fused_kernels_on_cuda(dtype: torch.dtype, optimizer: str) -> None:
    _, controller = _run(ZOO_BY_NAME["transformer"], dtype, OPTIMIZERS[optimizer], "inductor")
    assert controller.phase is resu.Phase.DONE
    assert all(count > 0 for count in controller.resurrected_per_cycle())
    assert_exact_counts(controller, 0.7)


@pytest.mark.parametrize("gradient_mask", ["graph", "optimizer"])
def test_fused_path_equals_reference_path_on_cuda(
    monkeypatch: pytest.MonkeyPatch, gradient_mask: str
) -> None:
    entry = ZOO_BY_NAME["mlp"]
    fused_model, fused = _run(entry, torch.float32, OPTIMIZERS["adamw"], "aot_eager", gradient_mask)
    torch._dynamo.reset()
    for family in (masked_adam, masked_sgd, theta_update):  # the references, on CUDA
        monkeypatch.setattr(family, "on_gpu", lambda tensors: False)
    reference_model, referenced = _run(
        entry, torch.float32, OPTIMIZERS["adamw"], "aot_eager", gradient_mask
    )
    for name, mask in fused.masks().items():
        assert torch.equal(mask, referenced.masks()[name]), name
    for (name, a), (_, b) in zip(
        fused_model.named_parameters(), reference_model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


METHOD_OPTIONS = {
    "rigl": {"method": "rigl", "rigl_interval": 3},
    "gmp": {"method": "gmp"},
    "topk_refresh": {"selection": "topk", "refresh": 2},
    "consistency_adamw": {"selection": "consistency"},
    "consistency_sgd": {"selection": "consistency", "theta_optimizer": "sgd"},
    "frozen": {"freeze_active": True, "freeze_others": True},
    "gradient_amnesty_carry": {"amnesty_score": "gradient", "carry_theta_state": True},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_every_method_option_keeps_the_invariants_on_cuda(dtype: torch.dtype, method: str) -> None:
    _, controller = _run(
        ZOO_BY_NAME["transformer"],
        dtype,
        OPTIMIZERS["adamw_fused"],
        "inductor",
        "optimizer",
        **METHOD_OPTIONS[method],
    )
    assert controller.phase is resu.Phase.DONE
    assert controller.history


def _after_first_resu_step(monkeypatch: pytest.MonkeyPatch, same_pass: bool) -> torch.nn.Module:
    """The zoo transformer trained (seeded) up to and including its first RESU step."""
    torch._dynamo.reset()
    if not same_pass:
        monkeypatch.setattr(ThetaSettings, "same_pass", lambda self, weights: None)
    entry = ZOO_BY_NAME["transformer"]
    torch.manual_seed(0)
    model = entry.build().cuda()
    compiled = resu.compile(
        model, sparsity=0.7, cycles=2, steps_per_cycle=10, compiler="aot_eager",
        gradient_mask="optimizer",
    )  # fmt: skip
    optimizer = OPTIMIZERS["adamw_fused"](model.parameters())
    step = 0
    while compiled.resu.resu_steps < 1:
        batch = tuple(t.cuda() for t in entry.make_batch(step))
        optimizer.zero_grad(set_to_none=True)
        entry.loss_fn(compiled(*batch)).float().backward()
        compiled.resu.step(optimizer)
        step += 1
    return model


def test_theta_riding_on_the_actives_pass_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default RESU phase (trainable actives, AdamW theta in the optimizer's slots) runs one
    fused pass; with the same pass refused it runs two. After the same first RESU step every weight
    is the same bit for bit: the kernels round every multiply and add on its own
    (``kernels.launch.FP_FUSION``), so both compiled forms do the same arithmetic."""
    one_pass = _after_first_resu_step(monkeypatch, same_pass=True)
    two_passes = _after_first_resu_step(monkeypatch, same_pass=False)
    for (name, a), (_, b) in zip(
        one_pass.named_parameters(), two_passes.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
