"""Churn for the simulator: kill peers, restart them from their data folders, check resumes.

A churned peer is killed once it has completed its planned round (a crash: no final checkpoint,
no goodbye) and started again `downtime_s` later with the same command line, so with the same
data folder: the same identity key and its last checkpoint. The daemon resumes `round` and
`version` from that checkpoint, so the restarted peer still stops after `--rounds` rounds in
total. Peer 0 is never churned: it is the bootstrap address the others (re)join through.

`plan_churn` is pure; `Churn` (peer processes, SIGKILL) is polled from the simulator's watch
loop and owns no thread. In-process peers are churned by `scripts.inprocess` with the same plan
and the same records (`churn_record`), killed with `Peer.crash`.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from scripts.simreport import read_metrics

# Logged by peer/setup.py `build_runtime` when a peer loads its checkpoint.
_RESUMED = re.compile(r"resumed from .*: version (\d+), \d+ samples")


class PeerProcess(Protocol):
    """What the simulator knows about one launched peer (`scripts.processes.Launched`)."""

    name: str
    folder: Path
    process: subprocess.Popen[bytes]
    command: list[str]
    log: Path
    env: dict[str, str]


@dataclass(frozen=True)
class ChurnPlan:
    """Which peers (by index) are killed, each after how many completed rounds."""

    kill_after: dict[int, int] = field(default_factory=dict)
    downtime_s: float = 5.0


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
class _Kill:
    index: int
    after_round: int
    peer: PeerProcess | None = None  # set when it is killed
    killed_at: float = 0.0  # monotonic time of the SIGKILL
    killed_at_round: int = 0
    version_before_kill: int = 0
    restarts: int = 0


class Churn:
    """Kills and restarts the planned peers; `poll` it every tick of the watch loop."""

    def __init__(self, plan: ChurnPlan) -> None:
        self.plan = plan
        self._kills = [_Kill(index, after) for index, after in plan.kill_after.items()]

    def poll(self, peers: Sequence[PeerProcess]) -> None:
        """Kill the peers that reached their round; restart those whose downtime is over."""
        now = time.monotonic()
        for kill in self._kills:
            if kill.peer is None:
                self._maybe_kill(kill, peers[kill.index], now)
            elif not kill.restarts and now >= kill.killed_at + self.plan.downtime_s:
                self._restart(kill, kill.peer)

    def pending(self) -> bool:
        """True while a killed peer still waits for its restart (keep watching)."""
        return any(k.peer is not None and not k.restarts for k in self._kills)

    def annotate(self, summaries: list[dict[str, Any]]) -> list[str]:
        """Add a "churn" record to each churned peer's summary (matched by name).

        Returns:
            the names of planned peers that exited before their kill round was seen.
        """
        records = {k.peer.name: self._record(k, k.peer) for k in self._kills if k.peer}
        return annotate(summaries, records, planned=[f"p{k.index}" for k in self._kills])

    def _maybe_kill(self, kill: _Kill, peer: PeerProcess, now: float) -> None:
        if peer.process.poll() is not None:
            return  # finished (or failed) before we saw its kill round: watch() reports it
        metrics = read_metrics(peer.folder)
        if not metrics or int(metrics[-1]["round"]) < kill.after_round:
            return
        peer.process.kill()
        if peer.process.wait() == 0:
            return  # it finished its last round just before the signal landed
        # Read again after the kill: the peer may have finished another round meanwhile.
        kill.peer, kill.killed_at = peer, now
        kill.killed_at_round, kill.version_before_kill = last_metrics(peer.folder)

    def _restart(self, kill: _Kill, peer: PeerProcess) -> None:
        with open(peer.log, "ab") as log:
            log.write(f"--- simulate.py churn: killed (SIGKILL) after round "
                      f"{kill.killed_at_round}, restarting ---\n".encode())
            log.flush()
            peer.process = subprocess.Popen(peer.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=peer.env)
        kill.restarts += 1

    def _record(self, kill: _Kill, peer: PeerProcess) -> dict[str, Any]:
        return churn_record(peer.folder, killed_at_round=kill.killed_at_round,
                            version_before_kill=kill.version_before_kill,
                            resumed_version=_resumed_version(peer.log), restarts=kill.restarts)


def last_metrics(folder: Path) -> tuple[int, int]:
    """(round, version) of the peer's last metrics line: what its checkpoint holds."""
    last = read_metrics(folder)[-1]
    return int(last["round"]), int(last["version"])


def churn_record(folder: Path, *, killed_at_round: int, version_before_kill: int,
                 resumed_version: int | None, restarts: int) -> dict[str, Any]:
    """What a churned peer's summary reports under "churn".

    `checkpoint_loads` holds when the restart resumed from the version it last wrote (or the
    one before, if the kill landed while that checkpoint was being replaced) and the peer's
    final checkpoint loads with its own store code at a version no older than that.
    """
    final = _final_checkpoint_version(folder)
    loads = (final is not None and resumed_version is not None
             and resumed_version >= version_before_kill - 1 and final >= resumed_version)
    return {
        "killed_at_round": killed_at_round,
        "version_before_kill": version_before_kill,
        "resumed_version": resumed_version,
        "restarts": restarts,
        "checkpoint_loads": loads,
    }


def annotate(summaries: list[dict[str, Any]], records: dict[str, dict[str, Any]], *,
             planned: Sequence[str]) -> list[str]:
    """Put each record into the summary of the same name; return planned names left without."""
    for summary in summaries:
        if summary["name"] in records:
            summary["churn"] = records[summary["name"]]
    return [name for name in planned if name not in records]


def _resumed_version(log: Path) -> int | None:
    """The version the restarted daemon logged it resumed from (the log is appended to)."""
    found = _RESUMED.findall(log.read_text(errors="replace")) if log.is_file() else []
    return int(found[-1]) if found else None


def _final_checkpoint_version(folder: Path) -> int | None:
    """Load the checkpoint with the peer's own store code; None if it is missing or unreadable."""
    from peer.errors import PeerError
    from peer.store import PeerStore

    swarm = json.loads((folder / "status.json").read_text())["swarm_id"]
    try:
        checkpoint = PeerStore(folder).load_checkpoint(swarm)
    except PeerError:
        return None
    return None if checkpoint is None else checkpoint.version
