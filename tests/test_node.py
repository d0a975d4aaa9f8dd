"""GossipNode on real libp2p hosts (127.0.0.1, port 0): announcements and adapter transfers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from gossip.addresses import Scope
from gossip.errors import GossipError, TransferError, WireError
from gossip.estimate import encode_update
from gossip.node import GossipNode, NodeConfig
from gossip.swarm import TRANSFER_PROTOCOL
from gossip.wire import Announcement, FetchRequest, decode_adapter, digest, encode_adapter, frame
from tests.nodes import SWARM, running


def announce(node: GossipNode, data: bytes, version: int = 1, **changes) -> Announcement:
    fields: dict[str, Any] = dict(swarm=SWARM, peer=node.peer_id, version=version, samples=16,
                  digest=digest(data), nbytes=len(data), train_loss=1.5,
                  addrs=tuple(node.listen_addrs))
    fields.update(changes)
    return Announcement(**fields)


def state_of(data: bytes) -> dict[str, torch.Tensor]:
    """The adapter whose float32 safetensors bytes are `data`."""
    return decode_adapter(data, max_bytes=len(data))


def served(node: GossipNode) -> bytes:
    """The update `node` sends a client that holds nothing of its estimate: a keyframe."""
    offer = node.server.current
    assert offer is not None
    return encode_update(offer.estimate.update_for(None))


def adapter_bytes(scale: float = 1.0) -> bytes:
    return encode_adapter({"m.lora_A.weight": torch.full((4, 64), scale),
                           "m.lora_B.weight": torch.zeros(64, 4)})


async def test_fetch_moves_the_exact_bytes() -> None:
    async with running(NodeConfig(), NodeConfig()) as (server, client):
        data = adapter_bytes()
        server.offer(1, 16, state_of(data))
        with trio.fail_after(20):
            fetched = await client.fetch(announce(server, data))
        assert fetched.data == served(server) and fetched.version == 1 and fetched.samples == 16
        assert fetched.digest == digest(data)  # fp32: the estimate digest is the adapter's
        nbytes = len(served(server))
        assert client.bytes_in == nbytes and server.server.bytes_out == nbytes
        # The completed fetch measured the link: its next deadline follows it.
        link = client.links.statistics()[server.peer_id]
        assert link.transfers == 1 and link.rate_bps > 0 and 0 <= link.rtt_s < 20


async def test_large_adapter_crosses_the_stream() -> None:
    # 12 MiB: above gossipsub's 1 MiB frame and request_response's ~6.5 MiB failure point.
    async with running(NodeConfig(), NodeConfig()) as (server, client):
        data = encode_adapter({"big.lora_A.weight": torch.randn(8, 393216)})
        server.offer(3, 1, state_of(data))
        with trio.fail_after(60):
            fetched = await client.fetch(announce(server, data, version=3, samples=1))
        assert fetched.data == served(server)


async def test_serving_other_bytes_than_announced_is_equivocation() -> None:
    # Both the announcement and the transfer header are signed: two adapters for one version.
    async with running(NodeConfig(), NodeConfig()) as (server, client):
        data = adapter_bytes()
        server.offer(1, 16, state_of(data))
        forged = announce(server, data, digest=digest(adapter_bytes(2.0)))
        with trio.fail_after(20), pytest.raises(TransferError, match="equivocation"):
            await client.fetch(forged)
        assert client.rejected == {"equivocation": 1} and client.bytes_in == 0


async def test_an_update_larger_than_our_shapes_allow_is_refused_before_reading() -> None:
    async with running(NodeConfig(), NodeConfig()) as (server, client):
        data = encode_adapter({"m.lora_A.weight": torch.ones(64, 256)})
        server.offer(1, 16, state_of(data))
        client.expect_shapes({"m.lora_A.weight": (4, 64)})  # a keyframe's 1 KiB, plus framing
        with trio.fail_after(20), pytest.raises(TransferError, match="size_mismatch"):
            await client.fetch(announce(server, data))
        assert client.rejected == {"size_mismatch": 1} and client.bytes_in == 0


async def test_a_signed_newer_version_is_bound_and_cannot_roll_back() -> None:
    # The header's version (and so a merge's age) is signed; once seen, it cannot go back.
    async with running(NodeConfig(min_upload_interval_s=0), NodeConfig()) as (server, client):
        old, new = adapter_bytes(), adapter_bytes(2.0)
        server.offer(5, 16, state_of(new))
        with trio.fail_after(20):
            fetched = await client.fetch(announce(server, old, version=1))
        assert fetched.version == 5 and fetched.data == served(server)
        server.offer(3, 16, state_of(old))  # a peer that signs a lower version after a higher one
        with trio.fail_after(20), pytest.raises(TransferError, match="header_mismatch"):
            await client.fetch(announce(server, old, version=1))
        assert client.rejected == {"header_mismatch": 1}


async def test_oversized_adapter_is_refused_before_reading() -> None:
    async with running(NodeConfig(), NodeConfig(max_adapter_bytes=2048)) as (server, client):
        data = encode_adapter({"m.lora_A.weight": torch.zeros(64, 64)})
        server.offer(1, 16, state_of(data))
        with trio.fail_after(20), pytest.raises(WireError, match="oversized"):
            await client.fetch(announce(server, data, nbytes=1024))
        assert client.bytes_in == 0


async def test_per_peer_rate_limit() -> None:
    async with running(NodeConfig(min_upload_interval_s=30), NodeConfig()) as (server, client):
        data = adapter_bytes()
        server.offer(1, 16, state_of(data))
        with trio.fail_after(20):
            await client.fetch(announce(server, data))
            with pytest.raises(TransferError, match="rate_limited"):
                await client.fetch(announce(server, data))
        assert server.server.refused["rate_limited"] == 1


async def test_one_peer_holds_one_upload_slot_and_a_reader_that_stalls_loses_it() -> None:
    # A client that requests and never reads: 8 MiB do not fit yamux's window, so the upload
    # blocks. It keeps one slot, not all four, and loses that one once below the minimum rate.
    server_config = NodeConfig(min_upload_interval_s=0, min_upload_rate=1 << 20)
    async with running(server_config, NodeConfig(), NodeConfig()) as (server, greedy, honest):
        data = encode_adapter({"m.lora_A.weight": torch.ones(4, 512 << 10)})
        server.offer(1, 16, state_of(data))
        stalled = []
        with trio.fail_after(30):
            for _ in range(4):
                stream = await greedy.host.new_stream(server.host.get_id(),
                                                      [TProtocol(TRANSFER_PROTOCOL)])
                await stream.write(frame(FetchRequest(swarm=SWARM, version=-1).to_wire()))
                stalled.append(stream)
            while server.server.refused.get("busy", 0) < 3:  # the other three, at once
                await trio.sleep(0.05)
            # Another peer still gets the adapter while the greedy one sits on its slot.
            assert (await honest.fetch(announce(server, data))).data == served(server)
            # Dropped below the minimum rate, or by yamux once its window stayed shut for 5 s.
            while not (server.server.refused.get("slow_reader", 0)
                       or server.server.refused.get("stream_error", 0)):
                await trio.sleep(0.05)
        assert server.server.refused["busy"] == 3


async def test_silent_peer_costs_at_most_the_timeout() -> None:
    async with running(NodeConfig(), NodeConfig(fetch_timeout_s=1.0)) as (server, client):

        async def silent(stream) -> None:
            await trio.sleep_forever()

        server.host.set_stream_handler(TProtocol(TRANSFER_PROTOCOL), silent)
        data = adapter_bytes()
        started = trio.current_time()
        with trio.fail_after(10), pytest.raises(TransferError, match="timeout"):
            await client.fetch(announce(server, data))
        assert trio.current_time() - started < 5


async def test_announcements_arrive_signed_and_forgeries_are_dropped() -> None:
    async with running(NodeConfig(), NodeConfig()) as (a, b):
        with trio.fail_after(10):
            await a.pubsub.wait_for_subscription(ID.from_base58(b.peer_id), a.topic)
            await b.pubsub.wait_for_subscription(ID.from_base58(a.peer_id), b.topic)
        data = adapter_bytes()
        await a.publish(announce(a, data, version=5))
        with trio.fail_after(10):
            received = (await b.announcements.receive()).announcement
        assert received.peer == a.peer_id and received.version == 5
        # A forged envelope: signed by a but claiming to be b. a's own validator would stop it,
        # so remove it to see that b's validator rejects and counts it.
        a.pubsub.remove_topic_validator(a.topic)
        await a.pubsub.publish(a.topic, announce(a, data, version=6, peer=b.peer_id).to_wire())
        await a.publish(announce(a, data, version=7))
        with trio.fail_after(10):
            received = (await b.announcements.receive()).announcement
        assert received.version == 7, "the forgery must never be delivered"
        assert b.rejected["signer_mismatch"] == 1


async def test_garbage_on_the_topic_is_rejected_and_the_node_keeps_running() -> None:
    async with running(NodeConfig(), NodeConfig()) as (a, b):
        with trio.fail_after(10):
            await a.pubsub.wait_for_subscription(ID.from_base58(b.peer_id), a.topic)
        a.pubsub.remove_topic_validator(a.topic)
        other_swarm = b"LSW1" + b"\x01" * 16 + b"\xc1"
        for junk in (b"", b"\x00" * 40, other_swarm, b"LSW1" + SWARM + b"\x81"):
            await a.pubsub.publish(a.topic, junk)
            await trio.sleep(0.02)  # paced: gossipsub drops bursts (PY-LIBP2P.md pitfall 4)
        await a.publish(announce(a, adapter_bytes(), version=1))
        with trio.fail_after(10):
            received = (await b.announcements.receive()).announcement
        assert received.version == 1
        assert sum(b.rejected.values()) >= 3
        assert b.rejected["wrong_swarm"] >= 1


async def test_outgoing_fetches_are_bounded() -> None:
    # Slow servers that count the requests held at once; 5 fetches, 2 download slots. One
    # fetch per server: a server gives each remote peer one upload at a time.
    servers = [NodeConfig(min_upload_interval_s=0) for _ in range(5)]
    async with running(NodeConfig(max_downloads=2), *servers) as (client, *nodes):
        data = adapter_bytes()
        held = {"now": 0, "peak": 0}

        def slow(server: GossipNode) -> Any:
            async def handle(stream: Any) -> None:
                held["now"] += 1
                held["peak"] = max(held["peak"], held["now"])
                try:
                    await trio.sleep(0.2)
                    await server.server.handle(stream)
                finally:
                    held["now"] -= 1
            return handle

        for server in nodes:
            server.offer(1, 16, state_of(data))
            server.host.set_stream_handler(TProtocol(TRANSFER_PROTOCOL), slow(server))
        fetched = []

        async def fetch_one(server: GossipNode) -> None:
            fetched.append(await client.fetch(announce(server, data)))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for server in nodes:
                    nursery.start_soon(fetch_one, server)
        assert len(fetched) == 5 and all(f.data == served(nodes[0]) for f in fetched)
        assert held["peak"] == 2 and client.downloads_peak == 2
        assert client.downloads_in_flight == 0


async def test_dial_by_id_uses_only_addresses_the_peer_gave_for_itself() -> None:
    async with trio.open_nursery() as nursery:
        server, client = (GossipNode(NodeConfig(), SWARM, identity_dir=None) for _ in range(2))
        for node in (server, client):
            await nursery.start(node.run)
        with pytest.raises(GossipError, match="no address known"):
            await client.dial(server.peer_id)
        # An address naming a third peer would aim our dials at it: dropped and counted.
        victim = f"/ip4/127.0.0.1/tcp/9/p2p/{client.peer_id}"
        client.remember(server.peer_id, [victim, *server.listen_addrs], via=Scope.LOOPBACK)
        assert client.rejected["bad_addr"] == 1
        with trio.fail_after(10):
            await client.dial(server.peer_id)
        assert client.connected_peers() == [server.peer_id]
        nursery.cancel_scope.cancel()


async def test_a_connection_opened_for_a_fetch_is_closed_after_it() -> None:
    """Fetches reach peers we were not connected to, without keeping those connections."""
    async with trio.open_nursery() as nursery:
        server, client = (GossipNode(NodeConfig(), SWARM, identity_dir=None) for _ in range(2))
        for node in (server, client):
            await nursery.start(node.run)
        data = adapter_bytes()
        server.offer(1, 16, state_of(data))
        client.remember(server.peer_id, server.listen_addrs, via=Scope.LOOPBACK)
        with trio.fail_after(20):
            assert (await client.fetch(announce(server, data))).data == served(server)
        assert client.connected_peers() == [], "the fetch's own connection was kept"
        # A connection that was there before the fetch stays.
        with trio.fail_after(10):
            await client.dial(server.peer_id)
            await trio.sleep(0.6)  # the server serves a peer at most every 0.5 s
            assert (await client.fetch(announce(server, data))).data == served(server)
        assert client.connected_peers() == [server.peer_id]
        nursery.cancel_scope.cancel()


class _Stoppable:
    """A node of its own cancel scope beside `other`, for what its stop leaves behind."""

    def __init__(self, other: GossipNode) -> None:
        self.other = other
        self.node = GossipNode(NodeConfig(), SWARM, identity_dir=None)
        self._scope, self._stopped = trio.CancelScope(), trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            await self.node.run(task_status=task_status)
        self._stopped.set()

    async def stop_and_wait_until_other_sees_it_gone(self) -> None:
        """Stop abruptly; then every connection `other` has to us must close within 5 s."""
        self._scope.cancel()
        with trio.fail_after(15):
            await self._stopped.wait()
        gone = ID.from_base58(self.node.peer_id)
        with trio.fail_after(5):
            while any(not getattr(conn, "is_closed", False)
                      for conn in self.other.host.get_network().get_connections(gone)):
                await trio.sleep(0.05)


async def test_a_connection_the_swarm_lost_track_of_is_closed_at_stop() -> None:
    """An open connection missing from the swarm's table was never closed by `Swarm.close`."""
    async with running(NodeConfig()) as (other,), trio.open_nursery() as nursery:
        stoppable = _Stoppable(other)
        await nursery.start(stoppable.run)
        with trio.fail_after(10):
            await stoppable.node.connect(other.listen_addrs[0])
        del stoppable.node.host.get_network().connections[ID.from_base58(other.peer_id)]
        await stoppable.stop_and_wait_until_other_sees_it_gone()
