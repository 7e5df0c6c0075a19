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
from resu_compile.optim.resu_phase import ResuPhaseStep
from tests.zoo import ZOO_BY_NAME


def _through_resu_phase(rider: bool, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The zoo MLP trained (seeded) through its first RESU phase; the weights at the end."""
    torch._dynamo.reset()
    monkeypatch.setattr(updates, "_fused", lambda tensor: tensor.is_contiguous())
    calls = []
    original = ResuPhaseStep.rider

    def spy(self, optimizer, taken):
        calls.append(rider)
        return original(self, optimizer, taken) if rider else None

    monkeypatch.setattr(ResuPhaseStep, "rider", spy)
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
