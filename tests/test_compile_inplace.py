"""``resu.compile(model, inplace=True)``: the module itself is compiled, its type, signature and
state_dict keys stay its own, and ``attach()`` works before the first forward pass."""

from __future__ import annotations

import inspect

import pytest
import torch

import resu_compile as resu
from tests.invariants import assert_exact_counts, assert_sparse_invariants


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * scale


@pytest.mark.parametrize(
    "build",
    [
        _Net,
        lambda: torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        ),
    ],
)
def test_inplace_compiles_the_module_itself_and_attach_before_forward_works(build) -> None:
    torch.manual_seed(0)
    model = build()
    keys = list(model.state_dict())
    signature = inspect.signature(model.forward)
    out = resu.compile(
        model, sparsity=0.5, cycles=1, total_steps=10, compiler="aot_eager", inplace=True
    )
    assert out is model
    assert list(model.state_dict()) == keys
    assert inspect.signature(model.forward) == signature
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.resu.attach(optimizer)  # before any forward pass
    for _ in range(12):
        loss = model(torch.randn(4, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    controller = resu.controller(model)
    assert controller is model.resu
    assert controller.step_count == 12
    masks = controller.masks()
    assert len(masks) == 2
    assert_exact_counts(controller, 0.5)
    assert_sparse_invariants(controller, optimizer)


def test_inplace_must_be_a_bool() -> None:
    model = _Net()
    with pytest.raises(TypeError, match="inplace"):
        resu.compile(model, inplace="yes")
    assert resu.api.find_controller(model) is None
