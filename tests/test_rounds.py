"""The round logic on trio's virtual clock: waves, patience and settling, without a model.

The network is `tests.fakes.FakeNetwork` (in memory) and the trainer a 4-number adapter, so
these tests exercise `peer.gather.Gatherer` and `peer.daemon.Peer` alone, with no real sleep.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossip.compress import Codec, decode_payload, parse_codec, shapes_of
from gossip.config import NodeConfig
from gossip.estimate import PublicEstimate
from gossip.wire import Announcement
from gossip.wire import digest as sha256
from merge.config import MergeConfig
from peer.config import PeerConfig
from peer.daemon import Peer
from peer.gather import Gatherer
from peer.publish import settling_codec
from peer.stats import PeerStatistics
from tests.fakes import NAMES, FakeNetwork, FakeNode, fake_runtime
from topology.config import TopologyConfig

SWARM = sha256(b"fake swarm")[:16]
NETWORK = NodeConfig(fetch_timeout_s=2.0)


def _state(value: float, shape: tuple[int, int] = (2, 2)) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, value) for name in NAMES}


def _serving(network: FakeNetwork, value: float, *, samples: int = 4,
             shape: tuple[int, int] = (2, 2)) -> FakeNode:
    node = network.node(NETWORK, SWARM, None)
    node.offer(1, samples, _state(value, shape))
    return node


def _announcement(node: FakeNode) -> Announcement:
    offer = node.offered
    assert offer is not None
    return Announcement(swarm=SWARM, peer=node.peer_id, version=offer.version,
                        samples=offer.samples, digest=offer.digest,
                        nbytes=offer.keyframe_bytes, train_loss=1.0,
                        addrs=tuple(node.listen_addrs))


@dataclass
class Neighbours:
    """A membership that draws in a fixed order and records each verdict."""

    order: list[FakeNode]
    verdicts: dict[str, list[str]] = field(default_factory=lambda: {
        "answered": [], "trust": [], "failed": [], "distrust": []})

    def sample(self, k: int, *, exclude: Collection[str] = ()) -> list[Announcement]:
        left = [node for node in self.order if node.peer_id not in exclude]
        return [_announcement(node) for node in left[:k]]

    def answered(self, peer: str) -> None:
        self.verdicts["answered"].append(peer)

    def trust(self, peer: str) -> None:
        self.verdicts["trust"].append(peer)

    def failed(self, peer: str) -> None:
        self.verdicts["failed"].append(peer)

    def distrust(self, peer: str) -> None:
        self.verdicts["distrust"].append(peer)


def _gatherer(network: FakeNetwork, order: list[FakeNode]) -> tuple[Gatherer, Neighbours]:
    ours = network.node(NETWORK, SWARM, None)
    neighbours = Neighbours(order)
    return Gatherer(ours, neighbours, MergeConfig(), fanout=2,
                    fetch_timeout_s=NETWORK.fetch_timeout_s, offload=_inline), neighbours


async def _inline(fn: Callable[[], Any]) -> Any:
    """Validate on the event loop: a worker thread would let the virtual clock jump meanwhile."""
    return fn()


def test_a_slow_or_stalled_link_is_a_network_failure_not_a_lie() -> None:
    # An honest peer behind a slow or congested link keeps its place in the view.
    network = FakeNetwork()
    gatherer, neighbours = _gatherer(network, [])
    for reason in ("stalled", "too_slow", "timeout"):
        gatherer._judge(reason, reason)
    assert neighbours.verdicts["failed"] == ["stalled", "too_slow", "timeout"]
    assert neighbours.verdicts["distrust"] == []


async def test_failed_and_invalid_neighbours_are_replaced_in_later_waves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork()
    down, wrong, good, also_good = (_serving(network, 0.1), _serving(network, 0.1, shape=(2, 3)),
                                    _serving(network, 0.2), _serving(network, 0.3))
    down.up = False
    gatherer, neighbours = _gatherer(network, [down, wrong, good, also_good])
    found = await gatherer.gather(_state(0.1), version=1, trained=True)
    assert sorted(c.peer for c in found.accepted) == sorted([good.peer_id, also_good.peer_id])
    assert found.tried == sorted(n.peer_id for n in (down, wrong, good, also_good))
    assert neighbours.verdicts["failed"] == [down.peer_id], "the network failed it: it stays"
    assert neighbours.verdicts["distrust"] == [wrong.peer_id], "invalid bytes: it goes"
    assert sorted(neighbours.verdicts["trust"]) == sorted([good.peer_id, also_good.peer_id])
    assert gatherer.stats.rejected == {"shape_mismatch": 1}
    assert gatherer.stats.adapters_received == 3, "the invalid one arrived too"


def _untrained_neighbour() -> tuple[Gatherer, FakeNode]:
    network = FakeNetwork()
    late = _serving(network, 0.2, samples=0)
    return _gatherer(network, [late])[0], late


async def test_an_untrained_neighbour_is_fetched_again_until_it_has_trained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gatherer, late = _untrained_neighbour()

    async def train_at(when: float) -> None:
        await trio.sleep_until(when)
        late.offer(2, 4, _state(0.2))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(train_at, 2.5)
        started = trio.current_time()
        found = await gatherer.gather(_state(0.1), version=2, trained=True, patience_s=10)
    # Fetched at 0, then after 1 s and 2 more s of backoff: trained by then.
    assert [c.peer for c in found.accepted] == [late.peer_id]
    assert 3.0 <= trio.current_time() - started < 4.0
    assert found.accepted[0].age == 0 and found.unanswered == []


async def test_a_busy_neighbour_is_asked_again_in_a_settling_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Peers that settle behind a gate all fetch at once; a neighbour serves a few and answers
    # the rest "busy". With nobody left to draw, a settling round asks it again after 1 s, 2 s.
    network = FakeNetwork()
    loaded, free = _serving(network, 0.2), _serving(network, 0.3)
    loaded.busy = 2
    gatherer, neighbours = _gatherer(network, [loaded, free])
    started = trio.current_time()
    found = await gatherer.gather(_state(0.1), version=1, trained=True, patience_s=10,
                                  settling=True)
    assert sorted(c.peer for c in found.accepted) == sorted([loaded.peer_id, free.peer_id])
    assert 3.0 <= trio.current_time() - started < 4.0 and found.unanswered == []
    assert loaded.server.refused["busy"] == 2
    assert neighbours.verdicts["failed"] == [] == neighbours.verdicts["distrust"]
    # Busy to the end of the patience: the round goes on with the one it has.
    loaded.busy = 100
    found = await gatherer.gather(_state(0.1), version=2, trained=True, patience_s=5,
                                  settling=True)
    assert [c.peer for c in found.accepted] == [free.peer_id]
    assert [a.peer for a in found.unanswered] == [loaded.peer_id]
    # A training round does not wait for a busy neighbour: it goes on with the others.
    loaded.busy, started = 1, trio.current_time()
    found = await gatherer.gather(_state(0.1), version=3, trained=True, patience_s=5)
    assert [c.peer for c in found.accepted] == [free.peer_id]
    assert trio.current_time() - started < 1.0 and found.unanswered == []


async def test_patience_ends_with_the_fetch_timeout_when_training_was_quick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gatherer, never = _untrained_neighbour()
    started = trio.current_time()
    found = await gatherer.gather(_state(0.1), version=2, trained=True, patience_s=0.5)
    assert found.accepted == [] and [a.peer for a in found.unanswered] == [never.peer_id]
    assert trio.current_time() - started < NETWORK.fetch_timeout_s + 0.5


FANOUT_ONE = TopologyConfig(fanout=1, peer_timeout_s=3)


def _fake_peer(tmp_path: Path, network: FakeNetwork, name: str, seed: int, *,
               settle_rounds: int = 3, topology: TopologyConfig = FANOUT_ONE) -> Peer:
    config = PeerConfig(
        data_dir=tmp_path / name, train_path=tmp_path / "unused.jsonl", rounds=2,
        settle_rounds=settle_rounds, topology=topology, network=NETWORK,
    )
    peer = Peer(config, node_factory=network.node)  # type: ignore[arg-type]
    peer.runtime = fake_runtime(config.data_dir, train_s=10, seed=seed)
    return peer


async def test_settling_rounds_last_as_long_as_a_training_round(
    tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    # The peer works in threads (encoding, merging, writing); the clock jumps only once the
    # loop has been idle this long, so that it does not run ahead while a thread works.
    mock_clock.autojump_threshold = 0.02
    network = FakeNetwork()
    peers = [_fake_peer(tmp_path, network, f"p{i}", seed=i) for i in range(3)]
    ends: dict[int, list[float]] = {i: [] for i in range(3)}

    async def watch(i: int) -> None:
        for r in range(1, 6):
            await peers[i].wait_rounds(r)
            ends[i].append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for i, peer in enumerate(peers):
            nursery.start_soon(peer.run)
            nursery.start_soon(watch, i)
    for i, peer in enumerate(peers):
        first, second, *settling = ends[i]
        training_round = second - first
        assert training_round >= 10
        # A round's pause follows it: each settling round but the first is paced by the one
        # before it, to last as long as the last training round.
        gaps = [b - a for a, b in pairwise(settling)]
        assert len(gaps) == 2 and min(gaps) >= 0.9 * training_round, (training_round, gaps)
        lines = [json.loads(line)
                 for line in (peer.config.data_dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["merged"] for line in lines][2:] == [2, 2, 2], "settling merged both others"
        # Each line says where its round's time went: training (none when settling), gathering.
        # (A thread slow to start under load may let the virtual clock jump a tick further.)
        trained = [line["train_s"] for line in lines[:2]]
        assert all(10 <= s < 13 for s in trained)
        assert abs(lines[-1]["t_train"] - sum(trained)) < 1e-3, "training seconds add up"
        assert [line["train_s"] for line in lines[2:]] == [None, None, None]
        assert all(0 < line["gather_s"] <= line["round_s"] for line in lines)
        assert all(line["round_s"] >= line["train_s"] for line in lines[:2])
        assert peer.stats.merges >= 4
        assert (peer.config.data_dir / "export").exists(), "a clean stop exports"
        # status.json reports the links its fetches measured, of live neighbours only.
        status = json.loads((peer.config.data_dir / "status.json").read_text())
        assert status["links"] and set(status["links"]) <= set(status["live_peers"])
        assert all(link["transfers"] >= 1 and link["rate_bps"] > 0
                   for link in status["links"].values())
        # ... and its wire: the codec, the estimate it serves, the uploads by kind.
        wire = status["wire"]
        assert wire["codec"] == peer.config.network.wire_codec
        assert wire["estimate"]["version"] == status["version"]
        assert wire["served"]["keyframe"] >= 1 and wire["replicas"]["held"] == 0


async def test_a_settling_round_fetches_settle_fanout_neighbours_a_training_round_fanout(
    tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02  # as above: threads must not let the clock run ahead
    network = FakeNetwork()
    topology = TopologyConfig(fanout=1, settle_fanout=3, peer_timeout_s=30)
    peers = [_fake_peer(tmp_path, network, f"p{i}", seed=i, settle_rounds=2, topology=topology)
             for i in range(4)]
    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(peer.run)
    for peer in peers:
        lines = [json.loads(line)
                 for line in (peer.config.data_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = [line for line in lines if line["round"] >= 1]
        # Two training rounds at fanout 1, then two settling rounds at settle fanout 3: every
        # other peer of the four.
        assert [line["train_loss"] is None for line in rounds] == [False, False, True, True]
        assert [line["merged"] for line in rounds] == [1, 1, 3, 3]
        assert [len(line["tried"]) for line in rounds] == [1, 1, 3, 3]


async def test_settle_fanout_left_at_0_settles_at_8_or_every_neighbour_there_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork()
    nodes = [_serving(network, value) for value in (0.2, 0.3, 0.4)]
    ours = network.node(NETWORK, SWARM, None)
    for settle_fanout, wanted in ((0, 3), (3, 3), (1, 1)):  # 0: 8, of the 3 there are
        topology = TopologyConfig(fanout=2, settle_fanout=settle_fanout)
        gatherer = Gatherer(ours, Neighbours(nodes), MergeConfig(), fanout=topology.fanout,
                            settle_fanout=topology.settling_fanout, offload=_inline,
                            fetch_timeout_s=NETWORK.fetch_timeout_s)
        training = await gatherer.gather(_state(0.1), version=1, trained=True)
        settling = await gatherer.gather(_state(0.1), version=2, trained=True, settling=True)
        assert len(training.accepted) == 2
        assert len(settling.accepted) == wanted, settle_fanout


def test_training_seconds_go_on_after_a_restart() -> None:
    stats = PeerStatistics.resumed({"merges": 3, "t": 50.0, "t_train": 40.0})
    stats.train_s += 2.5
    assert stats.totals(bytes_in=0, bytes_out=0)["t_train"] == 42.5


async def test_require_dp_refuses_by_reason_before_fetching_and_by_the_signed_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = FakeNetwork()
    plain, loose, tight, stale = (_serving(network, v) for v in (0.1, 0.2, 0.3, 0.4))
    announced = {plain.peer_id: -1.0, loose.peer_id: 9.5, tight.peer_id: 4.0,
                 stale.peer_id: 4.0}
    # What each serves is signed with the ε of its version: `stale` trained on since its
    # announcement and serves a version at ε 9.
    signed = {**announced, stale.peer_id: 9.0}
    for node in (plain, loose, tight, stale):
        assert node.offered is not None
        node.serve(replace(node.offered, privacy=signed[node.peer_id]))

    class Private(Neighbours):
        def sample(self, k: int, *, exclude: Collection[str] = ()) -> list[Announcement]:
            drawn = super().sample(k, exclude=exclude)
            return [replace(a, privacy=announced[a.peer]) for a in drawn]

    ours = network.node(NETWORK, SWARM, None)
    neighbours = Private([plain, loose, tight, stale])
    gatherer = Gatherer(ours, neighbours, MergeConfig(), fanout=4, offload=_inline,
                        fetch_timeout_s=NETWORK.fetch_timeout_s, require_dp=8.0)
    found = await gatherer.gather(_state(0.1), version=1, trained=True)
    assert [c.peer for c in found.accepted] == [tight.peer_id]
    assert gatherer.stats.rejected == {"not_private": 1, "epsilon_over": 2}
    assert gatherer.stats.adapters_received == 2, "the announced refusals were not fetched"
    assert neighbours.verdicts["distrust"] == [], "a refusal says nothing of honesty"


async def test_settling_rounds_step_the_estimate_with_the_settle_codec(
    tmp_path: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sign steps leave each peer a residual x - x̂ that settling merges never shrink, and
    # consensus stalls (README, "Settling"); settling rounds step with int8 instead.
    mock_clock.autojump_threshold = 0.02  # as above: threads must not let the clock run ahead
    steps: dict[int, list[str]] = {}  # version -> the codecs of its steps, over the peers
    step = PublicEstimate.step

    def recording(estimate: PublicEstimate, x: Any, *, version: int | None = None,
                  codec: Codec | None = None) -> Any:
        done = step(estimate, x, version=version, codec=codec)
        payload = done.payload
        spec = decode_payload(payload, shapes=shapes_of(x), max_bytes=len(payload))[0].spec
        steps.setdefault(done.version, []).append(spec)
        return done

    monkeypatch.setattr(PublicEstimate, "step", recording)
    network, sign = FakeNetwork(), replace(NETWORK, wire_codec="sign")
    peers = [_fake_peer(tmp_path, network, f"p{i}", seed=i, settle_rounds=2) for i in range(3)]
    for peer in peers:
        peer.config = replace(peer.config, network=sign)
    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(peer.run)
    # Versions 1 and 2 trained (sign steps); 3 and 4 settled (int8, the "auto" settle codec).
    assert steps == {1: ["sign"] * 3, 2: ["sign"] * 3, 3: ["int8"] * 3, 4: ["int8"] * 3}, steps


@pytest.mark.parametrize(("wire", "spec", "settles"), [
    ("sign", "auto", "int8"), ("topk:0.05+zstd", "auto", "int8+zstd"), ("bf16", "auto", "bf16"),
    ("fp32", "auto", "fp32"), ("sign", "fp32+zstd", "fp32+zstd"), ("int8", "sign", "sign"),
])
def test_the_auto_settle_codec_is_the_wire_codec_when_dense_else_int8(
    wire: str, spec: str, settles: str,
) -> None:
    assert settling_codec(parse_codec(wire), spec).spec == settles
