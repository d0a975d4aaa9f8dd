"""Measure what a larger fanout in settling rounds buys: rounds and bytes to consensus.

Settling rounds (`--settle-rounds`) train nothing, so they can afford more fetches than
training rounds. For each swarm size of `--peers` and each settle fanout of `--fanouts`, one
`scripts/simulate.py --in-process` run with the same seed, data and training (`--rounds`
rounds at `--fanout`), then `--settle-rounds` merge-only rounds at that settle fanout; from its
result.json, per (peers, settle fanout):

  * settle_rounds_to_consensus: settling rounds until the consensus distance is below 1 %
    (null: not within `--settle-rounds`);
  * settle_bytes_per_peer: adapter bytes a peer received in those settling rounds (the deltas
    of its metrics lines' bytes_in), mean over peers; null when consensus was not reached, and
    then `all_settle_bytes_per_peer` still says what every settling round cost;
  * merged_per_settle_round: neighbours merged per peer and settling round, mean;
  * consensus_after_training, final_consensus: the distance before and after settling;
  * wall_s: the whole run's seconds (the settling rounds are paced to the last training
    round, so they do not shrink with the fanout); settle_s: the settling rounds' seconds until
    consensus (all of them when not reached), mean over peers.

The JSON is rewritten after each run, so a bench stopped early keeps what it measured, and
`--resume` skips the runs already in it.

Examples:
    python scripts/bench_settle.py --json bench-settle.json
    python scripts/bench_settle.py --json out.json --peers 64 --fanouts 2,8 --workers 2
Arguments after `--` go to every simulate.py run (not --out, --peers or the fanouts); its
--timeout is 8 s a peer (at least 1,800) unless one is given there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.peerconfigs import TABLE_SEQ_LEN

SIMULATE = Path(__file__).with_name("simulate.py")


def _sizes(text: str) -> list[int]:
    values = [int(item) for item in text.split(",") if item.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 8,16, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, metavar="FILE")
    parser.add_argument("--out", type=Path, default=Path("bench-settle-out"),
                        help="folder of the swarms' result folders (OUT/pPEERS-fFANOUT)")
    parser.add_argument("--peers", type=_sizes, default=[8, 16], metavar="N,N",
                        help="swarm sizes (64 takes about half an hour a run here)")
    parser.add_argument("--fanouts", type=_sizes, default=[2, 4, 8], metavar="K,K",
                        help="settle fanouts; each must be at most the view size (64)")
    parser.add_argument("--fanout", type=int, default=2, help="fanout of the training rounds")
    parser.add_argument("--rounds", type=int, default=3, help="training rounds")
    parser.add_argument("--settle-rounds", type=int, default=8,
                        help="settling rounds: the most the count to consensus can be")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--model", default="builtin-small",
                        help="the simulator's --model (builtin-small: 16 peers fit 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1,
                        help="the simulator's --workers (2 for 64 peers on 2 cores)")
    parser.add_argument("--network", help="the simulator's --network, passed on only if given")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --json instead of running them again")
    parser.add_argument("simulate", nargs="*", metavar="-- SIMULATE_ARG",
                        help="more simulate.py arguments, after --")
    args = parser.parse_args(argv)
    if min(args.fanout, args.rounds, args.settle_rounds, args.workers) < 1:
        parser.error("--fanout, --rounds, --settle-rounds and --workers must be at least 1")
    return args


def run_timeout(peers: int) -> int:
    """The simulator's --timeout for a swarm of `peers`: its 1,800 s default ends a 1,000-peer run
    (about 5,000 s here) in its first training round. A later `-- --timeout` wins."""
    return max(1800, 8 * peers)


def simulate_command(args: argparse.Namespace, peers: int, fanout: int, out: Path) -> list[str]:
    """The simulate.py command line of one run."""
    command = [sys.executable, str(SIMULATE), "--in-process", "--peers", str(peers),
               "--model", args.model, "--rounds", str(args.rounds),
               "--steps-per-round", str(args.steps_per_round),
               "--batch-size", str(args.batch_size), *TABLE_SEQ_LEN, "--fanout", str(args.fanout),
               "--settle-rounds", str(args.settle_rounds), "--settle-fanout", str(fanout),
               "--eval-every", str(args.rounds + args.settle_rounds), "--seed", str(args.seed),
               "--out", str(out), "--timeout", str(run_timeout(peers))]
    if args.workers > 1:
        command += ["--workers", str(args.workers)]
    if args.network is not None:
        command += ["--network", args.network]
    return command + list(args.simulate)


def run_one(args: argparse.Namespace, peers: int, fanout: int) -> dict[str, Any]:
    """One simulated swarm; returns its result.json (exits if the run failed)."""
    out = args.out / f"p{peers}-f{fanout}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {peers} peers, settle fanout {fanout} -> {out}",
          flush=True)
    with (out / "bench.log").open("wb") as log:
        done = subprocess.run(simulate_command(args, peers, fanout, out), stdout=log,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"simulate.py failed ({done.returncode}); see {out / 'bench.log'}")
    return json.loads((out / "result.json").read_text())


def _at(series: Sequence[Mapping[str, Any]], round_: int, key: str) -> float:
    """`key` of the last line at or before `round_` (0 before any line)."""
    lines = [r for r in series if r["round"] <= round_ and r.get(key) is not None]
    return float(lines[-1][key]) if lines else 0.0


def summarize(result: Mapping[str, Any], *, trained: int) -> dict[str, Any]:
    """One (peers, settle fanout) row from a run's result.json (see the module docstring)."""
    settled = result["settle_rounds_to_consensus"]
    last = max(r["round"] for peer in result["peers"] for r in peer["round_series"])
    until = trained + settled if settled is not None else last
    series = [peer["round_series"] for peer in result["peers"]]

    def per_peer(key: str, end: int) -> float:
        return statistics.fmean(_at(s, end, key) - _at(s, trained, key) for s in series)

    merged = [r["merged"] for s in series for r in s if r["round"] > trained]
    distances = {e["round"]: e["distance"] for e in result["consensus"]}
    return {
        "settle_rounds_to_consensus": settled,
        "settle_bytes_per_peer": None if settled is None else round(per_peer("bytes_in", until)),
        "all_settle_bytes_per_peer": round(per_peer("bytes_in", last)),
        "merged_per_settle_round": round(statistics.fmean(merged), 3) if merged else None,
        "consensus_after_training": distances.get(trained),
        "final_consensus": distances.get(last),
        "settle_s": round(per_peer("t", until), 1),
        "wall_s": result["wall_s"],
        "mean_eval_loss": result["mean_eval_loss"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    previous = json.loads(args.json.read_text()) if args.resume and args.json.exists() else {}
    result: dict[str, Any] = {
        "setup": {"peers": args.peers, "fanouts": args.fanouts, "fanout": args.fanout,
                  "rounds": args.rounds, "settle_rounds": args.settle_rounds,
                  "steps_per_round": args.steps_per_round, "batch_size": args.batch_size,
                  "model": args.model, "seed": args.seed, "workers": args.workers,
                  "network": args.network, "simulate_args": args.simulate},
        "runs": previous.get("runs", {}),
    }
    for peers in args.peers:
        rows = result["runs"].setdefault(str(peers), {})
        for fanout in args.fanouts:
            if str(fanout) in rows:
                print(f"{peers} peers, settle fanout {fanout}: kept from {args.json}", flush=True)
                continue
            rows[str(fanout)] = summarize(run_one(args, peers, fanout), trained=args.rounds)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")  # progress survives
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for peers, rows in result["runs"].items():
        for fanout, row in rows.items():
            print(f"{peers:>3} peers  settle fanout {fanout:>2}: "
                  f"{row['settle_rounds_to_consensus']} rounds, "
                  f"{row['settle_bytes_per_peer']} B/peer, {row['settle_s']} s settling, "
                  f"final consensus {row['final_consensus']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
