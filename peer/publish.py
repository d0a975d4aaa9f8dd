"""Serving a peer's adapter and telling the swarm about it, and waiting for the swarm to form.

A peer serves its public estimate x̂ (`gossip.estimate.PublicEstimate`), not its adapter x: each
round x̂ moves towards x by one step of `--wire-codec`, and neighbours fetch the steps since the
version they hold. With an exact codec (fp32) x̂ is x itself, rebuilt each round as a keyframe.
A lossy estimate starts at version 0, the swarm-seeded adapter every peer holds already.

Only a peer's first announcement is published at once: it tells the swarm that the peer has an
adapter to fetch. Later ones ride on the next re-announcement (every third of
`--peer-timeout`), because a fetch always returns the newest adapter, with its version, samples
and digest in the signed transfer header. Published every round, each announcement reaches
every peer: O(N²) deliveries per round (see the README's "Design decisions, measured").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import torch
import trio

from gossip.compress import Codec, Shapes, parse_codec, shapes_of
from gossip.errors import GossipError
from gossip.estimate import MAX_CHAIN, EstimateSnapshot, PublicEstimate
from gossip.membership import Membership
from gossip.nodes import Node
from gossip.transfer import Offer
from gossip.wire import Announcement
from merge.validate import MAX_RANK_FACTOR
from peer.attacks import poison
from peer.config import PeerConfig
from peer.setup import Runtime
from peer.stats import PeerStatistics
from peer.telemetry import own_telemetry

logger = logging.getLogger(__name__)
_TOPIC_POLL_S = 0.05  # how often the join announcement checks for a subscribed neighbour


SETTLING_KINDS = ("fp32", "bf16", "int8")  # dense enough to settle on (README, "Settling")


def settling_codec(wire: Codec, spec: str) -> Codec:
    """The codec of a settling round's step: `spec`, or for "auto" the wire codec when it is
    dense (fp32, bf16, int8), else int8 (+zstd with the wire codec's). After a merge, a peer's
    residual x - x̂ holds its distance to the average too, which a sign or sparse step sends
    only part of, and consensus stalls (README, "Settling"). Unused under an exact wire codec:
    every version is then a keyframe."""
    if spec != "auto":
        return parse_codec(spec)
    return wire if wire.kind in SETTLING_KINDS else Codec("int8", zstd=wire.zstd)


class Publisher:
    """Offers a peer's adapter on its node and announces it, signed."""

    def __init__(self, node: Node, membership: Membership, config: PeerConfig,
                 runtime: Runtime, stats: PeerStatistics, *, rank_free: bool) -> None:
        self.node = node
        self.membership = membership
        self.config = config
        self.runtime = runtime  # its trainer says how many samples the adapter embodies
        self.trainer = runtime.trainer
        self.swarm = runtime.swarm
        self.initial = runtime.initial
        self.stats = stats  # says the last training loss
        self.rank_free = rank_free
        self.codec: Codec = parse_codec(config.network.wire_codec)
        self.settle_codec = settling_codec(self.codec, config.network.settle_codec)
        self.estimate: PublicEstimate | None = None  # created at the first announce
        self._shapes: dict[str, tuple[int, int]] = {}  # of the estimate's tensors

    def step(self, state: Mapping[str, torch.Tensor], version: int, *,
             settling: bool = False) -> EstimateSnapshot:
        """Move the public estimate to `version` (in a worker thread: it encodes the adapter),
        by a step of the settle codec in a settling round.

        Under a lossy codec the first version is a step from the swarm-seeded adapter (version
        0, see `origin`); a keyframe of `state` when there is no origin. Every version is a
        keyframe under an exact codec, since a float32 step x̂ + (x - x̂) may round away from x,
        and a keyframe is no larger; and so is one whose tensors changed shape (a step only
        moves an estimate of the same shapes).
        """
        shapes = shapes_of(state)
        if self.estimate is None or self.codec.exact or shapes != self._shapes:
            self._shapes = shapes
            origin = self.origin(shapes) if version > 0 else None
            start, at = (state, version) if origin is None else (origin, 0)
            # Chains longer than a keyframe are never sent: no use keeping more history.
            self.estimate = PublicEstimate(start, self.codec, version=at,
                                           keep=0 if self.codec.exact else MAX_CHAIN,
                                           max_history_bytes=Codec("fp32").body_size(shapes))
            if origin is None:
                return self.estimate.snapshot()
        self.estimate.step(state, version=version,
                           codec=self.settle_codec if settling else None)
        return self.estimate.snapshot()

    def public_estimate(self) -> dict[str, torch.Tensor] | None:
        """Our x̂ now (a copy), when neighbours hold it instead of our adapter (a lossy codec);
        None when they hold the adapter itself. Merges take it for ours (`merge_estimates`)."""
        if self.estimate is None or self.codec.exact or self.config.attack:
            return None  # (an attacker's estimate follows its poisoned adapter, not x)
        return self.estimate.estimate

    def origin(self, shapes: Shapes) -> Mapping[str, torch.Tensor] | None:
        """Where a lossy estimate starts: the swarm-seeded adapter as version 0, which every
        neighbour holds already, so that even its first fetch from us is a chain of steps (as
        long as our history reaches back to it and is smaller than a keyframe). None for an
        exact codec (each version a keyframe) or an adapter of other shapes."""
        initial = self.initial
        if self.codec.exact or initial is None or shapes_of(initial) != shapes:
            return None
        return initial

    async def announce(self, state: Mapping[str, torch.Tensor], *, version: int,
                       round_: int, settling: bool = False) -> None:
        """Step the public estimate towards this version's adapter (poisoned, for an attacker),
        serve it and describe it, signed, with our telemetry for the round `round_` it ends
        (0: before the first). `settling`: a round that did not train (the settle codec)."""
        node, config, samples = self.node, self.config, self.trainer.samples
        served = state if not config.attack else poison(
            dict(state), config.attack, scale=config.attack_scale, seed=version)
        snapshot = await trio.to_thread.run_sync(
            partial(self.step, served, version, settling=settling))
        privacy = self.trainer.ledger.announced()  # ε of this version: signed in its headers
        offer = node.serve(Offer(version=version, samples=samples, estimate=snapshot,
                                 privacy=privacy))
        # A neighbour's tensors have exactly our shapes, unless ranks may differ (up to
        # MAX_RANK_FACTOR x ours): what bounds the size of an update taken from it.
        node.expect_shapes(self._shapes, rank_factor=MAX_RANK_FACTOR if self.rank_free else 1,
                           origin=self.origin(self._shapes))
        # nbytes: the size of this version's keyframe (float32, +zstd with the codec), the most
        # a neighbour's first fetch of it costs; the digest names the estimate version.
        announcement = Announcement(
            swarm=self.swarm, peer=node.peer_id, version=version, samples=samples,
            digest=offer.digest, nbytes=offer.keyframe_bytes,
            train_loss=self.stats.last_train_loss, addrs=tuple(node.announce_addrs),
            telemetry=own_telemetry(config, self.runtime, self.stats, round_),
            privacy=privacy,
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
            # Polled: a peer's subscription arrives with no event of ours. Waiting on the
            # membership's changes instead waited a whole tick (1 s) whenever the bootstrap's
            # announcement came by catch-up before its subscription did, and a short first
            # round of the bootstrap peer then ended before it heard of us.
            while not self.node.topic_peers():
                await trio.sleep(_TOPIC_POLL_S)
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

