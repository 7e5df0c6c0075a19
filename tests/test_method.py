"""The method layer's rules, pinned to small hand-computed examples (METHOD.md sections 2-5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resu_compile.method.amnesty import amnesty_mask
from resu_compile.method.pruning import prune_mask
from resu_compile.method.schedule import amnesty_budget, cycle_sparsities, keep_count
from resu_compile.method.selective import initial_theta, select_trainable
from resu_compile.method.topk import topk_mask


def test_topk_breaks_ties_by_lower_index() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_mask(scores, 2).tolist() == [False, True, True, False, False]
    eligible = torch.tensor([True, False, True, True, True])
    assert topk_mask(scores, 2, eligible).tolist() == [False, False, True, False, True]
    assert topk_mask(scores, 10, eligible).sum() == 4


def test_linear_schedule_ends_at_the_target_and_cycle_zero_prunes() -> None:
    assert cycle_sparsities(0.7, 5, "linear") == pytest.approx([0.14, 0.28, 0.42, 0.56, 0.7])
    assert cycle_sparsities(0.8, 2, "cubic") == pytest.approx([0.8 * (1 - 0.5**3), 0.8])
    assert cycle_sparsities(0.5, 3, "constant") == [0.5, 0.5, 0.5]
    assert cycle_sparsities(0.0, 3, [0.7, 0.5, 0.3]) == [0.7, 0.5, 0.3]


def test_amnesty_budget_runs_from_r_start_to_r_end() -> None:
    assert amnesty_budget(0, 5, 0.10, 0.02) == pytest.approx(0.10)
    assert amnesty_budget(2, 5, 0.10, 0.02) == pytest.approx(0.06)
    assert amnesty_budget(4, 5, 0.10, 0.02) == pytest.approx(0.02)
    assert amnesty_budget(0, 1, 0.10, 0.02) == pytest.approx(0.02)


def test_prune_keeps_exactly_int_1_minus_s_times_n_by_magnitude() -> None:
    weight = torch.tensor([[0.5, -2.0, 0.1], [3.0, -0.2, 1.0]])
    mask = prune_mask(weight, None, 0.5)
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    assert keep_count(7, 0.7) == 2  # int(0.3 * 7) = int(2.1)
    # Already-pruned coordinates never come back at a prune, whatever their value.
    current = torch.tensor([[True, False, True], [True, True, True]])
    assert prune_mask(weight, current, 0.5).tolist() == [[True, False, False], [True, False, True]]
    # A lower target than the current sparsity changes nothing at prune time.
    assert torch.equal(prune_mask(weight, current, 0.0), current)


def test_random_selection_takes_exactly_alpha_of_the_pruned_set() -> None:
    pruned = torch.rand(40, 30, generator=torch.Generator().manual_seed(0)) < 0.6
    first, count = select_trainable(pruned, "random", 0.2, torch.Generator().manual_seed(1))
    again, _ = select_trainable(pruned, "random", 0.2, torch.Generator().manual_seed(1))
    assert int(first.sum()) == count == int(0.2 * int(pruned.sum()))
    assert not (first & ~pruned).any()
    assert torch.equal(first, again)
    assert torch.equal(select_trainable(pruned, "all", 0.2, torch.Generator())[0], pruned)


def test_theta_is_eps_sigma_times_standard_normal() -> None:
    weight = torch.randn(200, 50, generator=torch.Generator().manual_seed(0)) * 3.0
    active = torch.rand(200, 50, generator=torch.Generator().manual_seed(1)) < 0.5
    theta = initial_theta(weight, active, 0.1, torch.Generator().manual_seed(2))
    sigma = weight[active].std()
    expected = 0.1 * sigma * torch.randn(200, 50, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(theta, expected)
    lone = torch.zeros(200, 50, dtype=torch.bool)
    lone[0, 0] = True
    assert torch.count_nonzero(initial_theta(weight, lone, 0.1, torch.Generator())) == 0


def test_amnesty_reserves_places_for_resurrected_weights() -> None:
    # 10 coordinates, 6 active (0..5), 4 pruned (6..9); keep 5 with r = 0.4 -> 2 reserved.
    old = torch.tensor([True] * 6 + [False] * 4)
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.5, 3.0, 0.1, 2.0])
    result = amnesty_mask(scores, old, n_keep=5, budget=0.4)
    assert result.n_reserved == 2
    # Actives compete for 3 places (0, 1, 2), pruned ones for 2 (7, 9), though 3 and 4 score higher.
    assert result.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 7, 9]
    assert result.resurrected == 2


def test_amnesty_shortfall_is_filled_from_pruned_then_active() -> None:
    # Densifying: keep 8 of 10 with only 3 active; the active group (n_A = 6) falls 3 short.
    old = torch.tensor([True, True, True] + [False] * 7)
    scores = torch.tensor([1.0, 2.0, 3.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    result = amnesty_mask(scores, old, n_keep=8, budget=0.25)
    assert int(result.mask.sum()) == 8
    assert result.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # Pruned group too small for its reserved places: the rest comes from the best remaining actives.
    old = torch.tensor([True] * 9 + [False])
    scores = torch.arange(10, dtype=torch.float32)
    result = amnesty_mask(scores, old, n_keep=6, budget=0.5)
    assert result.mask.nonzero().squeeze(1).tolist() == [4, 5, 6, 7, 8, 9]


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.integers(0, 4), min_size=1, max_size=200),
    eligible_bits=st.lists(st.booleans(), min_size=200, max_size=200),
    k=st.integers(0, 210),
)
def test_topk_mask_equals_a_stable_sort_reference(scores, eligible_bits, k) -> None:
    values = torch.tensor(scores, dtype=torch.float32)
    eligible = torch.tensor(eligible_bits[: len(scores)])
    candidates = eligible.nonzero().squeeze(1)
    order = torch.sort(values[candidates], descending=True, stable=True).indices
    expected = torch.zeros(len(scores), dtype=torch.bool)
    expected[candidates[order[:k]]] = True
    assert torch.equal(topk_mask(values, k, eligible), expected)
