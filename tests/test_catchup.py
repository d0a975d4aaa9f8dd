"""Catch-up on connect (gossip.catchup): a late joiner learns the swarm from its first neighbour,
and what a neighbour sends is checked entry by entry, as gossipsub checks a delivery."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.pubsub.pb import rpc_pb2

from gossip.catchup import CATCHUP_PROTOCOL, MAX_ENTRIES, Recent
from gossip.errors import GossipError
from gossip.membership import Membership
from gossip.memory import MemoryNetwork
from gossip.node import GossipNode, NodeConfig
from gossip.transfer import close_quietly
from gossip.wire import Announcement, digest, frame
from testbed.loopback import loopback_swarm
from tests.nodes import SWARM, running
from topology.config import TopologyConfig

_CATCHUP = TProtocol(CATCHUP_PROTOCOL)
# Re-announcements come every third of the timeout: 200 s, far beyond each test's bound, so
# whatever a joiner knows within it came by catch-up.
QUIET = TopologyConfig(peer_timeout_s=600)


def announce(node: Any, version: int = 1) -> Announcement:
    data = f"adapter of {node.peer_id} v{version}".encode()
    return Announcement(swarm=SWARM, peer=node.peer_id, version=version, samples=16,
                        digest=digest(data), nbytes=len(data), train_loss=1.5,
                        addrs=tuple(node.listen_addrs))


def test_recent_keeps_each_signers_newest_message_bounded() -> None:
    recent: Recent[str] = Recent(bound=3)
    recent.keep("a", 5, "a5")
    recent.keep("a", 4, "a4")  # older: ignored
    recent.keep("b", 1, "b1")
    recent.keep("a", 6, "a6")  # newer: replaces, and is now the newest
    assert recent.newest(10) == ["a6", "b1"]
    recent.keep("c", 1, "c1")
    recent.keep("d", 1, "d1")  # over the bound: the signer heard from longest ago goes
    assert recent.newest(10) == ["d1", "c1", "a6"] and len(recent) == 3
    recent.forget("c")
    assert recent.newest(1) == ["d1"] and recent.newest(10) == ["d1", "a6"]


async def _heard_from(node: GossipNode, signer: str) -> int:
    """Wait until `node` holds a message of `signer` it could serve; its sequence number."""
    while (seqno := node.recent.seqno(signer)) is None:
        await trio.sleep(0.05)
    return seqno


async def test_a_joiner_hears_what_its_neighbour_holds_with_the_original_sequence_numbers(
) -> None:
    async with running(NodeConfig(), NodeConfig()) as (first, second):
        with trio.fail_after(20):
            while not first.topic_peers() or not second.topic_peers():
                await trio.sleep(0.05)
            await first.publish(announce(first))
            await second.publish(announce(second))
            seqnos = {first.peer_id: await _heard_from(first, first.peer_id),
                      second.peer_id: await _heard_from(first, second.peer_id)}
        async with running(NodeConfig()) as (joiner,):
            with trio.fail_after(20):
                await joiner.connect(first.listen_addrs[0])
                assert await joiner.catch_up(first.peer_id) == 2
                heard = [joiner.announcements.receive_nowait() for _ in range(2)]
            assert {h.announcement.peer: h.seqno for h in heard} == seqnos
            assert {h.announcement for h in heard} == {first.current, second.current}
            assert joiner.catchup_status() == {"asked": 1, "heard": 2, "failed": 0,
                                               "served": {}}
            # A second ask within the interval gets an empty reply, counted by the server.
            assert await joiner.catch_up(first.peer_id) == 0
            assert first.catchup_status()["served"] == {"ok": 1, "rate_limited": 1}


def _knows(membership: Membership, peers: set[str]) -> bool:
    return all(membership.latest(peer) is not None for peer in peers)


async def test_a_late_joiner_knows_every_member_before_anyone_re_announces() -> None:
    async with loopback_swarm(3, topology=QUIET, network=NodeConfig()) as swarm:
        with trio.fail_after(30):
            await swarm.announce_all()
            for peer in swarm.peers:
                others = {o.peer_id for o in swarm.peers if o is not peer}
                await peer.membership.wait_until(
                    partial(_knows, peer.membership, others))
        # gossipsub's message cache has forgotten them: it would offer them to a newcomer
        # (IHAVE) for 3 heartbeats, and what the joiner knows would not prove catch-up.
        await trio.sleep(4)
        joiner = await swarm.add()
        members = {peer.peer_id for peer in swarm.peers[:3]}
        with trio.fail_after(10):
            await joiner.membership.wait_until(partial(_knows, joiner.membership, members))
        assert set(joiner.membership.live_peers()) >= members
        assert joiner.node.catchups["heard"] >= 3


def _forged(raw: bytes) -> bytes:
    msg = rpc_pb2.Message.FromString(raw)
    msg.data = msg.data[:-1] + bytes([msg.data[-1] ^ 1])  # not what its publisher signed
    return msg.SerializeToString()


def _other_topic(raw: bytes) -> bytes:
    msg = rpc_pb2.Message.FromString(raw)
    del msg.topicIDs[:]
    msg.topicIDs.append("another-swarm")
    return msg.SerializeToString()


@pytest.mark.parametrize(("reply", "reason", "kept"), [
    (lambda good: [good, _forged(good)], "bad_signature", 1),
    (lambda good: [_other_topic(good)], "wrong_topic", 0),
    (lambda good: [b"\xff" * 40], "malformed", 0),
    (lambda good: [good] * (MAX_ENTRIES + 1), "oversized", MAX_ENTRIES),
])
async def test_a_hostile_reply_is_refused_once_and_the_checked_entries_kept(
        reply: Any, reason: str, kept: int) -> None:
    async with running(NodeConfig(), NodeConfig()) as (hostile, joiner):
        with trio.fail_after(20):
            while not hostile.topic_peers():
                await trio.sleep(0.05)
            await hostile.publish(announce(hostile))
            await _heard_from(hostile, hostile.peer_id)
        good = hostile.recent.newest(1)[0].SerializeToString()

        async def handler(stream: Any) -> None:
            await stream.write(b"".join(frame(e) for e in reply(good)) + frame(b""))
            await close_quietly(stream)

        hostile.host.set_stream_handler(_CATCHUP, handler)
        with trio.fail_after(20), pytest.raises(GossipError, match=reason):
            await joiner.catch_up(hostile.peer_id)
        assert joiner.rejected == {reason: 1}
        assert joiner.catchup_status() == {"asked": 1, "heard": kept, "failed": 1, "served": {}}
        # It keeps running: the honest reply after the hostile one is heard.
        hostile.host.set_stream_handler(_CATCHUP, hostile.catchup_server.handle)
        with trio.fail_after(20):
            assert await joiner.catch_up(hostile.peer_id) == 1


async def test_memory_network_joiners_catch_up_from_their_bootstrap(tmp_path: Path) -> None:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        nodes = [network.node(NodeConfig(), SWARM, tmp_path / f"p{i}") for i in range(4)]
        await nursery.start(nodes[0].run)
        for node in nodes[1:3]:
            await nursery.start(node.run)
            await node.dial(nodes[0].peer_id)
        for node in nodes[:3]:
            await node.publish(announce(node))
        await trio.sleep(0.1)  # delivered along the connections
        late = nodes[3]
        await nursery.start(late.run)
        membership = Membership(late, QUIET, random.Random(0))
        await nursery.start(membership.run)
        await late.connect(nodes[0].listen_addrs[0])
        assert await late.catch_up(nodes[0].peer_id) == 3
        with trio.fail_after(5):
            await membership.wait_until(
                lambda: all(membership.latest(n.peer_id) is not None for n in nodes[:3]))
        assert await late.catch_up(nodes[0].peer_id) == 0  # spaced out, as on libp2p
        assert nodes[0].catchups_served == {"ok": 1, "rate_limited": 1}
        nursery.cancel_scope.cancel()
