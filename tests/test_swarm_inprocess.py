"""Three real peers in one trio process: real libp2p hosts on 127.0.0.1, real peft adapters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import trio

from gossip.node import NodeConfig
from peer.config import PeerConfig, TrainConfig
from peer.daemon import Peer
from tests.conftest import write_jsonl
from topology.config import TopologyConfig


def _config(
    tmp: Path, name: str, model: Path, train: Path, bootstrap: tuple[str, ...], **extra
) -> PeerConfig:
    return PeerConfig(**extra,
        data_dir=tmp / name, train_path=train, model=str(model), rounds=0,
        train=TrainConfig(steps_per_round=1, batch_size=2, seq_len=24, lr=1e-3, threads=1),
        network=NodeConfig(bootstrap=bootstrap, fetch_timeout_s=20),
        topology=TopologyConfig(fanout=2, peer_timeout_s=60),
        round_pause_s=0.2,
    )


async def test_three_peers_exchange_and_merge(tmp_path: Path, small_model_dir: Path) -> None:
    trains = [
        write_jsonl(tmp_path / f"train{i}.jsonl",
                    [{"instruction": f"question {i}.{j}", "output": f"answer {j} of peer {i}"}
                     for j in range(6)])
        for i in range(3)
    ]
    peers: list[Peer] = []
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            first = Peer(_config(tmp_path, "p0", small_model_dir, trains[0], ()))
            node0 = await nursery.start(first.run)
            peers.append(first)
            for i in (1, 2):
                peer = Peer(_config(tmp_path, f"p{i}", small_model_dir, trains[i],
                                    (node0.listen_addrs[0],)))
                await nursery.start(peer.run)
                peers.append(peer)
            for peer in peers:
                while peer.stats.merges < 1:
                    await peer.wait_rounds(peer.round + 1)
            nursery.cancel_scope.cancel()
    ids = {peer.status()["peer_id"] for peer in peers}
    assert len(ids) == 3
    # Every update a peer applied was an upload a neighbour counted.
    wires = [peer.status()["wire"] for peer in peers]
    uploads = sum(w["served"].get("keyframe", 0) + w["served"].get("delta", 0) for w in wires)
    assert uploads >= sum(w["replicas"]["keyframes"] + w["replicas"]["chains"] for w in wires) > 0
    for peer in peers:
        status = peer.status()
        assert status["merges"] >= 1
        assert status["adapters_received"] >= 1
        assert status["bytes_in"] > 0
        assert any(link["transfers"] >= 1 for link in status["links"].values())
        replicas = status["wire"]["replicas"]  # neighbours' estimates it rebuilt
        assert replicas["held"] >= 1 and replicas["steps"] >= 1
        assert replicas["keyframes"] + replicas["chains"] >= 1
        assert status["swarm_id"] == peers[0].status()["swarm_id"]
        # Cancellation wrote a final checkpoint and a PEFT export.
        assert (peer.config.data_dir / "checkpoint.safetensors").is_file()
        assert (peer.config.data_dir / "export" / "adapter_config.json").is_file()


async def test_a_loud_attacker_is_rejected_by_honest_peers(
    tmp_path: Path, small_model_dir: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"text": f"an ordinary training line number {j}"} for j in range(6)])
    async with trio.open_nursery() as nursery:
        honest = Peer(_config(tmp_path, "honest", small_model_dir, train, ()))
        node = await nursery.start(honest.run)
        attacker = Peer(_config(tmp_path, "attacker", small_model_dir, train,
                                (node.listen_addrs[0],), attack="scale", attack_scale=1000.0))
        await nursery.start(attacker.run)
        with trio.fail_after(240):
            while honest.stats.rejected["norm_bound"] < 1 or honest.round < 3:
                await honest.wait_rounds(honest.round + 1)
        nursery.cancel_scope.cancel()
    assert honest.stats.merges == 0, "the only neighbour was poisoned: nothing may be merged"
    state = honest.runtime.trainer.state() if honest.runtime else {}
    assert state and all(bool(torch.isfinite(v).all()) for v in state.values())
    assert max(v.abs().max().item() for v in state.values()) < 10


async def test_joiners_that_wait_for_each_other_start_together(tmp_path: Path,
                                                               small_model_dir: Path) -> None:
    """Two joiners with --wait-peers 2 each wait to hear of the other: they announce before
    they wait, so neither waits out its --wait-timeout (they used to, each alone)."""
    trains = [write_jsonl(tmp_path / f"train{i}.jsonl",
                          [{"text": f"peer {i} line {j}"} for j in range(6)]) for i in range(3)]
    peers: list[Peer] = []
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            node0 = await nursery.start(
                Peer(_config(tmp_path, "p0", small_model_dir, trains[0], ())).run)
            for i in (1, 2):
                config = _config(tmp_path, f"p{i}", small_model_dir, trains[i],
                                 (node0.listen_addrs[0],), wait_peers=2, wait_timeout_s=600)
                peer = Peer(config)
                await nursery.start(peer.run)
                peers.append(peer)
            for peer in peers:
                await peer.wait_rounds(1)
            nursery.cancel_scope.cancel()
    assert all(peer.round >= 1 for peer in peers)


async def test_settling_rounds_merge_without_training(tmp_path: Path,
                                                      small_model_dir: Path) -> None:
    """After --rounds, --settle-rounds only exchange and merge: the peers move together.

    Three peers, not two: two peers that fetch each other's adapter of the same round both end
    it with the same weighted average, so there would be nothing left to settle.
    """
    from scripts.simreport import consensus_distance, read_metrics

    trains = [write_jsonl(tmp_path / f"train{i}.jsonl",
                          [{"text": f"peer {i} writes about topic {i}, line {j}"}
                           for j in range(8)])
              for i in range(3)]
    peers: list[Peer] = []
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            node = None
            for i in range(3):
                config = _config(tmp_path, f"p{i}", small_model_dir, trains[i],
                                 (node.listen_addrs[0],) if node else (),
                                 wait_peers=1 if node else 2)
                # The default wire codec, sign: settling rounds step its estimates with int8
                # (--settle-codec auto), without which each peer kept a residual it never sent
                # and the swarm stalled apart (README, "Settling").
                config = replace(config, rounds=2, settle_rounds=4, eval_path=trains[0],
                                 topology=TopologyConfig(fanout=1, peer_timeout_s=60))
                peer = Peer(config)
                started = await nursery.start(peer.run)
                node = node or started
                peers.append(peer)
    lines = [read_metrics(peer.config.data_dir) for peer in peers]
    for metrics in lines:
        settling = [m for m in metrics if m["round"] > 2]
        assert [m["round"] for m in settling] == [3, 4, 5, 6]
        assert all(m["train_loss"] is None for m in settling), "settling rounds do not train"
        trained = next(m for m in metrics if m["round"] == 2)
        assert all(m["samples"] == trained["samples"] for m in settling)
        assert metrics[-1]["eval_loss"] is not None, "the final adapter is evaluated"
    assert sum(m["merged"] for metrics in lines for m in metrics if m["round"] > 2) >= 2

    def distance(number: int) -> float:
        sketches = [next(m["sketch"] for m in metrics if m["round"] == number)
                    for metrics in lines]
        value = consensus_distance(sketches)
        assert value is not None
        return value

    assert distance(6) < distance(2) / 2, "merging without training pulls the adapters together"


async def test_a_failed_neighbour_is_replaced_and_rounds_announce_nothing(
    tmp_path: Path, small_model_dir: Path
) -> None:
    """With fanout 1, drawing the attacker costs no merge: another neighbour is fetched instead,
    and the attacker, refused once, is dropped from the view.

    And only the join announcement is published (the re-announce interval, a third of the peer
    timeout, is longer than the test): fetches still get each neighbour's newest adapter.
    """
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"text": f"an ordinary training line number {j}"} for j in range(6)])
    slow_reannounce = TopologyConfig(fanout=1, peer_timeout_s=900)
    # Paced: a neighbour serves one peer at most every 0.5 s.
    paced = {"topology": slow_reannounce, "round_pause_s": 0.6}
    peers: list[Peer] = []
    async with trio.open_nursery() as nursery:
        honest = Peer(replace(_config(tmp_path, "honest", small_model_dir, train, (),
                                      wait_peers=2), **paced))
        node = await nursery.start(honest.run)
        bootstrap = (node.listen_addrs[0],)
        for name, extra in (("attacker", {"attack": "scale", "attack_scale": 1000.0}),
                            ("other", {})):
            peer = Peer(replace(_config(tmp_path, name, small_model_dir, train, bootstrap,
                                        **extra), **paced))
            await nursery.start(peer.run)
            peers.append(peer)
        with trio.fail_after(240):
            while honest.stats.rejected["norm_bound"] < 1 or honest.round < 4:
                await honest.wait_rounds(honest.round + 1)
        heard = peers[1].parts.membership.latest(node.peer_id) if peers[1].parts else None
        nursery.cancel_scope.cancel()
    from scripts.simreport import read_metrics

    merged = [m["merged"] for m in read_metrics(honest.config.data_dir) if m["round"] >= 2]
    assert merged and all(count == 1 for count in merged), merged
    assert honest.stats.merges >= len(merged)
    assert heard is not None and heard.version == 0, "rounds were not announced one by one"
    assert honest.version >= 4
    # Refused once, the attacker left the view: it is not drawn again until it re-announces.
    assert honest.stats.rejected["norm_bound"] == 1


async def test_a_neighbour_that_has_not_trained_yet_is_waited_for(
    tmp_path: Path, small_model_dir: Path, monkeypatch
) -> None:
    """The first peer to finish round 1 fetches its only neighbour again once that one trained.

    The neighbour's training is held until the first peer has fetched its untrained adapter,
    so round 1 of the first peer can merge only if it waits and fetches again.
    """
    import threading

    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"text": f"an ordinary training line number {j}"} for j in range(6)])
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        first = Peer(replace(_config(tmp_path, "first", small_model_dir, train, (), wait_peers=1),
                             topology=TopologyConfig(fanout=1, peer_timeout_s=60)))
        node = await nursery.start(first.run)
        late = Peer(_config(tmp_path, "late", small_model_dir, train, (node.listen_addrs[0],)))
        trainer = (await late.load()).trainer
        train_late = trainer.train_round

        def held(stop: threading.Event) -> float:
            release.wait(timeout=60)
            return train_late(stop)

        monkeypatch.setattr(trainer, "train_round", held)
        await nursery.start(late.run)
        try:
            with trio.fail_after(120):
                while first.stats.adapters_received < 1:
                    await trio.sleep(0.05)
                waiting = first.round == 0
                release.set()
                await first.wait_rounds(1)
        finally:
            release.set()
            nursery.cancel_scope.cancel()
    assert waiting, "round 1 ended without waiting for the neighbour to train"
    from scripts.simreport import read_metrics

    round_one = next(m for m in read_metrics(first.config.data_dir) if m["round"] == 1)
    assert round_one["merged"] == 1
    assert first.stats.adapters_received >= 2


async def test_a_finished_peer_lingers_and_keeps_serving_its_final_adapter(
    tmp_path: Path, small_model_dir: Path
) -> None:
    """After its last round, a peer with --linger still serves: a slower one merges from it."""
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"text": f"an ordinary training line number {j}"} for j in range(6)])
    fanout_one = TopologyConfig(fanout=1, peer_timeout_s=60)
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        quick = Peer(replace(_config(tmp_path, "quick", small_model_dir, train, (),
                                     wait_peers=1),
                             rounds=1, linger_s=120, topology=fanout_one))

        async def run_quick(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            await quick.run(task_status=task_status)
            done.set()

        node = await nursery.start(run_quick)
        # Paced: a neighbour serves one peer at most every 0.5 s.
        slow = Peer(replace(_config(tmp_path, "slow", small_model_dir, train,
                                    (node.listen_addrs[0],)),
                            topology=fanout_one, round_pause_s=0.6))
        await nursery.start(slow.run)
        with trio.fail_after(120):
            await quick.wait_rounds(1)
            merges, rounds = slow.stats.merges, slow.round
            while slow.round < rounds + 3:
                await slow.wait_rounds(slow.round + 1)
        lingering = not done.is_set()
        nursery.cancel_scope.cancel()
    assert lingering, "the finished peer left before the test ended"
    assert quick.round == 1
    assert slow.stats.merges >= merges + 3, "every later round merged the finished peer's adapter"


async def test_the_join_announcement_leaves_once_a_swarm_peer_can_receive_it(
    tmp_path: Path, small_model_dir: Path, monkeypatch
) -> None:
    """Published before the bootstrap peer's subscription arrived, it would reach nobody."""
    from gossip.node import GossipNode

    publish = GossipNode.publish
    receivers: dict[str, int] = {}

    async def recording(node: GossipNode, announcement: Any) -> None:
        receivers.setdefault(node.peer_id, len(node.topic_peers()))
        await publish(node, announcement)

    monkeypatch.setattr(GossipNode, "publish", recording)
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"text": f"an ordinary training line number {j}"} for j in range(6)])
    async with trio.open_nursery() as nursery:
        first = Peer(_config(tmp_path, "first", small_model_dir, train, ()))
        node = await nursery.start(first.run)
        joiner = Peer(_config(tmp_path, "joiner", small_model_dir, train, (node.listen_addrs[0],)))
        joined = await nursery.start(joiner.run)
        with trio.fail_after(120):
            await joiner.wait_rounds(1)
            while first.parts is None or first.parts.membership.latest(joined.peer_id) is None:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert receivers[joined.peer_id] >= 1, "the joiner announced before anyone could hear it"


async def test_a_malformed_transfer_header_is_counted_once(tmp_path: Path,
                                                         small_model_dir: Path) -> None:
    """Through the daemon's own fetch path: status.json shows each refusal once, by reason."""
    from gossip.swarm import TRANSFER_PROTOCOL
    from gossip.transfer import MAX_CONTROL_FRAME, read_frame
    from gossip.wire import MAGIC, frame

    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"text": f"an ordinary training line number {j}"} for j in range(6)])
    served = 0

    async def malformed(stream: Any) -> None:
        nonlocal served
        await read_frame(stream, max_len=MAX_CONTROL_FRAME)
        served += 1
        await stream.write(frame(MAGIC + stream_swarm + b"\x92\xc1"))  # undecodable msgpack
        await stream.close()

    async with trio.open_nursery() as nursery:
        honest = Peer(_config(tmp_path, "honest", small_model_dir, train, (), wait_peers=1))
        node = await nursery.start(honest.run)
        stream_swarm = node.swarm
        liar = Peer(_config(tmp_path, "liar", small_model_dir, train, (node.listen_addrs[0],)))
        liar_node = await nursery.start(liar.run)
        liar_node.host.set_stream_handler(TRANSFER_PROTOCOL, malformed)
        with trio.fail_after(240):
            while served < 2:
                await honest.wait_rounds(honest.round + 1)
        nursery.cancel_scope.cancel()
    rejected = honest.status()["rejected"]
    assert rejected.get("malformed") == served, rejected


async def _bytes_per_update(tmp: Path, model: Path, codec: str, merges: int) -> float:
    """Two peers with `--wire-codec codec`, run until each merged `merges` times: the bytes
    fetched per adapter received (fp32) or per compressed step received, over both. A fetch
    brings a chain of every step since the version held, so on a busy machine, where a peer
    misses rounds, one fetch can carry several steps: per step is what the codec decides."""
    train = write_jsonl(tmp / f"train-{codec}.jsonl",
                        [{"text": f"an ordinary training line number {j}"} for j in range(6)])
    peers: list[Peer] = []
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            bootstrap: tuple[str, ...] = ()
            for i in range(2):
                config = _config(tmp, f"{codec}-{i}", model, train, bootstrap)
                config = replace(config, network=replace(config.network, wire_codec=codec))
                peer = Peer(config)
                node = await nursery.start(peer.run)
                bootstrap = bootstrap or (node.listen_addrs[0],)
                peers.append(peer)
            for peer in peers:
                while peer.stats.merges < merges:
                    await peer.wait_rounds(peer.round + 1)
            nursery.cancel_scope.cancel()
    statuses = [peer.status() for peer in peers]
    assert all(s["merges"] >= merges for s in statuses), [s["rejected"] for s in statuses]
    if codec != "fp32":  # even the first fetch is a chain of steps from the seeded adapter
        assert all(s["wire"]["replicas"]["keyframes"] == 0 for s in statuses)
        assert all(s["wire"]["replicas"]["chains"] >= 1 for s in statuses)
    received = (sum(s["adapters_received"] for s in statuses) if codec == "fp32"
                else sum(s["wire"]["replicas"]["steps"] for s in statuses))
    return sum(s["bytes_in"] for s in statuses) / received


async def test_a_compressed_wire_codec_merges_every_round_on_fewer_bytes(
    tmp_path: Path, small_model_dir: Path
) -> None:
    # Each peer fetches its neighbour's estimate as steps from the swarm-seeded adapter, which
    # both hold. Compared per step received, which the codec alone decides (per fetch, how
    # many steps a fetch chains depends on how many rounds a busy peer missed: int8+zstd once
    # came to 83 KB of fp32's 198 KB). Measured on 2 quiet cores, 4 merges a peer, 2 runs:
    # fp32 198 KB a fetch, int8+zstd 51-52 KB and topk:0.02+zstd 3.4 KB a step.
    fp32 = await _bytes_per_update(tmp_path, small_model_dir, "fp32", merges=4)
    int8 = await _bytes_per_update(tmp_path, small_model_dir, "int8+zstd", merges=4)
    topk = await _bytes_per_update(tmp_path, small_model_dir, "topk:0.02+zstd", merges=4)
    print(f"bytes per update: fp32 {fp32:.0f}, int8+zstd {int8:.0f}, topk:0.02+zstd {topk:.0f}")
    assert int8 < 0.4 * fp32 and topk < 0.1 * fp32
