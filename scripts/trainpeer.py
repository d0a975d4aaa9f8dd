"""The peer side of `scripts/bench_train.py`: the measured peer and its neighbour process.

The measured peer runs in this process (pinned to its cores), the neighbour as a `loraswarm
peer` process on the next cores; `run_daemon` returns the peer's timed rounds, read from its
metrics lines (`summarise`). The bare loop it is compared with is `scripts/trainloop.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from gossip.config import NodeConfig
from peer.config import PeerConfig
from peer.daemon import Peer
from peer.device import DeviceConfig, resolve
from scripts.backends import spawn
from scripts.peerconfigs import write_toml
from scripts.simreport import read_metrics
from scripts.trainloop import BenchError, Clocks
from topology.config import TopologyConfig

STOP_TIMEOUT_S = 120.0  # for the neighbour to finish its step and write its final checkpoint
_STDERR = Console(stderr=True)


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the tables and the JSON."""
    _STDERR.log(message)


# -- the machine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cores:
    """The CPUs this process and the neighbour run on (empty: not pinned)."""

    ours: tuple[int, ...]
    neighbour: tuple[int, ...]


def plan_cores(threads: int) -> Cores:
    """The first `threads` CPUs for us, up to `threads` of the others for the neighbour; none
    pinned where no CPU would be left for the neighbour."""
    if not hasattr(os, "sched_getaffinity"):
        return Cores((), ())
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= threads:
        return Cores((), ())
    return Cores(tuple(cpus[:threads]), tuple(cpus[threads : 2 * threads]))


def pin_this_process(cpus: Sequence[int]) -> None:
    """Every thread of this process, and so every thread it starts later, on `cpus`."""
    tasks = Path("/proc/self/task")
    for tid in (int(name) for name in os.listdir(tasks)) if tasks.is_dir() else [0]:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


# -- the daemon --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonRun:
    """The measured peer's timed rounds (all but its first), read from its metrics lines."""

    wall_s: list[float]  # per round: from the end of the round before to the end of this one
    train_s: list[float]
    gather_s: list[float]
    round_s: list[float]  # training, announcing, gathering, merging; not writing the records
    warmup_loss: float
    merged: int  # neighbour adapters merged in the timed rounds
    clocks: Clocks  # over the timed rounds; `thread` is the event loop's CPU time


def peer_configs(args: argparse.Namespace, folder: Path,
                 shards: Sequence[Path]) -> tuple[PeerConfig, PeerConfig]:
    """The measured peer (a swarm of its own until the neighbour joins) and the neighbour.

    The measured peer keeps every daemon default but these: one neighbour per round, a last
    round, and waiting for the neighbour before its first round. The neighbour trains until
    stopped, on the CPU (in our dtype when we are on the CPU too).
    """
    topology = TopologyConfig(fanout=1)
    measured = PeerConfig(
        data_dir=folder / "peer", train_path=shards[0], model=args.model,
        rounds=args.rounds + 1, wait_peers=1, train=args.train, device=args.placement,
        topology=topology)
    neighbour = PeerConfig(
        data_dir=folder / "neighbour", train_path=shards[1], model=args.model,
        train=args.train, topology=topology, device=neighbour_placement(args))
    return measured, neighbour


def neighbour_placement(args: argparse.Namespace) -> DeviceConfig:
    """The CPU (in our dtype when we are on the CPU too), except beside a quantized base.

    A 4-bit or 8-bit base is in a swarm of its own (`gossip.swarm`), so an unquantized
    neighbour would never be heard and the peer would wait for it until `--timeout`. A
    quantized neighbour needs CUDA: it shares our device, and its steps share the GPU.
    """
    if args.quantize:
        return DeviceConfig(device=args.device, dtype=args.dtype, quantize=args.quantize)
    on_cpu = resolve(args.placement).device.type == "cpu"
    return DeviceConfig(device="cpu", dtype=args.dtype if on_cpu else "auto")


async def run_daemon(measured: PeerConfig, neighbour: PeerConfig, cores: Cores,
                     processes: list[trio.Process]) -> DaemonRun:
    """Start the measured peer, then the neighbour joining it; return after the last round.

    The neighbour goes on training (it is appended to `processes`, which the caller stops).
    """
    peer = Peer(measured)
    async with trio.open_nursery() as nursery:
        node = await nursery.start(peer.run)
        joining = replace(neighbour, network=NodeConfig(bootstrap=(node.listen_addrs[0],)))
        toml = write_toml(joining, neighbour.data_dir.parent / "neighbour.toml")
        log_file = neighbour.data_dir.parent / "logs" / "neighbour.log"
        process = await spawn([sys.executable, "-m", "peer.cli", "-v", "peer",
                               "--config", str(toml)], log_file)
        processes.append(process)
        if cores.neighbour:
            os.sched_setaffinity(process.pid, cores.neighbour)
        log(f"measured peer listening; neighbour started (pid {process.pid})")
        watch = trio.CancelScope()
        nursery.start_soon(_fail_if_exits, process, log_file, peer, watch)
        # This task runs on the event loop's thread: `clocks.thread` is the loop's CPU time,
        # which shares the training core (serving the neighbour, gossipsub, membership).
        await peer.wait_rounds(1)
        clocks = Clocks.now()
        await peer.wait_rounds(measured.rounds)
        clocks = Clocks.now() - clocks
        watch.cancel()  # the peer's run returns by itself after its last round
    return summarise(read_metrics(measured.data_dir), measured, clocks)


async def _fail_if_exits(process: trio.Process, log_file: Path, peer: Peer,
                         scope: trio.CancelScope) -> None:
    with scope:
        code = await process.wait()
        tail = " | ".join(log_file.read_text(errors="replace").splitlines()[-3:])
        raise BenchError(f"the neighbour exited ({code}) in the peer's round "
                         f"{peer.completed + 1}: {tail}")


def summarise(lines: Sequence[dict[str, Any]], config: PeerConfig,
              clocks: Clocks) -> DaemonRun:
    """Sum the timed rounds (every round after the first) of the peer's metrics lines."""
    rounds = {line["round"]: line for line in lines}
    if sorted(rounds) != list(range(1, config.rounds + 1)):
        raise BenchError(f"{config.data_dir}: metrics lines for rounds {sorted(rounds)}, "
                         f"expected 1..{config.rounds}")
    if rounds[config.rounds]["samples"] != config.planned_steps * config.train.batch_size:
        raise BenchError("the peer trained fewer steps than asked (was it stopped?)")
    timed = range(2, config.rounds + 1)
    return DaemonRun(
        wall_s=[rounds[number]["t"] - rounds[number - 1]["t"] for number in timed],
        train_s=[rounds[number]["train_s"] for number in timed],
        gather_s=[rounds[number]["gather_s"] for number in timed],
        round_s=[rounds[number]["round_s"] for number in timed],
        warmup_loss=rounds[1]["train_loss"],
        merged=sum(rounds[number]["merged"] for number in timed),
        clocks=clocks,
    )


async def stop(process: trio.Process) -> None:
    """SIGTERM, as a user stops a peer: it finishes its step and writes its final records."""
    process.terminate()
    with trio.move_on_after(STOP_TIMEOUT_S):
        await process.wait()
