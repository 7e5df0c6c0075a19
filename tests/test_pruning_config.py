"""Pruning criteria and layer distributions selected through ResuConfig, end to end."""

from __future__ import annotations

import pytest
import torch

import resu_compile as resu
from resu_compile.method.pruning import (
    GLOBAL_FLOOR_SHARE,
    global_floors,
    layer_keep_counts,
    nm_mask,
    rowwise_topk_mask,
)
from resu_compile.method.schedule import keep_count
from resu_compile.method.topk import topk_mask
from tests.zoo import ZOO_BY_NAME


def _compiled(**options):
    """A manual MLP controller; the layer rule is uniform unless a test asks for another."""
    entry = ZOO_BY_NAME["mlp"]
    model = entry.build()
    options = {"distribution": "uniform", **options}
    compiled = resu.compile(model, sparsity=0.6, manual=True, compiler="aot_eager", **options)
    compiled(*entry.make_batch(0))
    return entry, model, compiled


@pytest.mark.parametrize("distribution", ["global", "erk"])
def test_distribution_sets_per_layer_counts_that_commits_keep(distribution: str) -> None:
    _, _, compiled = _compiled(distribution=distribution)
    controller = compiled.resu
    weights = list(controller.state)
    expected = layer_keep_counts(
        [w.numel for w in weights],
        0.6,
        distribution,
        shapes=[tuple(w.shape) for w in weights],
        scores=[w.param.detach().abs() for w in weights],
    )
    controller.prune(0.6)
    assert [int(w.mask().sum()) for w in weights] == expected
    assert sum(expected) == keep_count(sum(w.numel for w in weights), 0.6)
    controller.enter_resu()
    controller.commit()
    assert [int(w.mask().sum()) for w in weights] == expected


def test_random_criterion_keeps_exact_counts_and_follows_the_seed() -> None:
    masks = []
    for _ in range(2):
        torch._dynamo.reset()
        _, _, compiled = _compiled(criterion="random", seed=3)
        compiled.resu.prune(0.6)
        masks.append(compiled.resu.masks())
    for name, mask in masks[0].items():
        assert int(mask.sum()) == keep_count(mask.numel(), 0.6)
        assert torch.equal(mask, masks[1][name])


def test_wanda_needs_a_calibrate_pass_and_then_compares_within_rows() -> None:
    entry, _, compiled = _compiled(criterion="wanda")
    controller = compiled.resu
    with pytest.raises(RuntimeError, match="calibrate"):
        controller.prune(0.6)
    assert all(mask is None for mask in controller.masks().values())
    with controller.calibrate():
        compiled(*entry.make_batch(1))
    controller.prune(0.6)
    for weight in controller.state:
        scores = weight.param.detach().abs() * controller.input_norms(weight.name)
        count = keep_count(weight.numel, 0.6)
        assert torch.equal(weight.mask(), rowwise_topk_mask(scores, count, output_dim=0))
        assert int(weight.mask().sum()) == count


def test_two_four_pattern_groups_a_transposed_conv1d_weight_along_its_inputs() -> None:
    """GPT-2's ``Conv1D`` stores ``(in, out)``: the N:M groups run along dim 0, its inputs."""
    entry = ZOO_BY_NAME["conv1d_gpt2"]
    model = entry.build()
    compiled = resu.compile(model, sparsity=0.5, pattern="2:4", manual=True, compiler="aot_eager")
    compiled(*entry.make_batch(0))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    compiled.resu.prune()
    for weight in compiled.resu.state:
        assert weight.input_dim == 0, weight.name
        expected = nm_mask(weights[weight.name].abs(), 2, 4, input_dim=0)
        assert torch.equal(weight.mask(), expected), weight.name
        groups = weight.mask().reshape(-1, 4, weight.shape[1]).sum(dim=1)
        assert torch.equal(groups, torch.full_like(groups, 2)), weight.name


def test_the_global_rule_keeps_a_floor_in_a_layer_of_small_weights() -> None:
    """A down-scaled layer ranks below every other under one threshold: it keeps its floor (its
    own top scores), the rest is chosen globally, and the total stays exact."""
    _, model, compiled = _compiled(distribution="global")
    with torch.no_grad():
        model.fc2.weight.mul_(1e-4)
    small = model.fc2.weight.detach().abs().clone()
    compiled.resu.prune(0.6)
    weights = {w.name: w for w in compiled.resu.state}
    floor = global_floors([weights["fc2.weight"].numel], 0.6)[0]
    assert floor == int(GLOBAL_FLOOR_SHARE * keep_count(weights["fc2.weight"].numel, 0.6)) > 0
    assert torch.equal(weights["fc2.weight"].mask(), topk_mask(small, floor))
    total = sum(w.numel for w in weights.values())
    assert sum(w.active_count() for w in weights.values()) == keep_count(total, 0.6)


def test_the_global_rule_without_a_binding_floor_is_one_threshold() -> None:
    _, model, compiled = _compiled(distribution="global")
    scores = {n: p.detach().abs().clone() for n, p in model.named_parameters() if p.dim() == 2}
    compiled.resu.prune(0.6)
    flat = torch.cat([scores[w.name].reshape(-1) for w in compiled.resu.state])
    chosen = topk_mask(flat, keep_count(flat.numel(), 0.6))
    masks = torch.cat([w.mask().reshape(-1) for w in compiled.resu.state])
    assert torch.equal(masks, chosen)


def _floor_rule_reference(
    numels: list[int], sparsity: float, scores: list[torch.Tensor], eligible: list
) -> list[int]:
    """The global rule as METHOD.md-level prose: every layer first keeps its floor (its own top
    eligible scores), then the rest of the budget goes to the top remaining scores overall."""
    allowed = [
        torch.ones(n, dtype=torch.bool) if e is None else e
        for n, e in zip(numels, eligible, strict=True)
    ]
    floors = global_floors(numels, sparsity)
    kept = [topk_mask(s, f, eligible=a) for s, f, a in zip(scores, floors, allowed, strict=True)]
    rest = keep_count(sum(numels), sparsity) - sum(int(k.sum()) for k in kept)
    others = torch.cat([a & ~k for a, k in zip(allowed, kept, strict=True)])
    chosen = topk_mask(torch.cat(scores), rest, eligible=others).split(numels)
    return [int(k.sum()) + int(c.sum()) for k, c in zip(kept, chosen, strict=True)]


@pytest.mark.parametrize("seed", range(40))
def test_the_global_counts_equal_the_floor_rule_whether_or_not_a_floor_binds(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    layers = int(torch.randint(1, 6, (), generator=generator))
    numels = [int(n) for n in torch.randint(1, 60, (layers,), generator=generator)]
    # Scales apart by up to 1e4 make floors bind; rounded scores make ties.
    scales = 10.0 ** torch.randint(-4, 1, (layers,), generator=generator).float()
    scores = [
        (torch.rand(n, generator=generator) * scale * 8).round() / 8
        for n, scale in zip(numels, scales, strict=True)
    ]
    eligible = [None if seed % 3 else torch.rand(n, generator=generator) < 0.7 for n in numels]
    sparsity = float(torch.rand((), generator=generator)) * 0.98
    counts = layer_keep_counts(numels, sparsity, "global", scores=scores, eligible=eligible)
    assert counts == _floor_rule_reference(numels, sparsity, scores, eligible)


def test_effective_options_drop_what_cannot_change_the_run() -> None:
    """An option scoped to a method or mode is dropped where it has no effect, and only there."""

    def effective(**options):
        return resu.ResuConfig.effective(resu.ResuConfig(**options).to_dict())

    gmp, rigl = effective(method="gmp"), effective(method="rigl")
    assert "theta_lr" not in gmp and "amnesty" not in gmp and "rigl_interval" not in gmp
    assert "rigl_interval" in rigl and "theta_lr" not in rigl
    assert gmp["sparsity"] == rigl["sparsity"] and "schedule" in gmp
    assert effective(method="gmp", theta_lr=5e-2) == gmp
    random = effective(method="resu", selection="random")
    assert "theta_lr_schedule" in random and "consistency_tau" not in random
    assert "consistency_tau" in effective(method="resu", selection="consistency")
    assert "transposable" not in random
    assert effective(pattern="2:4", sparsity=0.5)["semi_sparse"] is False
    # A record of an earlier version lacking an option keeps what it has, and nothing is added.
    earlier = {k: v for k, v in resu.ResuConfig(method="resu").to_dict().items() if k != "alpha"}
    assert resu.ResuConfig.effective(earlier) == {
        k: v for k, v in effective(method="resu").items() if k != "alpha"
    }
    lacking = {k: v for k, v in resu.ResuConfig(method="resu").to_dict().items()}
    del lacking["theta_lr_schedule"]  # recorded before the option existed: theta's rate was fixed
    assert resu.ResuConfig.effective(lacking)["theta_lr_schedule"] == "constant"
