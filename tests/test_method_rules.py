"""The rules of METHOD.md sections 4 and 5 and the RigL baseline, pinned to hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from resu_compile.method.amnesty import amnesty_mask, amnesty_scores
from resu_compile.method.consistency import DELTA, select_consistent, update_statistics_
from resu_compile.method.rigl import rigl_fraction, rigl_regrow
from resu_compile.method.schedule import cycle_sparsities
from resu_compile.method.selective import select_trainable


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
    by_magnitude = amnesty_mask(amnesty_scores(weight, "magnitude"), old, 3, 1 / 3).mask
    by_gradient = amnesty_mask(amnesty_scores(weight, "gradient", gradient=grad), old, 3, 1 / 3)
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
