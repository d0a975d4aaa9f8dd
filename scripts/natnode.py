"""One network node (no model) for the NAT lab benchmark: announce, relay, serve, fetch, report.

`scripts/bench_nat.py` starts one per lab namespace. Each prints JSON lines on stdout:
{"event": "up", ...} once listening, {"event": "reserved", "s": ...} when a relay first holds a
slot for it (seconds after its first connection), {"event": "fetched", ...} per fetch with its
time and whether the connection was relayed, and {"event": "reachability", ...} per verdict.

    python scripts/natnode.py --listen /ip4/0.0.0.0/tcp/4001 --relay-service on --offer-mb 4
    python scripts/natnode.py --listen /ip4/0.0.0.0/tcp/4001 --bootstrap ADDR --fetch 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.peer.id import ID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gossip.errors import GossipError  # noqa: E402
from gossip.node import GossipNode, NodeConfig  # noqa: E402
from gossip.relay import is_relayed  # noqa: E402
from gossip.swarm import swarm_id  # noqa: E402
from gossip.wire import Announcement, digest, encode_adapter  # noqa: E402

SWARM = swarm_id("bench-nat", {"r": 8}, 0)
ANNOUNCE_EVERY_S = 1.0
UPLOAD_INTERVAL_S = 0.6


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def adapter(megabytes: float, seed: int) -> dict[str, torch.Tensor]:
    """A float32 adapter of about `megabytes` MB, as LoRA A/B pairs of width 576, rank 8."""
    pairs = max(1, math.ceil(megabytes * 1e6 / (2 * 576 * 8 * 4)))
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator)
            for i in range(pairs)
            for name, shape in ((f"m{i}.lora_A.weight", (8, 576)),
                                (f"m{i}.lora_B.weight", (576, 8)))}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        config = NodeConfig(listen=(args.listen,), bootstrap=tuple(args.bootstrap),
                            relay_service=args.relay_service, reachability_interval_s=60.0)
        self.node = GossipNode(config, SWARM, None)
        self.state = adapter(args.offer_mb, args.seed) if args.offer_mb else None
        self.connected_at: float | None = None

    async def run(self) -> None:
        node = self.node
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            emit("up", peer=node.peer_id, addrs=node.listen_addrs)
            for addr in self.args.bootstrap:
                with trio.fail_after(30):
                    await node.connect(addr)
            self.connected_at = time.monotonic()
            if self.state is not None:
                node.offer(1, 16, self.state)
                nursery.start_soon(self._announce)
            nursery.start_soon(self._watch)
            if self.args.fetch:
                await self._fetch_each()
                nursery.cancel_scope.cancel()

    def _announcement(self) -> Announcement:
        assert self.state is not None
        data = encode_adapter(self.state)
        return Announcement(swarm=SWARM, peer=self.node.peer_id, version=1, samples=16,
                            digest=digest(data), nbytes=len(data), train_loss=1.0,
                            addrs=tuple(self.node.announce_addrs))

    async def _announce(self) -> None:
        while True:
            await self.node.publish(self._announcement())
            await trio.sleep(ANNOUNCE_EVERY_S)

    async def _watch(self) -> None:
        """Report reachability verdicts and the first relay slot."""
        node, told, reserved = self.node, None, False
        while True:
            found = node.reachability
            if found.status != "unknown" and found.why != told:
                emit("reachability", status=found.status, why=found.why)
                told = found.why
            if not reserved and node.relay_client.reservations and self.connected_at:
                reserved = True
                emit("reserved", s=round(time.monotonic() - self.connected_at, 3),
                     circuits=node.relay_client.circuit_addrs())
            await trio.sleep(0.05)

    async def _fetch_each(self) -> None:
        """Fetch every announcer named in --fetch-from (or the first ones heard) --fetch times."""
        wanted: set[str] = set(self.args.fetch_from)
        done: set[str] = set()
        with trio.fail_after(self.args.timeout):
            async for heard in self.node.announcements:
                peer = heard.announcement.peer
                if peer in done or (wanted and peer not in wanted):
                    continue
                if not wanted and len(done) >= self.args.peers:
                    break
                self.node.remember(peer, heard.announcement.addrs, via=heard.via)
                if peer in self.args.wait_circuit and \
                        not any("p2p-circuit" in a for a in heard.announcement.addrs):
                    continue  # a private peer's first announcements predate its relay slot
                done.add(peer)
                await self._fetch(heard.announcement)
                if wanted and done >= wanted:
                    break

    async def _fetch(self, announcement: Announcement) -> None:
        dials, punches = self.node.dialer.relayed_dials, self.node.puncher.outcomes
        for _ in range(self.args.fetch):
            relayed_before, punched_before = dials["ok"], punches["successes"]
            await trio.sleep(UPLOAD_INTERVAL_S)  # a server serves one peer once per 0.5 s
            started = time.monotonic()
            try:
                fetched = await self.node.fetch(announcement)
            except GossipError as exc:  # every refusal has a reason: report it, go on
                emit("fetch_failed", peer=announcement.peer, error=str(exc))
                continue
            seconds = time.monotonic() - started
            conns = self.node.host.get_network().get_connections(
                ID.from_base58(announcement.peer))
            # Streams prefer a direct connection: after a punch the bytes came directly.
            emit("fetched", peer=announcement.peer, nbytes=len(fetched.data), s=round(seconds, 4),
                 mbps=round(len(fetched.data) * 8 / seconds / 1e6, 2),
                 relayed=dials["ok"] > relayed_before or any(is_relayed(c) for c in conns),
                 punched=punches["successes"] > punched_before)
        emit("holepunch", **dict(punches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--relay-service", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--offer-mb", type=float, default=0.0, help="serve an adapter this big")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fetch", type=int, default=0, help="fetches of each announcer")
    parser.add_argument("--fetch-from", action="append", default=[], help="announcer ids")
    parser.add_argument("--wait-circuit", action="append", default=[], metavar="ID",
                        help="fetch this peer only once it announces a circuit address")
    parser.add_argument("--peers", type=int, default=1, help="announcers to fetch (no ids)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    trio.run(Bench(args).run)


if __name__ == "__main__":
    main()
