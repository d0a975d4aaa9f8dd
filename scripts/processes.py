"""One OS process per peer (`simulate.py`'s default mode): launch, watch, churn, clean up.

Peer 0 starts first; once it listens, its address is every other peer's bootstrap. A progress bar
per peer follows the round count in its metrics.jsonl until every daemon has exited; churned
peers are killed and restarted by `scripts.churn.Churn`, polled from the same loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from scripts.churn import Churn, ChurnPlan
from scripts.simreport import progress_columns

CommandFor = Callable[[int, str | None], list[str]]


@dataclass
class Launched:
    name: str
    folder: Path
    process: subprocess.Popen[bytes]
    command: list[str]  # what started it, kept so that churn can restart it the same way
    log: Path
    env: dict[str, str]


def run_processes(command_for: CommandFor, folders: list[Path], rounds: int, *, out: Path,
                  timeout: float, console: Console, churn: Churn | None = None,
                  bootstrap_first: bool = True) -> list[Path]:
    """Run one `loraswarm peer` process per folder; return the folders once all have exited.

    Args:
        command_for: (peer index, bootstrap address or None) -> the peer's command line.
        bootstrap_first: wait for peer 0's address and give it to the others.

    Raises:
        SystemExit: a peer failed, or the run took longer than `timeout` seconds.
    """
    peers = launch(command_for, folders, out=out, timeout=timeout,
                   bootstrap_first=bootstrap_first)
    try:
        watch(peers, rounds, timeout, console, churn)
    finally:
        for p in peers:
            if p.process.poll() is None:
                p.process.kill()
    return folders


def launch(command_for: CommandFor, folders: list[Path], *, out: Path, timeout: float,
           bootstrap_first: bool) -> list[Launched]:
    """Start peer 0, wait for its address, then start the others bootstrapping through it."""
    launched: list[Launched] = []
    bootstrap = None
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for index, folder in enumerate(folders):
        command = command_for(index, bootstrap)
        log_path = logs / f"{folder.name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        launched.append(Launched(folder.name, folder, process, command, log_path, env))
        if index == 0 and bootstrap_first:
            bootstrap = wait_for_address(launched[0], timeout=timeout)
    return launched


def wait_for_address(peer: Launched, *, timeout: float) -> str:
    """The first peer writes status.json once it listens; its address is the bootstrap."""

    def exited() -> None:
        if peer.process.poll() is not None:
            raise SystemExit(f"peer {peer.name} exited early; see its log in logs/{peer.name}.log")

    return wait_for_file_address(peer.folder, timeout=timeout, what=f"peer {peer.name}",
                                 check=exited)


def wait_for_file_address(folder: Path, *, timeout: float, what: str,
                          check: Callable[[], None] = lambda: None) -> str:
    """Poll `folder`'s status.json for a listen address; `check` may raise to give up early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        address = read_address(folder)
        if address:
            return address
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up within {timeout:.0f} s")


def read_address(folder: Path) -> str | None:
    """The first listen address in a peer's status.json; None before the peer has written it."""
    status = folder / "status.json"
    if not status.is_file():
        return None
    addrs = json.loads(status.read_text())["listen_addrs"]
    return str(addrs[0]) if addrs else None


def rounds_done(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((int(line["round"]) for line in lines), default=0)


def stop_lingering(peers: list[Launched]) -> None:
    """SIGTERM every peer still running: all have done their rounds (`--linger` keeps them up
    serving their final adapter to slower ones until then); each writes its final checkpoint."""
    for p in peers:
        if p.process.poll() is None:
            p.process.terminate()


def watch(peers: list[Launched], rounds: int, timeout: float, console: Console,
          churn: Churn | None = None) -> None:
    """Show a progress bar per peer until every daemon has exited (churned ones: restarted)."""
    churn = churn or Churn(ChurnPlan())
    deadline, stopped = time.monotonic() + timeout, False
    with Progress(*progress_columns(), console=console, transient=False) as progress:
        tasks = {p.name: progress.add_task(f"peer {p.name}", total=rounds) for p in peers}
        while any(p.process.poll() is None for p in peers) or churn.pending():
            if not stopped:
                churn.poll(peers)
            if time.monotonic() > deadline:
                for p in peers:
                    p.process.kill()
                raise SystemExit(f"the simulation did not finish within {timeout:.0f} s")
            done = {p.name: rounds_done(p.folder) for p in peers}
            for p in peers:
                progress.update(tasks[p.name], completed=done[p.name])
            if not stopped and all(n >= rounds for n in done.values()) and not churn.pending():
                stop_lingering(peers)  # once: a second SIGTERM would kill a peer mid-export
                stopped = True
            time.sleep(0.5)
        for p in peers:
            progress.update(tasks[p.name], completed=rounds_done(p.folder))
    failed = [p.name for p in peers if p.process.returncode != 0]
    if failed:
        raise SystemExit(f"peers {failed} failed; see their logs under logs/")
