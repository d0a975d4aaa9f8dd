"""Where simulated peers run, behind one seam, as in Flower's simulation engine.

A backend starts, kills, restarts and stops peers and reports their progress; launching,
watching and churning a swarm are written once (`scripts.swarm`, `scripts.churn`) for all:
`ProcessBackend` here (a `loraswarm peer` process per peer, as a user runs it),
`scripts.inprocess.InProcessBackend` (peers in one event loop over one shared base model), and
`scripts.workers` (processes that each host an in-process backend).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from peer.config import PeerConfig
from scripts.peerconfigs import config_file, write_toml
from scripts.simreport import rounds_done


class SimulationError(Exception):
    """A peer or a worker failed, or the run ran out of time; the message is one line."""


class Watched(Protocol):
    """What the watch loop needs of whatever runs the peers."""

    def progress(self, index: int) -> int:
        """Rounds peer `index` has completed (its metrics line written)."""

    async def stop(self, index: int) -> None:
        """Stop peer `index` as SIGTERM does, if it is still serving (lingering)."""

    def check(self) -> None:
        """Raise `SimulationError` if a peer has failed."""

    async def wait(self) -> None:
        """Return once every peer has exited."""


class Backend(Watched, Protocol):
    """Runs peers from their configs."""

    async def start(self, configs: Mapping[int, PeerConfig]) -> None:
        """Start these peers (index -> config)."""

    async def kill(self, index: int) -> bool:
        """Kill peer `index` as a crash would; False if it had exited by itself first."""

    async def restart(self, index: int) -> None:
        """Start the killed peer again with its config, so from its data folder."""


async def spawn(command: list[str], log: Path, *, append: bool = False) -> trio.Process:
    """Start `command` with its stdout and stderr going to the file `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as handle:
        return await trio.lowlevel.open_process(command, stdout=handle,
                                                stderr=subprocess.STDOUT)


async def reap(processes: list[trio.Process]) -> None:
    """Kill whatever still runs and wait for it: a failed or timed-out run leaves no process."""
    with trio.CancelScope(shield=True):
        for process in processes:
            if process.poll() is None:
                process.kill()
            await process.wait()


@dataclass
class _PeerProcess:
    config: PeerConfig
    toml: Path
    log: Path
    process: trio.Process
    down: bool = False  # killed by churn, not restarted yet


class ProcessBackend:
    """A `loraswarm peer --config OUT/peers/pN.toml` process per peer, logging to
    OUT/logs/pN.log; as an async context manager, no process outlives the block."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._peers: dict[int, _PeerProcess] = {}

    async def __aenter__(self) -> ProcessBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await reap([peer.process for peer in self._peers.values()])

    async def start(self, configs: Mapping[int, PeerConfig]) -> None:
        for index, config in configs.items():
            toml = write_toml(config, config_file(config))
            log = self._logs / f"{config.data_dir.name}.log"
            self._peers[index] = _PeerProcess(config, toml, log, await spawn(_command(toml), log))

    async def kill(self, index: int) -> bool:
        peer = self._peers[index]
        if peer.process.poll() is not None:
            return False
        peer.process.kill()
        peer.down = await peer.process.wait() != 0  # 0: it finished just before the signal
        return peer.down

    async def restart(self, index: int) -> None:
        peer = self._peers[index]
        with open(peer.log, "ab") as log:
            log.write(f"--- simulate.py churn: killed (SIGKILL) after round "
                      f"{rounds_done(peer.config.data_dir)}, restarting ---\n".encode())
        peer.process = await spawn(_command(peer.toml), peer.log, append=True)
        peer.down = False

    def progress(self, index: int) -> int:
        return rounds_done(self._peers[index].config.data_dir)

    async def stop(self, index: int) -> None:
        # A peer without --linger leaves by itself after its last round, and a signal would
        # only race its exit; a lingering one serves until its one SIGTERM.
        peer = self._peers[index]
        if peer.config.linger_s and peer.process.poll() is None:
            peer.process.terminate()

    def check(self) -> None:
        for peer in self._peers.values():
            code, name = peer.process.poll(), peer.config.data_dir.name
            if peer.down or code is None:
                continue
            if code != 0:
                raise SimulationError(f"peer {name} failed (exit {code}); see logs/{name}.log")
            done = rounds_done(peer.config.data_dir)
            if done < peer.config.total_rounds:  # stopped from outside: nothing will finish it
                raise SimulationError(f"peer {name} exited after {done} of "
                                      f"{peer.config.total_rounds} rounds; see logs/{name}.log")

    async def wait(self) -> None:
        for peer in self._peers.values():
            await peer.process.wait()


def _command(toml: Path) -> list[str]:
    return [sys.executable, "-m", "peer.cli", "-v", "peer", "--config", str(toml)]
