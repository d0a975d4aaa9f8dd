"""`NormReference`: the scale a neighbour's adapter is bounded by, which a liar cannot inflate.

A bound relative to our own norm grows with every update it lets in: a liar serving just under
20 x our norm, and claiming the sample cap, multiplies our norm by 13.6 each round (see
`merge.attack_sim`). The norms that our neighbours served recently do not move when a liar moves
us, and their lower median moves only if liars served more than half of them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from merge.tensors import floored_norm, norm_floor

# Accepted norms remembered: with a fanout of 2-3, the last 5-8 rounds. Recent enough to follow
# honest adapters as training grows them (a bound of 20 x leaves slack for the lag), long enough
# that a neighbour heard in one round is a small share of the window.
REFERENCE_WINDOW = 16

# Until the window holds this many norms, a liar heard alone in our first round would be its
# median: the scale is then never above our own norm, the scale used before any history.
MIN_HISTORY = 3


@dataclass(frozen=True)
class ReferenceStatistics:
    """What a `NormReference` holds."""

    size: int
    window: int
    median: float | None  # lower median of the remembered norms; None while there are none


class NormReference:
    """The robust scale for `validate_update`: the lower median of recently accepted norms.

    One per peer. Each round: `scale(own)` once, pass it as `reference=` to every
    `validate_update`, then `update` with the norms of the neighbours accepted (what
    `validate_update` returned for them).

    Args:
        window: how many of the most recent accepted norms the median is taken over.
    """

    def __init__(self, window: int = REFERENCE_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._window = window
        self._norms: deque[float] = deque(maxlen=window)

    def scale(self, own: Mapping[str, torch.Tensor]) -> float:
        """The scale to bound neighbours of `own` by this round, at least `norm_floor(own)`.

        Our own floored norm while nothing was accepted yet; afterwards the lower median of the
        remembered norms (capped at our own floored norm while fewer than `MIN_HISTORY`). The
        lower median, not the mean of the middle two: with one honest neighbour and one liar per
        round, half the window is the liar's, and the lower median is still an honest norm.
        """
        own_scale = floored_norm(own)
        if not self._norms:
            return own_scale
        median = _lower_median(self._norms)
        if len(self._norms) < MIN_HISTORY:
            median = min(median, own_scale)
        return max(median, norm_floor(own))

    def update(self, norms: Iterable[float]) -> None:
        """Remember the norms of the neighbours just accepted (the oldest fall out of the window).

        Raises:
            ValueError: a norm is negative or not finite (a validated neighbour has neither).
        """
        for norm in norms:
            if not (math.isfinite(norm) and norm >= 0.0):
                raise ValueError(f"an accepted norm must be finite and >= 0, got {norm}")
            self._norms.append(float(norm))

    def statistics(self) -> ReferenceStatistics:
        """How many norms are remembered, and their lower median."""
        median = _lower_median(self._norms) if self._norms else None
        return ReferenceStatistics(size=len(self._norms), window=self._window, median=median)


def _lower_median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]
