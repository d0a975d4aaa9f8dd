"""Topology config validation, re-dial backoff and the choice of peers to dial."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topology import (
    InvalidArgument,
    MembershipView,
    TopologyConfig,
    TopologyConfigError,
    TopologyError,
    backoff_delay,
    peers_to_dial,
)

NOW = 50.0


def test_default_config_is_valid_and_frozen() -> None:
    config = TopologyConfig()
    assert (config.fanout, config.view_size, config.peer_timeout_s, config.target_connections) == (
        2, 64, 30.0, 4
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fanout = 3  # type: ignore[misc]
    assert all(f.metadata.get("help") for f in dataclasses.fields(TopologyConfig))


def test_fanout_zero_means_training_alone() -> None:
    assert TopologyConfig(fanout=0).fanout == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fanout": -1}, "fanout"),
        ({"fanout": 65}, "fanout"),
        ({"view_size": 0}, "view_size"),
        ({"peer_timeout_s": 0.0}, "peer_timeout_s"),
        ({"peer_timeout_s": math.nan}, "peer_timeout_s"),
        ({"peer_timeout_s": math.inf}, "peer_timeout_s"),
        ({"target_connections": -1}, "target_connections"),
        ({"view_size": 3, "target_connections": 4}, "target_connections"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(TopologyConfigError, match=message) as caught:
        TopologyConfig(**kwargs)  # type: ignore[arg-type]
    # The CLI reports any ValueError from a config as a one-line setting error.
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, TopologyError)
    assert "\n" not in str(caught.value)


@given(attempt=st.integers(0, 10_000), seed=st.integers(0, 2**32 - 1),
       base=st.floats(0.01, 5.0), cap=st.floats(5.0, 600.0))
@settings(max_examples=200, deadline=None)
def test_backoff_stays_within_its_ceiling(attempt: int, seed: int, base: float, cap: float) -> None:
    delay = backoff_delay(attempt, random.Random(seed), base_s=base, cap_s=cap)
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt, 64))


def test_backoff_grows_exponentially_then_caps_with_full_jitter() -> None:
    rng = random.Random(7)
    means = [
        statistics.fmean(backoff_delay(a, rng, base_s=1.0, cap_s=30.0) for _ in range(4000))
        for a in range(8)
    ]
    # Full jitter: the mean delay is half the ceiling min(30, 2**attempt).
    for attempt, mean in enumerate(means):
        assert mean == pytest.approx(min(30.0, 2.0**attempt) / 2, rel=0.05)
    spread = [backoff_delay(3, rng) for _ in range(2000)]
    assert min(spread) < 0.1 * 4.0 and max(spread) > 0.9 * 4.0  # not a fixed delay plus noise


def test_backoff_is_reproducible() -> None:
    first = [backoff_delay(a, random.Random(3)) for a in range(6)]
    assert first == [backoff_delay(a, random.Random(3)) for a in range(6)]


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [(-1, 0.5, 30.0), (0, 0.0, 30.0), (0, 2.0, 1.0), (0, math.nan, 30.0), (0, 0.5, math.inf)],
)
def test_backoff_rejects_bad_arguments(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(InvalidArgument):
        backoff_delay(attempt, random.Random(0), base_s=base, cap_s=cap)


def _view(config: TopologyConfig) -> MembershipView:
    """Peers a..h live with addresses, x live without one, z silent past the timeout."""
    view = MembershipView(config, "self")
    for name in "abcdefgh":
        view.observe(name, NOW, addrs=[f"/dns/{name}/tcp/1"], version=1)
    view.observe("x", NOW, version=1)
    view.observe("z", NOW - config.peer_timeout_s - 1, addrs=["/dns/z/tcp/1"])
    return view


def test_dial_only_what_is_missing() -> None:
    config = TopologyConfig(target_connections=4)
    view = _view(config)
    # z is connected but not live, so it does not count toward the target.
    picked = peers_to_dial(view, {"a", "z", "stranger"}, NOW, config, random.Random(1))
    assert len(picked) == 3
    assert {info.peer_id for info in picked} <= set("bcdefgh")
    assert peers_to_dial(view, set("abcd"), NOW, config, random.Random(1)) == []


def test_dial_everything_dialable_when_short() -> None:
    config = TopologyConfig(target_connections=64)
    picked = peers_to_dial(_view(config), (), NOW, config, random.Random(1))
    assert sorted(info.peer_id for info in picked) == list("abcdefgh")
    assert peers_to_dial(_view(config), (), NOW, TopologyConfig(target_connections=0),
                         random.Random(1)) == []


@given(connected=st.sets(st.sampled_from(list("abcdefghxz"))), target=st.integers(0, 12),
       seed=st.integers(0, 2**32 - 1))
@settings(max_examples=150, deadline=None)
def test_dial_choice_properties(connected: set[str], target: int, seed: int) -> None:
    config = TopologyConfig(target_connections=target)
    view = _view(config)
    picked = [info.peer_id for info in peers_to_dial(view, connected, NOW, config,
                                                      random.Random(seed))]
    connected_live = len(connected & {info.peer_id for info in view.live(NOW)})
    dialable = set("abcdefgh") - connected
    assert len(picked) == len(set(picked)) == min(max(0, target - connected_live), len(dialable))
    assert set(picked) <= dialable


def test_dial_choice_is_random_not_first_heard() -> None:
    config = TopologyConfig(target_connections=1)
    view = _view(config)
    rng = random.Random(9)
    chosen = {peers_to_dial(view, (), NOW, config, rng)[0].peer_id for _ in range(200)}
    assert chosen == set("abcdefgh")
