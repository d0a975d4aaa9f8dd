"""GossipSub that floods the swarm topic: every message goes to every connected topic peer.

py-libp2p 0.8.1 sends a message we publish on a subscribed topic only to our mesh peers for
that topic. A peer whose mesh is empty therefore publishes into the void: measured in a 32-peer
swarm joined through one bootstrap peer, 2 to 3 joiners ended with a single connection (the
bootstrap peer, which had pruned them from its full mesh and held them in backoff) and an empty
mesh; none of their announcements ever reached anyone, so nobody could dial them either.

go-libp2p avoids that case with `floodPublish`: a peer's own messages go to every connected
topic peer. Forwarded messages need the same. A swarm that joins through one bootstrap peer
starts as a star, and the hub forwards only to its mesh (at most 12 peers); the others, pruned
and penalised for grafting again, got nothing: measured with 64 peers, 19 of them still knew
only the bootstrap peer after three training rounds, and could fetch from nobody else. Flooded,
each announcement crosses every connection once each way at most. Connections are few: a peer
keeps `--target-connections` and closes those it opened for a fetch, so this costs about what
mesh forwarding does, and announcements are rare (one when a peer joins, then one per
re-announcement interval).
"""
from __future__ import annotations

from collections.abc import Iterable

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub


class FloodPublishGossipSub(GossipSub):
    """GossipSub whose messages, published or forwarded, reach every topic peer, mesh or not."""

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterable[ID]:
        topics = list(topic_ids)
        chosen = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        if self.pubsub is not None:
            for topic in topics:
                chosen.update(self.pubsub.peer_topics.get(topic, ()))
        chosen.difference_update((msg_forwarder, origin))
        return chosen
