"""Who gets into a full membership view, who makes room, and in which order the rest is drawn.

Identities are free, so admission (as in Brahms and SecureCyclon) protects what a flood cannot
fake: seniority, trust earned by serving valid adapters, and address diversity.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from topology.backoff import backoff_ceiling
from topology.config import TopologyConfig

if TYPE_CHECKING:
    from topology.view import PeerInfo

# At most view_size / this many untrusted members may share one public address prefix.
PER_PREFIX_SHARE = 8
# A peer whose fetch failed is drawn after the others for this long, doubling with each
# failure in a row: long enough that identities that never serve sink, short enough that an
# honest peer which failed once (not yet dialable, or timed out on a loaded machine) comes back.
RETRY_BASE_S, RETRY_CAP_S = 30.0, 600.0


def retry_after_s(failures: int) -> float:
    """How long a peer with `failures` failed fetches in a row is drawn after the others."""
    return backoff_ceiling(failures - 1, RETRY_BASE_S, RETRY_CAP_S)


def per_prefix_cap(config: TopologyConfig) -> int:
    """How many untrusted members one public /24 (IPv6: /48) may hold."""
    return max(2, config.view_size // PER_PREFIX_SHARE)


def eviction_candidate(peers: Iterable[PeerInfo],
                       is_live: Callable[[PeerInfo], bool]) -> PeerInfo | None:
    """The silent member heard longest ago, else the newest untrusted one (ties: smaller id).

    None when every member is live and trusted: the newcomer is refused.
    """
    members = list(peers)
    silent = [info for info in members if not is_live(info)]
    if silent:
        return min(silent, key=lambda info: (info.last_heard, info.peer_id))
    untrusted = [info for info in members if not info.trusted]
    if not untrusted:
        return None
    return min(untrusted, key=lambda info: (-info.admitted, info.peer_id))


def draw_rank(info: PeerInfo, now: float) -> tuple[int, bool]:
    """Draw order of untrusted peers: fewer failed fetches first (failures whose retry time
    has come count as none), then peers a host answered for first."""
    failures = info.failures if now < info.retry_at else 0
    return (failures, not info.reached)


def public_prefix(addrs: Sequence[str]) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) network of a peer's first public address, else None.

    Loopback and private addresses are exempt: a LAN or a test swarm shares one prefix.
    """
    for addr in addrs:
        parts = addr.split("/")
        for proto, value in zip(parts[1::2], parts[2::2], strict=False):
            if proto not in ("ip4", "ip6"):
                continue
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                continue
            if ip.is_global:
                bits = 24 if ip.version == 4 else 48
                return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))
    return None
