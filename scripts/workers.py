"""In-process peers spread over worker processes (`simulate.py --in-process --workers K`).

All the libp2p hosts of one process share one trio event loop. With 64 peers in one process that
loop was saturated (yamux frames and window updates, gossipsub heartbeats; see the README), and a
training round took 87 s against 9 s with 32 peers. Worker W runs peers W, W + K, ... in an
in-process backend of its own (its own base model and event loop), from their TOML files.
Worker 0 runs peer 0, the bootstrap; each worker lets its peers linger until every peer of
every worker has logged its last round, then stops them: no signal crosses processes.

    python -m scripts.workers OUT/workers.json W    # worker W of the plan (simulate.py runs it)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from peer.config import PeerConfig
from peer.errors import PeerError
from scripts.backends import SimulationError, reap, spawn
from scripts.churn import ChurnPlan
from scripts.peerconfigs import config_file, peer_folder, read_config, write_toml
from scripts.simreport import rounds_done
from scripts.swarm import Settings, SwarmRun, drive, run_trio, watch


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker needs, written once to OUT/workers.json by the simulator."""

    configs: list[str]  # peer i's TOML file, without a bootstrap address
    settings: dict[str, Any]  # `scripts.swarm.Settings`
    churn: dict[str, Any]  # `scripts.churn.ChurnPlan`

    @classmethod
    def read(cls, path: Path) -> WorkerPlan:
        return cls(**json.loads(path.read_text()))


class WorkerPool:
    """The worker processes, watched like a backend whose peers run elsewhere."""

    def __init__(self, processes: list[trio.Process], folders: Sequence[Path]) -> None:
        self._processes = processes
        self._folders = folders

    def progress(self, index: int) -> int:
        return rounds_done(self._folders[index])

    async def stop(self, index: int) -> None:
        """Nothing to do: each worker stops its own peers once every peer is done."""

    def check(self) -> None:
        for worker, process in enumerate(self._processes):
            if process.poll() not in (None, 0):
                raise SimulationError(f"worker {worker} failed; see logs/worker-{worker}.log")

    async def wait(self) -> None:
        for process in self._processes:
            await process.wait()


async def run_workers(configs: Sequence[PeerConfig], plan: ChurnPlan, settings: Settings,
                      console: Console) -> SwarmRun:
    """Run `configs` over `settings.workers` processes; their churn records, summed memory."""
    out, workers = settings.out, settings.workers
    tomls = [str(write_toml(config, config_file(config))) for config in configs]
    path = out / "workers.json"
    path.write_text(json.dumps({"configs": tomls, "settings": {**asdict(settings), "out": str(out)},
                                "churn": asdict(plan)}, indent=1))
    processes = [await spawn([sys.executable, "-m", "scripts.workers", str(path), str(w)],
                             out / "logs" / f"worker-{w}.log") for w in range(workers)]
    folders = [config.data_dir for config in configs]
    try:
        await watch(WorkerPool(processes, folders), folders, settings.rounds, console)
    finally:
        await reap(processes)
    reports = [json.loads((out / f"worker-{w}.json").read_text()) for w in range(workers)]
    records = {name: record for report in reports for name, record in report["churn"].items()}
    return SwarmRun(records, _summed_memory([r["memory"] for r in reports], len(configs)))


def _summed_memory(parts: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """Every worker's resident memory added up; `peak_mib` adds peaks that may not coincide."""
    total = {key: round(sum(part[key] for part in parts), 1)
             for key in ("base_mib", "loaded_mib", "running_mib", "peak_mib")}
    total["per_peer_mib"] = round((total["running_mib"] - total["base_mib"]) / count, 2)
    total["workers"] = len(parts)
    return total


async def _worker(plan: WorkerPlan, worker: int, settings: Settings) -> dict[str, Any]:
    from scripts.inprocess import InProcessBackend

    folders = [peer_folder(settings.out, index) for index in range(len(plan.configs))]
    mine = {i: read_config(Path(plan.configs[i]))
            for i in range(worker, len(plan.configs), settings.workers)}
    kill_after = {int(index): after for index, after in plan.churn["kill_after"].items()}
    churn = ChurnPlan(kill_after, plan.churn["downtime_s"]).only(list(mine))
    log = settings.out / "logs" / f"inprocess-w{worker}.log"
    async with InProcessBackend.open(folders, log, next(iter(mine.values()))) as backend:
        records = await drive(backend, mine, folders, churn, settings, Console(quiet=True))
    return {"memory": backend.memory(len(mine)), "churn": records}


def main(plan_path: Path, worker: int) -> None:
    """Run worker `worker` of the plan; its report goes to OUT/worker-W.json."""
    plan = WorkerPlan.read(plan_path)
    settings = Settings(**{**plan.settings, "out": Path(plan.settings["out"])})
    try:
        report = run_trio(_worker, plan, worker, settings, timeout=settings.timeout)
    except (SimulationError, PeerError) as exc:
        raise SystemExit(f"worker {worker}: error: {exc}") from None
    (settings.out / f"worker-{worker}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
