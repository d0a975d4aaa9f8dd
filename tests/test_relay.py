"""Circuit relay on real libp2p hosts (127.0.0.1): reservations, relayed fetches, admission.

The NAT lab's version (private peers behind masquerading routers) is in
tests/test_nat_lab_peers.py.
"""

from __future__ import annotations

import socket

import pytest
import torch
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

import gossip.relay
from gossip.addresses import Scope, circuit_relay, usable_addrs
from gossip.node import GossipNode, NodeConfig
from gossip.reachability import PRIVATE, Reachability
from gossip.relay import Pacer, is_relayed
from gossip.wire import Announcement, digest, encode_adapter
from tests.nodes import SWARM, running

R = "12D3KooWRelayRe1ayRe1ayRe1ayRe1ayRe1ayRe1ayRe1ayRe1ay"
P = "12D3KooWPeerPeerPeerPeerPeerPeerPeerPeerPeerPeerPeer"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(**changes) -> NodeConfig:
    return NodeConfig(reachability_interval_s=0, **changes)  # reachability set by hand


def behind_nat() -> NodeConfig:
    """A peer announcing a port nobody listens on, as a NAT'd peer's address is."""
    return config(announce=(f"/ip4/127.0.0.1/tcp/{closed_port()}",))




def make_private(node: GossipNode) -> None:
    node.probe.current = Reachability(PRIVATE, "set by the test")


def adapter(scale: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A.weight": torch.full((4, 64), scale), "m.lora_B.weight": torch.zeros(64, 4)}


def announcement(node: GossipNode, state: dict[str, torch.Tensor]) -> Announcement:
    data = encode_adapter(state)
    return Announcement(swarm=SWARM, peer=node.peer_id, version=1, samples=16,
                        digest=digest(data), nbytes=len(data), train_loss=1.0,
                        addrs=tuple(node.announce_addrs))


# -- circuit addresses in announcements -------------------------------------------------------


def test_a_circuit_address_names_its_relay_and_must_end_in_the_announcer() -> None:
    circuit = f"/ip4/100.64.0.10/tcp/4001/p2p/{R}/p2p-circuit/p2p/{P}"
    assert circuit_relay(circuit, P) == R
    assert circuit_relay(circuit, R) is None  # someone else's circuit
    assert circuit_relay(f"/p2p/{P}/p2p-circuit/p2p/{P}", P) is None  # its own relay
    assert circuit_relay(f"/ip4/1.2.3.4/tcp/1/p2p/{P}", P) is None
    # Kept whatever the relay's address says: only the relay id is used, never that address.
    private = f"/ip4/10.0.0.1/tcp/1/p2p/{R}/p2p-circuit/p2p/{P}"
    assert usable_addrs(P, [circuit, private], via=Scope.PUBLIC, allow_private=False) == (
        [circuit, private], 0)


# -- reserving, and fetching through the relay ------------------------------------------------


async def test_a_private_peer_is_fetched_from_through_its_relay() -> None:
    async with running(config(relay_service="on"), behind_nat(), config()) as (
            relay, private, dialler):
        make_private(private)
        with trio.fail_after(20):
            await private.relay_client.tick()
        assert list(private.relay_client.reservations) == [relay.peer_id]
        circuits = private.relay_client.circuit_addrs()
        assert circuits and all(c.endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/"
                                           f"{private.peer_id}") for c in circuits)
        assert private.announce_addrs[-len(circuits):] == circuits
        assert relay.relay.reservations == 1

        state = adapter(0.5)
        private.offer(1, 16, state)
        heard = announcement(private, state)
        dialler.remember(private.peer_id, list(heard.addrs), via=Scope.LOOPBACK)
        with trio.fail_after(30):
            fetched = await dialler.fetch(heard)
        assert fetched.version == 1 and fetched.digest == heard.digest
        assert dialler.dialer.relayed_dials == {"ok": 1}  # the direct address was refused first
        assert dialler.relay_status()["relayed_dials"] == {"ok": 1}


async def test_a_relay_connection_is_swept_and_the_reservation_dropped_when_the_relay_goes(
        ) -> None:
    async with running(config(relay_service="on"), behind_nat()) as (relay, private):
        make_private(private)
        with trio.fail_after(20):
            await private.relay_client.tick()
            assert private.relay_client.reservations
            await private.host.disconnect(ID.from_base58(relay.peer_id))
            await private.relay_client.tick()
        assert private.relay_client.reservations == {}
        assert private.relay_client.events["lost"] == 1
        assert private.relay_client.circuit_addrs() == []


# -- what the relay admits --------------------------------------------------------------------


async def raw_reserve(host, relay: str, claim: bytes | None = None) -> int:
    """RESERVE by hand, with a `peer` field claiming another id if given; the status."""
    stream = await host.new_stream(ID.from_base58(relay), [HOP])
    message = HopMessage(type=HopMessage.RESERVE)
    if claim is not None:
        message.peer.id = claim
    await write_delimited_msg(stream, message)
    answer = await read_delimited_msg(stream, HopMessage)
    await stream.close()
    return int(answer.status)


async def test_a_reservation_is_bound_to_the_connection_not_to_the_claimed_id() -> None:
    async with running(config(relay_service="on"), config(), config()) as (relay, victim, thief):
        with trio.fail_after(20):
            status = await raw_reserve(thief.host, relay.peer_id,
                                       claim=ID.from_base58(victim.peer_id).to_bytes())
        assert status == 100  # OK, but for the thief itself
        manager = relay.relay.resource_manager
        assert manager.has_reservation(ID.from_base58(thief.peer_id))
        assert not manager.has_reservation(ID.from_base58(victim.peer_id))


async def test_a_peer_that_is_not_public_refuses_to_relay() -> None:
    async with running(config(), config()) as (relay, client):  # auto, reachability unknown
        with trio.fail_after(20):
            assert await raw_reserve(client.host, relay.peer_id) == 200  # RESERVATION_REFUSED
        assert relay.relay.refused == {"not_serving": 1}
        assert not relay.relay_status()["serving"]


async def test_reservations_from_one_address_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gossip.relay, "MAX_PER_IP", 1)
    async with running(config(relay_service="on"), config(), config()) as (relay, one, two):
        with trio.fail_after(20):
            assert await raw_reserve(one.host, relay.peer_id) == 100
            assert await raw_reserve(two.host, relay.peer_id) == 200
            assert await raw_reserve(one.host, relay.peer_id) == 100  # a renewal is not a new one
        assert relay.relay.refused == {"too_many_from_ip": 1}


async def test_a_relayed_dial_is_followed_by_a_hole_punch() -> None:
    # On one machine nothing stands between the two: the punch gives a direct connection, and
    # new streams prefer it. (Behind NATs: tests/test_nat_lab_peers.py.)
    async with running(config(relay_service="on"), behind_nat(), config()) as (
            relay, private, dialler):
        make_private(private)
        with trio.fail_after(30):
            await private.relay_client.tick()
            dialler.remember(private.peer_id, private.announce_addrs, via=Scope.LOOPBACK)
            await dialler.dial(private.peer_id)
        conns = dialler.host.get_network().get_connections(ID.from_base58(private.peer_id))
        assert any(is_relayed(c) for c in conns) and not all(is_relayed(c) for c in conns)
        assert dialler.relay_status()["holepunch"] == {"attempts": 1, "successes": 1}


# -- the relay's bandwidth --------------------------------------------------------------------


async def test_the_pacer_lets_through_its_burst_then_its_rate(
        autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(rate=1000.0, burst=1000.0)
    started = trio.current_time()
    for _ in range(3):
        await pacer.take(1000)
    assert trio.current_time() - started == pytest.approx(2.0)
    assert pacer.waited_s == pytest.approx(2.0)


async def test_a_relay_forwards_no_faster_than_its_rate() -> None:
    rate = 512 * 1024.0
    async with running(config(relay_service="on", relay_rate=rate), behind_nat(), config()) as (
            relay, private, dialler):
        make_private(private)
        dialler.dialer.puncher = None  # on one machine a punch would bypass the relay
        state = {f"m{i}.lora_A.weight": torch.randn(8, 4096) for i in range(12)}  # 1.5 MB
        private.offer(1, 16, state)
        heard = announcement(private, state)
        with trio.fail_after(60):
            await private.relay_client.tick()
            dialler.remember(private.peer_id, list(private.announce_addrs), via=Scope.LOOPBACK)
            started = trio.current_time()
            fetched = await dialler.fetch(heard)
            elapsed = trio.current_time() - started
        assert len(fetched.data) > 1_500_000 and relay.relay.forwarded > len(fetched.data)
        # Slower is possible on a busy machine; faster is not.
        assert elapsed >= (relay.relay.forwarded - relay.relay.pacer.burst) / rate * 0.95
        assert relay.relay_status()["forwarded_bytes"] == relay.relay.forwarded


async def test_a_punched_connection_outlives_the_fetch_and_serves_the_next() -> None:
    async with running(config(relay_service="on"), behind_nat(), config()) as (
            relay, private, dialler):
        make_private(private)
        state = adapter(0.25)
        private.offer(1, 16, state)
        with trio.fail_after(60):
            await private.relay_client.tick()
            heard = announcement(private, state)
            dialler.remember(private.peer_id, list(heard.addrs), via=Scope.LOOPBACK)
            first = await dialler.fetch(heard)
            conns = dialler.host.get_network().get_connections(ID.from_base58(private.peer_id))
            assert conns and not any(is_relayed(c) for c in conns)  # the relayed one is gone
            await trio.sleep(0.6)  # a server serves one peer once per 0.5 s
            second = await dialler.fetch(heard)
        assert first.digest == second.digest == heard.digest
        status = dialler.relay_status()
        assert status["relayed_dials"] == {"ok": 1}  # no second relayed dial, no second punch
        assert status["holepunch"] == {"attempts": 1, "successes": 1}
