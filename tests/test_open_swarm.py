"""An open swarm meets strangers: floods of identities, plaintext nodes, peers without ping.

Each test reproduces a finding of the open-swarm review against real libp2p hosts on loopback
and fails on the code before its fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import multiaddr
import pytest
import trio
from libp2p import generate_new_ed25519_identity, new_host
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.network.health import monitor as health_monitor
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from gossip.addresses import Scope
from gossip.config import NodeConfig
from gossip.errors import GossipError
from testbed.loopback import SybilPublisher, loopback_swarm
from topology.config import TopologyConfig

LOCAL = "/ip4/127.0.0.1/tcp/0"


async def test_a_flood_of_identities_never_evicts_our_own_key() -> None:
    # py-libp2p's peerstore evicts entries without addresses first once over its cap, ours
    # included, and the next publish failed with PeerStoreError. The cap is lowered from 1000 so
    # that 150 minted identities suffice; the mechanism is the same.
    topology = TopologyConfig(view_size=16)
    async with loopback_swarm(2, topology=topology) as swarm:
        victim, attacker = swarm.peers
        store = victim.node.host.get_peerstore()
        store.max_peers = 100
        with trio.fail_after(60):
            await swarm.announce_all()
            sybils = SybilPublisher(attacker)
            await sybils.publish(150, gap_s=0.005)
            await victim.membership.wait_until(
                lambda: victim.membership.latest(sybils.minted[-1]) is not None)
            # Our key is still there, so publishing still signs.
            await victim.announce()
        assert store.pubkey(victim.node.host.get_id()) is not None
        # The peerstore holds what the view admits and the connected peers, not the flood.
        assert len(store.peer_ids()) <= topology.view_size + 1 + len(victim.node.connected_peers())


async def test_a_failing_reannouncement_is_logged_and_retried(monkeypatch: Any) -> None:
    async with loopback_swarm(2, topology=TopologyConfig(peer_timeout_s=0.6)) as swarm:
        speaker, listener = swarm.peers
        with trio.fail_after(30):
            await swarm.announce_all()
            failures = 0
            publish = speaker.node.pubsub.publish

            async def failing(topic: str, data: bytes) -> None:
                nonlocal failures
                if failures < 2:
                    failures += 1
                    raise RuntimeError("peer ID not found")  # as PeerStoreError did
                await publish(topic, data)

            monkeypatch.setattr(speaker.node.pubsub, "publish", failing)
            published = speaker.node.published_at
            await listener.membership.wait_until(lambda: speaker.node.published_at > published)
        assert failures == 2


@contextlib.asynccontextmanager
async def plaintext_host() -> AsyncIterator[Any]:
    """A host that offers only `/plaintext/2.0.0`: no encryption, no authentication."""
    keys = generate_new_ed25519_identity()
    host = new_host(key_pair=keys, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(keys)},
                    listen_addrs=[multiaddr.Multiaddr(LOCAL)])
    async with host.run(listen_addrs=[multiaddr.Multiaddr(LOCAL)]):
        yield host
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await host.close()


async def test_a_plaintext_only_node_is_refused_in_both_directions() -> None:
    config = NodeConfig(dial_timeout_s=3)
    async with loopback_swarm(1, network=config) as swarm, plaintext_host() as stranger:
        node = swarm.peers[0].node
        stranger_addr = f"{stranger.get_addrs()[0]}"
        if "/p2p/" not in stranger_addr:
            stranger_addr += f"/p2p/{stranger.get_id()}"
        with pytest.raises(GossipError):
            await node.connect(stranger_addr)
        ours = info_from_p2p_addr(multiaddr.Multiaddr(node.listen_addrs[0]))
        with trio.move_on_after(5):
            with contextlib.suppress(Exception):  # py-libp2p raises several types here
                await stranger.connect(ours)
        assert stranger.get_id() not in node.host.get_connected_peers()
        assert ID.from_base58(node.peer_id) not in stranger.get_connected_peers()


async def test_a_peer_without_ping_stays_connected(monkeypatch: Any) -> None:
    # js-libp2p leaves ping out by default; the health monitor counted "protocol not supported"
    # as a failed ping and closed the connection.
    config = NodeConfig(health_check_s=0.3, ping_timeout_s=2)
    async with loopback_swarm(2, network=config) as swarm:
        pinger, mute = swarm.peers
        mute.node.host.remove_stream_handler(PING_PROTOCOL)
        probes: list[Any] = []
        three = trio.Event()
        probe = health_monitor.ping_connection

        async def counted(conn: Any, **kwargs: Any) -> Any:
            result = await probe(conn, **kwargs)
            if conn.muxed_conn.peer_id == mute.node.host.get_id():
                probes.append(result)
                if len(probes) >= 3:
                    three.set()
            return result

        monkeypatch.setattr(health_monitor, "ping_connection", counted)
        with trio.fail_after(20):
            await three.wait()
        assert mute.node.host.get_id() in pinger.node.host.get_connected_peers()
        assert all(result.success and not result.protocol_supported for result in probes)


async def test_announced_addresses_cannot_aim_the_swarm_at_a_victim() -> None:
    # Only the announcer's own addresses, and private ones only from a peer of that scope.
    for allow_private, kept_private in ((False, False), (True, True)):
        config = NodeConfig(allow_private_addrs=allow_private)
        async with loopback_swarm(2, network=config) as swarm:
            receiver, hostile = swarm.peers
            own = hostile.node.listen_addrs[0]
            private = f"/ip4/10.1.2.3/tcp/443/p2p/{hostile.peer_id}"
            poisoned = ("/ip4/127.0.0.1/tcp/9",  # a bare victim address: no /p2p/ of its own
                        f"/ip4/0.0.0.0/tcp/1/p2p/{hostile.peer_id}", private, own)
            with trio.fail_after(30):
                await swarm.announce_all()
                await hostile.node.publish(replace(hostile.node.current, version=1,
                                                   addrs=poisoned))
                await receiver.membership.wait_until(lambda: getattr(
                    receiver.membership.latest(hostile.peer_id), "version", 0) == 1)  # noqa: B023
            info = receiver.membership.view.get(hostile.peer_id)
            assert info is not None
            assert set(info.addrs) == ({own, private} if kept_private else {own})
            assert receiver.node.rejected["bad_addr"] == (2 if kept_private else 3)
            stored = {str(a) for a in receiver.node.host.get_peerstore().addrs(
                ID.from_base58(hostile.peer_id))}
            assert "/ip4/0.0.0.0/tcp/1" not in stored and "/ip4/127.0.0.1/tcp/9" not in stored


async def test_a_dead_address_backs_off_on_its_own() -> None:
    async with loopback_swarm(1, network=NodeConfig(dial_timeout_s=2)) as swarm:
        node = swarm.peers[0].node
        stranger = str(ID.from_pubkey(generate_new_ed25519_identity().public_key))
        dead = f"/ip4/127.0.0.1/tcp/9/p2p/{stranger}"  # discard port: nobody listens
        node.remember(stranger, [dead], via=Scope.LOOPBACK)
        with trio.fail_after(10):
            with pytest.raises(GossipError, match="dial failed|timed out"):
                await node.dial(stranger)
            with pytest.raises(GossipError, match="backing off"):
                await node.dial(stranger)  # refused at once: no second dial
