"""Serving a peer's adapter and telling the swarm about it, and waiting for the swarm to form.

Only a peer's first announcement is published at once: it tells the swarm that the peer has an
adapter to fetch. Later ones ride on the next re-announcement (every third of
`--peer-timeout`), because a fetch always returns the newest adapter, with its version, samples
and digest in the signed transfer header. Published every round, each announcement reaches
every peer: O(N²) deliveries per round (see the README's "Design decisions, measured").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import trio

from gossip.errors import GossipError
from gossip.membership import Membership
from gossip.node import GossipNode
from gossip.wire import Announcement, digest, encode_adapter
from merge.validate import MAX_RANK_FACTOR
from peer.attacks import poison
from peer.config import PeerConfig
from peer.setup import Runtime
from peer.stats import PeerStatistics

logger = logging.getLogger(__name__)

# Room for a safetensors header to grow with a neighbour's other rank (rank-free rules only).
_HEADER_SLACK = 64 * 1024


class Publisher:
    """Offers a peer's adapter on its node and announces it, signed."""

    def __init__(self, node: GossipNode, membership: Membership, config: PeerConfig,
                 runtime: Runtime, stats: PeerStatistics, *, rank_free: bool) -> None:
        self.node = node
        self.membership = membership
        self.config = config
        self.trainer = runtime.trainer  # says how many samples the adapter embodies
        self.swarm = runtime.swarm
        self.stats = stats  # says the last training loss
        self.rank_free = rank_free

    async def announce(self, state: Mapping[str, torch.Tensor], *, version: int) -> None:
        """Serve this version's adapter (poisoned, for an attacker) and describe it, signed."""
        node, config, samples = self.node, self.config, self.trainer.samples
        served = state if not config.attack else poison(
            dict(state), config.attack, scale=config.attack_scale, seed=version)
        data = await trio.to_thread.run_sync(encode_adapter, served)
        offer = node.offer(version, samples, data,
                           digest=await trio.to_thread.run_sync(digest, data))
        # The encoding is deterministic: a neighbour's adapter has exactly our size, unless
        # ranks may differ (up to MAX_RANK_FACTOR x ours, plus a header's slack).
        node.adapter_sizes = (len(data), len(data)) if not self.rank_free else (
            1, MAX_RANK_FACTOR * len(data) + _HEADER_SLACK)
        announcement = Announcement(
            swarm=self.swarm, peer=node.peer_id, version=version, samples=samples,
            digest=offer.digest, nbytes=len(data), train_loss=self.stats.last_train_loss,
            addrs=tuple(node.announce_addrs),
        )
        if node.current is not None:
            node.update(announcement)
            return
        try:
            await node.publish(announcement)
        except GossipError as exc:  # it is `current`: the re-announcement retries it
            logger.warning("first announcement failed (%s); the next re-announcement "
                           "retries it", exc)

    async def wait_for_topic_peer(self) -> None:
        """Hold the join announcement until a connected peer has subscribed to the swarm topic.

        Published before that, it goes nowhere, and the swarm learns of us only at our first
        re-announcement. Bounded by `--wait-timeout`; a peer without `--bootstrap` starts the
        swarm and does not wait.
        """
        if not self.config.network.bootstrap:
            return
        with trio.move_on_after(self.config.wait_timeout_s):
            await self.membership.wait_until(lambda: bool(self.node.topic_peers()))
            return
        logger.warning("no swarm peer after %.0f s; announcing anyway", self.config.wait_timeout_s)

    async def wait_for_peers(self) -> None:
        """Hold the first round until `wait_peers` others are live (a swarm starting together)."""
        wanted, membership = self.config.wait_peers, self.membership
        if not wanted:
            return
        logger.info("waiting for %d other peers before the first round", wanted)
        with trio.move_on_after(self.config.wait_timeout_s):
            await membership.wait_until(lambda: len(membership.live_peers()) >= wanted)
            logger.info("%d peers live; starting", len(membership.live_peers()))
            return
        logger.warning("only %d of %d peers live after %.0f s; starting anyway",
                       len(membership.live_peers()), wanted, self.config.wait_timeout_s)

