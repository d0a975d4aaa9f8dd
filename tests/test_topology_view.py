"""Membership view: liveness, replays, eviction, expiry (plain cases and hypothesis properties)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topology import (
    NO_VERSION,
    InvalidArgument,
    MembershipView,
    Observation,
    PeerInfo,
    TopologyConfig,
)
from topology.admission import RETRY_BASE_S, RETRY_CAP_S, retry_after_s

SELF = "self"
POOL = [SELF] + [f"p{i}" for i in range(9)]

# (peer, seconds since the previous event, announced version or None for a connection event)
_events = st.lists(
    st.tuples(st.sampled_from(POOL), st.integers(0, 20), st.none() | st.integers(0, 5)),
    max_size=60,
)


def _view(view_size: int = 64, timeout: float = 30.0) -> MembershipView:
    # fanout and target_connections may not exceed view_size; the view itself ignores both.
    config = TopologyConfig(fanout=1, view_size=view_size, peer_timeout_s=timeout,
                            target_connections=1)
    return MembershipView(config, SELF)


def _snapshot(view: MembershipView) -> list[PeerInfo | None]:
    return [view.get(peer) for peer in POOL]


def test_new_then_refreshed_then_updated() -> None:
    view = _view()
    assert view.observe("a", 1.0, addrs=["/ip4/1.2.3.4/tcp/1"]) is Observation.NEW
    assert view.get("a") == PeerInfo("a", ("/ip4/1.2.3.4/tcp/1",), 1.0, NO_VERSION, 0, admitted=1.0)
    assert view.observe("a", 2.0) is Observation.REFRESHED
    assert view.observe("a", 3.0, version=0, samples=8) is Observation.UPDATED
    # Empty addrs keep the known ones; a newer announcement replaces version and samples.
    assert view.get("a") == PeerInfo("a", ("/ip4/1.2.3.4/tcp/1",), 3.0, 0, 8, admitted=1.0)
    assert view.observe("a", 4.0, addrs=["/ip4/5.6.7.8/tcp/2"], version=3, samples=30) is (
        Observation.UPDATED
    )
    assert view.get("a") == PeerInfo("a", ("/ip4/5.6.7.8/tcp/2",), 4.0, 3, 30, admitted=1.0)
    assert len(view) == 1 and "a" in view and "b" not in view


def test_connection_event_keeps_version_and_samples() -> None:
    view = _view()
    view.observe("a", 1.0, version=4, samples=12)
    assert view.observe("a", 2.0, samples=99) is Observation.REFRESHED
    assert view.get("a") == PeerInfo("a", (), 2.0, 4, 12, admitted=1.0)


def test_replay_changes_nothing_so_it_cannot_keep_a_peer_alive() -> None:
    view = _view(timeout=10.0)
    view.observe("a", 0.0, addrs=["/x"], version=5, samples=10)
    for version in (5, 4, 0):
        assert view.observe("a", 9.0, addrs=["/y"], version=version) is Observation.REPLAY
    assert view.get("a") == PeerInfo("a", ("/x",), 0.0, 5, 10)
    assert view.statistics(9.0).replays == 3
    assert view.expire(10.5) == ["a"]


def test_replay_after_expiry_does_not_resurrect_the_peer() -> None:
    view = _view(timeout=10.0)
    view.observe("a", 0.0, version=5)
    assert view.expire(11.0) == ["a"]
    assert view.observe("a", 12.0, version=5) is Observation.REPLAY
    assert view.get("a") is None
    # A connection event brings it back without a version; old versions are still replays.
    assert view.observe("a", 13.0) is Observation.NEW
    assert view.get("a") == PeerInfo("a", (), 13.0, NO_VERSION, 0, admitted=13.0)
    assert view.observe("a", 14.0, version=2) is Observation.REPLAY
    assert view.observe("a", 15.0, version=6) is Observation.UPDATED
    assert view.get("a") == PeerInfo("a", (), 15.0, 6, 0, admitted=13.0)


def test_forget_remembers_the_version() -> None:
    view = _view()
    view.observe("a", 0.0, version=2)
    view.forget("a")
    view.forget("never-seen")
    assert view.get("a") is None and len(view) == 0
    assert view.observe("a", 1.0, version=2) is Observation.REPLAY
    assert view.observe("a", 1.0, version=3) is Observation.NEW


def test_late_event_does_not_move_last_heard_backwards() -> None:
    view = _view()
    view.observe("a", 10.0)
    assert view.observe("a", 5.0, version=1) is Observation.UPDATED
    info = view.get("a")
    assert info is not None and info.last_heard == 10.0


def test_self_is_never_stored() -> None:
    view = _view()
    assert view.observe(SELF, 1.0, version=3) is Observation.REFRESHED
    assert view.get(SELF) is None and len(view) == 0


def test_a_full_view_evicts_a_silent_member_first() -> None:
    view = _view(view_size=3, timeout=10.0)
    view.observe("a", 1.0)
    view.observe("b", 2.0)
    view.observe("c", 3.0)
    view.observe("a", 4.0)
    assert view.observe("d", 12.5) is Observation.NEW  # b (heard at 2) is past the timeout
    assert sorted(info.peer_id for info in view.live(12.5)) == ["a", "c", "d"]
    assert view.statistics(12.5).evictions == 1


def test_when_all_are_live_the_newest_untrusted_member_makes_room() -> None:
    # Newcomers compete with each other, not with senior members: a flood churns one slot.
    view = _view(view_size=3)
    view.observe("a", 1.0)
    view.observe("b", 2.0)
    view.observe("c", 3.0)
    for t, sybil in enumerate(("s1", "s2", "s3"), 4):
        assert view.observe(sybil, float(t)) is Observation.NEW
    assert sorted(info.peer_id for info in view.live(7.0)) == ["a", "b", "s3"]


def test_trusted_members_are_never_evicted_and_a_view_of_them_refuses_newcomers() -> None:
    view = _view(view_size=2)
    view.observe("a", 1.0)
    view.observe("b", 2.0)
    view.trust("a")
    view.trust("b")
    assert view.observe("c", 3.0) is Observation.REFUSED
    assert view.get("c") is None and view.statistics(3.0).refused == 1
    view.distrust("b")  # it served something invalid: out
    assert view.observe("c", 4.0) is Observation.NEW and view.is_trusted("a")


def test_one_public_prefix_holds_at_most_an_eighth_of_the_view() -> None:
    view = _view(view_size=16)
    for i in range(4):
        view.observe(f"s{i}", 1.0, addrs=[f"/ip4/93.184.216.{i}/tcp/1/p2p/s{i}"])
    assert len(view) == 2 and view.statistics(1.0).refused == 2
    # Another prefix, loopback and private addresses are not limited.
    assert view.observe("x", 1.0, addrs=["/ip4/151.101.1.1/tcp/1"]) is Observation.NEW
    for i in range(4):
        assert view.observe(f"l{i}", 1.0, addrs=[f"/ip4/127.0.0.1/tcp/{i}"]) is Observation.NEW


@given(heard=st.lists(st.sampled_from(POOL[1:]), max_size=40), view_size=st.integers(1, 6),
       trusted=st.sets(st.sampled_from(POOL[1:]), max_size=3))
@settings(max_examples=80, deadline=None)
def test_admission_keeps_senior_and_trusted_members(heard: list[str], view_size: int,
                                                     trusted: set[str]) -> None:
    view = _view(view_size=view_size, timeout=1000.0)
    members: list[str] = []  # reference: in order of admission
    for t, peer in enumerate(heard):
        outcome = view.observe(peer, float(t))
        if peer in trusted:
            view.trust(peer)
        if peer in members:
            continue
        if len(members) < view_size:
            members.append(peer)
            continue
        newest = [p for p in members if not view.is_trusted(p)]
        if not newest:
            assert outcome is Observation.REFUSED
            continue
        members.remove(newest[-1])
        members.append(peer)
        assert outcome is Observation.NEW
        assert sorted(info.peer_id for info in view.live(float(t))) == sorted(members)


def test_half_the_draw_comes_from_trusted_peers() -> None:
    view = _view(view_size=64)
    for i in range(60):
        view.observe(f"s{i:02d}", 1.0, version=1)
    view.observe("honest", 1.0, version=1)
    view.trust("honest")
    rng = random.Random(0)
    for _ in range(20):
        assert "honest" in [info.peer_id for info in view.sample(2, rng, 1.0)]
    # A draw of one takes a trusted peer with even odds (uniform would be 1 in 61).
    drawn = sum("honest" in [i.peer_id for i in view.sample(1, rng, 1.0)] for _ in range(400))
    assert 150 < drawn < 250


def test_expiry_boundary_is_inclusive() -> None:
    view = _view(timeout=30.0)
    view.observe("a", 100.0)
    view.observe("b", 101.0)
    assert view.expire(130.0) == []
    assert [info.peer_id for info in view.live(130.0)] == ["a", "b"]
    just_after = math.nextafter(130.0, math.inf)
    assert [info.peer_id for info in view.live(just_after)] == ["b"]
    assert len(view) == 2  # live() only filters; expire() drops
    assert view.expire(just_after) == ["a"]
    assert view.get("a") is None and view.statistics(just_after).expirations == 1


@given(heard=st.integers(0, 10**6), timeout=st.integers(1, 1000))
@settings(max_examples=100, deadline=None)
def test_expiry_exactly_at_the_timeout(heard: int, timeout: int) -> None:
    view = _view(timeout=float(timeout))
    view.observe("a", float(heard))
    boundary = float(heard + timeout)
    assert view.expire(boundary) == [] and len(view.live(boundary)) == 1
    assert view.expire(math.nextafter(boundary, math.inf)) == ["a"]


def test_statistics() -> None:
    view = _view(timeout=10.0)
    empty = view.statistics(0.0)
    assert (empty.known, empty.live, empty.newest_version, empty.stalest_age_s) == (
        0, 0, NO_VERSION, None
    )
    view.observe("a", 0.0, version=7)
    view.observe("b", 5.0)
    view.observe("c", 8.0, version=2)
    stats = view.statistics(12.0)
    assert (stats.known, stats.live, stats.announced) == (3, 2, 1)
    assert stats.newest_version == 7  # "a" is silent but not expired yet
    assert stats.stalest_age_s == 7.0


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_non_finite_time_is_rejected(now: float) -> None:
    view = _view()
    with pytest.raises(InvalidArgument, match="now"):
        view.observe("a", now)
    with pytest.raises(ValueError, match="now"):
        view.expire(now)


def test_bad_arguments_are_rejected() -> None:
    view = _view()
    with pytest.raises(InvalidArgument, match="version"):
        view.observe("a", 0.0, version=-1)
    with pytest.raises(InvalidArgument, match="samples"):
        view.observe("a", 0.0, version=1, samples=-3)
    with pytest.raises(InvalidArgument, match="k must"):
        view.sample(-1, random.Random(0), 0.0)
    assert len(view) == 0


@given(events=_events, view_size=st.integers(1, 5))
@settings(max_examples=150, deadline=None)
def test_invariants_under_any_event_sequence(
    events: list[tuple[str, int, int | None]], view_size: int
) -> None:
    timeout = 15.0
    view = _view(view_size=view_size, timeout=timeout)
    highest: dict[str, int] = {}
    now = 0.0
    for peer, dt, version in events:
        now += dt
        before, held = _snapshot(view), view.get(peer)
        seen = view.observe(peer, now, version=version)
        after = view.get(peer)
        if seen is Observation.REPLAY:
            # Only an announcement can be a replay, only of a version seen before, and it is inert.
            assert version is not None and version <= highest[peer]
            assert _snapshot(view) == before
        elif peer != SELF:
            assert after is not None and after.last_heard == now
            if held is None:
                assert seen is Observation.NEW
            else:
                assert seen is (Observation.REFRESHED if version is None else Observation.UPDATED)
            if version is not None:
                assert after.version == version
        if held is not None and version is not None and version <= held.version:
            assert seen is Observation.REPLAY
        if version is not None and peer != SELF:
            highest[peer] = max(highest.get(peer, NO_VERSION), version)
        assert len(view) <= view_size and view.get(SELF) is None
        live = view.live(now)
        assert [i.peer_id for i in live] == sorted({i.peer_id for i in live})
        assert all(now - info.last_heard <= timeout for info in live)
    gone = view.expire(now)
    assert all(view.get(peer) is None for peer in gone)
    assert len(view) == len(view.live(now))


def test_a_fresh_message_may_repeat_the_version_of_a_departed_peer() -> None:
    view = _view(timeout=10.0)
    view.observe("a", 0.0, version=5)
    assert view.expire(11.0) == ["a"]
    assert view.observe("a", 12.0, version=4, fresh=True) is Observation.REPLAY
    assert view.observe("a", 12.0, version=5, fresh=True) is Observation.NEW
    assert view.get("a") == PeerInfo("a", (), 12.0, 5, 0, admitted=12.0)
    # Only a departed peer: a live one repeating its version is no news, fresh or not.
    assert view.observe("a", 13.0, version=5, fresh=True) is Observation.REPLAY


def test_peers_whose_fetches_failed_are_drawn_after_the_others() -> None:
    view = _view(view_size=64)
    for i in range(10):
        view.observe(f"s{i}", 1.0, version=1)
        view.failed(f"s{i}", 1.0)  # identities that never served
    view.observe("quiet", 1.0, version=1)
    rng = random.Random(0)
    for _ in range(20):
        assert "quiet" in [info.peer_id for info in view.sample(1, rng, 1.0)]
    assert len(view.sample(5, rng, 1.0)) == 5, "failed peers still fill a larger draw"
    view.trust("s3")  # serving a valid adapter clears its failures
    info = view.get("s3")
    assert info is not None and info.failures == 0 and info.trusted


def test_a_peer_that_failed_comes_back_to_the_draw_after_a_backoff() -> None:
    """Ranked after the others for good, a peer that failed once (asked before it had an
    address we could dial) was never drawn again while enough others served."""
    view = _view(view_size=64, timeout=10_000.0)
    for name in ("a", "b", "late"):
        view.observe(name, 0.0, version=1)
    view.failed("late", 0.0)
    rng = random.Random(0)

    def draws_of_late(now: float) -> int:
        return sum("late" in [i.peer_id for i in view.sample(2, rng, now)] for _ in range(200))

    assert draws_of_late(0.0) == 0 and draws_of_late(RETRY_BASE_S - 0.1) == 0
    assert 100 < draws_of_late(RETRY_BASE_S) < 200, "then as likely as the others: 2 of 3"
    view.failed("late", 100.0)  # failing again in a row waits twice as long
    assert draws_of_late(100.0 + 2 * RETRY_BASE_S - 0.1) == 0
    assert draws_of_late(100.0 + 2 * RETRY_BASE_S) > 100
    info = view.get("late")
    assert info is not None and info.failures == 2
    assert retry_after_s(1) == RETRY_BASE_S and retry_after_s(100) == RETRY_CAP_S


def test_untrusted_peers_a_host_answered_for_are_drawn_first() -> None:
    view = _view(view_size=64)
    for i in range(20):
        view.observe(f"minted{i}", 1.0, version=1)  # identities with no host behind them
    view.observe("hosted", 1.0, version=1)
    view.reached("hosted")
    rng = random.Random(0)
    assert all(view.sample(1, rng, 1.0)[0].peer_id == "hosted" for _ in range(20))
    view.failed("hosted", 1.0)  # failures weigh first: a reached peer that fails sinks too
    assert all(view.sample(1, rng, 1.0)[0].peer_id != "hosted" for _ in range(20))
