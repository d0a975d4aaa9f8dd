"""Membership: who is in the swarm, who is alive, and whom to stay connected to.

One `Membership` per peer feeds a `topology.MembershipView` and keeps the peer in the swarm:

1. Announcements (signed, validated by the node) carry a peer's adapter version, sample
   count and addresses; their addresses go to the peerstore, so that dials and fetches reach
   the peer. A message whose gossipsub sequence number is not above the last one seen from its
   signer, or that announces an older version than one already seen, is a replay: logged,
   counted in `node.rejected["replay"]` and dropped. One exception: a message numbered below
   the last one but arriving within `peer_timeout_s` of it took a slower path through the mesh
   (gossipsub's lazy IHAVE/IWANT repair; seen 30 s and more late in a loaded 32-peer swarm)
   and is only counted as `late`. A fresh message repeating the current
   version is a re-announcement: it proves the peer alive.
2. Re-announcing: after `reannounce_s` without a publish, we publish our current announcement
   (`Endpoint.current`: the daemon updates it every round without publishing). Peers that
   missed the last one (gossipsub loses messages while meshes form) learn of us, and peers we
   are not connected to keep us live even when rounds take longer than `peer_timeout_s`.
3. Connections: every tick, each connected peer subscribed to the swarm topic is observed
   alive. Health pings (`NodeConfig.health_check_s`) close the connection of a peer that died
   without a goodbye; nothing refreshes it any more and it expires after `peer_timeout_s`.
4. Dialling (`gossip.connections`): keep `target_connections` live peers connected, and
   rejoin through the bootstrap addresses when cut off.

Discovery beyond the bootstrap rests on announced addresses: in py-libp2p 0.8.1 gossipsub peer
exchange never fires and the DHT connects everyone to everyone (README, "Design decisions,
measured"), while announcements reach every member anyway and carry the addresses for free.
"""
from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import trio

from gossip.connections import Connections
from gossip.endpoint import Heard
from gossip.errors import GossipError
from gossip.nodes import Node
from gossip.wire import Announcement
from topology.config import TopologyConfig
from topology.view import MembershipView, Observation

logger = logging.getLogger(__name__)

_TICK_S = 1.0
_SEQNOS_PER_VIEW_SLOT = 4  # signers whose last seqno is kept: 4 x view size
# Re-announce after this share of the interval, drawn uniformly. Peers that joined together
# re-announce together; the wider the draw, the sooner their waves spread out (with 0.75-1.25,
# 64 in-process peers re-announced within 100 s of each other, and fetches failed in bursts).
_REANNOUNCE_SPREAD = (0.5, 1.5)


@dataclass(frozen=True)
class MembershipStatistics:
    """A snapshot for status reports; counters are totals since creation."""

    live: int  # peers heard from within the timeout
    announced: int  # live peers with an adapter: what `sample` draws from
    trusted: int  # live peers that served us a valid adapter
    refused: int  # new peers the full view turned away
    neighbours: int  # live peers we hold a connection to
    connected: int  # every peer we hold a connection to
    replays: int
    late: int  # older messages that arrived soon after a newer one: reordered, not replayed
    dials: int
    dial_failures: int
    bootstrap_failures: int


class Membership:
    """The service that keeps a peer's membership view and connections up to date.

    Args:
        node: the peer's network node (its announcements are consumed here).
        config: view size, peer timeout, fanout and connection target.
        rng: the source of randomness for sampling, dialling and backoff jitter.
        view: an existing view to feed (a new one when None).
        announcements: the table to keep each peer's newest announcement in, for a caller
            that reads it directly (a new one when None).
        tick_s: how often liveness is refreshed and connections are topped up.
        reannounce_s: after this long without a publish, our latest announcement is
            published again; by default a third of `peer_timeout_s` (10 s by default), so a
            peer is heard about three times per timeout even when nobody is connected to it.
            Swarm-wide this costs O(N²) deliveries per interval: a longer peer timeout makes
            big swarms cheaper to run, and a dead peer slower to forget.
    """

    def __init__(
        self,
        node: Node,
        config: TopologyConfig,
        rng: random.Random,
        *,
        view: MembershipView | None = None,
        announcements: dict[str, Announcement] | None = None,
        tick_s: float = _TICK_S,
        reannounce_s: float | None = None,
    ) -> None:
        if reannounce_s is None:
            reannounce_s = config.peer_timeout_s / 3
        if tick_s <= 0 or reannounce_s <= 0:
            raise ValueError(f"tick_s and reannounce_s must be positive: {tick_s}, {reannounce_s}")
        self.node = node
        self.config = config
        self.rng = rng
        self.view = view if view is not None else MembershipView(config, node.peer_id)
        self._latest = announcements if announcements is not None else {}
        self._tick_s = tick_s
        self._reannounce_s = reannounce_s
        # Per signer: the highest gossipsub seqno seen, and when it arrived.
        self._seqnos: dict[str, tuple[int, float]] = {}
        self._changed = trio.Event()
        self._replays = 0
        self._late = 0
        self.relayed_deferred = 0  # draws that passed over peers we reach only through a relay
        self.connections = Connections(node, self.view, config, rng, tick_s=tick_s,
                                       on_change=self._notify)

    # -- queries ---------------------------------------------------------------------------

    def latest(self, peer_id: str) -> Announcement | None:
        """The newest announcement heard from `peer_id`, or None."""
        return self._latest.get(peer_id)

    def sample(self, k: int, *, exclude: Collection[str] = ()) -> list[Announcement]:
        """Announcements of `k` live peers drawn uniformly at random (fewer if fewer are live).

        Peers we reach only through a relay, whose hole punch failed, are drawn only when the
        others are too few: each fetch from them costs a relay's bandwidth and a relayed dial.
        `relayed_deferred` counts the draws that passed them over.
        """
        now, later = trio.current_time(), self.node.relayed_only() - set(exclude)
        drawn = self.view.sample(k, self.rng, now, exclude={*exclude, *later})
        if later and len(drawn) < k:
            taken = {*exclude, *(info.peer_id for info in drawn)}
            drawn += self.view.sample(k - len(drawn), self.rng, now, exclude=taken)
        elif later and any(self.view.get(p) is not None for p in later):
            self.relayed_deferred += 1
        return [self._latest[info.peer_id] for info in drawn if info.peer_id in self._latest]

    def live_peers(self) -> list[str]:
        """Ids of the peers heard from within the timeout, sorted."""
        return [info.peer_id for info in self.view.live(trio.current_time())]

    def reports(self) -> list[tuple[Announcement, float]]:
        """Each live peer's newest announcement (its telemetry with it) and its age in seconds,
        sorted by peer id. Self-reported figures: for operators, never for merge weights."""
        now, found = trio.current_time(), []
        for info in self.view.live(now):
            announcement = self._latest.get(info.peer_id)
            if announcement is not None:
                _, heard = self._seqnos.get(info.peer_id, (0, info.last_heard))
                found.append((announcement, max(0.0, now - heard)))
        return found

    def neighbours(self) -> list[str]:
        """Live peers we hold a connection to, sorted."""
        connected = set(self.node.connected_peers())
        return [peer for peer in self.live_peers() if peer in connected]

    def statistics(self) -> MembershipStatistics:
        """Counts describing the membership now."""
        view = self.view.statistics(trio.current_time())
        return MembershipStatistics(
            live=view.live, announced=view.announced, trusted=view.trusted,
            refused=view.refused, neighbours=len(self.neighbours()),
            connected=len(self.node.connected_peers()), replays=self._replays, late=self._late,
            dials=self.connections.dials, dial_failures=self.connections.dial_failures,
            bootstrap_failures=self.connections.bootstrap_failures,
        )

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; it is re-checked after every change and tick."""
        while not predicate():
            await self._changed.wait()

    # -- the service -----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Consume announcements, refresh liveness and keep connected; runs until cancelled.

        Readiness is signalled at once: a peer whose bootstrap is down keeps running (and
        retrying) instead of blocking its owner.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen)
            nursery.start_soon(self._refresh)
            nursery.start_soon(self.connections.maintain)
            nursery.start_soon(self._reannounce)
            task_status.started(self)

    async def _listen(self) -> None:
        async for heard in self.node.announcements:
            self.observe(heard)

    def observe(self, heard: Heard) -> Observation:
        """Feed one validated announcement into the view; replays are counted and dropped."""
        announcement, peer = heard.announcement, heard.announcement.peer
        now = trio.current_time()
        last, last_at = self._seqnos.get(peer, (-1, -math.inf))
        if heard.seqno == last:
            # py-libp2p can deliver one message twice when two copies race through validation,
            # so a repeat is not counted as hostile; it proves nothing either (an old copy
            # replayed after gossipsub's seen-cache expired looks the same): the view is kept.
            logger.debug("duplicate delivery of %s's message %d ignored", peer, heard.seqno)
            return Observation.REPLAY
        if heard.seqno < last:
            if now - last_at < self.config.peer_timeout_s:
                self._late += 1
                logger.debug("late delivery of %s's message %d (after %d)", peer, heard.seqno,
                             last)
                return Observation.REPLAY
            return self._replayed(announcement, f"sequence number {heard.seqno} < {last}")
        known = self.view.get(peer)
        if known is not None and known.version == announcement.version:
            # A fresh copy of what we know: the peer is alive and re-announced itself. The same
            # version with other bytes would let it show different adapters to different peers.
            previous = self._latest.get(peer)
            if previous is not None and (previous.digest, previous.samples) != (
                    announcement.digest, announcement.samples):
                self.node.rejected["equivocation"] += 1
                logger.warning("rejected equivocation: %s announced version %d twice with "
                               "different adapters", peer, announcement.version)
                return Observation.REPLAY
            self._record_seqno(peer, heard.seqno, now)
            self.view.observe(peer, now, addrs=self._usable(heard))
            self._keep(announcement)
            return Observation.REFRESHED
        # A higher signed seqno than one we kept proves the message fresh, so a peer that
        # expired here (our loop was late, or its re-announcements were lost) comes back even
        # when it re-announces the version it had: rounds do not publish, versions may not move.
        seen = self.view.observe(peer, now, addrs=self._usable(heard),
                                 version=announcement.version, samples=announcement.samples,
                                 fresh=peer in self._seqnos)
        if seen is Observation.REPLAY:
            return self._replayed(announcement, "a newer version was seen")
        if seen is Observation.REFUSED:  # no room: nothing of it is kept (see MembershipView)
            return seen
        self._record_seqno(peer, heard.seqno, now)
        if self._keep(announcement):
            logger.info("new peer %s (version %d)", peer, announcement.version)
        if seen is Observation.NEW:
            self._prune()  # its admission may have evicted another peer
        return seen

    def _usable(self, heard: Heard) -> list[str]:
        """The announced addresses we may dial, stored in the peerstore (see `remember`)."""
        announcement = heard.announcement
        previous = self._latest.get(announcement.peer)
        known = self.view.get(announcement.peer)
        if previous is not None and previous.addrs == announcement.addrs and known is not None:
            return list(known.addrs)
        return self.node.remember(announcement.peer, announcement.addrs, via=heard.via)

    def answered(self, peer: str) -> None:
        """`peer` answered a fetch: it is alive, whatever it served."""
        self.view.observe(peer, trio.current_time())

    def trust(self, peer: str) -> None:
        """`peer` served an adapter that passed validation: it keeps its place in the view."""
        self.view.trust(peer)

    def failed(self, peer: str) -> None:
        """A fetch from `peer` failed on the network: draws try it after the others for a while."""
        self.view.failed(peer, trio.current_time())

    def distrust(self, peer: str) -> None:
        """`peer` served something invalid: drop it from the view.

        A re-announcement with a fresh sequence number may bring it back, as a newcomer.
        """
        self.view.distrust(peer)
        self._prune()

    def _keep(self, announcement: Announcement) -> bool:
        """Store the newest announcement of its peer; True if the peer was unknown."""
        previous = self._latest.get(announcement.peer)
        self._latest[announcement.peer] = announcement
        self._notify()
        return previous is None

    def _replayed(self, announcement: Announcement, why: str) -> Observation:
        self._replays += 1
        self.node.rejected["replay"] += 1
        logger.info("rejected replay: version %d from %s (%s)", announcement.version,
                    announcement.peer, why)
        self._notify()
        return Observation.REPLAY

    async def _reannounce(self) -> None:
        """Publish our latest announcement again after `reannounce_s` of silence, until cancelled.

        Any publish resets the clock (the daemon publishes only when it joins). Every
        announcement reaches every member, so swarm-wide they cost O(N²) deliveries per
        interval: the reason to re-announce only after silence.
        """
        while True:
            quiet = trio.current_time() - self.node.published_at
            wait = self._reannounce_s * self.rng.uniform(*_REANNOUNCE_SPREAD) - quiet
            if wait > 0:
                await trio.sleep(wait)
            elif self.node.current is not None:
                try:
                    await self.node.publish(self.node.current)
                except GossipError as exc:
                    # Never fatal: the next interval tries again.
                    logger.warning("re-announcement failed (%s); retrying in %.0f s", exc,
                                   self._reannounce_s)
                    await trio.sleep(self._reannounce_s)
            else:
                await trio.sleep(self._reannounce_s)

    async def _refresh(self) -> None:
        """Connected members are alive; silent ones expire; their records go with them."""
        while True:
            now = trio.current_time()
            for peer in self.node.topic_peers():
                self.view.observe(peer, now)
                self.view.reached(peer)
            self.view.expire(now)
            self._prune()
            self._forget_oldest_seqnos()
            self._notify()
            await trio.sleep(self._tick_s)

    def _prune(self) -> None:
        """Drop every record of peers that left the view (expired or evicted), peerstore too.

        Per-peer state is bounded by what the view admits: a flood of identities cannot grow it.
        """
        for peer in [p for p in self._latest if p not in self.view]:
            del self._latest[peer]
            self.node.forget(peer)
        self.connections.prune()

    def _record_seqno(self, peer: str, seqno: int, now: float) -> None:
        """Kept in arrival order (re-inserted at the end), so the oldest come first."""
        self._seqnos.pop(peer, None)
        self._seqnos[peer] = (seqno, now)

    def _forget_oldest_seqnos(self) -> None:
        """Keep the seqnos of departed peers too (they prove a later message fresh), bounded.

        The dict is in arrival order, so the oldest are its first keys: no sort per tick (with
        a thousand signers, sorting them every second was 14 % of a 1,000-peer process).
        """
        excess = len(self._seqnos) - _SEQNOS_PER_VIEW_SLOT * self.config.view_size
        if excess > 0:
            for peer in list(itertools.islice(self._seqnos, excess)):
                del self._seqnos[peer]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
