"""Input counts of the coordinate-wise rules: what they cut, and how many inputs they wait for.

Plain arithmetic on `trim` and `trim_fraction`, apart from the rules, so that the registry can
say what a rule needs without importing the rule.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

logger = logging.getLogger(__name__)

# Neighbours a full buffer holds (16 inputs with self). Each is a distinct neighbour heard
# lately, so with a quarter of the swarm bad about 4 of them are, and floor(0.25 x 16) = 4 is
# what `trimmed-mean` cuts per end; over a handful of inputs the bad share strays far from the
# swarm's (2 of 4 is not rare at a quarter).
FRACTION_CAPACITY = 15

# Bad neighbours a buffered merge must outvote before it may run at all: a median of self and
# two neighbours is decided by the neighbours when both are bad (measured with 2 attackers among
# 8 peers: honest loss 7.4 against 3.06 clean).
MIN_TOLERANCE = 2


class TrimSettings(Protocol):
    """The `MergeConfig` fields this arithmetic reads (a protocol: no import of the config)."""

    @property
    def trim(self) -> int: ...

    @property
    def trim_fraction(self) -> float: ...


def trim_count(n: int, config: TrimSettings) -> int:
    """Values `trimmed-mean` cuts from each end of n: max(trim, floor(trim_fraction n)), but at
    most (n - 1) // 2, so that at least one value is left."""
    # The epsilon keeps a product such as 0.29 * 100 = 28.999... from flooring one short.
    wanted = max(config.trim, math.floor(config.trim_fraction * n + 1e-9))
    cut = min(wanted, max(n - 1, 0) // 2)
    if cut < wanted:
        logger.debug("trimmed-mean over %d inputs can trim only %d of %d per end", n, cut, wanted)
    return cut


def buffer_capacity(config: TrimSettings) -> int:
    """Neighbours a buffered rule keeps: max(FRACTION_CAPACITY, 2 trim + 3), enough that their
    bad share tracks the swarm's, and room for a median to outvote `trim`.

    Over a full buffer with the defaults, `trimmed-mean` cuts trim_count(16) = 4 per end, a
    quarter, and a median outvotes up to 7.
    """
    return max(FRACTION_CAPACITY, 2 * config.trim + 3)


def min_buffered(config: TrimSettings) -> int:
    """Neighbours buffered before a coordinate-wise rule merges at all.

    With f0 = max(trim, MIN_TOLERANCE): the smallest m >= 2 f0 at which the trimmed mean over
    self and m neighbours cuts at least f0 per end, trim_count(m + 1) >= f0 (with trim 1 and
    trim_fraction 0.25: m = 7, 8 inputs, 2 cut per end); 2 f0, an honest majority of 2 f0 + 1
    inputs for a median, when no m up to `buffer_capacity` qualifies (trim_fraction near 0).
    """
    least = max(config.trim, MIN_TOLERANCE)
    return next(
        (m for m in range(2 * least, buffer_capacity(config) + 1)
         if trim_count(m + 1, config) >= least),
        2 * least,
    )


def no_minimum(config: TrimSettings) -> int:
    """Neighbours a rule over one round's fetches waits for: none (alone, it keeps its own)."""
    return 0
