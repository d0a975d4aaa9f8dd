"""Robust rules stay with the honest inputs while bad ones are within their tolerance; the
`NeighbourBuffer` that feeds them keeps each neighbour's latest adapter, boundedly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge.buffer import NeighbourBuffer
from merge.config import MergeConfig
from merge.quorum import buffer_capacity, min_buffered, trim_count
from merge.rules import merge_states
from merge.tensors import state_distance, state_norm
from merge.types import AdapterState, Contribution
from merge.weights import merge_weights

SHAPES = {"l.lora_A.weight": (2, 6), "l.lora_B.weight": (5, 2), "l.bias": (5,)}


def honest_swarm(gen: torch.Generator, n: int, noise: float = 0.01) -> list[AdapterState]:
    center = {key: torch.randn(shape, generator=gen) for key, shape in SHAPES.items()}
    return [{key: t + noise * torch.randn(t.shape, generator=gen) for key, t in center.items()}
            for _ in range(n)]


def corrupt(gen: torch.Generator, state: AdapterState, kind: str) -> AdapterState:
    if kind == "scaled":
        return {key: 50.0 * t for key, t in state.items()}
    if kind == "flipped":
        return {key: -10.0 * t for key, t in state.items()}
    return {key: 100.0 * torch.randn(t.shape, generator=gen) for key, t in state.items()}


def swarm(seed: int, honest: int, bad: int, kind: str) -> tuple[list[AdapterState],
                                                                list[Contribution]]:
    """Self (honest) first; the bad neighbours also lie about their samples and age."""
    gen = torch.Generator().manual_seed(seed)
    states = honest_swarm(gen, honest)
    contributions = [Contribution(states[0], samples=10)]
    contributions += [Contribution(s, samples=10, age=1, peer=f"h{i}")
                      for i, s in enumerate(states[1:])]
    contributions += [Contribution(corrupt(gen, states[i % honest], kind), samples=10**9, age=-5,
                                   peer=f"bad{i}") for i in range(bad)]
    return states, contributions


def within_honest_range(merged: AdapterState, honest: list[AdapterState]) -> bool:
    for key, value in merged.items():
        stacked = torch.stack([state[key] for state in honest])
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        if not bool(((value >= low - 1e-6) & (value <= high + 1e-6)).all()):
            return False
    return True


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), trim=st.integers(1, 3), kind=st.sampled_from(
    ["scaled", "flipped", "random"]), extra=st.integers(1, 3))
def test_trimmed_mean_stays_within_the_honest_values(seed: int, trim: int, kind: str,
                                                     extra: int) -> None:
    honest, contributions = swarm(seed, honest=trim + extra, bad=trim, kind=kind)
    config = MergeConfig(rule="trimmed-mean", trim=trim)
    merged = merge_states(contributions[0], contributions[1:], config)
    assert within_honest_range(merged, honest)
    # The plain average is dragged far away by the same inputs (so this check has teeth).
    averaged = merge_states(contributions[0], contributions[1:], MergeConfig(rule="average"))
    assert not within_honest_range(averaged, honest)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), bad=st.integers(1, 4),
       kind=st.sampled_from(["scaled", "flipped", "random"]))
def test_median_tolerates_a_minority(seed: int, bad: int, kind: str) -> None:
    honest, contributions = swarm(seed, honest=bad + 1, bad=bad, kind=kind)
    merged = merge_states(contributions[0], contributions[1:], MergeConfig(rule="median"))
    assert within_honest_range(merged, honest)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), honest_n=st.integers(1, 5), bad=st.integers(1, 5),
       kind=st.sampled_from(["scaled", "flipped", "random"]), tau=st.floats(0.05, 1.0))
def test_clipped_bounds_the_damage_of_any_number_of_bad_neighbours(
    seed: int, honest_n: int, bad: int, kind: str, tau: float
) -> None:
    honest, contributions = swarm(seed, honest=honest_n, bad=bad, kind=kind)
    own = contributions[0]
    config = MergeConfig(rule="clipped", clip_tau=tau)
    weights = merge_weights(own, contributions[1:], config)
    merged = merge_states(own, contributions[1:], config)
    radius = tau * state_norm(own.state)
    # Honest neighbours sit well within the radius, so they alone would be averaged unclipped.
    assert all(state_distance(s, own.state) < radius for s in honest)
    honest_only = {
        key: ref + sum(w * (c.state[key] - ref)
                       for c, w in zip(contributions[1:honest_n], weights[1:honest_n],
                                       strict=True))
        for key, ref in own.state.items()
    }
    bad_weight = sum(weights[honest_n:])
    damage = state_distance(merged, honest_only)
    assert damage <= radius * bad_weight * (1 + 1e-5) + 1e-5
    assert damage > 0.0


def test_clipped_leaves_close_neighbours_unclipped() -> None:
    _, contributions = swarm(seed=1, honest=4, bad=0, kind="scaled")
    own, others = contributions[0], contributions[1:]
    clipped = merge_states(own, others, MergeConfig(rule="clipped", clip_tau=1.0))
    averaged = merge_states(own, others, MergeConfig(rule="average"))
    for key in clipped:
        torch.testing.assert_close(clipped[key], averaged[key], atol=1e-6, rtol=1e-6)


def test_trimmed_mean_over_too_few_inputs_trims_what_it_can() -> None:
    gen = torch.Generator().manual_seed(2)
    states = honest_swarm(gen, 2, noise=1.0)
    own, other = Contribution(states[0], 1), Contribution(states[1], 1, peer="x")
    merged = merge_states(own, [other], MergeConfig(rule="trimmed-mean", trim=2))
    for key, value in merged.items():
        torch.testing.assert_close(value, (states[0][key] + states[1][key]) / 2)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.lists(st.integers(-3, 3), min_size=4, max_size=4), min_size=1,
                       max_size=12), trim=st.integers(0, 6),
       fraction=st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.49]))
def test_coordinate_rules_match_a_sorting_reference(values: list[list[int]], trim: int,
                                                    fraction: float) -> None:
    # Small integers make ties frequent, the case a selection network most easily gets wrong.
    stacked = torch.tensor(values, dtype=torch.float32)
    contributions = [Contribution({"x": row}, samples=1, peer=str(i))
                     for i, row in enumerate(stacked)]
    n = len(values)
    ordered = stacked.sort(dim=0).values
    trimmed = min(max(trim, math.floor(fraction * n + 1e-9)), (n - 1) // 2)
    for rule, cut in (("trimmed-mean", trimmed), ("median", (n - 1) // 2)):
        merged = merge_states(contributions[0], contributions[1:],
                              MergeConfig(rule=rule, trim=trim, trim_fraction=fraction))
        torch.testing.assert_close(merged["x"], ordered[cut:n - cut].mean(dim=0))


@pytest.mark.parametrize(("n", "trim", "fraction", "cut"), [
    (16, 1, 0.25, 4), (15, 1, 0.25, 3), (7, 1, 0.25, 1), (16, 5, 0.25, 5), (16, 0, 0.0, 0),
    (100, 0, 0.29, 29), (3, 4, 0.25, 1), (2, 1, 0.49, 0), (1, 3, 0.25, 0),
])
def test_trim_count_is_the_larger_of_trim_and_the_fraction_but_leaves_one(
    n: int, trim: int, fraction: float, cut: int
) -> None:
    assert trim_count(n, MergeConfig(trim=trim, trim_fraction=fraction)) == cut


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, math.nan])
def test_trim_fraction_must_leave_an_honest_majority(fraction: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        MergeConfig(trim_fraction=fraction)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(["scaled", "flipped", "random"]),
       rule=st.sampled_from(["trimmed-mean", "median"]))
def test_a_full_buffer_with_a_quarter_bad_lands_near_the_honest_mean(seed: int, kind: str,
                                                                    rule: str) -> None:
    # What the daemon merges with the defaults: self and a full buffer, a quarter of it bad.
    config = MergeConfig(rule=rule)
    inputs = buffer_capacity(config) + 1
    bad = inputs // 4
    honest, contributions = swarm(seed, honest=inputs - bad, bad=bad, kind=kind)
    merged = merge_states(contributions[0], contributions[1:], config)
    assert within_honest_range(merged, honest)
    mean = {key: torch.stack([state[key] for state in honest]).mean(dim=0) for key in SHAPES}
    spread = max(state_distance(state, mean) for state in honest)
    assert state_distance(merged, mean) <= spread
    # The old fixed trim of 1 lets 3 of the 4 through.
    if rule == "trimmed-mean":
        fixed = merge_states(contributions[0], contributions[1:],
                             MergeConfig(rule=rule, trim_fraction=0.0))
        assert not within_honest_range(fixed, honest)


def test_buffer_sizes_with_the_defaults() -> None:
    config = MergeConfig(rule="median")
    capacity, start = buffer_capacity(config), min_buffered(config)
    assert (capacity, start, trim_count(capacity + 1, config)) == (15, 7, 4)
    # At the threshold, a trimmed mean over self and 7 neighbours cuts 2 per end.
    assert trim_count(start + 1, MergeConfig()) == 2


@settings(max_examples=60, deadline=None)
@given(trim=st.integers(0, 12), fraction=st.floats(0.0, 0.49))
def test_buffer_sizes_are_consistent(trim: int, fraction: float) -> None:
    config = MergeConfig(rule="trimmed-mean", trim=trim, trim_fraction=fraction)
    capacity, start = buffer_capacity(config), min_buffered(config)
    tolerance = trim_count(capacity + 1, config)
    least = max(trim, 2)
    NeighbourBuffer(capacity)  # a valid buffer
    assert capacity >= max(15, 2 * trim + 3)
    assert 2 * least <= start <= capacity
    # Once it merges, a median has an honest majority against `least` bad inputs...
    assert start // 2 >= least
    # ...and a full buffer's trimmed mean cuts what it promises, leaving a middle.
    assert tolerance >= trim
    assert capacity + 1 - 2 * tolerance >= 1
    if trim_count(start + 1, config) < least:  # the fraction is too small to help
        assert start == 2 * least


def test_for_tolerance_still_sizes_a_buffer_for_f_bad() -> None:
    assert NeighbourBuffer.for_tolerance(2).capacity == 7


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    values = [1.0, 2.0, 10.0, -3.0]
    states = [{"x": torch.tensor([v])} for v in values]
    contributions = [Contribution(states[0], 1)] + [Contribution(s, 1, peer=str(i))
                                                    for i, s in enumerate(states[1:])]
    merged = merge_states(contributions[0], contributions[1:], MergeConfig(rule="median"))
    assert float(merged["x"]) == 1.5


def buffered(peer: str, value: float, age: int = 0) -> Contribution:
    return Contribution({"x": torch.tensor([value])}, samples=1, age=age, peer=peer)


def test_buffer_keeps_the_latest_per_neighbour_and_evicts_the_oldest() -> None:
    buffer = NeighbourBuffer.for_tolerance(1)
    assert buffer.capacity == 5
    for i, peer in enumerate("abcde"):
        buffer.put(buffered(peer, float(i)), now=i)
    buffer.put(buffered("a", 10.0), now=5)  # refreshes a: b is now the oldest
    buffer.put(buffered("f", 11.0), now=6)
    assert [c.peer for c in buffer.contributions(now=6)] == ["c", "d", "e", "a", "f"]
    assert "b" not in buffer and "a" in buffer and len(buffer) == 5
    assert float(buffer.contributions(now=6)[3].state["x"]) == 10.0
    assert buffer.statistics().evicted == 1
    assert buffer.discard("c") and not buffer.discard("c")


def test_buffer_ages_entries_and_expires_them() -> None:
    buffer = NeighbourBuffer(4, max_age=3)
    buffer.put(buffered("a", 0.0, age=1), now=10)
    buffer.put(buffered("b", 0.0), now=12)
    assert {c.peer: c.age for c in buffer.contributions(now=12)} == {"a": 3, "b": 0}
    assert [c.peer for c in buffer.contributions(now=13)] == ["b"]
    assert len(buffer) == 2 and buffer.expire(now=13) == 1 and len(buffer) == 1
    assert buffer.statistics().expired == 1


@pytest.mark.parametrize("kwargs", [{"capacity": 2}, {"capacity": 5, "max_age": -1}])
def test_buffer_rejects_bad_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        NeighbourBuffer(**kwargs)


def test_buffer_needs_a_peer_id() -> None:
    with pytest.raises(ValueError):
        NeighbourBuffer(3).put(buffered("", 1.0), now=0)


def test_median_over_a_buffer_outvotes_bad_neighbours_heard_over_several_rounds() -> None:
    # One round's 2 fetches plus self make a median over 3 inputs, which outvotes 1 bad one at
    # most; over 4 rounds the buffer gathers 7 distinct neighbours, and a median over 8 outvotes 3.
    gen = torch.Generator().manual_seed(3)
    honest = honest_swarm(gen, 6)
    own = Contribution(honest[0], samples=10)
    buffer = NeighbourBuffer.for_tolerance(2)
    arrivals = [("h1", honest[1]), ("bad1", corrupt(gen, honest[0], "random")),
                ("h2", honest[2]), ("h3", honest[3]),
                ("bad2", corrupt(gen, honest[0], "scaled")), ("h4", honest[4]), ("h5", honest[5])]
    for round_, (peer, state) in enumerate(arrivals):
        buffer.put(Contribution(state, samples=10, peer=peer), now=round_ // 2)
    merged = merge_states(own, buffer.contributions(now=3), MergeConfig(rule="median"))
    assert within_honest_range(merged, honest)
    assert math.isfinite(state_norm(merged))
