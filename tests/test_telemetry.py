"""Self-reported telemetry: what a peer announces, what status.json's "swarm" makes of it, and
the swarm-wide figures `loraswarm swarm` prints.

The swarm here is `tests.fakes.FakeNetwork` under trio's virtual clock (no model, no real
sleep); the real-network path is in tests/test_operating.py and tests/test_hostile_peer.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import trio
import trio.testing

from gossip.config import NodeConfig
from gossip.telemetry import Telemetry
from gossip.wire import Announcement
from gossip.wire import digest as sha256
from peer.config import PeerConfig
from peer.daemon import Peer
from peer.stats import PeerStatistics
from peer.summary import swarm_figures
from peer.telemetry import ROW_KEYS, own_telemetry, swarm_row
from tests.fakes import FakeNetwork, fake_runtime
from topology.config import TopologyConfig

PEER = "12D3KooWGzXKrLVBzgqQZ3uMCfNiVRxk3gAXZpETYPHbCpbyT3Sq"


def _peer(tmp_path: Path, network: FakeNetwork, name: str, seed: int) -> Peer:
    config = PeerConfig(data_dir=tmp_path / name, train_path=tmp_path / "unused.jsonl",
                        topology=TopologyConfig(fanout=1, peer_timeout_s=30),
                        network=NodeConfig(fetch_timeout_s=2.0))
    peer = Peer(config, node_factory=network.node)  # type: ignore[arg-type]
    peer.runtime = fake_runtime(config.data_dir, train_s=10, seed=seed)
    return peer


async def test_status_lists_every_live_peer_as_it_describes_itself(
    tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02  # threads work meanwhile (see test_rounds.py)
    network = FakeNetwork()
    peers = [_peer(tmp_path, network, f"p{i}", seed=i) for i in range(3)]
    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(peer.run)
        for peer in peers:
            await peer.wait_rounds(3)
        # Re-announcements (every third of the peer timeout) carry each peer's newest record.
        await trio.sleep(15)
        statuses = [peer.status() for peer in peers]
        nursery.cancel_scope.cancel()
    ids = [status["peer_id"] for status in statuses]
    for status in statuses:
        swarm = status["swarm"]
        assert swarm["self_reported"] is True
        rows = swarm["peers"]
        assert [row["peer_id"] for row in rows][0] == status["peer_id"], "ourselves first"
        assert sorted(row["peer_id"] for row in rows) == sorted(ids)
        for row in rows:
            assert tuple(row) == ROW_KEYS
            # The fake trainer: 4 samples and loss 1/n after n rounds; one version per round.
            assert row["round"] >= 3 and row["version"] == row["round"]
            assert row["samples"] == 4 * row["round"]
            assert row["train_loss"] == pytest.approx(1 / row["round"])
            assert (row["device"], row["rank"], row["merge_rule"]) == ("cpu", 8, "average")
            assert row["eval_loss"] is None  # no eval data
            assert 0 <= row["age_s"] <= 15  # re-announced every 5 to 15 s
        assert rows[0]["age_s"] == 0.0
    # status.json on disk says the same, and that the peer runs (its final one: it stopped).
    on_disk = json.loads((peers[0].config.data_dir / "status.json").read_text())
    assert on_disk["running"] is False and len(on_disk["swarm"]["peers"]) == 3


def _announcement(telemetry: Telemetry | None, **changes: object) -> Announcement:
    fields: dict = dict(swarm=bytes(16), peer=PEER, version=5, samples=40,
                        digest=sha256(b"a"), nbytes=100, train_loss=2.5, addrs=(),
                        telemetry=telemetry)
    fields.update(changes)
    return Announcement(**fields)


def test_a_row_without_telemetry_or_training_says_so() -> None:
    silent = swarm_row(_announcement(None), 3.04)
    assert silent["round"] is None and silent["device"] is None and silent["age_s"] == 3.0
    assert silent["train_loss"] == 2.5
    joined = Telemetry(round=0, eval_loss=3.7, device="cuda", rank=16, merge_rule="median")
    row = swarm_row(_announcement(joined, train_loss=0.0), 0.0)
    assert row["train_loss"] is None, "round 0 has trained nothing: its 0.0 is a placeholder"
    assert (row["eval_loss"], row["device"], row["rank"]) == (3.7, "cuda", 16)


@pytest.mark.parametrize("loss", [math.nan, math.inf, 1e9])
def test_an_eval_loss_the_wire_would_refuse_is_not_announced(tmp_path: Path,
                                                              loss: float) -> None:
    config = PeerConfig(data_dir=tmp_path, train_path=tmp_path / "t.jsonl")
    stats = PeerStatistics(last_eval=loss)
    telemetry = own_telemetry(config, fake_runtime(tmp_path, train_s=1, seed=0), stats, 2)
    assert telemetry.eval_loss is None and telemetry.round == 2
    _announcement(telemetry)  # and the announcement is one we would accept


def test_swarm_figures() -> None:
    rows = [
        {"version": 3, "samples": 40, "train_loss": 2.0, "device": "cpu"},
        {"version": 9, "samples": 60, "train_loss": 2.5, "device": "cuda"},
        {"version": 4, "samples": 10, "train_loss": None, "device": "cpu"},
        # Damaged rows (a hand-edited status.json) count as peers, never as numbers.
        {"version": "7", "samples": True, "train_loss": "nan", "device": 5},
    ]
    figures = swarm_figures(rows)
    assert figures == {
        "peers": 4, "total_samples": 110, "version_min": 3, "version_median": 4,
        "version_max": 9, "train_loss_min": 2.0, "train_loss_max": 2.5,
        "train_loss_spread": 0.5, "devices": {"cpu": 2, "cuda": 1, "unknown": 1},
    }
    assert swarm_figures([])["version_median"] is None
