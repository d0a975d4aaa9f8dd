"""GossipSub with flood publishing of our own messages.

py-libp2p 0.8.1 sends a message we publish on a subscribed topic only to our mesh peers for
that topic. A peer whose mesh is empty therefore publishes into the void, and joiners pruned
from a full bootstrap mesh were never heard of (README, "Design decisions, measured").

go-libp2p avoids this with `floodPublish` (on by default): a peer's own messages go to every
connected peer subscribed to the topic, while forwarded messages still follow the mesh. This
router does the same. Announcements are small and published once when a peer joins and then
at each periodic re-announcement, so the extra copies cost little.
"""

from __future__ import annotations

from collections.abc import Iterable

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub


class FloodPublishGossipSub(GossipSub):
    """GossipSub whose own publishes reach every topic peer, mesh or not."""

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterable[ID]:
        topics = list(topic_ids)
        chosen = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and origin == self.pubsub.my_id:
            for topic in topics:
                chosen.update(self.pubsub.peer_topics.get(topic, ()))
            chosen.discard(origin)
        return chosen
