"""`RoundGate`: peers of one process settle together, in lock step (`simulate.py`).

Peers that share a process share one model lock, so a training round of N peers lasts about
N training steps, and the peers drift apart in time: at 1,000 peers the first finished its 9
rounds at 24 minutes and the last at 68, and a peer that has finished merges no more. A
settling round paced by the peer's own last training round then fetches from neighbours that
are still training, or that have stopped merging. Behind a gate, round r of a member starts
once every member still in has finished round r - 1: the first settling round starts after
the last training round of the slowest peer. Then each member announces (serves) what it merged
in round r - 1 and waits again, until every member has announced round r, before it fetches:
a member whose announcement was ready first would otherwise fetch from neighbours still
serving what they had before round r - 1's merge (one slow announcer is enough; see
tests/test_gate.py).

The gate holds no peer: members are any hashable keys, with how far each has come. A
member leaves when it stops, crashes or is done, so the gate never waits for it; and a wait is
bounded (`patience` times the longest round a member reported, at least `floor_s`). A member
that a wait gave up on is late: no wait counts it until it has caught up with the rounds waited
for, so a stuck peer delays the others once, by that bound, and never hangs the swarm.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass

import trio

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateStatistics:
    """What a gate did: its members now, the waits it opened and those that timed out."""

    members: int
    late: int  # members a wait gave up on, not waited for until they catch up
    opened: int  # waits (for rounds finished or announced) that ended with every member there
    timed_out: int  # waits that ended at the bound, the stragglers not caught up
    waited_s: float  # seconds spent waiting, over every wait
    longest_round_s: float  # the longest round a member reported (sets the bound)


class RoundGate:
    """Lock step for the peers of one process: `wait_for(n)` returns once every member has
    finished `n` rounds, `wait_announced(n)` once every member has announced its round `n`, or
    either when the bound runs out."""

    def __init__(self, *, patience: float = 4.0, floor_s: float = 60.0) -> None:
        """
        Args:
            patience: how many of the longest rounds a wait may last before it gives up.
            floor_s: the least a wait may last (before any round has been reported, too).
        """
        if patience <= 0 or floor_s < 0:
            raise ValueError(f"patience must be > 0 and floor_s >= 0, got {patience}, {floor_s}")
        self.patience = patience
        self.floor_s = floor_s
        # member -> how far it has come, in half rounds: 2n once it has finished n rounds,
        # 2n + 1 once it has also announced round n + 1.
        self._steps: dict[Hashable, int] = {}
        self._late: set[Hashable] = set()  # members a wait gave up on
        self._frontier = 0  # the furthest a wait has asked for, in half rounds
        self._changed = trio.Event()
        self._longest_s = 0.0
        self._opened = self._timed_out = 0
        self._waited_s = 0.0

    def join(self, member: Hashable, done: int) -> None:
        """Add `member`, which has finished `done` rounds (a restarted peer: its resumed ones)."""
        self._steps[member] = 2 * done
        self._wake()

    def finished(self, member: Hashable, done: int, took_s: float) -> None:
        """`member` has finished `done` rounds, the last of them in `took_s` seconds."""
        self._longest_s = max(self._longest_s, took_s)
        self._reached(member, 2 * done)

    def announced(self, member: Hashable, round_: int) -> None:
        """`member` serves and has announced its adapter for round `round_` (it fetches next)."""
        self._reached(member, 2 * round_ - 1)

    def leave(self, member: Hashable) -> None:
        """`member` stopped, crashed or is done: wait for it no more."""
        self._late.discard(member)
        if self._steps.pop(member, None) is not None:
            self._wake()

    def bound_s(self) -> float:
        """How long a wait may last now."""
        return max(self.floor_s, self.patience * self._longest_s)

    def behind(self, rounds: int) -> int:
        """How many members, late ones aside, have finished fewer than `rounds` rounds."""
        return self._behind(2 * rounds)

    async def wait_for(self, rounds: int) -> bool:
        """Wait until every member, late ones aside, has finished `rounds` rounds.

        Returns:
            True once they have; False if the bound ran out first (logged and counted).
        """
        return await self._wait(2 * rounds, f"finished {rounds} rounds")

    async def wait_announced(self, round_: int) -> bool:
        """Wait until every member, late ones aside, has announced its round `round_`.

        Returns:
            True once they have; False if the bound ran out first (logged and counted).
        """
        return await self._wait(2 * round_ - 1, f"announced round {round_}")

    def statistics(self) -> GateStatistics:
        return GateStatistics(members=len(self._steps), late=len(self._late),
                              opened=self._opened, timed_out=self._timed_out,
                              waited_s=round(self._waited_s, 3),
                              longest_round_s=round(self._longest_s, 3))

    def _reached(self, member: Hashable, steps: int) -> None:
        if member in self._steps:
            self._steps[member] = max(self._steps[member], steps)
        if member in self._late and steps >= self._frontier:
            self._late.discard(member)  # caught up: waited for again
        self._wake()

    def _behind(self, steps: int) -> int:
        return sum(done < steps for member, done in self._steps.items()
                   if member not in self._late)

    async def _wait(self, steps: int, what: str) -> bool:
        started, self._frontier = trio.current_time(), max(self._frontier, steps)
        with trio.move_on_after(self.bound_s()) as scope:
            while self._behind(steps):
                await self._changed.wait()
                # A longer round reported meanwhile lengthens the bound of this wait too.
                scope.deadline = started + self.bound_s()
        self._waited_s += trio.current_time() - started
        if scope.cancelled_caught:
            self._timed_out += 1
            late = [member for member, done in self._steps.items()
                    if done < steps and member not in self._late]
            self._late.update(late)
            self._wake()  # the others waiting for them go on too
            logger.warning("round gate: %d of %d peers had not %s after %.0f s; going on "
                           "without them until they catch up", len(late), len(self._steps),
                           what, trio.current_time() - started)
            return False
        self._opened += 1
        return True

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
