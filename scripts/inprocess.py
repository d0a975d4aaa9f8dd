"""Many peers in one trio process, sharing one frozen base model (`simulate.py --in-process`).

Every peer is the real `peer.daemon.Peer` with its own libp2p host on 127.0.0.1, data folder,
optimizer and adapter; only the base model is shared (`peer.shared.SharedModel`), so an added
peer costs its adapter, optimizer moments and token batches instead of a whole model. The
peers take turns on the CPU for forward and backward passes; networking never waits for them.
Peers are configured from the same command lines the process mode runs, so both modes run
the same settings.

Churn (`--churn`) follows the same seeded plan as in process mode: a planned peer is crashed
(`Peer.crash`: cancelled with no final checkpoint) once it has completed its kill round, its
adapter is dropped from the shared model, and after the downtime a new `Peer` on the same data
folder resumes from the checkpoint its last completed round wrote.
"""

from __future__ import annotations

import argparse
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio
from rich.console import Console
from rich.progress import Progress

from peer.config import PeerConfig
from peer.daemon import Peer
from peer.options import add_peer_arguments, config_from_args
from peer.shared import SharedModel
from scripts.churn import ChurnPlan, churn_record, last_metrics
from scripts.simreport import progress_columns

CommandFor = Callable[[int, str | None], list[str]]
_PEER_ARGV_START = 5  # python -m peer.cli -v peer ...


def peer_config(command: list[str]) -> PeerConfig:
    """The `PeerConfig` a `loraswarm peer` process would build from this command line."""
    parser = argparse.ArgumentParser(prog="loraswarm peer")
    add_peer_arguments(parser)
    return config_from_args(parser.parse_args(command[_PEER_ARGV_START:]))


def rss_mib() -> float:
    """This process's resident memory now, in MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_in_process(command_for: CommandFor, count: int, rounds: int, *, out: Path,
                   timeout: float, console: Console,
                   churn: ChurnPlan | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `count` peers in this process until each has done `rounds` rounds.

    Args:
        command_for: (peer index, bootstrap address or None) -> the peer's command line.
        churn: which peers to crash after which round, and for how long.

    Returns:
        memory figures in MiB: base (after loading the shared model), loaded (every peer's
        model and data loaded), running (once every peer finished a round), per_peer
        ((running - base) / count) and peak; and the churn record of each churned peer, by
        name (`scripts.churn.churn_record`).
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "inprocess.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return trio.run(_swarm, command_for, count, rounds, timeout, console,
                        churn or ChurnPlan())
    except trio.TooSlowError:
        raise SystemExit(f"the simulation did not finish within {timeout:.0f} s; "
                         "raise --timeout") from None
    finally:
        root.removeHandler(handler)
        handler.close()


@dataclass
class _Slot:
    """The peer running under one index now (a churned peer's restart takes over its slot)."""

    peer: Peer
    done: trio.Event = field(default_factory=trio.Event)  # set when `peer.run` returned


@dataclass
class _Killed:
    name: str
    folder: Path
    round: int
    version: int
    resumed: int | None = None


async def _run(slot: _Slot, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await slot.peer.run(task_status=task_status)
    finally:
        slot.done.set()


async def _swarm(command_for: CommandFor, count: int, rounds: int, timeout: float,
                 console: Console, churn: ChurnPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    first = peer_config(command_for(0, None))
    torch.set_num_threads(first.train.threads or torch.get_num_threads())
    shared = await trio.to_thread.run_sync(
        lambda: SharedModel.load(first.model, first.lora, first.init_seed,
                                 frozen_a=first.train.frozen_a))
    memory: dict[str, Any] = {"base_mib": round(rss_mib(), 1)}
    killed: list[_Killed] = []
    with trio.fail_after(timeout):
        # Load every peer first (seconds each), then join them all at once: joined one by one,
        # the first peers of a 64-peer run finished short runs before the last had loaded.
        loaded = [await _loaded(Peer(first, shared))]
        for index in range(1, count):
            loaded.append(await _loaded(Peer(peer_config(command_for(index, None)), shared)))
        memory["loaded_mib"] = round(rss_mib(), 1)
        async with trio.open_nursery() as nursery:
            slots = [_Slot(loaded[0])]
            node = await nursery.start(_run, slots[0])
            bootstrap = node.listen_addrs[0]
            for index, early in enumerate(loaded[1:], 1):
                peer = Peer(peer_config(command_for(index, bootstrap)), shared)
                peer.runtime = early.runtime  # the same data folder, loaded without a network
                slots.append(_Slot(peer))
                await nursery.start(_run, slots[-1])
            for index, after in churn.kill_after.items():
                config = peer_config(command_for(index, bootstrap))
                nursery.start_soon(_churn_one, nursery, slots, index, after, churn.downtime_s,
                                   config, shared, killed)
            memory["running_mib"] = await _show_progress(slots, rounds, console)
            nursery.cancel_scope.cancel()  # every peer is done and lingering: stop them all
    memory["per_peer_mib"] = round((memory["running_mib"] - memory["base_mib"]) / count, 2)
    memory["peak_mib"] = round(peak_rss_mib(), 1)
    records = {k.name: churn_record(k.folder, killed_at_round=k.round,
                                    version_before_kill=k.version, resumed_version=k.resumed,
                                    restarts=1)
               for k in killed}
    return memory, records


async def _churn_one(nursery: trio.Nursery, slots: list[_Slot], index: int, after: int,
                     downtime_s: float, config: PeerConfig, shared: SharedModel,
                     killed: list[_Killed]) -> None:
    """Crash the peer of `slots[index]` after round `after`; restart it after the downtime."""
    slot = slots[index]
    await slot.peer.wait_rounds(after)
    slot.peer.crash()
    await slot.done.wait()
    folder = config.data_dir
    record = _Killed(folder.name, folder, *last_metrics(folder))
    killed.append(record)
    logging.getLogger(__name__).info("churn: crashed %s after round %d; restarting in %.1f s",
                                     folder.name, record.round, downtime_s)
    await trio.sleep(downtime_s)
    shared.remove_adapter(folder.name)
    restarted = Peer(config, shared)
    runtime = await restarted.load()
    record.resumed = runtime.resumed.version if runtime.resumed is not None else None
    replacement = _Slot(restarted)
    await nursery.start(_run, replacement)
    slots[index] = replacement


async def _loaded(peer: Peer) -> Peer:
    await peer.load()
    return peer


async def _show_progress(slots: list[_Slot], rounds: int, console: Console) -> float:
    """Show the slowest peer's round until every peer is done.

    Returns:
        the resident memory in MiB once every peer had finished its first round (hosts
        connected, optimizer moments allocated, a neighbour's adapter fetched).
    """
    running = None
    with Progress(*progress_columns(), console=console) as progress:
        task = progress.add_task(f"{len(slots)} peers in one process", total=rounds)
        while True:
            slowest = min(slot.peer.round for slot in slots)
            progress.update(task, completed=slowest)
            if slowest >= 1 and running is None:
                running = round(rss_mib(), 1)
            if slowest >= rounds:
                return running if running is not None else round(rss_mib(), 1)
            await trio.sleep(0.5)
