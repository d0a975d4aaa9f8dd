"""`peer.gate.RoundGate` on trio's virtual clock: alone, then behind fake peers that drift.

The peers are `peer.daemon.Peer` over `tests.fakes.FakeNetwork` with a 4-number trainer, as in
tests/test_rounds.py; a slow peer's training rounds last three times the others'.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from gossip.config import NodeConfig
from peer.config import PeerConfig
from peer.daemon import Peer
from peer.gate import RoundGate
from peer.publish import Publisher
from tests.fakes import FakeNetwork, fake_runtime
from topology.config import TopologyConfig


async def test_the_gate_opens_once_every_member_has_finished_the_rounds(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = RoundGate(floor_s=100)
    for member in "abc":
        gate.join(member, 0)
    opened: list[float] = []

    async def waiter() -> None:
        assert await gate.wait_for(1)
        opened.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        gate.finished("a", 1, took_s=5)
        await trio.sleep(10)
        gate.finished("b", 1, took_s=5)
        await trio.sleep(10)
        assert not opened, "c has not finished round 1"
        gate.finished("c", 1, took_s=5)
    assert opened == [20]
    assert await gate.wait_for(1), "already there: no wait"
    stats = gate.statistics()
    assert (stats.members, stats.opened, stats.timed_out) == (3, 2, 0)
    assert stats.waited_s == 20 and stats.longest_round_s == 5


async def test_a_member_that_leaves_is_not_waited_for(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = RoundGate(floor_s=100)
    gate.join("a", 2)
    gate.join("crashed", 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.wait_for, 2)
        await trio.sleep(7)
        gate.leave("crashed")
    assert trio.current_time() == 7
    assert gate.statistics().opened == 1 and gate.statistics().members == 1
    gate.leave("crashed")  # twice: nothing more


async def test_a_stuck_member_delays_the_others_by_the_bound_only(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = RoundGate(patience=3, floor_s=10)
    assert gate.bound_s() == 10, "the floor, before any round"
    gate.join("stuck", 0)
    gate.join("a", 0)
    gate.finished("a", 1, took_s=20)  # the longest round so far: 3 x 20 s
    assert not await gate.wait_for(1)
    assert trio.current_time() == pytest.approx(60)
    stats = gate.statistics()
    assert (stats.opened, stats.timed_out, stats.waited_s, stats.late) == (0, 1, 60, 1)
    # Late now: the next rounds do not wait for it again ...
    gate.finished("a", 2, took_s=20)
    assert await gate.wait_for(2) and trio.current_time() == pytest.approx(60)
    # ... until it has caught up with the rounds waited for; then it is waited for again.
    gate.finished("stuck", 1, took_s=20)
    assert gate.statistics().late == 1, "1 round of the 2 waited for"
    gate.finished("stuck", 2, took_s=20)
    assert gate.statistics().late == 0 and await gate.wait_for(2)
    assert gate.behind(3) == 2


async def test_when_one_wait_gives_up_the_others_waiting_go_on(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = RoundGate(patience=1, floor_s=10)
    for member in ("stuck", "a", "b"):
        gate.join(member, 0)
    gate.finished("a", 1, took_s=1)
    gate.finished("b", 1, took_s=1)
    results: dict[str, tuple[bool, float]] = {}

    async def wait(name: str, after_s: float) -> None:
        await trio.sleep(after_s)
        results[name] = (await gate.wait_for(1), trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "a", 0)
        nursery.start_soon(wait, "b", 4)  # its own bound would end at 14
    assert results == {"a": (False, 10), "b": (True, 10)}
    stats = gate.statistics()
    assert (stats.timed_out, stats.opened, stats.late) == (1, 1, 1)
    with pytest.raises(ValueError):
        RoundGate(patience=0)


async def test_a_longer_round_reported_during_a_wait_extends_it(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = RoundGate(patience=2, floor_s=10)
    gate.join("slow", 0)
    gate.join("other", 1)

    async def report() -> None:
        await trio.sleep(5)
        gate.finished("other", 2, took_s=30)  # now the bound is 60 s

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        assert not await gate.wait_for(1)
    assert trio.current_time() == pytest.approx(60)


async def test_announcements_are_waited_for_as_rounds_are(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = RoundGate(floor_s=100)
    for member in "ab":
        gate.join(member, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gate.wait_announced, 3)
        gate.announced("a", 3)
        await trio.sleep(5)
        assert gate.statistics().opened == 0, "b has not announced round 3"
        gate.announced("b", 3)
    assert trio.current_time() == 5 and gate.statistics().opened == 1
    # Having finished round 3 is past having announced it; announcing is not finishing.
    gate.finished("a", 3, took_s=1)
    assert await gate.wait_announced(3)
    with trio.move_on_after(50):
        await gate.wait_for(3)
    assert trio.current_time() == 55 and gate.behind(3) == 1


async def test_a_member_late_to_announce_is_waited_for_once(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = RoundGate(floor_s=30)
    for member in "ab":
        gate.join(member, 0)
    gate.announced("a", 1)
    assert not await gate.wait_announced(1)
    assert trio.current_time() == 30 and gate.statistics().late == 1
    assert await gate.wait_announced(1), "b is late: not waited for again"
    gate.announced("b", 1)  # caught up with the wait that gave up on it
    assert gate.statistics().late == 0 and trio.current_time() == 30


NETWORK = NodeConfig(fetch_timeout_s=2.0)


def _peer(tmp_path: Path, network: FakeNetwork, index: int, train_s: float,
          gate: RoundGate | None) -> Peer:
    config = PeerConfig(
        data_dir=tmp_path / f"p{index}", train_path=tmp_path / "unused.jsonl", rounds=2,
        settle_rounds=2, topology=TopologyConfig(fanout=1, settle_fanout=2), network=NETWORK)
    peer = Peer(config, node_factory=network.node, gate=gate)  # type: ignore[arg-type]
    peer.runtime = fake_runtime(config.data_dir, train_s=train_s, seed=index)
    return peer


async def _run(peers: list[Peer], *, crash_after: int = 0) -> dict[int, list[float]]:
    """Run `peers`; the virtual time each finished each round (the last peer crashes after
    `crash_after` rounds, if given)."""
    ends: dict[int, list[float]] = {index: [] for index in range(len(peers))}

    async def watch(index: int) -> None:
        for rounds in range(1, 5):
            await peers[index].wait_rounds(rounds)
            ends[index].append(trio.current_time())
            if index == len(peers) - 1 and rounds == crash_after:
                peers[index].crash()
                return

    async with trio.open_nursery() as nursery:
        for index, peer in enumerate(peers):
            nursery.start_soon(peer.run)
            nursery.start_soon(watch, index)
    return ends


def _round_s(peer: Peer, round_: int) -> float:
    lines = (peer.config.data_dir / "metrics.jsonl").read_text().splitlines()
    return next(line["round_s"] for line in map(json.loads, lines) if line["round"] == round_)


@pytest.mark.parametrize("together", [True, False])
async def test_peers_behind_a_gate_settle_after_the_slowest_has_trained(
        tmp_path: Path, mock_clock: trio.testing.MockClock, together: bool) -> None:
    mock_clock.autojump_threshold = 0.02  # threads must not let the clock run ahead
    network, gate = FakeNetwork(), RoundGate() if together else None
    peers = [_peer(tmp_path, network, index, train_s, gate)
             for index, train_s in enumerate((10, 10, 30))]
    ends = await _run(peers)
    trained = max(ends[index][1] for index in range(3))  # the slow peer's second round
    settle_starts = [ends[index][2] - _round_s(peer, 3) for index, peer in enumerate(peers)]
    if together:
        assert min(settle_starts) >= trained, (settle_starts, trained)
        # ... and the second settling round starts after every peer's first.
        assert min(ends[i][3] - _round_s(p, 4) for i, p in enumerate(peers)) >= max(
            ends[i][2] for i in range(3))
        assert gate is not None and gate.statistics().members == 0, "done peers left"
        assert gate.statistics().timed_out == 0
    else:  # paced, as deployed peers: the fast ones settle while the slow one still trains
        assert min(settle_starts) < trained - 20, (settle_starts, trained)


@pytest.mark.parametrize("together", [True, False])
async def test_settling_peers_behind_a_gate_fetch_what_every_neighbour_merged_last(
        tmp_path: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
        together: bool) -> None:
    """One peer takes long to announce: behind a gate, the others fetch only once it serves
    this round's adapter, never the one it had before its last merge."""
    mock_clock.autojump_threshold = 0.02
    network, gate = FakeNetwork(), RoundGate() if together else None
    peers = [_peer(tmp_path, network, index, 10, gate) for index in range(3)]
    step = Publisher.step

    def slow_step(publisher: Publisher, *args: Any, **kwargs: Any) -> Any:
        slow_node = peers[2].parts.node  # type: ignore[union-attr]
        if kwargs.get("settling") and publisher.node is slow_node:
            time.sleep(1.0)  # real time, in a worker thread: the virtual clock runs on
        return step(publisher, *args, **kwargs)

    monkeypatch.setattr(Publisher, "step", slow_step)
    await _run(peers)
    slow = peers[2].parts.node.peer_id  # type: ignore[union-attr]
    # Settling rounds announce versions 3 and 4 (a version a round, after round 0's 0).
    settling = [(own, served) for _, server, own, served in network.fetched
                if server == slow and own >= 3]
    assert settling, network.fetched
    if together:
        assert all(served == own for own, served in settling), settling
    else:
        assert any(served < own for own, served in settling), settling


async def test_a_crashed_peer_leaves_the_gate(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0.02
    network, gate = FakeNetwork(), RoundGate(floor_s=1000)
    peers = [_peer(tmp_path, network, index, train_s, gate)
             for index, train_s in enumerate((10, 10, 30))]
    ends = await _run(peers, crash_after=1)
    assert len(ends[2]) == 1, "the slow peer crashed after round 1"
    # The others did not wait for it: their settling ended long before the 1,000 s bound, and
    # before the slow peer would have finished training (about 60 s).
    assert max(ends[0][3], ends[1][3]) < 60
    stats = gate.statistics()
    assert stats.timed_out == 0 and stats.members == 0
