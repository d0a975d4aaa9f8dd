"""Pure membership and neighbour-sampling logic: the clock and the RNG are passed in."""

from __future__ import annotations

from topology.config import TopologyConfig
from topology.discovery import backoff_delay, peers_to_dial
from topology.errors import InvalidArgument, TopologyConfigError, TopologyError
from topology.view import NO_VERSION, MembershipView, Observation, PeerInfo, ViewStatistics

__all__ = [
    "NO_VERSION",
    "InvalidArgument",
    "MembershipView",
    "Observation",
    "PeerInfo",
    "TopologyConfig",
    "TopologyConfigError",
    "TopologyError",
    "ViewStatistics",
    "backoff_delay",
    "peers_to_dial",
]
