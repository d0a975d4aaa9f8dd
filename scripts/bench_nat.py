"""Measure the connectivity ladder in the NAT lab: reservation time, relayed and direct rates,
hole punching, and what private peers merge against public ones.

Runs as root (it builds `testbed.natlab` network namespaces; nothing outside them is touched):

1. Nodes (`scripts/natnode.py`, no model): a relay R on a public host serving an adapter, a
   private peer B behind one NAT serving one of the same size, and a private peer A behind
   another NAT that fetches R's (directly) and B's (through R) `--fetches` times each.
   Once with routers that reset unsolicited packets (no hole punch can work) and once with
   "stealth" routers that drop them, as most home routers do (`labs` holds both):
   - reservation_s: seconds from B's first connection until R holds a slot for it (the
     reachability probe, then the reservation), stealth routers;
   - relayed_mbps: A's fetches from B through R (resetting routers), median Mbit/s, dial
     included (each fetch opens its own connection and hangs up after it);
   - direct_mbps: A's fetches from B over a punched connection (stealth routers): the first
     with its relayed dial and punch, the next ones over the connection kept from it; null
     when no punch worked;
   - holepunch: punch attempts and successes in both labs;
   - public_direct_mbps (per lab): A's fetches from R, directly, for comparison.
2. Daemons (`loraswarm peer`, built-in small model): `--publics` public and two private peers
   (behind stealth routers) for `--rounds` rounds; private_merges and public_merges list
   each one's merges, and private_from_private the fetches each private peer made of the
   other's adapter.

    python scripts/bench_nat.py --json bench-nat.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.labpeers import Daemon, wait_for  # noqa: E402
from testbed.natlab import NatLab, Node, lab_unavailable  # noqa: E402

NATNODE = Path(__file__).with_name("natnode.py")
DEFAULT_ADAPTER_MB = 1.84  # the built-in model's default adapter in float32 (README)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, metavar="FILE")
    parser.add_argument("--out", type=Path, default=Path("bench-nat-out"),
                        help="folder for the daemons' data and logs")
    parser.add_argument("--adapter-mb", type=float, default=DEFAULT_ADAPTER_MB)
    parser.add_argument("--fetches", type=int, default=3, help="fetches of each served adapter")
    parser.add_argument("--publics", type=int, default=2, help="public daemons in part 2")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of the daemons in part 2")
    parser.add_argument("--round-pause", type=float, default=3.0,
                        help="seconds between the daemons' rounds in part 2")
    parser.add_argument("--model", default="builtin-small")
    return parser.parse_args(argv)


class NodeProc:
    """A natnode.py process in a lab namespace; its JSON lines, read as they come."""

    def __init__(self, lab: NatLab, node: Node, log: Path, *args: str) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stderr:
            self.proc = lab.popen(node, [sys.executable, str(NATNODE), *args],
                                  stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.events: list[dict[str, Any]] = []

    def wait(self, event: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """The first `event` line (reading lines until it comes)."""
        deadline = time.monotonic() + timeout_s
        for seen in self.events:
            if seen["event"] == event:
                return seen
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"natnode exited before {event!r} (code {self.proc.wait()})")
            self.events.append(json.loads(line))
            if self.events[-1]["event"] == event:
                return self.events[-1]
        raise TimeoutError(f"no {event!r} in {timeout_s:.0f} s")

    def all(self, event: str, timeout_s: float = 300.0) -> list[dict[str, Any]]:
        """Every `event` line, once the process has exited."""
        assert self.proc.stdout is not None
        out, _ = self.proc.communicate(timeout=timeout_s)
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in self.events if e["event"] == event]


def measure_nodes(args: argparse.Namespace, *, stealth: bool) -> dict[str, Any]:
    """Part 1 in a lab of one router kind: reservation time, rates and hole punching."""
    size = str(args.adapter_mb)
    with NatLab(publics=1, homes=2, stealth=stealth) as lab:
        logs = args.out / f"nodes-{'stealth' if stealth else 'reset'}"
        relay = NodeProc(lab, lab.publics[0], logs / "relay.log", "--relay-service", "on",
                         "--offer-mb", size, "--seed", "1")
        up = relay.wait("up")
        boot = next(a for a in up["addrs"] if f"/{lab.publics[0].addr}/" in a)
        private = NodeProc(lab, lab.homes[0], logs / "private.log", "--bootstrap", boot,
                           "--offer-mb", size, "--seed", "2")
        private_id = private.wait("up")["peer"]
        reserved = private.wait("reserved")
        fetcher = NodeProc(lab, lab.homes[1], logs / "fetcher.log", "--bootstrap", boot,
                           "--fetch", str(args.fetches), "--fetch-from", up["peer"],
                           "--fetch-from", private_id, "--wait-circuit", private_id)
        fetched = fetcher.all("fetched")
        punches = next((e for e in reversed(fetcher.events) if e["event"] == "holepunch"), None)
        if punches is None:
            raise RuntimeError(f"the fetcher reported no hole punches: {fetcher.events}")
    from_private = [f for f in fetched if f["peer"] == private_id]
    if len(from_private) != args.fetches or not from_private[0]["relayed"]:
        raise RuntimeError(f"the private peer's adapter did not come through the relay: {fetched}")
    # Direct: over the connection a punch made, in that fetch or kept from an earlier one.
    direct = [f["mbps"] for f in from_private if f["punched"] or not f["relayed"]]
    relayed = [f["mbps"] for f in from_private if f["relayed"] and not f["punched"]]
    public = [f["mbps"] for f in fetched if f["peer"] == up["peer"]]
    return {"reservation_s": reserved["s"],
            "relayed_mbps": statistics.median(relayed) if relayed else None,
            "direct_mbps": statistics.median(direct) if direct else None,
            "public_direct_mbps": statistics.median(public) if public else None,
            "holepunch": {"attempts": punches.get("attempts", 0),
                          "successes": punches.get("successes", 0)},
            "adapter_bytes": fetched[0]["nbytes"], "fetches": fetched}


def measure_daemons(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: merges of private and public daemons over the same rounds."""
    from peer.model import resolve_model

    model = resolve_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    # Every daemon waits for the whole swarm before its first round, so that they all train
    # and merge over the same rounds.
    # Rounds of a few seconds leave the private peers time to reserve a relay slot and to
    # announce it, as they have in a swarm that runs for hours.
    rounds = ("--rounds", str(args.rounds), "--wait-peers", str(args.publics + 1),
              "--round-pause", str(args.round_pause))
    with NatLab(publics=args.publics, homes=2, stealth=True) as lab:
        first = Daemon(lab, lab.publics[0], args.out / "public0", model, *rounds)
        wait_for(lambda: bool(first.status().get("listen_addrs")), "the first public peer",
                 [first])
        boot = first.status()["listen_addrs"][0]
        join = (*rounds, "--bootstrap", boot)
        publics = [first, *(Daemon(lab, node, args.out / f"public{i}", model, *join)
                            for i, node in enumerate(lab.publics[1:], start=1))]
        homes = [Daemon(lab, home, args.out / f"home{i}", model, *join)
                 for i, home in enumerate(lab.homes)]
        for daemon in (*publics, *homes):
            daemon.proc.wait(timeout=900)
        statuses = [d.status() for d in (*publics, *homes)]
    homes_ = statuses[len(publics):]
    ids = [s.get("peer_id", "") for s in homes_]
    return {"public_merges": [s.get("merges", 0) for s in statuses[: len(publics)]],
            "private_merges": [s.get("merges", 0) for s in homes_],
            # fetches each private peer made of the other's adapter (through the relay)
            "private_from_private": [s.get("links", {}).get(other, {}).get("transfers", 0)
                                     for s, other in zip(homes_, ids[::-1], strict=True)],
            "private_reachability": [s.get("reachability", {}).get("status")
                                     for s in statuses[len(publics):]],
            "relayed_dials": [s.get("relay", {}).get("relayed_dials", {}) for s in statuses],
            "rounds": args.rounds}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = lab_unavailable()
    if reason:
        print(f"bench_nat: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    labs = {kind: measure_nodes(args, stealth=kind == "stealth") for kind in ("reset", "stealth")}
    for kind, found in labs.items():
        print(f"routers that {kind}: reservation {found['reservation_s']:.2f} s; relayed "
              f"{found['relayed_mbps']} Mbit/s, direct {found['direct_mbps']} Mbit/s, public "
              f"{found['public_direct_mbps']} Mbit/s; hole punches {found['holepunch']}",
              flush=True)
    reset, stealth = labs["reset"], labs["stealth"]
    result: dict[str, Any] = {
        "reservation_s": stealth["reservation_s"], "relayed_mbps": reset["relayed_mbps"],
        "direct_mbps": stealth["direct_mbps"],
        "holepunch": {key: reset["holepunch"][key] + stealth["holepunch"][key]
                      for key in ("attempts", "successes")},
        "labs": labs,
    }
    result |= measure_daemons(args)
    result["wall_s"] = round(time.monotonic() - started, 1)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"merges over {args.rounds} rounds: private {result['private_merges']}, public "
          f"{result['public_merges']}; {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
