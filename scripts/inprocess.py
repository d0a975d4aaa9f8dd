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
from collections.abc import Sequence
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
from scripts.processes import CommandFor, rounds_done
from scripts.simreport import progress_columns

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


@dataclass(frozen=True)
class Share:
    """The peers one process runs, and how it meets and waits for the rest of the swarm.

    Attributes:
        indices: the peers (by index) this process runs; the first one loads the shared model.
        bootstrap: the address to join through; None: the first peer here is the bootstrap
            (index 0) and every other peer joins through it.
        others: data folders of peers run by other processes; this one keeps its peers up
            (lingering) until those have finished their rounds too.
        log: file name under OUT/logs for the peers' log lines.
    """

    indices: Sequence[int]
    bootstrap: str | None = None
    others: Sequence[Path] = ()
    log: str = "inprocess.log"


def run_in_process(command_for: CommandFor, share: Share, rounds: int, *, out: Path,
                   timeout: float, console: Console,
                   churn: ChurnPlan | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the peers of `share` in this process until every peer has done `rounds` rounds.

    Args:
        command_for: (peer index, bootstrap address or None) -> the peer's command line.
        churn: which peers to crash after which round, and for how long (only those of
            `share.indices` are churned here).

    Returns:
        memory figures in MiB: base (after loading the shared model), loaded (every peer's
        model and data loaded), running (once every peer finished a round), per_peer
        ((running - base) / peers) and peak; and the churn record of each churned peer, by
        name (`scripts.churn.churn_record`).
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / share.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    churn = churn or ChurnPlan()
    plan = ChurnPlan({i: after for i, after in churn.kill_after.items() if i in share.indices},
                     churn.downtime_s)
    try:
        return trio.run(_swarm, command_for, share, rounds, timeout, console, plan)
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


async def _swarm(command_for: CommandFor, share: Share, rounds: int, timeout: float,
                 console: Console, churn: ChurnPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    indices = list(share.indices)
    first = peer_config(command_for(indices[0], None))
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
        for index in indices[1:]:
            loaded.append(await _loaded(Peer(peer_config(command_for(index, None)), shared)))
        memory["loaded_mib"] = round(rss_mib(), 1)
        async with trio.open_nursery() as nursery:
            slots: dict[int, _Slot] = {}
            bootstrap = share.bootstrap
            for index, early in zip(indices, loaded, strict=True):
                if bootstrap is None:  # the swarm's first peer: it needs no address
                    slots[index] = _Slot(early)
                    node = await nursery.start(_run, slots[index])
                    bootstrap = node.listen_addrs[0]
                    continue
                peer = Peer(peer_config(command_for(index, bootstrap)), shared)
                peer.runtime = early.runtime  # the same data folder, loaded without a network
                slots[index] = _Slot(peer)
                await nursery.start(_run, slots[index])
            for index, after in churn.kill_after.items():
                config = peer_config(command_for(index, bootstrap))
                nursery.start_soon(_churn_one, nursery, slots, index, after, churn.downtime_s,
                                   config, shared, killed)
            memory["running_mib"] = await _show_progress(slots, rounds, console)
            await _wait_for_others(share.others, rounds)
            nursery.cancel_scope.cancel()  # every peer is done and lingering: stop them all
    memory["per_peer_mib"] = round((memory["running_mib"] - memory["base_mib"]) / len(indices),
                                   2)
    memory["peak_mib"] = round(peak_rss_mib(), 1)
    records = {k.name: churn_record(k.folder, killed_at_round=k.round,
                                    version_before_kill=k.version, resumed_version=k.resumed,
                                    restarts=1)
               for k in killed}
    return memory, records


async def _wait_for_others(folders: Sequence[Path], rounds: int) -> None:
    """Wait until the peers of the other processes have logged `rounds` rounds each."""
    while any(rounds_done(folder) < rounds for folder in folders):
        await trio.sleep(0.5)


async def _churn_one(nursery: trio.Nursery, slots: dict[int, _Slot], index: int, after: int,
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


async def _show_progress(slots: dict[int, _Slot], rounds: int, console: Console) -> float:
    """Show the slowest peer's round until every peer is done.

    Returns:
        the resident memory in MiB once every peer had finished its first round (hosts
        connected, optimizer moments allocated, a neighbour's adapter fetched).
    """
    running = None
    with Progress(*progress_columns(), console=console) as progress:
        task = progress.add_task(f"{len(slots)} peers in one process", total=rounds)
        while True:
            # Rounds on disk, not `round`: that moves before the round's metrics are written,
            # and a peer cancelled in between would lose its last line.
            slowest = min(slot.peer.completed for slot in slots.values())
            progress.update(task, completed=slowest)
            if slowest >= 1 and running is None:
                running = round(rss_mib(), 1)
            if slowest >= rounds:
                return running if running is not None else round(rss_mib(), 1)
            await trio.sleep(0.5)
