"""Membership on real libp2p hosts (127.0.0.1): joining, replays, liveness, abrupt departures."""

from __future__ import annotations

import logging
import random
import socket
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from gossip.addresses import Scope
from gossip.config import NodeConfig
from gossip.membership import Membership
from gossip.node import GossipNode, Heard
from gossip.wire import Announcement, digest
from testbed.loopback import LOOPBACK_SWARM, SyntheticPeer, loopback_swarm
from topology.config import TopologyConfig
from topology.view import Observation


def _neighbours_are(peer: SyntheticPeer, count: int) -> bool:
    return len(peer.membership.neighbours()) == count


def _forgot(peer: SyntheticPeer, other: SyntheticPeer) -> bool:
    return other.peer_id not in peer.membership.view


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_bootstrap_is_retried_with_backoff_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gossip.membership")
    # The bootstrap peer's identity and port are fixed before it runs, so its address is known.
    port = _free_port()
    boot = GossipNode(NodeConfig(listen=(f"/ip4/127.0.0.1/tcp/{port}",)), LOOPBACK_SWARM,
                      identity_dir=tmp_path)
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot.peer_id}"
    joiner = GossipNode(NodeConfig(bootstrap=(address,)), LOOPBACK_SWARM, identity_dir=None)
    membership = Membership(joiner, TopologyConfig(), random.Random(1))
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(joiner.run)
            await nursery.start(membership.run)
            await membership.wait_until(lambda: membership.statistics().bootstrap_failures >= 3)
            assert joiner.connected_peers() == []
            await nursery.start(boot.run)
            await membership.wait_until(lambda: boot.peer_id in joiner.connected_peers())
            nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) >= 3
    assert all("cannot reach the swarm" in w and "retrying in" in w for w in warnings)
    assert "attempt 1:" in warnings[0] and "attempt 2:" in warnings[1]
    assert address in warnings[0], "the message names the address that failed"


async def test_replayed_announcement_is_counted_and_ignored() -> None:
    async with loopback_swarm(2) as swarm:
        receiver, sender = swarm.peers
        sender.hold(3)
        with trio.fail_after(20):
            await swarm.announce_all()
            await receiver.membership.wait_until(lambda: receiver.membership.latest(
                sender.peer_id) is not None)
        newest = receiver.membership.latest(sender.peer_id)
        assert newest is not None and newest.version == 3
        # A validly signed announcement of an older version: what a replay looks like once
        # gossipsub's seen-cache has forgotten the original.
        old = Announcement(swarm=LOOPBACK_SWARM, peer=sender.peer_id, version=2, samples=16,
                           digest=newest.digest, nbytes=newest.nbytes, train_loss=1.0,
                           addrs=newest.addrs)
        await sender.node.publish(old)
        with trio.fail_after(10):
            await receiver.membership.wait_until(lambda: receiver.node.rejected["replay"] == 1)
        assert receiver.membership.latest(sender.peer_id) == newest
        assert receiver.membership.statistics().replays == 1
        sender.hold(4)
        await sender.announce()

        def newest_is_4() -> bool:
            latest = receiver.membership.latest(sender.peer_id)
            return latest is not None and latest.version == 4

        with trio.fail_after(10):
            await receiver.membership.wait_until(newest_is_4)


async def test_abrupt_stop_leaves_every_view_within_the_timeout_and_never_stalls_a_round() -> None:
    timeout_s = 5.0
    topology = TopologyConfig(fanout=4, target_connections=4, peer_timeout_s=timeout_s)
    network = NodeConfig(min_upload_interval_s=0, fetch_timeout_s=20)
    async with loopback_swarm(5, topology=topology, network=network) as swarm:
        victim, others = swarm.peers[4], swarm.peers[:4]
        with trio.fail_after(30):
            await swarm.announce_all()
            for peer in others:
                await peer.membership.wait_until(partial(_neighbours_are, peer, 4))
        victim.stop()
        with trio.fail_after(10):
            await victim.stopped.wait()
        stopped = trio.current_time()
        # Right away the victim is still live, so fanout 4 draws it: no round may wait on it.
        # (On a loaded machine it may already have expired in some views; those prove nothing.)
        drawn = 0
        for peer in others:
            if victim.peer_id not in peer.membership.live_peers():
                continue
            drawn += 1
            started = trio.current_time()
            assert await peer.pull_round(4) == 3
            # Waiting on the dead peer would cost the whole fetch timeout (20 s); the bound is
            # loose because these machines are shared and a loaded one runs everything slower.
            elapsed = trio.current_time() - started
            assert elapsed < network.fetch_timeout_s / 2, f"a dead neighbour stalled: {elapsed:.1f}"
        assert drawn, "the victim expired everywhere before a round could draw it"
        with trio.fail_after(timeout_s + 10):
            for peer in others:
                await peer.membership.wait_until(partial(_forgot, peer, victim))
        gone_after = trio.current_time() - stopped
        print(f"victim left every view {gone_after:.2f} s after its host closed")
        # Last heard at most one refresh tick (1 s) before its sockets closed; expiry is checked
        # once per tick: so timeout + 2 ticks at worst, plus slack for a loaded machine.
        assert gone_after <= timeout_s + 5.0, f"left the views after {gone_after:.1f} s"
        for peer in others:
            assert victim.peer_id not in {a.peer for a in peer.membership.sample(4)}
            assert peer.membership.latest(victim.peer_id) is None
            # The living stay live past the timeout without announcing: connections count.
            assert len(peer.membership.live_peers()) == 3


def _heard(peer: str, version: int, seqno: int, data: bytes = b"adapter") -> Heard:
    announcement = Announcement(
        swarm=LOOPBACK_SWARM, peer=peer, version=version, samples=8, digest=digest(data),
        nbytes=len(data), train_loss=0.5, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",),
    )
    return Heard(announcement, seqno, Scope.LOOPBACK)


def _membership_that_heard_a_peer() -> tuple[Membership, str]:
    """A membership (30 s timeout) whose view took one fresh peer's version 1, seqno 100."""
    node = GossipNode(NodeConfig(), LOOPBACK_SWARM, identity_dir=None)
    membership = Membership(node, TopologyConfig(peer_timeout_s=30), random.Random(0))
    peer = str(ID.from_pubkey(create_new_key_pair().public_key))
    assert membership.observe(_heard(peer, 1, seqno=100)) is Observation.NEW
    return membership, peer


async def test_sequence_numbers_tell_fresh_re_announcements_from_replays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    membership, peer = _membership_that_heard_a_peer()
    node = membership.node
    first_heard = membership.view.get(peer)
    assert first_heard is not None and membership.latest(peer) is not None
    # The same signed message again (a duplicate delivery or an old copy): it proves nothing,
    # and is not counted as hostile, since py-libp2p itself sometimes delivers a message twice.
    await trio.sleep(20)
    assert membership.observe(_heard(peer, 1, seqno=100)) is Observation.REPLAY
    assert membership.view.get(peer) == first_heard
    # A fresh re-announcement of the same version keeps the peer alive.
    assert membership.observe(_heard(peer, 1, seqno=101)) is Observation.REFRESHED
    refreshed = membership.view.get(peer)
    assert refreshed is not None and refreshed.last_heard == first_heard.last_heard + 20
    # An older version, freshly signed: a replay too.
    assert membership.observe(_heard(peer, 0, seqno=102)) is Observation.REPLAY
    # The same version with other bytes: equivocation, refused.
    assert membership.observe(_heard(peer, 1, seqno=103, data=b"other")) is Observation.REPLAY
    assert membership.observe(_heard(peer, 2, seqno=104)) is Observation.UPDATED
    assert node.rejected == Counter({"replay": 1, "equivocation": 1})
    latest = membership.latest(peer)
    assert latest is not None and latest.version == 2 and latest.digest == digest(b"adapter")
    assert membership.statistics().replays == 1
    # An older message soon after a newer one took a slower path through the mesh: dropped,
    # counted as late, not as a replay. The same message much later is a replay.
    await trio.sleep(5)
    assert membership.observe(_heard(peer, 1, seqno=101)) is Observation.REPLAY
    assert membership.statistics().late == 1 and node.rejected["replay"] == 1
    await trio.sleep(25)  # 30 s, the peer timeout, after the newer message
    assert membership.observe(_heard(peer, 1, seqno=101)) is Observation.REPLAY
    assert membership.statistics().late == 1 and node.rejected["replay"] == 2
    assert membership.latest(peer) == latest


async def test_an_expired_peer_comes_back_with_a_fresh_re_announcement_of_its_version(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rounds do not publish, so a re-announcement may repeat the version a peer had.

    Once a peer expired here, its next freshly signed message must bring it back; a replay of
    its last message must not.
    """
    node = GossipNode(NodeConfig(), LOOPBACK_SWARM, identity_dir=None)
    membership = Membership(node, TopologyConfig(peer_timeout_s=30), random.Random(0))
    peer = str(ID.from_pubkey(create_new_key_pair().public_key))
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)  # its refresh loop expires the silent peer
        assert membership.observe(_heard(peer, 3, seqno=200)) is Observation.NEW
        await trio.sleep(35)
        assert peer not in membership.view
        assert membership.observe(_heard(peer, 3, seqno=200)) is Observation.REPLAY
        assert peer not in membership.view
        assert membership.observe(_heard(peer, 2, seqno=201)) is Observation.REPLAY
        assert membership.observe(_heard(peer, 3, seqno=202)) is Observation.NEW
        back = membership.view.get(peer)
        assert back is not None and back.version == 3 and membership.latest(peer) is not None
        nursery.cancel_scope.cancel()


async def test_a_peer_that_expired_comes_back_with_its_addresses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The daemon expires the view before each round, between two `_refresh` ticks: the peer's
    # last announcement is still kept, and its next one repeats the same addresses.
    membership, peer = _membership_that_heard_a_peer()
    await trio.sleep(31)
    assert membership.view.expire(trio.current_time()) == [peer]
    assert membership.observe(_heard(peer, 1, seqno=101)) is Observation.NEW
    info = membership.view.get(peer)
    assert info is not None and info.addrs == (f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",)


async def test_the_oldest_signers_sequence_numbers_are_forgotten_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Seqnos outlive the view (4 per view slot), oldest arrival forgotten first, with no sort:
    a signer heard again moves to the back of the line."""
    node = GossipNode(NodeConfig(), LOOPBACK_SWARM, identity_dir=None)
    membership = Membership(node, TopologyConfig(view_size=2, fanout=1, target_connections=1,
                                           peer_timeout_s=30),
                            random.Random(0))
    peers = [str(ID.from_pubkey(create_new_key_pair().public_key)) for _ in range(10)]

    def hear(peer: str, seqno: int) -> None:
        membership.view.expire(trio.current_time())  # room in the 2-slot view
        assert membership.observe(_heard(peer, 1, seqno=seqno)) is Observation.NEW

    for peer in peers[:9]:
        hear(peer, 100)
        await trio.sleep(31)
    hear(peers[0], 101)  # back after it expired: its seqno is kept as the newest
    await trio.sleep(31)
    hear(peers[9], 100)
    membership._forget_oldest_seqnos()
    assert list(membership._seqnos) == [*peers[3:9], peers[0], peers[9]]
    # What is kept still tells a replay: peer 0's old message, long after, is refused.
    membership.view.expire(trio.current_time())
    assert membership.observe(_heard(peers[0], 1, seqno=101)) is Observation.REPLAY


async def test_peers_reached_only_through_a_relay_are_drawn_after_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    membership, relayed = _membership_that_heard_a_peer()
    direct = str(ID.from_pubkey(create_new_key_pair().public_key))
    membership.observe(_heard(direct, 1, seqno=100))
    membership.node.relayed_only = lambda: {relayed}  # its hole punch failed lately
    for _ in range(20):  # one neighbour wanted: always the direct one
        assert [a.peer for a in membership.sample(1)] == [direct]
    assert membership.relayed_deferred == 20
    # When the direct ones are too few, the relayed one fills the draw.
    assert {a.peer for a in membership.sample(2)} == {direct, relayed}
    assert [a.peer for a in membership.sample(1, exclude={direct})] == [relayed]
    assert membership.relayed_deferred == 20
