"""Many peers in one trio process, sharing one frozen base model (`simulate.py --in-process`).

Every peer is the real `peer.daemon.Peer` with its own libp2p host on 127.0.0.1, data folder,
optimizer and adapter; only the base model is shared (`peer.shared.SharedModel`), so an added
peer costs its adapter, optimizer moments and token batches instead of a whole model. The
peers take turns on the CPU for forward and backward passes; networking never waits for them.
A kill is `Peer.crash` (no final checkpoint, as after a SIGKILL) and drops the peer's adapter
from the shared model; a restart is a new `Peer` on the same data folder.
"""

from __future__ import annotations

import ctypes
import logging
import resource
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from gossip.node import GossipNode
from peer.config import PeerConfig
from peer.daemon import Peer
from peer.device import resolve
from peer.gate import RoundGate
from peer.parts import NodeFactory
from peer.shared import SharedModel
from scripts.simreport import rounds_done

_M_ARENA_MAX, _M_MMAP_THRESHOLD = -8, -3  # glibc's mallopt parameters (malloc.h)


def share_malloc_arenas() -> bool:
    """Make glibc keep few heap arenas and hand large blocks back on free (False: not glibc).

    glibc gives each thread that allocates its own arena (up to 8 per core) and, once a large
    block has been freed, raises the size below which blocks stay in an arena after their
    free, up to 32 MiB. Peers of one process take turns in worker threads, each step leaving
    its activations (tens of MiB) in whichever arena its thread had. Measured with 16 peers on
    the memory network: 1,488 MiB resident with glibc's defaults, 1,100 with 2 arenas, 982
    with 2 arenas and a fixed 128 KiB mmap threshold (tensors above it are mapped and unmapped
    on their own). Equivalent to MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 2)) and bool(libc.mallopt(_M_MMAP_THRESHOLD,
                                                                      128 * 1024))


def rss_mib() -> float:
    """This process's resident memory now, in MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return peak_rss_mib()


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass
class _Slot:
    """The peer running under one index now (a churned peer's restart takes it over)."""

    peer: Peer
    config: PeerConfig
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # `stop` cancels it
    done: trio.Event = field(default_factory=trio.Event)  # set when `peer.run` returned


class InProcessBackend:
    """The peers of this process, in a nursery it owns; the progress of peers that other
    processes run (`scripts.workers`) is read from their folders."""

    def __init__(self, nursery: trio.Nursery, shared: SharedModel, folders: Sequence[Path],
                 node_factory: NodeFactory = GossipNode, gate: RoundGate | None = None) -> None:
        self._nursery = nursery
        self._shared = shared
        self._folders = folders
        self._node_factory = node_factory
        self.gate = gate  # every peer's, restarts too: they settle in lock step
        self._slots: dict[int, _Slot] = {}
        self._memory = {"base_mib": rss_mib()}
        self._running_of = 0  # how many peers the running_mib figure covers

    @classmethod
    @asynccontextmanager
    async def open(cls, folders: Sequence[Path], log: Path, first: PeerConfig, *,
                   node_factory: NodeFactory = GossipNode,
                   gate: RoundGate | None = None) -> AsyncIterator[InProcessBackend]:
        """Load the base model of `first`, placed by its --device, --dtype, --quantize and
        --attention, which every peer must share (and use its torch threads, 0: all); log to
        `log`.
        The peers' nodes come from `node_factory` (libp2p hosts, or a memory network's); with
        `gate`, they settle in lock step behind it."""
        with logging_to(log):
            share_malloc_arenas()  # before the threads that training and merging run in
            torch.set_num_threads(first.train.threads or torch.get_num_threads())
            shared = await trio.to_thread.run_sync(
                lambda: SharedModel.load(first.model, first.lora, first.init_seed,
                                         frozen_a=first.train.frozen_a,
                                         placement=resolve(first.device)))
            async with trio.open_nursery() as nursery:
                yield cls(nursery, shared, folders, node_factory, gate)
                nursery.cancel_scope.cancel()

    async def start(self, configs: Mapping[int, PeerConfig]) -> None:
        # Load every peer first (seconds each), then join them all at once: joined one by one,
        # the first peers of a 64-peer run finished short runs before the last had loaded.
        peers = {index: self._peer(config) for index, config in configs.items()}
        for peer in peers.values():
            await peer.load()
        self._memory["loaded_mib"] = rss_mib()
        for index, peer in peers.items():
            await self._run(index, peer, configs[index])
        self._nursery.start_soon(self._measure_running, list(self._slots.values()))

    async def kill(self, index: int) -> bool:
        slot = self._slots[index]
        if slot.done.is_set():
            return False
        slot.peer.crash()
        await slot.done.wait()
        return True

    async def restart(self, index: int) -> None:
        config = self._slots[index].config
        self._shared.remove_adapter(config.data_dir.name)
        peer = self._peer(config)
        await peer.load()
        await self._run(index, peer, config)

    def progress(self, index: int) -> int:
        # `completed`, not `round`: that moves before the round's metrics line is written.
        slot = self._slots.get(index)
        return slot.peer.completed if slot else rounds_done(self._folders[index])

    async def stop(self, index: int) -> None:
        # As SIGTERM stops a process; a peer without --linger returns by itself.
        slot = self._slots.get(index)
        if slot is not None and slot.config.linger_s and not slot.done.is_set():
            slot.peer.request_stop()
            slot.scope.cancel()

    def check(self) -> None:
        """Nothing to look at: a peer that fails raises through the nursery, ending the run."""

    async def wait(self) -> None:
        for slot in list(self._slots.values()):
            await slot.done.wait()

    def memory(self, peers: int) -> dict[str, Any]:
        """Resident MiB: base (the shared model), loaded (every peer's model and data),
        running (every peer past round 1: hosts connected, optimizer moments allocated),
        per_peer ((running - base) / peers) and peak."""
        memory: dict[str, Any] = {"running_mib": rss_mib(), **self._memory}
        memory["per_peer_mib"] = round((memory["running_mib"] - memory["base_mib"]) / peers, 2)
        return {**memory, "peak_mib": peak_rss_mib()}

    def _peer(self, config: PeerConfig) -> Peer:
        return Peer(config, self._shared, node_factory=self._node_factory, gate=self.gate)

    async def _run(self, index: int, peer: Peer, config: PeerConfig) -> None:
        self._slots[index] = _Slot(peer, config)
        await self._nursery.start(_serve, self._slots[index])

    async def _measure_running(self, slots: list[_Slot]) -> None:
        # Each `start` measures over the peers started so far; the widest measure wins.
        for slot in slots:
            await slot.peer.wait_rounds(1)
        if len(slots) >= self._running_of:
            self._running_of, self._memory["running_mib"] = len(slots), rss_mib()


async def _serve(slot: _Slot, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    try:
        with slot.scope:
            await slot.peer.run(task_status=task_status)
    finally:
        slot.done.set()


@contextmanager
def logging_to(path: Path, *, mode: str = "a") -> Iterator[None]:
    """Every logger's INFO lines go to `path` while the block runs (the peers' log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode=mode)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
