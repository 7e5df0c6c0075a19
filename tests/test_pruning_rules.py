"""Pruning rules (METHOD.md section 3) pinned to small hand-computed examples."""

from __future__ import annotations

import pytest
import torch

from resu_compile.method.pruning import (
    layer_keep_counts,
    nm_mask,
    prune_mask,
    prune_scores,
    row_quotas,
)
from resu_compile.method.schedule import keep_count


def test_wanda_scores_multiply_by_the_input_norm_along_the_input_dim() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # nn.Linear (out, in)
    norms = torch.tensor([4.0, 1.0])
    expected = torch.tensor([[4.0, 2.0], [12.0, 0.5]])
    assert torch.equal(prune_scores(weight, "wanda", input_norms=norms), expected)
    # GPT-2 Conv1D stores (in, out): the same layer transposed, input dim 0.
    conv = prune_scores(weight.t(), "wanda", input_norms=norms, input_dim=0)
    assert torch.equal(conv, expected.t())


def test_wanda_per_row_chooses_differently_from_magnitude() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = torch.tensor([4.0, 1.0])
    magnitude = prune_mask(weight, None, 0.5, per_row=True)
    wanda = prune_mask(weight, None, 0.5, "wanda", input_norms=norms, per_row=True)
    assert magnitude.tolist() == [[False, True], [True, False]]
    assert wanda.tolist() == [[True, False], [True, False]]
    # Not per row, Wanda's two best are both in row 1 (12 and 4 > 2).
    whole = prune_mask(weight, None, 0.5, "wanda", input_norms=norms)
    assert whole.tolist() == [[True, False], [True, False]]
    # Conv1D layout: rows are along dim 1.
    conv = prune_mask(
        weight.t(), None, 0.5, "wanda", input_norms=norms, input_dim=0, per_row=True, output_dim=1
    )
    assert torch.equal(conv, wanda.t())


def test_per_row_keeps_the_exact_total_with_the_remainder_to_low_rows() -> None:
    weight = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    mask = prune_mask(weight, None, 0.4, per_row=True)  # int(0.6 * 12) = 7 -> 3, 2, 2
    assert mask.sum() == 7
    assert mask.tolist() == [
        [True, True, True, False],
        [False, False, True, True],
        [True, True, False, False],  # ties by lower index within the row
    ]
    assert row_quotas([4, 4, 4], 7) == [3, 2, 2]
    # A row with fewer active coordinates keeps them all; the others fill up to the total.
    assert row_quotas([1, 4, 4], 7) == [1, 3, 3]
    assert row_quotas([1, 4, 4], 6) == [1, 3, 2]
    assert row_quotas([1, 4, 4], 20) == [1, 4, 4]
    current = torch.tensor(
        [[False, False, False, True], [True, True, True, True], [True, True, True, True]]
    )
    pruned = prune_mask(weight, current, 0.5, per_row=True)  # 6 -> 1, 3, 2
    assert pruned.tolist() == [
        [False, False, False, True],
        [False, True, True, True],
        [True, True, False, False],
    ]
    assert not (pruned & ~current).any()


def test_random_criterion_is_reproducible_and_exact() -> None:
    weight = torch.zeros(5, 7)
    a = prune_mask(weight, None, 0.7, "random", generator=torch.Generator().manual_seed(3))
    b = prune_mask(weight, None, 0.7, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.sum() == int(0.3 * 35)
    c = prune_mask(weight, None, 0.7, "random", generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)
    scores = prune_scores(weight, "random", generator=torch.Generator().manual_seed(3))
    assert scores.shape == weight.shape
    assert ((scores >= 0) & (scores < 1)).all()


def test_uniform_and_global_distributions() -> None:
    assert layer_keep_counts([10, 7], 0.7, "uniform") == [3, 2]
    scores = [torch.tensor([1.0, 5.0]), torch.tensor([3.0, 4.0, 0.0])]
    assert layer_keep_counts([2, 3], 0.4, "global", scores=scores) == [1, 2]  # keeps 5, 4, 3
    assert layer_keep_counts([2, 3], 0.75, "global", scores=scores) == [1, 0]  # keeps 5
    ties = [torch.tensor([2.0, 1.0]), torch.tensor([2.0, 2.0])]
    assert layer_keep_counts([2, 2], 0.5, "global", scores=ties) == [1, 1]
    assert layer_keep_counts([2, 2], 0.75, "global", scores=ties) == [1, 0]  # layer order
    # Already-pruned coordinates are not eligible.
    eligible = [torch.tensor([False, True]), None]
    assert layer_keep_counts([2, 3], 0.4, "global", scores=scores, eligible=eligible) == [1, 2]
    eligible = [torch.tensor([True, False]), None]
    assert layer_keep_counts([2, 3], 0.4, "global", scores=scores, eligible=eligible) == [1, 2]
    eligible = [torch.tensor([False, False]), None]
    assert layer_keep_counts([2, 3], 0.4, "global", scores=scores, eligible=eligible) == [0, 3]


def test_erk_gives_small_layers_higher_density_and_sums_exactly() -> None:
    # raw densities 8/16 and 16/64; eps = 40 / (0.5 * 16 + 0.25 * 64) = 5/3
    # real counts 13.33 and 26.67 -> floors 13, 26, the remainder to the larger fraction.
    counts = layer_keep_counts([16, 64], 0.5, "erk", shapes=[(4, 4), (8, 8)])
    assert counts == [13, 27]
    assert sum(counts) == int(0.5 * 80)
    assert counts[0] / 16 > counts[1] / 64
    shapes = [(3, 5), (10, 7), (4, 2, 3, 3), (64,)]
    numels = [15, 70, 72, 64]
    for s in (0.1, 0.5, 0.77, 0.9, 0.99):
        counts = layer_keep_counts(numels, s, "erk", shapes=shapes)
        assert sum(counts) == keep_count(sum(numels), s)
        assert all(0 <= c <= n for c, n in zip(counts, numels, strict=True))


def test_erk_clamps_a_layer_to_dense_and_rescales_the_rest() -> None:
    # raw 4/4 = 1 and 32/256; eps = 130/36 would give layer 0 density 3.6 -> dense;
    # then eps = (130 - 4) / 32 and layer 1 keeps exactly 126.
    assert layer_keep_counts([4, 256], 0.5, "erk", shapes=[(2, 2), (16, 16)]) == [4, 126]
    assert layer_keep_counts([4, 256], 0.0, "erk", shapes=[(2, 2), (16, 16)]) == [4, 256]


def test_nm_two_four_keeps_the_largest_two_of_every_four() -> None:
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 5.0, 5.0, 0.0, 5.0], [0.0, 0.0, 1.0, 0.0] * 2])
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist() == [
        [False, True, True, False, True, True, False, False],
        [True, False, True, False, True, False, True, False],
    ]
    assert (mask.reshape(2, 2, 4).sum(-1) == 2).all()
    assert torch.equal(nm_mask(scores.t(), 2, 4, input_dim=0), mask.t())
    big = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    assert (nm_mask(big, 2, 4).reshape(6, 4, 4).sum(-1) == 2).all()


def test_bad_arguments_raise() -> None:
    weight = torch.ones(2, 3)
    with pytest.raises(ValueError, match="input_norms"):
        prune_scores(weight, "wanda")
    with pytest.raises(ValueError, match="input_norms"):
        prune_scores(weight, "wanda", input_norms=torch.ones(2))
    with pytest.raises(ValueError, match="input_dim"):
        prune_scores(weight, "wanda", input_norms=torch.ones(3), input_dim=2)
    with pytest.raises(ValueError, match="generator"):
        prune_scores(weight, "random")
    with pytest.raises(ValueError, match="criterion"):
        prune_scores(weight, "taylor")
    with pytest.raises(ValueError, match="distribution"):
        layer_keep_counts([6], 0.5, "owl")
    with pytest.raises(ValueError, match="scores"):
        layer_keep_counts([6], 0.5, "global")
    with pytest.raises(ValueError, match="shapes"):
        layer_keep_counts([6], 0.5, "erk")
    with pytest.raises(ValueError, match="shapes"):
        layer_keep_counts([6], 0.5, "erk", shapes=[(2, 2)])
    with pytest.raises(ValueError, match="m"):
        nm_mask(weight, 2, 4)
    with pytest.raises(ValueError, match="n, m"):
        nm_mask(torch.ones(2, 4), 3, 2)
