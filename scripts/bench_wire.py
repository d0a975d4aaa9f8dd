"""Measure the wire codecs in real swarms over emulated wide-area links, and per fetch.

For each codec, one `scripts/simulate.py --in-process` swarm per link (`--link
delay=DELAY,rate=RATE` on every peer, `--peer-arg=--wire-codec=CODEC`, the same seed, data and
schedule), then reads its result.json:

  * bytes_per_peer_round: bytes a peer sent (uploads), per peer and round, in the first link's
    run (bytes do not depend on the link);
  * eval_loss: the mean over peers of the final eval loss, in the first link's run;
  * consensus: the consensus distance after the last round (settling rounds included);
  * wall_s: {link: seconds} of each run;
  * merged_every_round: whether every peer merged `--fanout` neighbours in every training
    round of every link's run.

and, as `local`, the eval loss of the same peers each training alone (`--mode local`).

Then, for the Qwen2-0.5B adapter shape of `bench_merge` (r = 16 on q, k, v, o), the bytes of
one round's update per codec (a keyframe for fp32, one error-feedback step otherwise, as
`bench_codecs` measures them) and the seconds to fetch them through a `testbed.wan.LinkProxy`
of the first link: a request on an open connection, timed to the last byte (`qwen_fetch_s`).

Examples:
    python scripts/bench_wire.py --json bench-wire.json
    python scripts/bench_wire.py --json out.json --codecs fp32 topk:0.02+zstd --links 20mbit \\
        -- --rounds 4
Arguments after `--` go to every simulate.py run (they must not set --out, --link or --seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import trio

from gossip.config import NodeConfig
from scripts.bench_codecs import measure
from scripts.bench_merge import random_adapter
from scripts.peerconfigs import TABLE_SEQ_LEN
from testbed.wan import Link, LinkProxy

CODECS = ("fp32", "bf16", "int8+zstd", "sign", "ternary:0.1+zstd", "ternary:0.05+zstd",
          "topk:0.05+zstd", "topk:0.02+zstd", "topk:0.01+zstd")
SIMULATE = Path(__file__).with_name("simulate.py")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="FILE")
    parser.add_argument("--out", type=Path, default=Path("bench-wire-out"),
                        help="folder of the swarms' result folders (OUT/CODEC/LINK)")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), metavar="SPEC")
    parser.add_argument("--links", nargs="+", default=["20mbit", "5mbit"], metavar="RATE",
                        help="each link's rate; the first one's run gives bytes and loss")
    parser.add_argument("--delay", default="50ms", help="one-way delay of every link")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--fanout", type=int, default=2)
    parser.add_argument("--settle-rounds", type=int, default=3,
                        help="merge-only rounds after training: where a lossy estimate catches up")
    parser.add_argument("--model", default="builtin-small",
                        help="the simulator's --model (builtin-small: 8 peers fit 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to this many of a codec's link runs at once (their wall "
                             "times then share the machine)")
    parser.add_argument("--no-local", dest="local", action="store_false",
                        help="skip the local-only baseline run (its eval loss is what tells "
                             "whether gossip, with any codec, helped at all)")
    parser.add_argument("--resume", action="store_true",
                        help="read the result.json of a run already in --out instead of running "
                             "it again (a bench cut short, or more codecs later)")
    parser.add_argument("--qwen-only", action="store_true",
                        help="only the Qwen2-0.5B-shape fetch times (seconds, no swarm)")
    parser.add_argument("simulate", nargs="*", metavar="-- SIMULATE_ARG",
                        help="more simulate.py arguments, after --")
    return parser.parse_args(argv)


def run_swarm(args: argparse.Namespace, codec: str, rate: str) -> dict[str, Any]:
    """One simulated swarm; returns its result.json (raises if the run failed)."""
    out = args.out / codec.replace(":", "_").replace("+", "_") / rate
    if args.resume and (out / "result.json").exists():
        print(f"{codec} over {rate}: kept {out / 'result.json'}", flush=True)
        return json.loads((out / "result.json").read_text())
    command = [sys.executable, str(SIMULATE), "--in-process", "--peers", str(args.peers),
               "--model", args.model, *TABLE_SEQ_LEN, "--fanout", str(args.fanout),
               "--settle-rounds", str(args.settle_rounds), "--seed", str(args.seed),
               "--link", f"delay={args.delay},rate={rate}", f"--peer-arg=--wire-codec={codec}",
               "--out", str(out), *args.simulate]
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {codec} over {args.delay} / {rate} -> {out}",
          flush=True)
    with (out / "bench.log").open("wb") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"simulate.py failed ({done.returncode}); see {out / 'bench.log'}")
    return json.loads((out / "result.json").read_text())


def run_local(args: argparse.Namespace) -> dict[str, Any]:
    """The same peers, each training alone (`--mode local`, no link): what gossip must beat."""
    out = args.out / "local"
    if not (args.resume and (out / "result.json").exists()):
        command = [sys.executable, str(SIMULATE), "--in-process", "--mode", "local",
                   "--peers", str(args.peers), "--model", args.model, *TABLE_SEQ_LEN,
                   "--seed", str(args.seed),
                   "--out", str(out), *args.simulate]
        out.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] local-only baseline -> {out}", flush=True)
        with (out / "bench.log").open("wb") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"simulate.py --mode local failed; see {out / 'bench.log'}")
    result = json.loads((out / "result.json").read_text())
    return {"eval_loss": result["mean_eval_loss"], "wall_s": result["wall_s"]}


def merged_every_round(result: dict[str, Any], fanout: int) -> bool:
    """Whether every peer merged `fanout` neighbours in every training round (settling rounds
    skip a neighbour whose version they merged already)."""
    rounds = [r for peer in result["peers"] for r in peer["round_series"]
              if r["round"] >= 1 and r.get("train_loss") is not None]
    return bool(rounds) and all(r["merged"] >= fanout for r in rounds)


def summarize(runs: dict[str, dict[str, Any]], fanout: int) -> dict[str, Any]:
    """One codec's row from its runs, {rate: result}; the first rate's run gives the figures."""
    first = next(iter(runs.values()))
    rounds = max(r["round"] for peer in first["peers"] for r in peer["round_series"])
    sent = [peer["bytes_sent"] / rounds for peer in first["peers"]]
    return {
        "bytes_per_peer_round": statistics.fmean(sent),
        "eval_loss": first["mean_eval_loss"],
        "consensus": first["consensus"][-1]["distance"] if first["consensus"] else None,
        "wall_s": {rate: result["wall_s"] for rate, result in runs.items()},
        "merged_every_round": all(merged_every_round(r, fanout) for r in runs.values()),
        "merged_every_round_by_link": {rate: merged_every_round(r, fanout)
                                       for rate, r in runs.items()},
        "rounds": rounds,
    }


def compare(codecs: dict[str, dict[str, Any]]) -> None:
    """Add each codec's byte ratios to fp32 and bf16 and its eval loss against fp32's."""
    for reference in ("fp32", "bf16"):
        if reference not in codecs:
            continue
        ref = codecs[reference]
        for row in codecs.values():
            row[f"fewer_bytes_than_{reference}"] = (ref["bytes_per_peer_round"]
                                                    / row["bytes_per_peer_round"])
            if reference == "fp32":
                row["eval_loss_vs_fp32"] = row["eval_loss"] / ref["eval_loss"] - 1


async def _timed_fetch(nbytes: int, link: Link) -> float:
    """Seconds from a one-byte request on an open connection to the last of `nbytes` back."""
    body = bytes(nbytes)

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(1)
        await stream.send_all(body)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        proxy = await nursery.start(LinkProxy(link, ("127.0.0.1", port)).run)
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await trio.sleep(4 * link.delay_s)  # the handshake's round trip is not the fetch's
        began, got = trio.current_time(), 0
        await stream.send_all(b"?")
        while got < nbytes:
            chunk = await stream.receive_some(1 << 16)
            if not chunk:
                raise RuntimeError(f"the proxy closed after {got} of {nbytes} bytes")
            got += len(chunk)
        elapsed = trio.current_time() - began
        nursery.cancel_scope.cancel()
    return elapsed


def qwen_fetches(codecs: Sequence[str], link: Link, seed: int) -> dict[str, dict[str, float]]:
    """Per codec: one round's update of a Qwen2-0.5B-shaped adapter, bytes and fetch seconds."""
    start = random_adapter(torch.Generator().manual_seed(seed))
    rows = {}
    for codec in codecs:
        sizes = measure(codec, start, rounds=3, amount=0.01, seed=seed)
        nbytes = int(sizes["whole_bytes"] if codec.split("+")[0] == "fp32"
                     else sizes["step_bytes"])
        rows[codec] = {"bytes": nbytes, "s": trio.run(_timed_fetch, nbytes, link)}
        print(f"  Qwen2-0.5B {codec:16} {nbytes:>10,} B  {rows[codec]['s']:6.2f} s", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    first = Link.parse(f"delay={args.delay},rate={args.links[0]}")
    result: dict[str, Any] = {"default": NodeConfig().wire_codec, "codecs": {},
                              "setup": {"peers": args.peers, "model": args.model,
                                        "delay": args.delay, "links": args.links,
                                        "fanout": args.fanout, "seed": args.seed,
                                        "settle_rounds": args.settle_rounds,
                                        "simulate_args": args.simulate}}
    if not args.qwen_only:
        if args.local:
            result["local"] = run_local(args)
        for codec in args.codecs:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = {rate: pool.submit(run_swarm, args, codec, rate)
                           for rate in args.links}
                runs = {rate: future.result() for rate, future in futures.items()}
            result["codecs"][codec] = summarize(runs, args.fanout)
            args.json.write_text(json.dumps(result, indent=2) + "\n")  # progress survives
        compare(result["codecs"])
    result["qwen_fetch_s"] = qwen_fetches(args.codecs, first, args.seed)
    result["qwen_fetch_link"] = str(first)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for codec, row in result["codecs"].items():
        print(f"{codec:16} {row['bytes_per_peer_round']:>12,.0f} B/peer/round  "
              f"eval {row['eval_loss']:.4f}  consensus {row['consensus']}  "
              f"wall {row['wall_s']}  merged every round {row['merged_every_round']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
