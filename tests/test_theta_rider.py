"""The RESU step's one-pass form through the whole optimizer bridge, on the CPU.

With the Triton kernels interpreted (``TRITON_INTERPRET=1``, set by conftest) and CPU tensors let
through to them, the bridge takes the same route as on a GPU: theta's AdamW rides on the actives'
masked Adam launch. Refusing the rider makes it run the two launches instead; in the interpreter
both are the same arithmetic, so the weights must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
import resu_compile.optim.updates as updates
from resu_compile.optim.theta import ThetaSettings
from tests.zoo import ZOO_BY_NAME


def _through_resu_phase(rider: bool, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The zoo MLP trained (seeded) through its first RESU phase; the weights at the end."""
    torch._dynamo.reset()
    monkeypatch.setattr(updates, "_fused", lambda tensor: tensor.is_contiguous())
    calls = []
    original = ThetaSettings.same_pass

    def spy(self, weights):
        calls.append(rider)
        return original(self, weights) if rider else None

    monkeypatch.setattr(ThetaSettings, "same_pass", spy)
    fused = []
    ride = updates._fused_with_theta
    monkeypatch.setattr(updates, "_fused_with_theta", lambda *args: fused.append(1) or ride(*args))
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.7, cycles=1, steps_per_cycle=8, compiler="eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(8):
        optimizer.zero_grad(set_to_none=True)
        entry.loss_fn(compiled(*entry.make_batch(step))).backward()
        compiled.resu.step(optimizer)
    assert calls, "the schedule never reached a RESU step"
    assert bool(fused) == rider, "the one-pass launch ran only if the rider was offered"
    return [p.detach().clone() for p in model.parameters()]


def test_rider_equals_two_passes_through_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    one_pass = _through_resu_phase(True, monkeypatch)
    two_passes = _through_resu_phase(False, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(one_pass, two_passes, strict=True))


def _consistency_run(interpreted: bool, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The zoo MLP through its first RESU phase in consistency mode; the weights at the end."""
    import resu_compile.kernels.consistency as consistency
    import resu_compile.kernels.fused_update as fused_update
    import resu_compile.kernels.segmented_topk as segmented_topk

    torch._dynamo.reset()
    calls: list[str] = []
    if interpreted:  # the GPU's route: statistics, top-k and theta kernels, all weights at once
        monkeypatch.setattr(updates, "_fused", lambda tensor: tensor.is_contiguous())
        monkeypatch.setattr(consistency, "on_gpu", lambda tensors: True)
        monkeypatch.setattr(segmented_topk, "on_gpu", lambda tensors: True)
        for module, name in (
            (consistency, "consistency_statistics_triton_"),
            (segmented_topk, "topk_bits_triton"),
            (fused_update, "fused_theta_update_multi_"),
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
        assert "fused_theta_update_multi_" in calls
    monkeypatch.undo()
    return [p.detach().clone() for p in model.parameters()]


def test_consistency_mode_through_the_kernels_equals_the_references(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernels = _consistency_run(True, monkeypatch)
    references = _consistency_run(False, monkeypatch)
    for a, b in zip(kernels, references, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
