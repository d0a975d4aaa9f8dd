"""gossip.router: messages on the swarm topic reach every topic peer, not only the mesh."""

from __future__ import annotations

from types import SimpleNamespace

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from gossip.router import FloodPublishGossipSub

TOPIC = "/loraswarm/test/adapters/1"


def _ids(count: int) -> list[ID]:
    return [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(count)]


def _hub(peers: list[ID], me: ID) -> FloodPublishGossipSub:
    """A hub with 20 topic peers, of which only the first 6 are in its mesh."""
    router = FloodPublishGossipSub(protocols=[], degree=6, degree_low=4, degree_high=12)
    router.pubsub = SimpleNamespace(peer_topics={TOPIC: set(peers)}, my_id=me)  # type: ignore[assignment]
    router.mesh[TOPIC] = set(peers[:6])
    return router


def test_a_forwarded_message_reaches_every_topic_peer_but_its_sender_and_origin() -> None:
    me, *peers = _ids(21)
    forwarder, origin = peers[10], peers[15]
    chosen = set(_hub(peers, me)._get_peers_to_send([TOPIC], forwarder, origin))
    assert chosen == set(peers) - {forwarder, origin}


def test_our_own_message_reaches_every_topic_peer() -> None:
    me, *peers = _ids(21)
    assert set(_hub(peers, me)._get_peers_to_send([TOPIC], me, me)) == set(peers)


def test_another_topic_is_not_flooded() -> None:
    me, *peers = _ids(21)
    assert set(_hub(peers, me)._get_peers_to_send(["/other"], peers[0], peers[1])) == set()
