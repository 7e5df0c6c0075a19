"""LoRA adapters are skipped by default; frozen base weights are managed when ``include`` names
them; an ``include`` that selects only weights that cannot be managed fails, naming them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resu_compile as resu
from resu_compile.compiler.passes.eligibility import LORA_REASON
from resu_compile.method.schedule import keep_count

OPTIONS = {"sparsity": 0.5, "manual": True, "compiler": "aot_eager", "distribution": "uniform"}
BASE = ["fc1.base_layer.weight", "fc2.base_layer.weight"]


class LoraLinear(nn.Module):
    """PEFT's LoRA layer in miniature (same parameter names): frozen base, trainable A and B."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out)
        self.base_layer.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d_out, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class LoraMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = LoraLinear(8, 16)
        self.fc2 = LoraLinear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _peft_mlp() -> nn.Module:
    peft = pytest.importorskip("peft", reason="peft is not installed")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)
        return peft.get_peft_model(Plain(), config)


def _models() -> list:
    return [pytest.param(LoraMLP, id="by-name"), pytest.param(_peft_mlp, id="peft")]


def _base_names(model: nn.Module) -> list[str]:
    return sorted(n for n, _ in model.named_parameters() if n.endswith("base_layer.weight"))


@pytest.mark.parametrize("build", _models())
def test_lora_adapters_are_skipped_and_no_default_weight_remains(build) -> None:
    model = build()
    with pytest.raises(ValueError, match=r"no managed weight can be found.*LoRA adapters"):
        resu.compile(model, **OPTIONS)
    # Beside a plain head, the adapters and frozen bases are reported with their reasons.
    compiled = resu.compile(nn.Sequential(model, nn.Linear(4, 4)), **OPTIONS)
    compiled(torch.randn(2, 8))
    assert compiled.resu.state.names() == ["1.weight"]
    reasons = {s.name: s.reason for s in compiled.resu.state.skipped()}
    adapters = [n for n in reasons if ".lora_" in n]
    assert len(adapters) == 4
    assert all(reasons[n] == LORA_REASON for n in adapters)
    bases = [n for n in reasons if n.endswith("base_layer.weight")]
    assert len(bases) == 2
    assert all(reasons[n].startswith("frozen (requires_grad=False") for n in bases)


@pytest.mark.parametrize("build", _models())
def test_frozen_base_weights_named_by_include_are_managed_and_pruned(build) -> None:
    model = build()
    bases = _base_names(model)
    compiled = resu.compile(model, **OPTIONS, include="*base_layer.weight")
    compiled(torch.randn(2, 8)).sum().backward()
    assert compiled.resu.state.names() == bases
    compiled.resu.prune(0.5)
    params = dict(model.named_parameters())
    for name in bases:
        mask = compiled.resu.masks()[name]
        assert int(mask.sum()) == keep_count(mask.numel(), 0.5)
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0
    exported = compiled.resu.export()
    assert exported.keys() == model.state_dict().keys()


@pytest.mark.parametrize("build", _models())
def test_adapters_train_over_pruned_frozen_bases_that_never_move(build) -> None:
    model = build()
    bases = _base_names(model)
    compiled = resu.compile(
        model,
        sparsity=0.5,
        method="oneshot",
        cycles=1,
        total_steps=5,
        compiler="aot_eager",
        include="*base_layer.weight",
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen params: no grad, no step
    params = dict(model.named_parameters())
    adapters_before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    for step in range(8):
        if step == 4:  # after the one-shot prune (60% of 5 steps)
            pruned = {n: params[n].detach().clone() for n in bases}
        optimizer.zero_grad(set_to_none=True)
        compiled(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).pow(
            2
        ).mean().backward()
        compiled.resu.step(optimizer)
    for name in bases:
        assert torch.equal(params[name].detach(), pruned[name]), name
        assert compiled.resu.masks()[name].sum() == keep_count(params[name].numel(), 0.5)
    assert all(not torch.equal(params[n], before) for n, before in adapters_before.items())


def test_frozen_base_weights_need_not_be_in_the_optimizer() -> None:
    model = LoraMLP()
    compiled = resu.compile(model, **OPTIONS, include="*base_layer.weight")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    compiled(torch.randn(2, 8)).sum().backward()
    compiled.resu.step(optimizer)


def test_a_resu_cycle_leaves_a_frozen_base_weight_as_pruned() -> None:
    model = LoraMLP()
    compiled = resu.compile(model, **OPTIONS, include="*base_layer.weight")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = dict(model.named_parameters())
    compiled(torch.randn(2, 8)).sum().backward()
    compiled.resu.prune(0.5)
    pruned = {n: params[n].detach().clone() for n in BASE}
    compiled.resu.enter_resu()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        compiled(torch.randn(2, 8)).pow(2).mean().backward()
        compiled.resu.step(optimizer)
    compiled.resu.commit()
    for name in BASE:
        assert torch.equal(params[name].detach(), pruned[name]), name


def test_include_of_only_unmanageable_weights_fails_at_compile_listing_them() -> None:
    with pytest.raises(
        ValueError,
        match=r"include selects only weights that cannot be managed "
        r"\('fc1\.bias': 1-D parameter; 'fc2\.bias': 1-D parameter\)",
    ):
        resu.compile(Plain(), **OPTIONS, include="*bias")


def test_include_of_only_weights_skipped_in_the_graph_fails_at_the_first_step() -> None:
    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(8, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.table(idx))

    model = Lookup()
    compiled = resu.compile(model, **OPTIONS, include="table.*")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled(torch.tensor([[1, 2]])).sum().backward()
    with pytest.raises(ValueError, match="no managed weight found") as raised:
        compiled.resu.step(optimizer)
    message = str(raised.value)
    assert "none yet" not in message
    assert "table.weight" in message
    assert "has non-matmul users (embedding)" in message
