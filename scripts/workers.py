"""In-process peers spread over worker processes (`simulate.py --in-process --workers K`).

All the libp2p hosts of one process share one trio event loop. With 64 peers in one process that
loop was saturated (yamux frames and window updates, gossipsub heartbeats; see the README), and a
training round took 87 s against 9 s with 32 peers. K workers each run every K-th peer over a
shared base model of their own and their own event loop, which the OS spreads over the cores.

Worker 0 runs peer 0, the bootstrap; the others join through the address peer 0 writes to its
status.json. Each worker keeps its peers up (they linger, serving) until every peer of every
worker has logged its last round in metrics.jsonl, then stops them; no signal crosses processes.

    python -m scripts.workers OUT/workers.json W    # worker W of the plan (simulate.py runs it)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from scripts.churn import ChurnPlan  # noqa: E402
from scripts.processes import CommandFor, rounds_done, wait_for_file_address  # noqa: E402
from scripts.simreport import progress_columns  # noqa: E402

BOOTSTRAP = "{bootstrap}"  # stands for peer 0's address in the planned command lines


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker needs, written once to OUT/workers.json by the simulator."""

    commands: list[list[str]]  # peer i's command line; BOOTSTRAP where peer 0's address goes
    rounds: int
    workers: int
    timeout: float
    kill_after: dict[int, int]  # churn: peer index -> round after which it is crashed
    downtime_s: float

    def indices(self, worker: int) -> range:
        """The peers of worker `worker`: every `workers`-th one, so worker 0 has peer 0."""
        return range(worker, len(self.commands), self.workers)

    def command_for(self, index: int, bootstrap: str | None) -> list[str]:
        """Peer `index`'s command line joining through `bootstrap` (None: without one)."""
        command = self.commands[index]
        if BOOTSTRAP not in command:
            return list(command)
        at = command.index(BOOTSTRAP)
        if bootstrap is None:
            return command[:at - 1] + command[at + 1:]  # drop "--bootstrap" with its value
        return command[:at] + [bootstrap] + command[at + 1:]

    @classmethod
    def read(cls, path: Path) -> WorkerPlan:
        data = json.loads(path.read_text())
        data["kill_after"] = {int(k): v for k, v in data["kill_after"].items()}
        return cls(**data)


def run_workers(command_for: CommandFor, count: int, rounds: int, workers: int, *, out: Path,
                timeout: float, console: Console,
                churn: ChurnPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `count` peers in `workers` processes; return their summed memory and churn records.

    Raises:
        SystemExit: a worker failed (its log is named), or the run took longer than `timeout`.
    """
    plan = WorkerPlan(commands=[command_for(i, BOOTSTRAP if i else None) for i in range(count)],
                      rounds=rounds, workers=workers, timeout=timeout,
                      kill_after=dict(churn.kill_after), downtime_s=churn.downtime_s)
    path = out / "workers.json"
    path.write_text(json.dumps(asdict(plan), indent=1))
    folders = [out / "peers" / f"p{index}" for index in range(count)]
    (folders[0] / "status.json").unlink(missing_ok=True)  # a stale address from an earlier run
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = []
    for worker in range(workers):
        with open(logs / f"worker-{worker}.log", "wb") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "scripts.workers", str(path), str(worker)],
                stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        _watch(processes, folders, rounds, timeout, console)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    reports = [json.loads((out / f"worker-{w}.json").read_text()) for w in range(workers)]
    return _summed_memory([r["memory"] for r in reports], count), {
        name: record for report in reports for name, record in report["churn"].items()}


def _watch(processes: list[subprocess.Popen[bytes]], folders: list[Path], rounds: int,
           timeout: float, console: Console) -> None:
    deadline = time.monotonic() + timeout
    with Progress(*progress_columns(), console=console) as progress:
        task = progress.add_task(f"{len(folders)} peers in {len(processes)} processes",
                                 total=rounds)
        while any(process.poll() is None for process in processes):
            _raise_if_failed(processes)
            if time.monotonic() > deadline:
                raise SystemExit(f"the simulation did not finish within {timeout:.0f} s; "
                                 "raise --timeout")
            progress.update(task, completed=min(rounds_done(folder) for folder in folders))
            time.sleep(0.5)
        progress.update(task, completed=min(rounds_done(folder) for folder in folders))
    _raise_if_failed(processes)


def _raise_if_failed(processes: list[subprocess.Popen[bytes]]) -> None:
    failed = [w for w, process in enumerate(processes) if process.poll() not in (None, 0)]
    if failed:
        raise SystemExit(f"worker {failed[0]} failed; see logs/worker-{failed[0]}.log")


def _summed_memory(parts: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """Every worker's resident memory added up; `peak_mib` adds peaks that may not coincide."""
    total = {key: round(sum(part[key] for part in parts), 1)
             for key in ("base_mib", "loaded_mib", "running_mib", "peak_mib")}
    total["per_peer_mib"] = round((total["running_mib"] - total["base_mib"]) / count, 2)
    total["workers"] = len(parts)
    return total


def _worker(plan_path: Path, worker: int) -> None:
    from scripts.inprocess import Share, run_in_process

    plan, out = WorkerPlan.read(plan_path), plan_path.parent
    folders = [out / "peers" / f"p{index}" for index in range(len(plan.commands))]
    mine = plan.indices(worker)
    bootstrap = None if worker == 0 else wait_for_file_address(
        folders[0], timeout=plan.timeout, what="peer 0 (see logs/worker-0.log)")
    share = Share(mine, bootstrap, others=[f for i, f in enumerate(folders) if i not in mine],
                  log=f"inprocess-w{worker}.log")
    memory, records = run_in_process(
        plan.command_for, share, plan.rounds, out=out, timeout=plan.timeout,
        console=Console(quiet=True), churn=ChurnPlan(plan.kill_after, plan.downtime_s))
    (out / f"worker-{worker}.json").write_text(json.dumps({"memory": memory, "churn": records}))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]))
