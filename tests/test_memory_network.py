"""gossip.memory: announcements spread along connections, transfers run the real protocol in
memory, with each peer's delay and rate.

Announcements are timed on trio's virtual clock. Transfers run on the real one: they hash and
decode in worker threads, and a virtual clock jumps to the next deadline while a thread runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from gossip.errors import GossipError, TransferError, WireError
from gossip.estimate import encode_update
from gossip.memory import LinkShape, MemoryNetwork, MemoryNode
from gossip.node import NodeConfig
from gossip.swarm import swarm_id
from gossip.wire import Announcement, decode_adapter, digest, encode_adapter

SWARM = swarm_id("model-fingerprint", {"r": 4}, 0)


@contextlib.asynccontextmanager
async def running(network: MemoryNetwork, folders: list[Path],
                  config: NodeConfig | None = None) -> AsyncIterator[list[MemoryNode]]:
    async with trio.open_nursery() as nursery:
        nodes = [network.node(config or NodeConfig(), SWARM, folder) for folder in folders]
        for node in nodes:
            await nursery.start(node.run)
        yield nodes
        nursery.cancel_scope.cancel()


def folders(tmp_path: Path, n: int) -> list[Path]:
    made = [tmp_path / f"p{i}" for i in range(n)]
    for folder in made:
        folder.mkdir(parents=True)
    return made


def announce(node: MemoryNode, data: bytes, version: int = 1, **changes: Any) -> Announcement:
    fields: dict[str, Any] = dict(swarm=SWARM, peer=node.peer_id, version=version, samples=16,
                                  digest=digest(data), nbytes=len(data), train_loss=1.5,
                                  addrs=tuple(node.listen_addrs))
    fields.update(changes)
    return Announcement(**fields)


def adapter_bytes(scale: float = 1.0, width: int = 64) -> bytes:
    return encode_adapter({"m.lora_A.weight": torch.full((4, width), scale),
                           "m.lora_B.weight": torch.zeros(width, 4)})


def serve(node: MemoryNode, data: bytes, version: int = 1) -> None:
    node.offer(version, 16, decode_adapter(data, max_bytes=len(data)))


async def test_announcements_spread_along_connections_with_each_hop_s_delay(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(LinkShape(delay_s=0.01), {"p2": LinkShape(delay_s=0.1)})
    async with running(network, folders(tmp_path, 4)) as (a, b, c, alone):
        await b.connect(a.listen_addrs[0])  # a chain a - b - c; `alone` dials nobody
        await c.dial(b.peer_id)
        assert sorted(b.connected_peers()) == sorted([a.peer_id, c.peer_id])
        started = trio.current_time()
        await a.publish(announce(a, adapter_bytes(), version=3))
        heard_b = await b.announcements.receive()
        at_b = trio.current_time() - started
        heard_c = await c.announcements.receive()
        at_c = trio.current_time() - started
        assert heard_b.announcement.version == heard_c.announcement.version == 3
        assert at_b == pytest.approx(0.02) and at_c == pytest.approx(0.02 + 0.11)
        await a.publish(announce(a, adapter_bytes(), version=4))
        assert (await b.announcements.receive()).seqno == heard_b.seqno + 1  # fresh numbers
        await trio.sleep(1)
        with pytest.raises(trio.WouldBlock):
            alone.announcements.receive_nowait()
        assert network.statistics()["publishes"] == 2


async def test_a_forged_or_foreign_announcement_is_refused_and_counted(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with running(network, folders(tmp_path, 2)) as (a, b):
        await b.dial(a.peer_id)
        await a.publish(announce(a, adapter_bytes(), peer=b.peer_id))  # signed by a, claims b
        await a.publish(announce(a, adapter_bytes(), swarm=swarm_id("other", {"r": 4}, 0)))
        await a.publish(announce(a, adapter_bytes(), version=2))
        heard = await b.announcements.receive()
        assert heard.announcement.version == 2
        assert b.rejected == {"signer_mismatch": 1, "wrong_swarm": 1}


async def test_a_fetch_runs_the_transfer_protocol_at_the_link_s_rate(tmp_path: Path) -> None:
    rate = 20_000.0  # bytes/s: the slower end sets it
    network = MemoryNetwork(LinkShape(delay_s=0.005), {"p0": LinkShape(0.005, rate)})
    async with running(network, folders(tmp_path, 2)) as (server, client):
        data = adapter_bytes(width=512)
        serve(server, data)
        started = trio.current_time()
        fetched = await client.fetch(announce(server, data))
        took = trio.current_time() - started
        sent = encode_update(server.server.current.estimate.update_for(None))  # type: ignore[union-attr]
        assert fetched.data == sent and fetched.version == 1 and fetched.digest == digest(data)
        assert len(sent) / rate <= took < len(sent) / rate + 10
        assert client.bytes_in == server.server.bytes_out == len(sent)
        assert client.links.statistics()[server.peer_id].transfers == 1
        received = await client.receive(announce(server, data))
        assert torch.equal(received.state["m.lora_A.weight"], torch.full((4, 512), 1.0))


async def test_the_real_checks_refuse_an_equivocating_or_vanished_server(tmp_path: Path) -> None:
    network = MemoryNetwork()
    async with running(network, folders(tmp_path, 2)) as (server, client):
        data = adapter_bytes()
        serve(server, data)
        forged = announce(server, data, digest=digest(adapter_bytes(2.0)))
        with pytest.raises(TransferError, match="equivocation"):
            await client.fetch(forged)
        network.leave(server)
        with pytest.raises(TransferError, match="unreachable"):
            await client.fetch(announce(server, data))
        with pytest.raises(GossipError):
            await client.dial(server.peer_id)
        assert client.rejected == {"equivocation": 1, "unreachable": 1}


async def test_a_restarted_peer_keeps_its_id_and_its_old_node_leaves(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    (folder,) = folders(tmp_path, 1)
    async with running(network, [folder]) as (first,):
        pass
    assert network.nodes == {}
    async with running(network, [folder, *folders(tmp_path / "x", 1)]) as (again, other):
        assert again.peer_id == first.peer_id and set(network.nodes) == {again.peer_id,
                                                                         other.peer_id}
        await other.dial(again.peer_id)
        assert again.connected_peers() == [other.peer_id]


def test_a_link_needs_a_finite_delay_and_a_positive_rate() -> None:
    for bad in (dict(delay_s=-1.0), dict(delay_s=float("inf")), dict(rate_bps=0.0)):
        with pytest.raises(ValueError, match="a link needs"):
            LinkShape(**bad)


async def test_garbage_from_a_peer_is_refused_by_reason(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    async with running(network, folders(tmp_path, 2)) as (a, b):
        await b.dial(a.peer_id)
        await network.deliver(a.peer_id, b"\x00" * 40, 1, network.arrivals(a))
        assert sum(b.rejected.values()) == 1
        with pytest.raises(WireError):
            Announcement.from_wire(b"\x00" * 40, swarm=SWARM, max_nbytes=1 << 20)


async def test_a_server_killed_mid_transfer_is_a_counted_failure_never_a_partial_adapter(
        tmp_path: Path) -> None:
    """hivemind's all-reduce returned a silently half-averaged tensor when a peer died mid-round;
    here the client's fetch fails with its reason and its replica of the peer stays as it was."""
    network = MemoryNetwork(LinkShape(delay_s=0.001), {"p0": LinkShape(0.001, 20_000.0)})
    async with running(network, folders(tmp_path, 2)) as (server, client):
        data = adapter_bytes(width=2048)  # about 70 KB: over 3 s at 20 KB/s
        serve(server, data)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                async def kill_soon() -> None:
                    await trio.sleep(1.0)
                    network.leave(server)
                    assert server._nursery is not None
                    server._nursery.cancel_scope.cancel()  # as a crash: its upload dies with it

                nursery.start_soon(kill_soon)
                with pytest.raises(TransferError) as caught:
                    await client.receive(announce(server, data))
        assert caught.value.reason in ("truncated", "stalled", "timeout")
        assert client.rejected == {caught.value.reason: 1} and client.bytes_in == 0
        assert client.replicas.get(server.peer_id) is None
