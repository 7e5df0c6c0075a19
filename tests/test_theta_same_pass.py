"""The one-pass RESU step (theta's AdamW in the actives' masked Adam pass) through the whole
optimizer bridge, on the CPU.

With the Triton kernels interpreted (``TRITON_INTERPRET=1``, set by conftest) and CPU tensors let
through to them, the bridge takes the same route as on a GPU: theta's AdamW runs in the actives'
masked Adam launch. Refusing it makes the bridge run the two launches instead; in the interpreter
both are the same arithmetic, so the weights must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
import resu_compile.kernels.triton.masked_adam as masked_adam_triton
from resu_compile.kernels import consistency, masked_adam, masked_sgd, segmented_topk, theta_update
from resu_compile.optim.theta import ThetaSettings
from tests.zoo import ZOO_BY_NAME


def _through_the_kernels(monkeypatch: pytest.MonkeyPatch, *families) -> None:
    """CPU tensors go to the (interpreted) Triton kernels of the update families and ``families``."""
    for module in (masked_adam, masked_sgd, theta_update, *families):
        monkeypatch.setattr(module, "on_gpu", lambda tensors: True)


def _through_resu_phase(same_pass: bool, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The zoo MLP trained (seeded) through its first RESU phase; the weights at the end."""
    torch._dynamo.reset()
    _through_the_kernels(monkeypatch)
    calls = []
    original = ThetaSettings.same_pass

    def spy(self, weights):
        calls.append(same_pass)
        return original(self, weights) if same_pass else None

    monkeypatch.setattr(ThetaSettings, "same_pass", spy)
    one_pass = []
    kernel = masked_adam_triton.masked_adam_triton_

    def counting(*args, theta=None, **kwargs):
        one_pass.append(theta is not None)
        return kernel(*args, theta=theta, **kwargs)

    monkeypatch.setattr(masked_adam_triton, "masked_adam_triton_", counting)
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.7, cycles=1, steps_per_cycle=8, compiler="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        entry.loss_fn(compiled(*entry.make_batch(step))).backward()
        compiled.resu.step(optimizer)
    assert calls, "the schedule never reached a RESU step"
    assert one_pass, "the masked Adam kernel never ran"
    assert any(one_pass) == same_pass, "the one-pass launch ran only if theta was offered"
    monkeypatch.undo()
    return [p.detach().clone() for p in model.parameters()]


def test_one_pass_equals_two_passes_through_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    one_pass = _through_resu_phase(True, monkeypatch)
    two_passes = _through_resu_phase(False, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(one_pass, two_passes, strict=True))


def _consistency_run(interpreted: bool, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The zoo MLP through its first RESU phase in consistency mode; the weights at the end."""
    import resu_compile.kernels.triton.consistency as consistency_triton
    import resu_compile.kernels.triton.segmented_topk as segmented_topk_triton
    import resu_compile.kernels.triton.theta_update as theta_update_triton

    torch._dynamo.reset()
    calls: list[str] = []
    if interpreted:  # the GPU's route: statistics, top-k and theta kernels, all weights at once
        _through_the_kernels(monkeypatch, consistency, segmented_topk)
        for module, name in (
            (consistency_triton, "consistency_statistics_triton_"),
            (segmented_topk_triton, "topk_bits_triton"),
            (theta_update_triton, "theta_update_triton_"),
        ):
            original = getattr(module, name)

            def spy(*args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(
        model, sparsity=0.7, cycles=1, steps_per_cycle=8, compiler="eager",
        selection="consistency", consistency_tau=0.3,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        entry.loss_fn(compiled(*entry.make_batch(step))).backward()
        compiled.resu.step(optimizer)
    assert compiled.resu.resu_steps > 0
    if interpreted:
        assert {"consistency_statistics_triton_", "topk_bits_triton"} <= set(calls)
        assert "theta_update_triton_" in calls
    monkeypatch.undo()
    return [p.detach().clone() for p in model.parameters()]


def test_consistency_mode_through_the_kernels_equals_the_references(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels = _consistency_run(True, monkeypatch)
    references = _consistency_run(False, monkeypatch)
    for a, b in zip(kernels, references, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
