"""Run a simulated swarm on any backend: launch, one watch loop with churn, stop.

Peer 0 starts first; in gossip mode the address it writes to its status.json is every other
peer's bootstrap. The watch loop follows each peer's completed rounds and churns the planned
ones; once every peer has done its rounds (the lingering ones serving slower ones till then),
it stops the peers still serving and waits for all to exit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.progress import Progress

from gossip.memory import LinkShape, MemoryNetwork
from peer.config import PeerConfig
from peer.errors import PeerError
from peer.gate import RoundGate
from scripts.backends import Backend, ProcessBackend, SimulationError, Watched
from scripts.churn import Churn, ChurnPlan
from scripts.links import LinkedSwarm, linked_swarm
from scripts.peerconfigs import with_bootstrap
from scripts.simreport import progress_columns
from testbed.wan import Link

TICK_S = 0.5  # how often the watch loop looks at the peers
MAX_BARS = 16  # more peers than this share one progress bar, the slowest peer's


@dataclass(frozen=True)
class Settings:
    """How the simulator runs its peers; JSON-able, for the workers (`scripts.workers`)."""

    rounds: int  # each peer's, training and settling: the watch loop waits for them all
    timeout: float  # seconds before the run is given up
    bootstrap: bool  # the peers join through peer 0 (gossip); else each runs alone
    in_process: bool
    workers: int  # with in_process: processes the peers are spread over
    out: Path  # logs go to OUT/logs
    links: tuple[str, ...] = ()  # peer i's link (`testbed.wan.Link` text; "": none)
    network: str = "libp2p"  # or "memory": in process, over `gossip.memory.MemoryNetwork`
    settle_schedule: str = "paced"  # or "together": peers of one process settle in lock step


@dataclass(frozen=True)
class SwarmRun:
    churn: dict[str, dict[str, Any]]  # each churned peer's record (`churn_record`), by name
    memory: dict[str, Any] | None  # resident MiB, for peers run in process
    links: list[dict[str, Any]] | None = None  # each linked peer's link and proxy statistics
    network: dict[str, Any] | None = None  # the memory network's counters
    gate: dict[str, Any] | None = None  # the settling gate's statistics (`peer.gate`)


def run_swarm(configs: Sequence[PeerConfig], plan: ChurnPlan, settings: Settings,
              console: Console) -> SwarmRun:
    """Run every peer of `configs` for `settings.rounds` rounds on the backend settings name.

    Raises:
        SimulationError: a peer or worker failed, or the run took longer than the timeout.
        PeerError: a peer's model, data or settings are bad.
    """
    # A stale address from an earlier run into the same folder would misdirect every joiner.
    (configs[0].data_dir / "status.json").unlink(missing_ok=True)
    if settings.in_process and settings.workers > 1:
        from scripts.workers import run_workers

        return run_trio(run_workers, configs, plan, settings, console, timeout=settings.timeout)
    return run_trio(_run, configs, plan, settings, console, timeout=settings.timeout)


async def _run(configs: Sequence[PeerConfig], plan: ChurnPlan, settings: Settings,
               console: Console) -> SwarmRun:
    if settings.network == "memory":
        return await _run_in_memory(configs, plan, settings, console)
    logs, folders = settings.out / "logs", [config.data_dir for config in configs]
    gate: RoundGate | None = None
    # The proxies outlive the peers: they close only after every peer has exited.
    async with linked_swarm(settings.links, folders, seed=0) as linked:
        peers = {index: linked.configure(index, config) for index, config in enumerate(configs)}
        if not settings.in_process:
            async with ProcessBackend(logs) as processes:
                records = await drive(processes, peers, folders, plan, settings, console,
                                      linked=linked)
            memory = None
        else:
            from scripts.inprocess import InProcessBackend

            async with InProcessBackend.open(folders, logs / "inprocess.log", configs[0],
                                             gate=settle_gate(settings)) as backend:
                records = await drive(backend, peers, folders, plan, settings, console,
                                      linked=linked)
            memory = backend.memory(len(configs))
            gate = backend.gate
        return SwarmRun(records, memory, linked.statistics() if linked.proxies else None,
                        gate=asdict(gate.statistics()) if gate is not None else None)


async def _run_in_memory(configs: Sequence[PeerConfig], plan: ChurnPlan, settings: Settings,
                         console: Console) -> SwarmRun:
    """The peers in this process over a `MemoryNetwork`: each link is its peer's shape there,
    not a proxy."""
    from scripts.inprocess import InProcessBackend

    folders = [config.data_dir for config in configs]
    network = MemoryNetwork(links={folders[index].name: memory_link(text)
                                   for index, text in enumerate(settings.links) if text})
    gate = settle_gate(settings)
    async with InProcessBackend.open(folders, settings.out / "logs" / "inprocess.log",
                                     configs[0], node_factory=network.node,
                                     gate=gate) as backend:
        records = await drive(backend, dict(enumerate(configs)), folders, plan, settings,
                              console)
    return SwarmRun(records, backend.memory(len(configs)), network=network.statistics(),
                    gate=asdict(gate.statistics()) if gate is not None else None)


def settle_gate(settings: Settings) -> RoundGate | None:
    """The gate the peers of this process settle behind, with `settle_schedule` "together".

    Not across worker processes (`scripts.workers` opens its backends without one): a gate sees
    only its own process's peers, and its unpaced settling rounds would outrun the other
    workers' peers, which still train or settle at their own pace.
    """
    return RoundGate() if settings.settle_schedule == "together" else None


def memory_link(text: str) -> LinkShape:
    """A `--link` text as a peer's link on the memory network (its jitter is not modelled).

    Raises:
        ValueError: a bad link, in one line.
    """
    link = Link.parse(text)
    return LinkShape(delay_s=link.delay_s,
                     rate_bps=link.rate_bps / 8 if link.rate_bps else float("inf"))


async def drive(backend: Backend, peers: Mapping[int, PeerConfig], folders: Sequence[Path],
                plan: ChurnPlan, settings: Settings, console: Console, *,
                linked: LinkedSwarm | None = None) -> dict[str, dict[str, Any]]:
    """Launch `peers` (index -> config; some or all of `folders`), then watch and churn them.

    With `linked`, the others join peer 0 through its link proxy, if it has one.

    Returns:
        the churn record of each churned peer, by name.
    """
    if 0 in peers:
        await backend.start({0: peers[0]})
    rest = {index: config for index, config in peers.items() if index != 0}
    if settings.bootstrap and rest:
        address = await wait_for_address(folders[0], check=backend.check)
        if linked is not None:
            address = linked.bootstrap_address(0, address)
        rest = {index: with_bootstrap(config, address) for index, config in rest.items()}
    if rest:
        await backend.start(rest)
    churn = Churn(plan, backend, folders)
    await watch(backend, folders, settings.rounds, console, churn=churn)
    return churn.records()


async def wait_for_address(folder: Path, *, check: Callable[[], None]) -> str:
    """The first listen address in a peer's status.json; `check` may raise to give up."""
    while True:
        check()
        status = folder / "status.json"
        addrs = json.loads(status.read_text())["listen_addrs"] if status.is_file() else []
        if addrs:
            return str(addrs[0])
        await trio.sleep(0.2)


async def watch(backend: Watched, folders: Sequence[Path], rounds: int, console: Console, *,
                churn: Churn | None = None) -> None:
    """Show progress until every peer has done `rounds` rounds and no churned one is down;
    then stop the peers still serving and wait until all have exited."""
    with Progress(*progress_columns(), console=console) as progress:
        show = _bars(progress, [folder.name for folder in folders], rounds)
        while True:
            backend.check()
            done = [backend.progress(index) for index in range(len(folders))]
            show(done)
            if churn is not None:
                await churn.poll(done)
            if min(done) >= rounds and not (churn and churn.pending()):
                break
            await trio.sleep(TICK_S)
        for index in range(len(folders)):
            await backend.stop(index)
        await backend.wait()
        backend.check()
        show([backend.progress(index) for index in range(len(folders))])


def _bars(progress: Progress, names: Sequence[str],
          rounds: int) -> Callable[[Sequence[int]], None]:
    """A bar per peer, or for many peers one bar that follows the slowest."""
    if len(names) > MAX_BARS:
        task = progress.add_task(f"{len(names)} peers", total=rounds)
        return lambda done: progress.update(task, completed=min(done))
    tasks = [progress.add_task(f"peer {name}", total=rounds) for name in names]

    def show(done: Sequence[int]) -> None:
        for task, completed in zip(tasks, done, strict=True):
            progress.update(task, completed=completed)

    return show


def run_trio(function: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """`trio.run(function, *args)` within `timeout` seconds; the first `SimulationError` or
    `PeerError` comes out of trio's exception groups, to be shown as one line."""

    async def limited() -> Any:
        with trio.fail_after(timeout):
            return await function(*args)

    try:
        return trio.run(limited)
    except* trio.TooSlowError:
        raise SimulationError(f"the simulation did not finish within {timeout:.0f} s; "
                              "raise --timeout") from None
    except* (SimulationError, PeerError) as group:
        raise _first(group) from None


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
