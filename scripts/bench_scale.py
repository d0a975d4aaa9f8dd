"""Benchmark the simulator at scale: the memory network beside real libp2p, one row per run.

Each run is `scripts/simulate.py` with one schedule (default: the scale table's, `--model
builtin-small --rounds 3 --steps-per-round 1 --batch-size 2 --seq-len 48 --settle-rounds 6
--eval-every 9`)
on one network and number of peers, named `NETWORK:PEERS`:

    memory:1000      --network memory
    libp2p:16        --in-process (every libp2p host in one process)
    libp2p-w2:64     --in-process --workers 2

The JSON (`--json OUT`) maps each run's name to its row:
  * wall_s, s_per_training_round (median over peers of their training rounds after the first);
  * running_mib, peak_mib, per_peer_mib (from result.json's `memory`);
  * merges_per_peer (min and median over peers, of every round), training_rounds_merged_none
    (training rounds, over all peers, whose metrics line merged nothing), rounds (per peer);
  * distance_trained (consensus distance after the last training round), distance_settled
    (after the last settling round), settle_rounds_to_consensus (< 1 %, None: not reached);
  * mean_eval_loss, mean_eval_loss_before (of the peers that evaluate: `--eval-peers`);
  * bytes_in_per_peer (mean over peers);
  * slope_mib_per_peer (top level): peak MiB per added peer between the two largest memory
    runs.
`--resume` keeps the rows already in OUT; a run that fails is recorded with its error.

    python scripts/bench_scale.py --json docs/bench-scale.json \\
        --runs memory:16,libp2p:16,memory:64,libp2p-w2:64,memory:256,memory:1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.peerconfigs import TABLE_SEQ_LEN  # noqa: E402
from scripts.simreport import read_metrics  # noqa: E402

SCHEDULE = ["--model", "builtin-small", "--rounds", "3", "--steps-per-round", "1",
            "--batch-size", "2", *TABLE_SEQ_LEN, "--settle-rounds", "6", "--eval-every", "9"]
NETWORKS = {"memory": ["--network", "memory"], "libp2p": ["--in-process"],
            "libp2p-w2": ["--in-process", "--workers", "2"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where the rows go")
    parser.add_argument("--runs", default="memory:16,libp2p:16",
                        help="comma-separated NETWORK:PEERS, NETWORK one of "
                        f"{', '.join(NETWORKS)}")
    parser.add_argument("--out", type=Path, default=Path("bench-scale-out"),
                        help="the simulations' folders")
    parser.add_argument("--eval-peers", type=int, default=16,
                        help="peers that evaluate in each run (simulate.py --eval-peers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument("--extra", action="append", default=[], metavar="ARG",
                        help="another simulate.py argument for every run (repeatable)")
    parser.add_argument("--resume", action="store_true", help="keep rows already in --json")
    args = parser.parse_args(argv)
    try:
        args.plan = [_parse_run(text) for text in args.runs.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _parse_run(text: str) -> tuple[str, str, int]:
    network, _, peers = text.partition(":")
    if network not in NETWORKS or not peers.isdigit() or int(peers) < 2:
        raise ValueError(f"--runs: {text!r} is not NETWORK:PEERS (NETWORK one of "
                         f"{', '.join(NETWORKS)}, PEERS at least 2)")
    return text, network, int(peers)


def run_one(args: argparse.Namespace, network: str, peers: int, out: Path) -> dict[str, Any]:
    """One simulation, then its row (see the module docstring)."""
    command = [sys.executable, str(ROOT / "scripts" / "simulate.py"), *NETWORKS[network],
               "--peers", str(peers), "--out", str(out), "--seed", str(args.seed),
               "--eval-peers", str(min(args.eval_peers, peers)),
               "--timeout", str(args.timeout), *SCHEDULE, *args.extra]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout + 120)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "wall_s": round(time.monotonic() - started, 1)}
    return row(json.loads((out / "result.json").read_text()), out, trained=3)


def row(result: dict[str, Any], out: Path, *, trained: int) -> dict[str, Any]:
    # Worker processes keep their peers' pN.toml beside the folders.
    metrics = [read_metrics(folder) for folder in sorted((out / "peers").iterdir())
               if folder.is_dir()]
    per_round = [line for lines in metrics for line in lines if line.get("round", 0) > 0]
    training = [line for line in per_round if line["round"] <= trained]
    later = [line["round_s"] for line in training if line["round"] > 1 and line.get("round_s")]
    merges = [sum(line.get("merged", 0) for line in lines) for lines in metrics]
    series = result.get("consensus", [])
    distance = {entry["round"]: entry["distance"] for entry in series}
    memory = result.get("memory", {})
    return {
        "wall_s": result["wall_s"],
        "s_per_training_round": round(statistics.median(later), 2) if later else None,
        "running_mib": memory.get("running_mib"), "peak_mib": memory.get("peak_mib"),
        "per_peer_mib": memory.get("per_peer_mib"),
        "merges_per_peer": {"min": min(merges), "median": statistics.median(merges)},
        "training_rounds_merged_none": sum(1 for line in training if not line.get("merged")),
        "training_rounds": len(training),
        "rounds": max(line["round"] for line in per_round),
        "distance_trained": distance.get(trained),
        "distance_settled": distance.get(max(distance)) if distance else None,
        "settle_rounds_to_consensus": result.get("settle_rounds_to_consensus"),
        "mean_eval_loss": result.get("mean_eval_loss"),
        "mean_eval_loss_before": result.get("mean_eval_loss_before"),
        "bytes_in_per_peer": round(statistics.mean(
            lines[-1].get("bytes_in", 0) for lines in metrics if lines)),
        "network": result.get("network"),
    }


def slope(rows: dict[str, dict[str, Any]]) -> float | None:
    """Peak MiB per added peer between the two largest memory-network runs."""
    sizes = sorted((int(name.split(":")[1]), data["peak_mib"]) for name, data in rows.items()
                   if name.startswith("memory:") and data.get("peak_mib"))
    if len(sizes) < 2:
        return None
    (small, low), (large, high) = sizes[-2], sizes[-1]
    return round((high - low) / (large - small), 3) if large > small else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: dict[str, Any] = {}
    if args.resume and args.json.is_file():
        rows = json.loads(args.json.read_text()).get("runs", {})
    for name, network, peers in args.plan:
        if name in rows and "error" not in rows[name]:
            continue
        print(f"{name}: running", flush=True)
        rows[name] = run_one(args, network, peers, args.out / name.replace(":", "-"))
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
        document = {"runs": rows, "slope_mib_per_peer": slope(rows),
                    "schedule": SCHEDULE, "seed": args.seed}
        args.json.write_text(json.dumps(document, indent=2))  # partial results survive a stop
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
