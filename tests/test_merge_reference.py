"""`NormReference` gives a scale that liars cannot inflate while they are at most half of what it
remembers, and with it a liar at the edge of the norm bound no longer compounds a victim's norm."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge.attack_sim import norm_growth_under_liar
from merge.reference import MIN_HISTORY, REFERENCE_WINDOW, NormReference
from merge.tensors import floored_norm, norm_floor

OWN = {"x": torch.full((4,), 0.5)}  # norm 1


def test_without_history_the_scale_is_our_own_floored_norm() -> None:
    assert NormReference().scale(OWN) == pytest.approx(1.0)
    zero = {"x": torch.zeros(100)}
    assert NormReference().scale(zero) == floored_norm(zero) > 0.0
    assert NormReference().statistics().median is None


def test_the_scale_is_the_lower_median_of_the_window() -> None:
    reference = NormReference(window=4)
    reference.update([9.0, 2.0, 100.0])
    assert reference.scale(OWN) == 9.0  # middle of 2, 9, 100
    reference.update([3.0])
    assert reference.scale(OWN) == 3.0  # lower of the middle two of 2, 3, 9, 100
    reference.update([50.0, 60.0])  # 9.0 and 2.0 fall out
    assert reference.statistics().size == 4 and reference.scale(OWN) == 50.0


def test_a_lone_early_liar_cannot_lift_the_scale_above_our_norm() -> None:
    reference = NormReference()
    reference.update([1e6] * (MIN_HISTORY - 1))
    assert reference.scale(OWN) == pytest.approx(1.0)


def test_the_scale_is_floored() -> None:
    reference = NormReference()
    reference.update([0.0] * REFERENCE_WINDOW)
    zero = {"x": torch.zeros(100)}
    assert reference.scale(zero) == norm_floor(zero) > 0.0


@pytest.mark.parametrize("norm", [-1.0, math.nan, math.inf])
def test_impossible_norms_are_refused(norm: float) -> None:
    with pytest.raises(ValueError):
        NormReference().update([norm])


@settings(max_examples=60, deadline=None)
@given(honest=st.lists(st.floats(0.5, 2.0), min_size=MIN_HISTORY, max_size=40),
       liars=st.lists(st.floats(0.0, 1e12), min_size=40, max_size=40),
       own_norm=st.floats(0.0, 1e9))
def test_liars_serving_half_the_norms_cannot_inflate_the_scale(
    honest: list[float], liars: list[float], own_norm: float
) -> None:
    # Each round one honest neighbour and one liar, whatever either serves and however far
    # the liar carried us (our own norm).
    reference = NormReference()
    window: list[float] = []
    for good, bad in zip(honest, liars, strict=False):
        reference.update([good, bad])
        window = (window + [good, bad])[-REFERENCE_WINDOW:]
    own = {"x": torch.full((4,), own_norm / 2)}
    honest_in_window = window[0::2]
    assert reference.scale(own) <= max(max(honest_in_window), norm_floor(own)) * (1 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(honest=st.lists(st.tuples(st.floats(0.5, 2.0), st.floats(0.5, 2.0)), min_size=2,
                       max_size=20),
       liars=st.lists(st.floats(0.0, 1e12), min_size=20, max_size=20))
def test_liars_serving_a_third_cannot_move_the_scale_either_way(
    honest: list[tuple[float, float]], liars: list[float]
) -> None:
    reference = NormReference(window=15)
    for (first, second), bad in zip(honest, liars, strict=False):
        reference.update([first, bad, second])
    recent = [value for pair in honest[-5:] for value in pair]
    assert min(recent) <= reference.scale(OWN) <= max(recent)


def test_a_liar_at_the_edge_of_the_old_bound_compounds_our_norm() -> None:
    # With a liar claiming the sample cap (weight 2/3): x13.6 a round, as measured in swarms.
    growth = [norm_growth_under_liar(rounds, robust=False) for rounds in (1, 2, 3, 5)]
    assert growth[0] == pytest.approx(13.6, rel=0.05)
    assert growth[2] == pytest.approx(13.6**3, rel=0.15)
    assert growth[3] > 1e5


def test_with_a_norm_reference_the_same_liar_stops_growing() -> None:
    # Bounded by the ball of radius 20 x an honest norm: every merged input lies inside it.
    after_5, after_30 = norm_growth_under_liar(5), norm_growth_under_liar(30)
    assert after_5 < 20.0 and after_30 < 20.0
    assert after_30 == pytest.approx(after_5, rel=0.02)


def test_a_tight_bound_keeps_the_victim_within_twice_its_clean_norm() -> None:
    # The first round has no history, so the victim bounds by its own norm and takes one step
    # of 2/3 x ratio: within 2x of the clean run needs a ratio near 2, not 20.
    assert norm_growth_under_liar(5, ratio=1.99, max_norm_ratio=2.0) < 2.0
    assert norm_growth_under_liar(30, ratio=1.99, max_norm_ratio=2.0) < 2.0
    assert norm_growth_under_liar(5, ratio=1.99, max_norm_ratio=2.0, robust=False) > 5.0


def test_the_reviews_liar_at_19_9x_our_norm_leaves_the_victim_within_2x() -> None:
    # The review's attack: a liar serving 19.9 x the victim's own norm every round. Bounded by
    # our own norm, the victim grew x13.6, x183, x2.5e3 and x4.4e5 after five rounds; bounded by
    # the reference, the liar gets in once (nothing is known yet) and is refused after, and the
    # honest neighbour pulls the victim back.
    assert norm_growth_under_liar(5, adaptive=False, robust=False) > 1e5
    assert norm_growth_under_liar(5, adaptive=False) < 2.0
