"""What a round merges: this round's accepted adapters, or, for coordinate-wise rules, a buffer.

Coordinate-wise rules need more inputs than one round's fetches: they merge over a buffer of
the latest adapter of each recently heard neighbour, sized so that the share of bad ones in it
tracks the swarm's (`--trim-fraction`). A median of self and two neighbours is decided by the
neighbours when both are bad.
"""

from __future__ import annotations

import logging

from merge.buffer import NeighbourBuffer
from merge.config import MergeConfig
from merge.quorum import buffer_capacity
from merge.registry import rule
from merge.types import Contribution

logger = logging.getLogger(__name__)


class MergeInputs:
    """Chooses the neighbours' contributions each round's merge takes."""

    def __init__(self, config: MergeConfig) -> None:
        needs = rule(config.rule)
        self.rule = config.rule
        self.buffered = needs.buffered
        self.buffer = NeighbourBuffer(buffer_capacity(config), max_age=config.max_age)
        self.min_buffered = needs.min_neighbours(config)

    def choose(self, accepted: list[Contribution], *, version: int) -> list[Contribution]:
        """The contributions to merge with ours at `version`; empty when the round merges none."""
        if not self.buffered:
            return accepted
        for contribution in accepted:
            self.buffer.put(contribution, now=version)
        buffered = self.buffer.contributions(now=version)
        if not accepted or len(buffered) < self.min_buffered:
            logger.info("%s waits for %d buffered neighbours before merging (has %d)",
                        self.rule, self.min_buffered, len(buffered))
            return []
        return buffered
