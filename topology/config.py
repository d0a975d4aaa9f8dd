"""Configuration of the membership view and of the dialling policy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from topology.errors import TopologyConfigError

# Measured (README, "Settling"): 8 reached 1 % in 3 settling rounds at 8, 16 and 64 peers, on the
# bytes of fanout 4, which took 4 to 6; fanout 2 did not reach it in 8.
DEFAULT_SETTLE_FANOUT = 8


@dataclass(frozen=True)
class TopologyConfig:
    """How many peers a node knows, talks to and keeps connections with."""

    fanout: int = field(
        default=2, metadata={"help": "neighbours fetched from per round (0: train alone)"}
    )
    settle_fanout: int = field(default=0, metadata={
        "help": "neighbours fetched per settling round (--settle-rounds): those train nothing, "
        "so they can afford more fetches, and each pulls the swarm closer together (0: 8, "
        "the fastest to consensus in the README's table, within --view-size and at least "
        "--fanout; 0 with --fanout 0)"})
    view_size: int = field(default=64, metadata={"help": "most peers kept in the membership view"})
    peer_timeout_s: float = field(
        default=30.0, metadata={"help": "a peer silent for longer than this is dropped"}
    )
    target_connections: int = field(
        default=4, metadata={"help": "below this many connected live peers, dial more known ones"}
    )
    tick_s: float = field(default=1.0, metadata={
        "help": "how often liveness is refreshed and connections topped up; keep it well below "
        "--peer-timeout (the simulator raises both with the peers of one process)"})

    def __post_init__(self) -> None:
        if self.view_size < 1:
            raise TopologyConfigError(f"view_size must be at least 1, got {self.view_size}")
        if not 0 <= self.fanout <= self.view_size:
            raise TopologyConfigError(
                f"fanout must be in 0..view_size ({self.view_size}), got {self.fanout}"
            )
        if not 0 <= self.settle_fanout <= self.view_size:
            raise TopologyConfigError(
                f"settle_fanout must be in 0..view_size ({self.view_size}), "
                f"got {self.settle_fanout}"
            )
        # NaN would make every liveness comparison false, so a NaN timeout must not slip through.
        if not (math.isfinite(self.peer_timeout_s) and self.peer_timeout_s > 0):
            raise TopologyConfigError(
                f"peer_timeout_s must be a positive number of seconds, got {self.peer_timeout_s}"
            )
        if not (math.isfinite(self.tick_s) and self.tick_s > 0):
            raise TopologyConfigError(
                f"tick_s must be a positive number of seconds, got {self.tick_s}")
        if not 0 <= self.target_connections <= self.view_size:
            raise TopologyConfigError(
                f"target_connections must be in 0..view_size ({self.view_size}), "
                f"got {self.target_connections}"
            )

    @property
    def settling_fanout(self) -> int:
        """Neighbours fetched per settling round: `settle_fanout`, or when it is 0,
        `DEFAULT_SETTLE_FANOUT` within the view and at least `fanout` (none when `fanout` is 0:
        a peer that trains alone settles alone)."""
        if self.settle_fanout or not self.fanout:
            return self.settle_fanout
        return max(self.fanout, min(DEFAULT_SETTLE_FANOUT, self.view_size))
