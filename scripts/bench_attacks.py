"""Attacks on an open swarm, measured: a sybil flood, a norm liar, and Byzantine quarters.

    python scripts/bench_attacks.py --json attacks.json

1. **sybil**: `--honest` real peers in one process (`simulate.py --in-process`, the built-in
   small model) while an attacker's host joins through the first one and publishes
   announcements from freshly minted identities at `--sybil-rate` per second (at least
   `--sybils` of them, until the honest peers are done). Each is correctly signed, so every
   honest validator passes it; none ever serves an adapter. Reported: the share of the honest
   peers' fetches that went to honest peers (`honest_fetch_share`), the share of their rounds
   after the first that merged an honest neighbour (`rounds_merging_honest`), and the honest
   share of their live views, sampled every 2 s (`honest_view_share`).
2. **norm_growth**: the review's liar, serving 19.9 x the victim's own norm every round
   (`merge.attack_sim`): the victim's norm after five rounds over its norm in the same run
   without the liar. `norm_growth_adaptive` is a liar that stays just inside the bound.
3. **byzantine_64**: `--peers` peers over `--workers` processes, the last `--byzantine` of them
   serving scaled, noisy or sign-flipped adapters, at the default merge settings: the honest
   peers' mean eval loss over the same run without attackers (1.0: no harm).

Writes `{"sybil": {...}, "norm_growth": z, "byzantine_64": {"scale": r1, "noise": r2,
"signflip": r3}}` and prints a table. The whole benchmark takes most of an hour on 2 cores;
`--skip-byzantine` leaves out part 3 (minutes instead).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from gossip.config import NodeConfig
from gossip.membership import Membership
from gossip.node import GossipNode
from merge.attack_sim import norm_growth_under_liar
from scripts.peerconfigs import TABLE_SEQ_LEN
from testbed.loopback import SybilPublisher, SyntheticPeer
from topology.config import TopologyConfig

ATTACKS = ("scale", "noise", "signflip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="OUT", help="result file")
    parser.add_argument("--out", type=Path, default=Path("bench-attacks"),
                        help="folder for the simulations' outputs")
    parser.add_argument("--honest", type=int, default=8, help="honest peers beside the sybils")
    parser.add_argument("--sybils", type=int, default=1000,
                        help="identities the flood must reach (raise --sybil-rounds if not)")
    parser.add_argument("--sybil-rate", type=float, default=40.0, help="identities per second")
    parser.add_argument("--sybil-rounds", type=int, default=10, help="rounds of the honest peers")
    parser.add_argument("--peers", type=int, default=64)
    parser.add_argument("--byzantine", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle-rounds", type=int, default=6)
    parser.add_argument("--skip-byzantine", action="store_true", help="leave out part 3")
    args = parser.parse_args(argv)
    if args.honest < 2 or args.sybils < 1 or args.sybil_rate <= 0:
        parser.error("need --honest >= 2, --sybils >= 1 and a positive --sybil-rate")
    return args


def simulate(out: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start `simulate.py` with the small built-in model; its output goes to OUT/sim.log."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).with_name("simulate.py")), "--out", str(out),
               "--model", "builtin-small", "--steps-per-round", "1", "--batch-size", "2",
               *TABLE_SEQ_LEN, "--timeout", "3000", *extra]
    log = open(out / "sim.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


# -- 1. sybil flood --------------------------------------------------------------------------


def sybil(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    out = args.out / "sybil"
    process = simulate(out, "--in-process", "--peers", str(args.honest),
                       "--rounds", str(args.sybil_rounds), "--peer-arg=--round-pause=1")
    console.print(f"sybil flood: {args.honest} honest peers, >= {args.sybils} identities")
    try:
        minted, views = trio.run(_flood, args, out / "peers", process)
    finally:
        process.wait(timeout=3000)
    if process.returncode != 0:
        raise SystemExit(f"the honest swarm failed; see {out / 'sim.log'}")
    if minted < args.sybils:
        console.print(f"[yellow]only {minted} identities before the honest peers finished; "
                      "raise --sybil-rounds for more")
    honest = {_status(folder)["peer_id"] for folder in _folders(out / "peers")}
    # Round 1 may end before the flood reaches a peer: rounds from the second on count.
    records = [record for folder in _folders(out / "peers")
               for record in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
               if record.get("round", 0) >= 2 and "tried" in record]
    tried = [peer for record in records for peer in record["tried"]]
    # Sybils never serve: a round that merged anything merged an honest neighbour.
    merging = [record["merged"] > 0 for record in records]
    return {
        "identities": minted,
        "honest_fetch_share": _share(sum(peer in honest for peer in tried), len(tried)),
        "rounds_merging_honest": _share(sum(merging), len(merging)),
        "honest_view_share": _share(sum(views), len(views)),
        "rounds": len(records),
    }


def _share(part: float, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


async def _flood(args: argparse.Namespace, peers: Path,
                 process: subprocess.Popen[bytes]) -> tuple[int, list[float]]:
    """Join through p0 once it is up and mint identities until the honest peers are done."""
    first = peers / "p0"
    with trio.fail_after(600):
        while not (first / "status.json").is_file() or not _status(first).get("listen_addrs"):
            await trio.sleep(0.5)
    status = _status(first)
    swarm = bytes.fromhex(status["swarm_id"])
    node = GossipNode(NodeConfig(bootstrap=(status["listen_addrs"][0],)), swarm, None)
    attacker = SyntheticPeer(node, Membership(node, TopologyConfig(), _rng()))
    views: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(attacker.membership.run)
        await attacker.membership.wait_until(attacker.has_topic_peer)
        publisher = SybilPublisher(attacker)
        nursery.start_soon(_sample_views, peers, publisher, views)
        while process.poll() is None:  # until the honest peers are done
            await publisher.publish(20, gap_s=1.0 / args.sybil_rate)
        nursery.cancel_scope.cancel()
    return len(publisher.minted), views


async def _sample_views(peers: Path, publisher: SybilPublisher, views: list[float]) -> None:
    while True:
        await trio.sleep(2.0)
        if len(publisher.minted) < 100:
            continue  # the flood has not started in earnest yet
        folders = _folders(peers)
        honest = {_status(folder).get("peer_id") for folder in folders}
        for folder in folders:
            live = _status(folder).get("live_peers", [])
            if live:
                views.append(sum(1 for peer in live if peer in honest) / len(live))


def _folders(peers: Path) -> list[Path]:
    return sorted(p for p in peers.iterdir() if (p / "status.json").is_file())


def _status(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / "status.json").read_text()))
    except (OSError, ValueError):  # rewritten this very moment: read it next time
        return {}


def _rng() -> Any:
    import random

    return random.Random(0)


# -- 3. Byzantine quarters -------------------------------------------------------------------


def byzantine(args: argparse.Namespace, console: Console) -> dict[str, float | None]:
    common = ["--in-process", "--workers", str(args.workers), "--peers", str(args.peers),
              "--rounds", str(args.rounds), "--settle-rounds", str(args.settle_rounds)]
    losses: dict[str, float | None] = {}
    for attack in (None, *ATTACKS):
        name = attack or "clean"
        started = time.monotonic()
        extra = [] if attack is None else ["--byzantine", str(args.byzantine), "--attack", attack]
        process = simulate(args.out / f"byzantine-{name}", *common, *extra)
        if process.wait() != 0:
            raise SystemExit(f"the {name} run failed; see {args.out / f'byzantine-{name}'}")
        result = json.loads((args.out / f"byzantine-{name}" / "result.json").read_text())
        losses[name] = result.get("honest_mean_eval_loss")
        console.print(f"{args.peers} peers, {name}: honest loss {losses[name]} "
                      f"({time.monotonic() - started:.0f} s)")
    clean = losses["clean"]
    return {attack: (round(loss / clean, 4) if loss is not None and clean else None)
            for attack, loss in losses.items() if attack != "clean"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    result: dict[str, Any] = {"sybil": sybil(args, console),
                              "norm_growth": round(norm_growth_under_liar(5, adaptive=False), 4),
                              "norm_growth_adaptive": round(norm_growth_under_liar(5), 4)}
    if not args.skip_byzantine:
        result["byzantine_64"] = byzantine(args, console)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = Table("measure", "value", title="attacks")
    for key, value in result["sybil"].items():
        table.add_row(f"sybil {key}", str(value))
    table.add_row("norm growth (19.9x liar, 5 rounds)", str(result["norm_growth"]))
    table.add_row("norm growth (liar at the bound)", str(result["norm_growth_adaptive"]))
    for attack, ratio in result.get("byzantine_64", {}).items():
        table.add_row(f"{args.peers} peers, {args.byzantine} {attack}: honest / clean loss",
                      str(ratio))
    console.print(table)
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
