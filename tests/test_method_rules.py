"""The method layer's rules (METHOD.md sections 2-5 and the RigL baseline), pinned to small
hand-computed examples and to stable-sort references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resu_compile.method.amnesty import amnesty_mask, amnesty_scores
from resu_compile.method.consistency import DELTA, select_consistent, update_statistics_
from resu_compile.method.pruning import prune_mask
from resu_compile.method.rigl import rigl_fraction, rigl_regrow
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


def test_amnesty_reserves_places_for_trained_candidates_only() -> None:
    # 10 coordinates, 6 active (0..5), 4 pruned (6..9) of which 7 and 8 trained as theta;
    # keep 5 with r = 0.4 -> 2 reserved.
    old = torch.tensor([True] * 6 + [False] * 4)
    trained = torch.tensor([False] * 7 + [True, True, False])
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.5, 3.0, 0.1, 2.0])
    result = amnesty_mask(scores, old, trained, n_keep=5, budget=0.4)
    assert result.n_reserved == 2
    # Actives compete for 3 places (0, 1, 2); the trained candidates 7 and 8 take the 2 reserved
    # places, though 9 (untrained) scores higher than 8.
    assert result.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 7, 8]
    assert result.resurrected == 2


def test_amnesty_gives_unused_reserved_places_back_to_the_actives() -> None:
    # Only one trained candidate (9) for 2 reserved places: the other place goes to the best
    # remaining active (3), never to an untrained zero.
    old = torch.tensor([True] * 6 + [False] * 4)
    trained = torch.tensor([False] * 9 + [True])
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 0.5, 3.0, 0.1, 2.0])
    result = amnesty_mask(scores, old, trained, n_keep=5, budget=0.4)
    assert result.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 9]
    assert result.resurrected == 1
    # No trained candidate at all (no RESU phase): the commit keeps the best actives.
    none = torch.zeros(10, dtype=torch.bool)
    result = amnesty_mask(scores, old, none, n_keep=5, budget=0.4)
    assert result.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4]


def test_densifying_amnesty_takes_all_of_a_and_t_then_untrained_by_gradient() -> None:
    # Keep 8 of 10 with 3 active (0..2) and 2 trained (3, 4): the last 3 places go to the
    # untrained pruned coordinates with the largest |G| (9, 6, then 5 before 7 and 8 by index).
    old = torch.tensor([True, True, True] + [False] * 7)
    trained = torch.tensor([False] * 3 + [True, True] + [False] * 5)
    scores = torch.tensor([1.0, 2.0, 3.0, 0.9, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0])
    grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 1.0, 1.0, -5.0])
    result = amnesty_mask(scores, old, trained, n_keep=8, budget=0.25, gradient=grad)
    assert int(result.mask.sum()) == 8
    assert result.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 6, 9]
    assert result.resurrected == 5
    # Without a gradient the untrained ones come back in index order.
    result = amnesty_mask(scores, old, trained, n_keep=8, budget=0.25)
    assert result.mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


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


def _bools(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_topk_selection_takes_the_largest_gradients_of_the_pruned_set() -> None:
    pruned = _bools(1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1)  # p = 10
    grad = torch.tensor([0.1, -0.9, 0.3, 0.0, 0.8, 5.0, -5.0, -0.2, 0.7, 0.05, 0.6, -0.4])
    chosen, count = select_trainable(pruned, "topk", 0.3, torch.Generator(), gradient=grad)
    assert count == 3  # int(0.3 * 10)
    # |g| on P: 0.9 (index 1), 0.8 (4), 0.7 (8) are the top 3; 5.0 and -5.0 are active.
    assert chosen.nonzero().flatten().tolist() == [1, 4, 8]


def test_topk_selection_needs_the_gradient() -> None:
    with pytest.raises(ValueError, match="topk"):
        select_trainable(_bools(1, 0), "topk", 0.5, torch.Generator())


def test_consistency_statistics_are_emas_of_g_and_abs_g_on_the_pruned_set_only() -> None:
    pruned = _bools(1, 1, 0)
    m = torch.tensor([0.0, 0.0, 7.0])  # slot 2 belongs to the user's optimizer: left alone
    v = torch.tensor([0.0, 0.0, 9.0])
    update_statistics_(torch.tensor([1.0, 2.0, 3.0]), m, v, pruned, beta=0.9)
    c = update_statistics_(torch.tensor([-1.0, 2.0, 3.0]), m, v, pruned, beta=0.9)
    # Coordinate 0 flips sign: m = 0.9 * 0.1 - 0.1 = -0.01, v = 0.9 * 0.1 + 0.1 = 0.19.
    # Coordinate 1 keeps it:    m = 0.9 * 0.2 + 0.2 = 0.38, v = 0.38.
    assert torch.allclose(m, torch.tensor([-0.01, 0.38, 7.0]))
    assert torch.allclose(v, torch.tensor([0.19, 0.38, 9.0]))
    assert math.isclose(c[0].item(), 0.01 / (0.19 + DELTA), rel_tol=1e-5)
    assert math.isclose(c[1].item(), 0.38 / (0.38 + DELTA), rel_tol=1e-5)
    assert c[2].item() == 0.0
    assert c.min() >= 0.0 and c.max() <= 1.0  # [0, 1) exactly; fp32 may round up to 1


def test_consistency_selects_top_gradients_among_the_screened_consistent_ones() -> None:
    pruned = _bools(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0)  # p = 10
    grad = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 9.0])
    consistency = torch.tensor([0.2, 0.9, 0.6, 0.8, 0.9, 0.99, 0.9, 0.9, 0.9, 0.9, 0.9])
    # Screen: top 5 |g| of P = indices 0..4. Consistent (C > 0.5) among them: 1, 2, 3, 4.
    # Select: top 2 |g| of those = 1, 2. Index 5 has the best C but fails the screen.
    chosen = select_consistent(grad, consistency, pruned, k_screen=5, k_select=2, tau=0.5)
    assert chosen.nonzero().flatten().tolist() == [1, 2]
    # Fewer consistent coordinates than k_select: all of them, no more.
    few = select_consistent(grad, consistency, pruned, k_screen=2, k_select=2, tau=0.5)
    assert few.nonzero().flatten().tolist() == [1]


def test_gradient_and_wanda_amnesty_scores() -> None:
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    grad = torch.tensor([[3.0, 0.5], [-4.0, 9.0]])
    assert torch.equal(
        amnesty_scores(weight, "gradient", gradient=grad), torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    )
    norms = torch.tensor([10.0, 1.0])  # ||X_j|| per input column (dim 1 of an nn.Linear weight)
    assert torch.equal(
        amnesty_scores(weight, "wanda", input_norms=norms, input_dim=1),
        torch.tensor([[10.0, 2.0], [5.0, 0.0]]),
    )
    with pytest.raises(ValueError, match="gradient"):
        amnesty_scores(weight, "gradient")


def test_gradient_score_lets_a_strongly_pulled_theta_beat_a_larger_one() -> None:
    old = _bools(1, 1, 0, 0)
    weight = torch.tensor([1.0, 2.0, 0.5, 0.1])
    grad = torch.tensor([0.0, 0.0, 0.1, 10.0])
    trained = ~old  # both pruned coordinates trained as theta
    by_magnitude = amnesty_mask(amnesty_scores(weight, "magnitude"), old, trained, 3, 1 / 3).mask
    by_gradient = amnesty_mask(
        amnesty_scores(weight, "gradient", gradient=grad), old, trained, 3, 1 / 3
    )
    assert by_magnitude.tolist() == [True, True, True, False]
    assert by_gradient.mask.tolist() == [True, True, False, True]


def test_rigl_fraction_is_cosine_decayed_and_stops_at_the_end() -> None:
    assert rigl_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert rigl_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert rigl_fraction(25, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert rigl_fraction(100, 100, 0.3) == 0.0
    assert rigl_fraction(150, 100, 0.3) == 0.0


def test_rigl_drops_smallest_magnitude_and_grows_largest_gradient() -> None:
    mask = _bools(1, 1, 0, 0, 1, 0)
    weight = torch.tensor([0.5, 0.1, 0.0, 0.0, -0.3, 0.0])
    grad = torch.tensor([0.0, 0.0, 0.9, -0.2, 0.0, 0.5])
    new, grown = rigl_regrow(weight, grad, mask, 2)
    # Drop 0.1 (index 1) and 0.3 (index 4); grow |g| 0.9 (index 2) and 0.5 (index 5).
    assert new.tolist() == [True, False, True, False, False, True]
    assert grown.tolist() == [False, False, True, False, False, True]
    assert int(new.sum()) == int(mask.sum())


def test_rigl_may_grow_back_a_weight_it_just_dropped() -> None:
    mask = _bools(1, 1, 0)
    weight = torch.tensor([0.5, 0.1, 0.0])
    grad = torch.tensor([0.0, 3.0, 1.0])
    new, grown = rigl_regrow(weight, grad, mask, 1)
    assert new.tolist() == [True, True, False]
    assert not grown.any()  # nothing new: the dropped weight keeps its value


def test_cubic_and_explicit_densifying_schedules() -> None:
    cubic = cycle_sparsities(0.8, 4, "cubic")
    expected = [0.8 * (1 - (1 - (c + 1) / 4) ** 3) for c in range(4)]
    assert cubic == pytest.approx(expected)
    assert cubic[-1] == pytest.approx(0.8)
    assert cycle_sparsities(0.7, 5, (0.7, 0.5, 0.3, 0.1, 0.0)) == [0.7, 0.5, 0.3, 0.1, 0.0]
