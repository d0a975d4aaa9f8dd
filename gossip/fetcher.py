"""One fetch on a live host: the deadlines its link earned, the dial if needed, the hang-up.

`GossipNode.fetch` keeps the download slots and the counters; this module opens the stream,
hands `gossip.transfer.fetch_adapter` the limits that `gossip.linkstats` gives the neighbour,
and closes a connection that was opened only for this fetch.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from gossip.config import NodeConfig
from gossip.linkstats import LinkStats
from gossip.swarm import TRANSFER_PROTOCOL
from gossip.transfer import Fetched, Patience, fetch_adapter
from gossip.wire import Announcement, FetchHeader

__all__ = ["fetch_from", "link_stats", "patience"]

logger = logging.getLogger(__name__)

_TRANSFER = TProtocol(TRANSFER_PROTOCOL)


def cap_s(config: NodeConfig) -> float:
    """The most one fetch may take: `max_fetch_s`, never below `fetch_timeout_s`."""
    return max(config.max_fetch_s, config.fetch_timeout_s)


def link_stats(config: NodeConfig) -> LinkStats:
    """The node's link estimates: budgets between `fetch_timeout_s` and the cap."""
    return LinkStats(floor_s=config.fetch_timeout_s, cap_s=cap_s(config))


def patience(config: NodeConfig, links: LinkStats, peer: str) -> Patience:
    """The body limits of a fetch from `peer` (the rule of `gossip.transfer`'s docstring)."""
    return Patience(budget=partial(links.deadline_for, peer), cap_s=cap_s(config),
                    stall_s=config.stall_s, min_rate=config.min_fetch_rate)


async def fetch_from(host: Any, dial: Callable[[str], Awaitable[None]],
                     announcement: Announcement, *, swarm: bytes, config: NodeConfig,
                     links: LinkStats, started: float,
                     check: Callable[[FetchHeader], None]) -> Fetched:
    """Pull `announcement`'s adapter from its peer, within the limits its link earned.

    Args:
        dial: connects to a peer at its remembered addresses (with per-address backoff).
        started: trio time the fetch started, its wait for a download slot included.
        check: binds the header to the signed announcement before the body is read.
    """
    peer = ID.from_base58(announcement.peer)
    # A connection opened only for this fetch is closed after it: kept, every peer ends up
    # connected to most of the swarm, whose upkeep then costs a core (see the README).
    transient = peer not in host.get_connected_peers()

    async def open_stream() -> Any:
        if peer not in host.get_connected_peers():
            await dial(announcement.peer)
        return await host.new_stream(peer, [_TRANSFER])

    try:
        return await fetch_adapter(
            open_stream, announcement.peer, swarm, max_bytes=config.max_adapter_bytes,
            timeout_s=config.fetch_timeout_s, check=check,
            patience=patience(config, links, announcement.peer), started=started,
        )
    finally:
        if transient:
            await hang_up(host, peer)


async def hang_up(host: Any, peer: ID) -> None:
    """Close our connection to `peer`, shielded and bounded."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await host.disconnect(peer)
        except Exception as exc:  # closing a broken connection may raise anything
            logger.debug("closing the connection to %s: %s", peer, exc)
