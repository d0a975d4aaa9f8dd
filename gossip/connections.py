"""Keeping a peer connected: dial live members up to a target, rejoin through the bootstrap.

While fewer than `target_connections` live peers are connected, random live ones are dialled
(`topology.peers_to_dial`), each with its own backoff after failures. While no peer at all is
connected, the bootstrap addresses are dialled again, backing off, every failure logged. Each
peer we connect to is asked at once for the announcements it holds (`gossip.catchup`), so
that a joiner need not wait for the swarm's re-announcements to know it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from gossip.errors import GossipError
from gossip.nodes import Node
from topology.config import TopologyConfig
from topology.discovery import backoff_delay, peers_to_dial
from topology.view import MembershipView

logger = logging.getLogger(__name__)

_REJOIN_BASE_S, _REJOIN_CAP_S = 0.5, 30.0
_REDIAL_BASE_S, _REDIAL_CAP_S = 1.0, 60.0


class Connections:
    """The dialling half of `Membership`: it owns the redial backoff and the dial counters."""

    def __init__(self, node: Node, view: MembershipView, config: TopologyConfig,
                 rng: random.Random, *, tick_s: float, on_change: Callable[[], None]) -> None:
        self.node = node
        self.view = view
        self.config = config
        self.rng = rng
        self.tick_s = tick_s
        self.on_change = on_change  # wakes `Membership.wait_until` after a new connection
        self._redial: dict[str, tuple[int, float]] = {}  # peer -> (failures, not before)
        self.dials = 0
        self.dial_failures = 0
        self.bootstrap_failures = 0
        self._nursery: trio.Nursery | None = None  # where catch-ups run, beside the dialling

    def prune(self) -> None:
        """Forget the backoff of peers that left the view."""
        for peer in [p for p in self._redial if p not in self.view]:
            del self._redial[peer]

    async def maintain(self) -> None:
        """Top up connections every tick; when cut off, rejoin through the bootstrap peers."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._maintain()

    def _catch_up(self, peer: str) -> None:
        """Ask `peer`, just connected, for what it knows of the swarm (in the background)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._ask, peer)

    async def _ask(self, peer: str) -> None:
        try:
            heard = await self.node.catch_up(peer)
        except GossipError as exc:
            logger.debug("no catch-up from %s: %s", peer, exc)
        else:
            logger.debug("caught up from %s: %d announcements", peer, heard)

    async def _maintain(self) -> None:
        attempt = 0
        was_connected = False
        while True:
            await self._dial_more()
            connected = bool(self.node.connected_peers())
            if connected or not self.node.config.bootstrap:
                attempt = 0
            else:
                if was_connected:
                    logger.warning("lost every connection; rejoining through the bootstrap peers")
                error = await self._rejoin()
                connected = error is None
                if error is not None:
                    self.bootstrap_failures += 1
                    delay = backoff_delay(attempt, self.rng, base_s=_REJOIN_BASE_S,
                                          cap_s=_REJOIN_CAP_S)
                    attempt += 1
                    logger.warning("cannot reach the swarm: no bootstrap peer answered "
                                   "(attempt %d: %s); retrying in %.1f s", attempt, error, delay)
                    was_connected = False
                    await trio.sleep(delay)
                    continue
            was_connected = connected
            await trio.sleep(self.tick_s)

    async def _dial_more(self) -> None:
        """Dial random live peers until `target_connections` live peers are connected."""
        now = trio.current_time()
        connected = set(self.node.connected_peers())
        chosen = [
            info.peer_id
            for info in peers_to_dial(self.view, connected, now, self.config, self.rng)
            if self._redial.get(info.peer_id, (0, now))[1] <= now
        ]
        async with trio.open_nursery() as nursery:
            for peer in chosen:
                nursery.start_soon(self._dial_one, peer)

    async def _dial_one(self, peer: str) -> None:
        self.dials += 1
        try:
            await self.node.dial(peer)
        except GossipError as exc:
            self.dial_failures += 1
            failures = self._redial.get(peer, (0, 0.0))[0]
            delay = backoff_delay(failures, self.rng, base_s=_REDIAL_BASE_S, cap_s=_REDIAL_CAP_S)
            self._redial[peer] = (failures + 1, trio.current_time() + delay)
            self.view.failed(peer, trio.current_time())
            logger.debug("dial %s failed (%s); not before %.1f s", peer, exc, delay)
            return
        self._redial.pop(peer, None)
        self.view.observe(peer, trio.current_time())
        self.view.reached(peer)
        logger.debug("connected to %s", peer)
        self._catch_up(peer)
        self.on_change()

    async def _rejoin(self) -> str | None:
        """Dial every bootstrap address at once; None if one answered, else the last error."""
        errors: list[str] = []

        async def dial(addr: str) -> None:
            try:
                peer = await self.node.connect(addr)
            except GossipError as exc:
                errors.append(f"{addr}: {exc}")
            else:
                logger.info("joined the swarm through %s", addr)
                self._catch_up(peer)

        async with trio.open_nursery() as nursery:
            for addr in self.node.config.bootstrap:
                nursery.start_soon(dial, addr)
        if len(errors) < len(self.node.config.bootstrap):
            self.on_change()
            return None
        return errors[-1]
