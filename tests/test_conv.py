"""Convolution kernels are managed like linear weights: masks, steps, transitions, export, ERK,
N:M along the input channels, Wanda with per-input-channel norms (refused for grouped kernels)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resu_compile as resu
from resu_compile.method.pruning import layer_keep_counts, nm_mask, prune_mask
from resu_compile.method.schedule import keep_count
from tests.invariants import CheckedStepper, assert_exact_counts
from tests.zoo import ZOO_BY_NAME

ENTRY = ZOO_BY_NAME["convnet"]


def _loss(compiled: nn.Module, seed: int) -> torch.Tensor:
    return ENTRY.loss_fn(compiled(*ENTRY.make_batch(seed)))


def test_every_kernel_is_managed_with_its_op_and_the_head_too() -> None:
    model = ENTRY.build()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    _loss(compiled, 0).backward()
    ops = {w.name: w.ops for w in compiled.resu.state}
    assert set(ops) == ENTRY.expected_managed
    assert ops["stem.weight"] == ["conv2d"]
    assert ops["temporal.weight"] == ["conv1d"]
    assert ops["volume.weight"] == ["conv3d"]
    assert ops["head.weight"] == ["linear"]
    reasons = {s.name: s.reason for s in compiled.resu.state.skipped()}
    assert reasons["bn.weight"] == "1-D parameter"
    assert "grouped.weight" in compiled.resu.report()


@pytest.mark.parametrize("criterion", ["magnitude", "random", "wanda"])
def test_prune_keeps_exactly_the_target_count_of_every_kernel(criterion: str) -> None:
    model = ConvOnly()
    compiled = resu.compile(
        model,
        sparsity=0.75,
        manual=True,
        compiler="aot_eager",
        criterion=criterion,
        distribution="uniform",
    )
    with compiled.resu.calibrate():
        compiled(torch.randn(2, 4, 6, 6))
    compiled.resu.prune(0.75)
    for weight in compiled.resu.state:
        mask = weight.mask()
        assert mask.shape == weight.shape
        assert int(mask.sum()) == keep_count(weight.numel, 0.75), weight.name
        assert torch.count_nonzero(weight.param.detach()[~mask]) == 0


@pytest.mark.parametrize("gradient_mask", ["optimizer", "graph"])
def test_invariants_hold_after_every_step_of_a_multi_cycle_conv_run(gradient_mask: str) -> None:
    model = ENTRY.build()
    compiled = resu.compile(
        model,
        sparsity=0.7,
        cycles=2,
        steps_per_cycle=8,
        theta_lr=1e-2,
        compiler="aot_eager",
        gradient_mask=gradient_mask,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    stepper = CheckedStepper(compiled.resu, optimizer)
    phases = set()
    for step in range(16):
        optimizer.zero_grad(set_to_none=True)
        _loss(compiled, step).backward()
        stepper.step()
        phases.add(compiled.resu.phase)
    assert resu.Phase.RESU in phases
    assert_exact_counts(compiled.resu, 0.7)


def test_export_loads_into_a_plain_convnet_and_matches_the_sparse_model() -> None:
    model = ENTRY.build()
    compiled = resu.compile(model, sparsity=0.6, manual=True, theta_lr=1e-2, compiler="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, transition in enumerate(("prune", "enter_resu", "commit")):
        optimizer.zero_grad(set_to_none=True)
        _loss(compiled, step).backward()
        compiled.resu.step(optimizer)
        getattr(compiled.resu, transition)()
    exported = compiled.resu.export()
    plain = ENTRY.build()
    plain.load_state_dict(exported, strict=True)
    for name in ENTRY.expected_managed:
        mask = compiled.resu.masks()[name]
        assert torch.count_nonzero(exported[name][~mask]) == 0
    model.eval()
    plain.eval()
    batch = ENTRY.make_batch(5)
    torch.testing.assert_close(plain(*batch), compiled(*batch))


class ConvOnly(nn.Module):
    """Two ungrouped convolutions with 4 input channels each (so 2:4 fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


def test_wanda_norms_of_a_convolution_are_the_input_channel_norms() -> None:
    model = ConvOnly()
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    x = torch.randn(2, 4, 6, 6)
    with compiled.resu.calibrate():
        compiled(x)
    expected_a = x.square().sum(dim=(0, 2, 3)).sqrt()
    expected_b = F.relu(model.a(x)).square().sum(dim=(0, 2, 3)).sqrt()
    torch.testing.assert_close(compiled.resu.input_norms("a.weight"), expected_a)
    torch.testing.assert_close(
        compiled.resu.input_norms("b.weight"), expected_b.detach(), rtol=1e-5, atol=1e-6
    )


def test_wanda_prune_of_a_convolution_scores_each_output_row_by_input_channel() -> None:
    model = ConvOnly()
    compiled = resu.compile(
        model,
        sparsity=0.5,
        manual=True,
        compiler="aot_eager",
        criterion="wanda",
        distribution="uniform",
    )
    x = torch.randn(2, 4, 6, 6)
    with compiled.resu.calibrate():
        compiled(x)
    weight = model.a.weight.detach().clone()
    norms = x.square().sum(dim=(0, 2, 3)).sqrt()
    expected = prune_mask(
        weight, None, 0.5, "wanda", input_norms=norms, input_dim=1, per_row=True, output_dim=0
    )
    compiled.resu.prune(0.5)
    assert torch.equal(compiled.resu.masks()["a.weight"], expected)
    assert torch.equal(expected.sum(dim=(1, 2, 3)), torch.full((4,), 18))


def test_wanda_on_a_grouped_convolution_is_refused_naming_the_weight() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 2))
    compiled = resu.compile(
        model, sparsity=0.5, manual=True, compiler="aot_eager", criterion="wanda"
    )
    with pytest.raises(Exception, match=r"criterion 'wanda': managed weight '0\.weight'.*grouped"):
        compiled(torch.randn(1, 4, 4, 4))


def test_two_four_pattern_groups_a_kernel_along_its_input_channels() -> None:
    model = ConvOnly()
    compiled = resu.compile(model, sparsity=0.5, pattern="2:4", manual=True, compiler="aot_eager")
    compiled(torch.randn(2, 4, 6, 6))
    expected = {
        "a.weight": nm_mask(model.a.weight.detach().abs(), 2, 4, input_dim=1),
        "b.weight": nm_mask(model.b.weight.detach().abs(), 2, 4, input_dim=1),
    }
    compiled.resu.prune()
    for name, mask in compiled.resu.masks().items():
        # every (output channel, kernel position) keeps the 2 largest of its 4 input channels
        assert torch.equal(mask.sum(dim=1), torch.full(mask.sum(dim=1).shape, 2))
        assert torch.equal(mask, expected[name])


def test_two_four_pattern_refuses_a_depthwise_kernel_with_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(16, 2))
    compiled = resu.compile(model, sparsity=0.5, pattern="2:4", manual=True, compiler="aot_eager")
    compiled(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"'0\.weight' has 1 inputs, not a multiple of 4"):
        compiled.resu.prune()


def test_nm_mask_on_a_kernel_groups_consecutive_input_channels_per_position() -> None:
    scores = torch.arange(2 * 4 * 1 * 2, dtype=torch.float32).reshape(2, 4, 1, 2)
    mask = nm_mask(scores, 2, 4, input_dim=1)
    # within every (out, kh, kw) the two highest input channels (2, 3) survive
    assert torch.equal(mask[:, :2], torch.zeros(2, 2, 1, 2, dtype=torch.bool))
    assert torch.equal(mask[:, 2:], torch.ones(2, 2, 1, 2, dtype=torch.bool))


def test_erk_density_of_a_kernel_is_the_sum_over_the_product_of_its_dims() -> None:
    # conv (8, 4, 3, 3): (8+4+3+3) / 288 = 1/16; linear (10, 8): 18 / 80. 90% of 368 weights
    # leaves int(36.8) = 36 = eps * (18 + 18): eps = 1, so each layer keeps 18.
    counts = layer_keep_counts([288, 80], 0.9, "erk", shapes=[(8, 4, 3, 3), (10, 8)])
    assert counts == [18, 18]
    # at 50% the linear layer's density eps * 18/80 would pass 1: it goes dense (80) and the
    # kernel keeps the rest, 184 - 80 = 104.
    assert layer_keep_counts([288, 80], 0.5, "erk", shapes=[(8, 4, 3, 3), (10, 8)]) == [104, 80]
    # for 2-D weights the same rule is RigL's (out + in) / (out * in): keeping 20 of 80,
    # eps = 20 / (16 + 8), so 13.33 and 6.67, the remainder going to the larger fraction
    assert layer_keep_counts([64, 16], 0.75, "erk", shapes=[(8, 8), (4, 4)]) == [13, 7]


def test_erk_distribution_through_compile_gives_each_kernel_its_share() -> None:
    model = ConvOnly()
    compiled = resu.compile(
        model, sparsity=0.75, distribution="erk", manual=True, compiler="aot_eager"
    )
    compiled(torch.randn(1, 4, 6, 6))
    compiled.resu.prune(0.75)
    shapes = [tuple(w.shape) for w in compiled.resu.state]
    expected = layer_keep_counts([math.prod(s) for s in shapes], 0.75, "erk", shapes=shapes)
    assert [w.active_count() for w in compiled.resu.state] == expected
    assert expected[0] != expected[1]  # the shapes differ, so ERK is not uniform here


def test_resnet18_smoke_every_convolution_is_managed() -> None:
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    model = torchvision.models.resnet18(num_classes=10)
    compiled = resu.compile(model, sparsity=0.5, manual=True, compiler="aot_eager")
    compiled(torch.randn(1, 3, 32, 32)).sum().backward()
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(compiled.resu.state.names()) == convs | {"fc.weight"}
    compiled.resu.prune()
    assert all(abs(w.sparsity() - 0.5) < 1e-3 for w in compiled.resu.state)
