"""Benchmark the network layer: adapter transfer throughput, and how fast gossip spreads.

Two measurements, on real libp2p hosts on 127.0.0.1 in one process (no language model):
  * transfer: our adapter protocol (`GossipNode.fetch`: request frame, header, bytes in 1 MiB
    chunks, sha256 check) against a raw py-libp2p stream moving the same bytes between the same
    two hosts, alternated, median of `--repeats`; `transfer_ratio` = our throughput / raw;
  * spread: swarms of 8, 16 and 32 synthetic peers (`testbed.loopback`) joined through one
    bootstrap peer. A random peer takes a new adapter version; then, round after round, every
    peer fetches from `--fanout` random live neighbours and adopts newer versions.
    `rounds_to_all` is the median, over `--trials` versions started by random peers, of the
    rounds until every peer holds the new version. Pull gossip of this kind needs about
    log_(1+fanout)(N) rounds plus a short tail, so the counts should grow logarithmically.

Examples:
    python scripts/bench_gossip.py --json bench-gossip.json
    python scripts/bench_gossip.py --json out.json --mib 32 --repeats 7 --sizes 8 16 --trials 5
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from rich.console import Console
from rich.table import Table

from gossip.config import NodeConfig
from gossip.node import GossipNode
from gossip.transfer import CHUNK_BYTES, write_all
from gossip.wire import Announcement, encode_adapter
from testbed.loopback import LOOPBACK_SWARM, SyntheticPeer, loopback_swarm
from topology.config import TopologyConfig

RAW_PROTOCOL = TProtocol("/loraswarm/bench-raw/1")
MAX_ROUNDS = 30
SETUP_TIMEOUT_S = 180.0
_STDERR = Console(stderr=True)


def log(message: str) -> None:
    """Progress on stderr, so that stdout holds only the tables and the JSON."""
    _STDERR.log(message)


@dataclass(frozen=True)
class Transfer:
    """Median seconds to move the same bytes both ways, and the size."""

    nbytes: int
    raw_s: float
    ours_s: float

    @property
    def ratio(self) -> float:
        return self.raw_s / self.ours_s


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="FILE",
                        help="where to write {transfer_ratio, rounds_to_all}")
    parser.add_argument("--mib", type=int, default=16, help="adapter size for the transfer")
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers of each kind")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32],
                        help="swarm sizes for the spread measurement")
    parser.add_argument("--trials", type=int, default=3, help="new versions spread per size")
    parser.add_argument("--fanout", type=int, default=2, help="neighbours fetched per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if min(args.mib, args.repeats, args.trials, args.fanout, args.threads) < 1:
        parser.error("--mib, --repeats, --trials, --fanout and --threads must be at least 1")
    if min(args.sizes) <= args.fanout:
        parser.error("every swarm size must exceed --fanout")
    return args


# -- transfer ----------------------------------------------------------------------------------


async def _raw_read(client: GossipNode, server: GossipNode) -> int:
    stream = await client.host.new_stream(ID.from_base58(server.peer_id), [RAW_PROTOCOL])
    received = 0
    while True:
        try:
            chunk = await stream.read(CHUNK_BYTES)
        except EOFError:
            break
        if not chunk:
            break
        received += len(chunk)
    await stream.close()
    return received


async def measure_transfer(mib: int, repeats: int) -> Transfer:
    """Alternate raw-stream and adapter-protocol transfers of the same bytes; medians."""
    state = {"bench.lora_A.weight": torch.randn(mib, 1 << 18)}
    data = encode_adapter(state)
    network = NodeConfig(min_upload_interval_s=0, max_adapter_bytes=len(data) + 64 * 1024)
    raw_times: list[float] = []
    our_times: list[float] = []
    async with trio.open_nursery() as nursery:
        server, client = (GossipNode(network, LOOPBACK_SWARM, identity_dir=None)
                          for _ in range(2))
        for node in (server, client):
            await nursery.start(node.run)
        await client.connect(server.listen_addrs[0])

        async def serve_raw(stream: Any) -> None:
            await write_all(stream, data)
            await stream.close()

        server.host.set_stream_handler(RAW_PROTOCOL, serve_raw)
        offer = server.offer(1, 1, state)  # served as an fp32 keyframe: the same bytes, framed
        announcement = Announcement(
            swarm=LOOPBACK_SWARM, peer=server.peer_id, version=1, samples=1,
            digest=offer.digest, nbytes=offer.keyframe_bytes, train_loss=0.0,
            addrs=tuple(server.listen_addrs),
        )
        for index in range(repeats + 1):  # the first pair warms both paths up, untimed
            for kind in (("raw", "ours") if index % 2 else ("ours", "raw")):
                started = time.perf_counter()
                if kind == "raw":
                    moved = await _raw_read(client, server)
                else:
                    moved = len((await client.fetch(announcement)).data)
                elapsed = time.perf_counter() - started
                if moved < len(data):
                    raise RuntimeError(f"{kind} transfer moved {moved} of {len(data)} bytes")
                if index:
                    (raw_times if kind == "raw" else our_times).append(elapsed)
        nursery.cancel_scope.cancel()
    return Transfer(len(data), statistics.median(raw_times), statistics.median(our_times))


# -- spread ------------------------------------------------------------------------------------


def _ready(peer: SyntheticPeer, fanout: int) -> bool:
    return len(peer.membership.sample(fanout)) == fanout


@dataclass(frozen=True)
class Spread:
    """Rounds until a new version reached every peer, per trial, and setup time."""

    size: int
    rounds: list[int]
    setup_s: float
    round_s: float

    @property
    def median(self) -> int:
        return int(statistics.median_low(self.rounds))


async def measure_spread(size: int, trials: int, fanout: int, seed: int) -> Spread:
    """Start a swarm, wait until everyone can draw `fanout` neighbours, then spread versions."""
    rng = random.Random(seed)
    # Nobody expires during a trial; an announcement lost while meshes form is re-sent after
    # 40 s (peer_timeout_s / 3), well within the setup limit.
    topology = TopologyConfig(fanout=fanout, target_connections=max(4, fanout),
                              peer_timeout_s=120)
    started = time.perf_counter()
    async with loopback_swarm(size, network=NodeConfig(min_upload_interval_s=0),
                              topology=topology, seed=seed) as swarm:
        with trio.fail_after(SETUP_TIMEOUT_S):
            await swarm.announce_all()
            for peer in swarm.peers:
                await peer.membership.wait_until(partial(_ready, peer, fanout))
        setup_s = time.perf_counter() - started
        log(f"{size} peers joined and know {fanout} neighbours each after {setup_s:.1f} s")
        counts: list[int] = []
        round_times: list[float] = []
        for version in range(1, trials + 1):
            source = rng.choice(swarm.peers)
            source.hold(version)
            await source.announce()
            rounds = 0
            while any(peer.version < version for peer in swarm.peers):
                if rounds == MAX_ROUNDS:
                    raise RuntimeError(f"version {version} stalled after {rounds} rounds")
                tick = time.perf_counter()
                await swarm.pull_round(fanout)
                round_times.append(time.perf_counter() - tick)
                rounds += 1
            counts.append(rounds)
            log(f"{size} peers: version {version} reached all in {rounds} rounds")
    return Spread(size, counts, setup_s, statistics.median(round_times))


# -- report ------------------------------------------------------------------------------------


def show(console: Console, transfer: Transfer, spreads: list[Spread], fanout: int) -> None:
    mb = transfer.nbytes / 1e6
    table = Table(title=f"adapter transfer, {mb:.1f} MB over loopback TCP (median)")
    for column in ("path", "seconds", "MB/s", "x raw stream"):
        table.add_column(column, justify="right")
    table.add_row("raw py-libp2p stream", f"{transfer.raw_s:.3f}", f"{mb / transfer.raw_s:.1f}",
                  "1.00")
    table.add_row("loraswarm fetch", f"{transfer.ours_s:.3f}", f"{mb / transfer.ours_s:.1f}",
                  f"{transfer.ratio:.2f}")
    console.print(table)
    table = Table(title=f"pull gossip: rounds until every peer holds a new version "
                        f"(fanout {fanout})")
    for column in ("peers", "rounds (median)", "per trial", f"log_{1 + fanout}(N)",
                   "s per round", "setup s"):
        table.add_column(column, justify="right")
    for spread in spreads:
        table.add_row(str(spread.size), str(spread.median),
                      " ".join(map(str, spread.rounds)),
                      f"{math.log(spread.size, 1 + fanout):.1f}", f"{spread.round_s:.2f}",
                      f"{spread.setup_s:.1f}")
    console.print(table)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    transfer = await measure_transfer(args.mib, args.repeats)
    log(f"transfer: ours {transfer.ours_s:.3f} s, raw {transfer.raw_s:.3f} s")
    spreads = [await measure_spread(size, args.trials, args.fanout, args.seed + size)
               for size in args.sizes]
    show(Console(), transfer, spreads, args.fanout)
    return {
        "transfer_ratio": round(transfer.ratio, 3),
        "rounds_to_all": {str(spread.size): spread.median for spread in spreads},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # libp2p logs every refused dial, failed ping and GRAFT race at WARNING or ERROR, through
    # handlers of its own; the tables are the output here.
    logging.disable(logging.ERROR)
    failed = False
    try:
        result = trio.run(run, args)
    except* trio.TooSlowError:
        failed = True
    if failed:
        _STDERR.print(f"bench_gossip.py: error: a swarm of {max(args.sizes)} peers or fewer "
                      f"was not ready within {SETUP_TIMEOUT_S:.0f} s; try smaller --sizes",
                      style="red", highlight=False)
        return 2
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
