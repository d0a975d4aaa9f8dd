"""Many peers in one trio process, sharing one frozen base model (`simulate.py --in-process`).

Every peer is the real `peer.daemon.Peer` with its own libp2p host on 127.0.0.1, data folder,
optimizer and adapter; only the base model is shared (`peer.shared.SharedModel`), so an added
peer costs its adapter, optimizer moments and token batches instead of a whole model. The
peers take turns on the CPU for forward and backward passes; networking never waits for them.
Peers are configured from the same command lines the process mode runs, so both modes run
the same settings.
"""

from __future__ import annotations

import argparse
import logging
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from peer.config import PeerConfig
from peer.daemon import Peer
from peer.options import add_peer_arguments, config_from_args
from peer.shared import SharedModel

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
                   timeout: float, console: Console) -> dict[str, Any]:
    """Run `count` peers in this process until each has done `rounds` rounds.

    Args:
        command_for: (peer index, bootstrap address or None) -> the peer's command line.

    Returns:
        memory figures in MiB: base (after loading the shared model), loaded (after every
        peer joined), per_peer ((loaded - base) / count) and peak.
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "inprocess.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return trio.run(_swarm, command_for, count, rounds, timeout, console)
    except trio.TooSlowError:
        raise SystemExit(f"the simulation did not finish within {timeout:.0f} s; "
                         "raise --timeout") from None
    finally:
        root.removeHandler(handler)
        handler.close()


async def _swarm(command_for: CommandFor, count: int, rounds: int, timeout: float,
                 console: Console) -> dict[str, Any]:
    first = peer_config(command_for(0, None))
    torch.set_num_threads(first.train.threads or torch.get_num_threads())
    shared = await trio.to_thread.run_sync(
        lambda: SharedModel.load(first.model, first.lora, first.init_seed,
                                 frozen_a=first.train.frozen_a))
    memory: dict[str, Any] = {"base_mib": round(rss_mib(), 1)}
    with trio.fail_after(timeout):
        # Load every peer first (seconds each), then join them all at once: joined one by one,
        # the first peers of a 64-peer run finished short runs before the last had loaded.
        loaded = [await _loaded(Peer(first, shared))]
        for index in range(1, count):
            loaded.append(await _loaded(Peer(peer_config(command_for(index, None)), shared)))
        memory["loaded_mib"] = round(rss_mib(), 1)
        async with trio.open_nursery() as nursery:
            node = await nursery.start(loaded[0].run)
            peers = [loaded[0]]
            for index, early in enumerate(loaded[1:], 1):
                peer = Peer(peer_config(command_for(index, node.listen_addrs[0])), shared)
                peer.runtime = early.runtime  # the same data folder, loaded without a network
                await nursery.start(peer.run)
                peers.append(peer)
            await _show_progress(peers, rounds, console)
    memory["per_peer_mib"] = round((memory["loaded_mib"] - memory["base_mib"]) / count, 2)
    memory["peak_mib"] = round(peak_rss_mib(), 1)
    return memory


async def _loaded(peer: Peer) -> Peer:
    await peer.load()
    return peer


async def _show_progress(peers: list[Peer], rounds: int, console: Console) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{len(peers)} peers in one process", total=rounds)
        while True:
            slowest = min(peer.round for peer in peers)
            progress.update(task, completed=slowest)
            if slowest >= rounds:
                return
            await trio.sleep(0.5)
