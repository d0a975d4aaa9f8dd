"""Churn for the simulator: kill peers, restart them from their data folders, check resumes.

A churned peer is killed once it has completed its planned round (a crash: no final checkpoint,
no goodbye) and started again `downtime_s` later with the same config, so with the same data
folder: the same identity key and its last checkpoint. The daemon resumes `round` and `version`
from that checkpoint, so the restarted peer still stops after `--rounds` rounds in total. Peer
0 is never churned: it is the bootstrap address the others (re)join through.

`plan_churn` is pure; `Churn` drives any backend (`scripts.backends.Backend`: SIGKILL for a
process, `Peer.crash` in process) from the watch loop's ticks and owns no task.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from scripts.backends import Backend
from scripts.simreport import read_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChurnPlan:
    """Which peers (by index) are killed, each after how many completed rounds."""

    kill_after: dict[int, int] = field(default_factory=dict)
    downtime_s: float = 5.0

    def only(self, indices: Sequence[int]) -> ChurnPlan:
        """The part of the plan for the peers `indices` (a worker churns its own peers)."""
        return ChurnPlan({i: n for i, n in self.kill_after.items() if i in indices},
                         self.downtime_s)


def plan_churn(peers: int, fraction: float, *, rounds: int, seed: int,
               downtime_s: float = 5.0) -> ChurnPlan:
    """Draw the churned peers and their kill rounds, reproducibly for a seed.

    `round(fraction * peers)` peers, at least one when `fraction > 0`, never peer 0, so at most
    `peers - 1`; each is killed after completing a round drawn from 1..rounds-2, which leaves it
    at least one round to run after its restart.
    """
    if not 0 <= fraction < 1:
        raise ValueError("the churn fraction must be in [0, 1)")
    if fraction == 0 or peers < 2:
        return ChurnPlan(downtime_s=downtime_s)
    if rounds < 3:
        raise ValueError("churn needs at least 3 rounds: killed after 1..rounds-2 of them")
    rng = random.Random(seed)
    count = min(max(1, round(fraction * peers)), peers - 1)
    chosen = sorted(rng.sample(range(1, peers), count))
    return ChurnPlan({index: rng.randint(1, rounds - 2) for index in chosen}, downtime_s)


@dataclass
class _Churned:
    """One planned kill, and what happened to it."""

    folder: Path
    after: int
    killed_at_round: int | None = None
    version_before_kill: int = 0
    down_since: float | None = None  # trio time of the kill, until the restart
    resumed_version: int | None = None
    restarts: int = 0
    finished: bool = False  # it exited by itself before its kill round was seen

    def due(self, done: int) -> bool:
        """Whether to kill it now, having seen it complete `done` rounds."""
        return self.killed_at_round is None and not self.finished and done >= self.after

    def record(self) -> dict[str, Any]:
        """What the peer's summary reports under "churn".

        `checkpoint_loads` holds when the restart resumed from the version the peer last wrote
        (or the one before, if the kill landed while that checkpoint was being replaced) and
        its final checkpoint loads with its own store code at a version no older than that.
        """
        final, resumed = checkpoint_version(self.folder), self.resumed_version
        return {
            "killed_at_round": self.killed_at_round,
            "version_before_kill": self.version_before_kill,
            "resumed_version": resumed,
            "restarts": self.restarts,
            "checkpoint_loads": final is not None and resumed is not None
            and resumed >= self.version_before_kill - 1 and final >= resumed,
        }


class Churn:
    """Kills and restarts the planned peers of a backend; `poll` it every watch-loop tick."""

    def __init__(self, plan: ChurnPlan, backend: Backend, folders: Sequence[Path]) -> None:
        self.plan = plan
        self._backend = backend
        self._churned = {i: _Churned(folders[i], after) for i, after in plan.kill_after.items()}

    async def poll(self, done: Sequence[int]) -> None:
        """Kill the peers that reached their round; restart those whose downtime is over.

        Args:
            done: rounds completed, per peer index.
        """
        for index, churned in self._churned.items():
            if churned.down_since is not None:
                if trio.current_time() >= churned.down_since + self.plan.downtime_s:
                    await self._restart(index, churned)
            elif churned.due(done[index]):
                await self._kill(index, churned)

    def pending(self) -> bool:
        """True while a killed peer still waits for its restart (keep watching)."""
        return any(churned.down_since is not None for churned in self._churned.values())

    def records(self) -> dict[str, dict[str, Any]]:
        """The record of every peer killed and restarted, by name."""
        return {c.folder.name: c.record() for c in self._churned.values() if c.restarts}

    async def _kill(self, index: int, churned: _Churned) -> None:
        if not await self._backend.kill(index):
            churned.finished = True  # it had done its last round: nothing left to churn
            return
        # Read after the kill: the peer may have finished another round since `done`.
        churned.killed_at_round, churned.version_before_kill = last_metrics(churned.folder)
        churned.down_since = trio.current_time()  # an in-process crash ends a step first
        logger.info("churn: crashed %s after round %d; restarting in %.1f s",
                    churned.folder.name, churned.killed_at_round, self.plan.downtime_s)

    async def _restart(self, index: int, churned: _Churned) -> None:
        # Nothing writes the checkpoint while the peer is down: it is what the restart loads.
        churned.resumed_version = checkpoint_version(churned.folder)
        await self._backend.restart(index)
        churned.restarts += 1
        churned.down_since = None


def last_metrics(folder: Path) -> tuple[int, int]:
    """(round, version) of the peer's last metrics line: what its checkpoint holds."""
    last = read_metrics(folder)[-1]
    return int(last["round"]), int(last["version"])


def annotate(summaries: list[dict[str, Any]], records: dict[str, dict[str, Any]], *,
             planned: Sequence[str]) -> list[str]:
    """Put each record into the summary of the same name; return planned names left without."""
    for summary in summaries:
        if summary["name"] in records:
            summary["churn"] = records[summary["name"]]
    return [name for name in planned if name not in records]


def checkpoint_version(folder: Path) -> int | None:
    """Load the checkpoint with the peer's own store code; None if it is missing or unreadable."""
    from peer.errors import PeerError
    from peer.store import PeerStore

    swarm = json.loads((folder / "status.json").read_text())["swarm_id"]
    try:
        checkpoint = PeerStore(folder).load_checkpoint(swarm)
    except PeerError:
        return None
    return None if checkpoint is None else checkpoint.version
