"""Neighbour sampling: who may be drawn, and that the draw is uniform (fixed-seed chi-square)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from topology import MembershipView, PeerInfo, TopologyConfig

SELF = "self"
NOW = 100.0
TIMEOUT = 30.0

Sampler = Callable[[int, random.Random], list[PeerInfo]]


def _critical(df: int, z: float = 4.75) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z=4.75 is a one-sided p of about 1e-6.

    So strict a level keeps these statistical tests from ever failing by bad luck, while a
    sampler with a real bias still lands far above it (see the power test below).
    """
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def _chi_square(counts: Sequence[int], expected: float) -> float:
    return sum((c - expected) ** 2 / expected for c in counts)


def _view_of(n: int, *, order: Sequence[int] | None = None) -> MembershipView:
    view = MembershipView(TopologyConfig(view_size=64, peer_timeout_s=TIMEOUT), SELF)
    for i in order if order is not None else range(n):
        view.observe(f"p{i:02d}", NOW - i, addrs=[f"/ip4/10.0.0.{i}/tcp/1"], version=i)
    return view


def _subset_statistic(sample: Sampler, n: int, k: int, draws: int, seed: int) -> float:
    """Chi-square of how often each k-subset of the n peers is drawn, against uniform."""
    rng = random.Random(seed)
    counts = Counter(frozenset(i.peer_id for i in sample(k, rng)) for _ in range(draws))
    subsets = [frozenset(s) for s in itertools.combinations([f"p{i:02d}" for i in range(n)], k)]
    assert set(counts) <= set(subsets)
    return _chi_square([counts[s] for s in subsets], draws / len(subsets))


def test_every_subset_is_equally_likely() -> None:
    view = _view_of(6)
    stat = _subset_statistic(lambda k, rng: view.sample(k, rng, NOW), 6, 2, 6000, seed=11)
    assert stat < _critical(math.comb(6, 2) - 1)


def test_the_bound_catches_a_sampler_biased_to_first_connected() -> None:
    """Power check: the same statistic rejects a sampler that favours early peers a little."""
    view = _view_of(6)

    def biased(k: int, rng: random.Random) -> list[PeerInfo]:
        live = view.live(NOW)
        return live[:k] if rng.random() < 0.1 else rng.sample(live, k)

    assert _subset_statistic(biased, 6, 2, 6000, seed=11) > _critical(math.comb(6, 2) - 1)


@given(
    n=st.integers(2, 12),
    k=st.integers(1, 6),
    order=st.randoms(use_true_random=False),
)
@settings(max_examples=25, deadline=None, derandomize=True)
def test_each_peer_is_drawn_with_equal_probability(n: int, k: int, order: random.Random) -> None:
    ids = list(range(n))
    order.shuffle(ids)  # connection order must not matter
    view = _view_of(n, order=ids)
    k = min(k, n - 1)
    draws = 150 * n
    rng = random.Random(2024)
    counts = Counter(info.peer_id for _ in range(draws) for info in view.sample(k, rng, NOW))
    p = k / n
    # Inclusion counts of a without-replacement draw vary by T*p*(1-p); rescale so the sum over
    # peers follows (approximately) a chi-square with n-1 degrees of freedom.
    stat = _chi_square([counts[f"p{i:02d}"] for i in range(n)], draws * p) / (1.0 - p)
    assert stat < _critical(n - 1)


@given(
    versions=st.lists(st.none() | st.integers(0, 9), min_size=0, max_size=10),
    ages=st.data(),
    k=st.integers(0, 12),
    exclude_mask=st.integers(0, 2**10 - 1),
    require_version=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=150, deadline=None)
def test_sample_draws_only_eligible_distinct_peers(
    versions: list[int | None],
    ages: st.DataObject,
    k: int,
    exclude_mask: int,
    require_version: bool,
    seed: int,
) -> None:
    view = MembershipView(TopologyConfig(view_size=64, peer_timeout_s=TIMEOUT), SELF)
    view.observe(SELF, NOW, version=1)
    for i, version in enumerate(versions):
        age = ages.draw(st.sampled_from([0.0, 5.0, TIMEOUT, TIMEOUT + 0.5, 100.0]))
        view.observe(f"p{i}", NOW - age, version=version)
    exclude = {f"p{i}" for i in range(10) if exclude_mask >> i & 1} | {"stranger"}
    eligible = {
        info.peer_id
        for info in view.live(NOW)
        if info.peer_id not in exclude and (info.version >= 0 or not require_version)
    }
    drawn = view.sample(k, random.Random(seed), NOW, exclude=exclude,
                        require_version=require_version)
    ids = [info.peer_id for info in drawn]
    assert len(ids) == len(set(ids)) == min(k, len(eligible))
    assert set(ids) <= eligible and SELF not in ids
    assert all(NOW - info.last_heard <= TIMEOUT for info in drawn)


def test_draw_is_reproducible_and_independent_of_connection_order() -> None:
    forward, backward = _view_of(10), _view_of(10, order=range(9, -1, -1))
    first = forward.sample(3, random.Random(5), NOW)
    assert first == forward.sample(3, random.Random(5), NOW)
    assert first == backward.sample(3, random.Random(5), NOW)


def test_require_version_false_includes_silent_announcers() -> None:
    view = MembershipView(TopologyConfig(peer_timeout_s=TIMEOUT), SELF)
    view.observe("connected-only", NOW)
    view.observe("announced", NOW, version=0)
    rng = random.Random(0)
    assert [i.peer_id for i in view.sample(5, rng, NOW)] == ["announced"]
    assert {i.peer_id for i in view.sample(5, rng, NOW, require_version=False)} == {
        "connected-only", "announced"
    }
    assert view.sample(0, rng, NOW) == []
