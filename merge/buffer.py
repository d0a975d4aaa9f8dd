"""`NeighbourBuffer`: the latest adapter of each recently heard neighbour, for the robust rules.

A coordinate-wise median or trimmed mean over one round's two or three fetches means nothing:
it needs at least 2f + 1 inputs to outvote f bad ones. The daemon puts every accepted adapter
here and passes the buffer's contents to the rule, so the rule sees up to `capacity` distinct
neighbours heard over the last few rounds, each counted once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from merge.types import Contribution


@dataclass(frozen=True)
class BufferStatistics:
    """What a `NeighbourBuffer` holds and has dropped so far."""

    size: int
    capacity: int
    evicted: int  # dropped to make room for another neighbour
    expired: int  # dropped for being older than max_age


@dataclass(frozen=True)
class _Entry:
    contribution: Contribution
    put_at: int  # our own version when it arrived


class NeighbourBuffer:
    """Bounded store of the latest contribution of each neighbour, oldest evicted first.

    Ages are kept current: a contribution put at our version v with age a is returned at our
    version `now` with age a + (now - v).

    Args:
        capacity: neighbours kept; at least 2f + 3 to let a rule tolerate f bad ones
            (see `merge.quorum.buffer_capacity`, or `for_tolerance`).
        max_age: contributions older than this are not returned and `expire` drops them
            (None: kept until evicted).
    """

    def __init__(self, capacity: int, *, max_age: int | None = None) -> None:
        if capacity < 3:
            raise ValueError(f"capacity must be at least 3 (2f + 3 with f = 0), got {capacity}")
        if max_age is not None and max_age < 0:
            raise ValueError(f"max_age must be >= 0 or None, got {max_age}")
        self._capacity = capacity
        self._max_age = max_age
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._evicted = 0
        self._expired = 0

    @classmethod
    def for_tolerance(cls, bad: int, *, max_age: int | None = None) -> NeighbourBuffer:
        """A buffer of capacity 2 * bad + 3, enough for a median to outvote `bad` neighbours."""
        if bad < 0:
            raise ValueError(f"the number of tolerated bad neighbours must be >= 0, got {bad}")
        return cls(2 * bad + 3, max_age=max_age)

    @property
    def capacity(self) -> int:
        """Most neighbours kept."""
        return self._capacity

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer: object) -> bool:
        return peer in self._entries

    def put(self, contribution: Contribution, *, now: int) -> None:
        """Keep `contribution` as its sender's latest, evicting the oldest neighbour when full.

        Args:
            contribution: an accepted (validated) neighbour adapter; its `peer` must be set.
            now: our own adapter version at this moment.
        """
        if not contribution.peer:
            raise ValueError("a buffered contribution needs its sender's peer id")
        # Re-putting a neighbour refreshes it: it moves to the young end.
        self._entries.pop(contribution.peer, None)
        self._entries[contribution.peer] = _Entry(contribution, now)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
            self._evicted += 1

    def contributions(self, *, now: int) -> list[Contribution]:
        """The buffered contributions, oldest first, with ages advanced to our version `now`."""
        result = []
        for entry in self._entries.values():
            age = entry.contribution.age + max(now - entry.put_at, 0)
            if self._max_age is None or age <= self._max_age:
                result.append(replace(entry.contribution, age=age))
        return result

    def expire(self, *, now: int) -> int:
        """Drop contributions older than `max_age` at our version `now`; return how many."""
        if self._max_age is None:
            return 0
        stale = [peer for peer, entry in self._entries.items()
                 if entry.contribution.age + max(now - entry.put_at, 0) > self._max_age]
        for peer in stale:
            del self._entries[peer]
        self._expired += len(stale)
        return len(stale)

    def discard(self, peer: str) -> bool:
        """Forget `peer` (e.g. it left the view); return whether it was held."""
        return self._entries.pop(peer, None) is not None

    def statistics(self) -> BufferStatistics:
        """Current size and counters."""
        return BufferStatistics(size=len(self._entries), capacity=self._capacity,
                                evicted=self._evicted, expired=self._expired)
