"""Bootstrap and rediscovery policy: when to re-dial, and whom to dial.

Both functions are pure: the daemon owns the clock, the sleeping and the dialling, and asks
here only for decisions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection

from topology.backoff import backoff_ceiling
from topology.config import TopologyConfig
from topology.errors import InvalidArgument
from topology.view import MembershipView, PeerInfo


def backoff_delay(
    attempt: int, rng: random.Random, *, base_s: float = 0.5, cap_s: float = 30.0
) -> float:
    """Delay before re-dialling after `attempt` failed tries: exponential backoff, full jitter.

    The delay is drawn uniformly from ``[0, min(cap_s, base_s * 2**attempt)]``. Drawing the
    whole interval (rather than adding a little noise to the ceiling) spreads out peers that
    lost the same bootstrap node at the same moment, so they do not all come back in lockstep.

    Args:
        attempt: failed tries so far; 0 before the first retry.
        rng: the source of randomness.
        base_s: ceiling of the first delay, in seconds.
        cap_s: largest ceiling, in seconds, however many tries failed.

    Returns:
        The delay in seconds, in ``[0, cap_s]``.

    Raises:
        InvalidArgument: `attempt` is negative, or the delays are not ``0 < base_s <= cap_s``.
    """
    if attempt < 0:
        raise InvalidArgument(f"attempt must be >= 0, got {attempt}")
    if not (math.isfinite(cap_s) and 0 < base_s <= cap_s):
        raise InvalidArgument(f"need 0 < base_s <= cap_s (finite), got {base_s} and {cap_s}")
    return rng.uniform(0.0, backoff_ceiling(attempt, base_s, cap_s))


def peers_to_dial(
    view: MembershipView,
    connected: Collection[str],
    now: float,
    config: TopologyConfig,
    rng: random.Random,
) -> list[PeerInfo]:
    """Choose known live peers to dial so that the connected live peers reach the target.

    Args:
        view: the membership view.
        connected: ids of the peers this node holds a connection to now.
        now: the caller's clock, in seconds.
        config: `target_connections` is the number of connected live peers to aim for.
        rng: the source of randomness; picking at random (not by id or age) keeps the swarm's
            connection graph from concentrating on the same few peers.

    Returns:
        Live, unconnected peers that have at least one address, in the order to dial them;
        empty when the target is already met.
    """
    live = view.live(now)
    missing = config.target_connections - sum(1 for info in live if info.peer_id in connected)
    if missing <= 0:
        return []
    candidates = [info for info in live if info.peer_id not in connected and info.addrs]
    return rng.sample(candidates, min(missing, len(candidates)))
