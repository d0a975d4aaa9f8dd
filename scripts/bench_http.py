"""Benchmark what `--http` costs a peer: its rounds with and without a client scraping it.

Two `loraswarm peer` processes on 127.0.0.1, as a user runs them: the measured peer serves
`--http 0`, the neighbour joins it, both train and gossip (one neighbour a round) until
stopped. After `--warmup` rounds, the measured peer's rounds are split in phases that
alternate off, on, off, on (`--phases`, each `--rounds` rounds): in an "on" phase a client in
this process fetches `--paths` (default /metrics and /) every `--interval` seconds (default
0.1: an open dashboard asks for /status.json and /rounds.json every 3 s, Prometheus for
/metrics every 15 s or so, so this is a far heavier client). Phases alternate so that a
machine whose load drifts slows both kinds alike. The measured peer runs on CPU 0, its
neighbour and this process on CPU 1 (where there are two): its serving costs it its own CPU.

The JSON (`--json OUT`):
  * round_s, train_s, gather_s: the median, over each kind of phase, of the measured peer's
    per-round seconds from its metrics lines (the whole round; its training steps; fetching
    and validating the neighbour's adapter);
  * ratio: on / off of each (1.0: no cost; above 1: the scraping slowed the peer);
  * cpu_s_per_round: the measured peer's CPU seconds (user + system, from /proc) per round,
    the median over each kind of phase, their ratio, and each phase's value: what serving
    costs the peer, which other processes on a shared machine do not change as they change
    wall time (Linux only);
  * requests: per path, how many were answered, failed, and the median and 95th percentile
    of their seconds, as the client saw them.

Example:
    python scripts/bench_http.py --json bench-http.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from scripts.backends import reap, spawn
from scripts.bench_train import write_shards
from scripts.simreport import read_metrics

PATHS = ("/metrics", "/")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="FILE")
    parser.add_argument("--model", default="builtin-small", help="the peers' base model")
    parser.add_argument("--rounds", type=int, default=6, help="rounds in each phase")
    parser.add_argument("--phases", type=int, default=4, help="off, on, off, on, ...")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between scrapes")
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="what the client fetches each time, e.g. /metrics,/,/rounds.json")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this")
    parser.add_argument("--out", type=Path, metavar="DIR", help="keep the peers' folders here")
    return parser.parse_args(argv)


def peer_command(folder: Path, train: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peer.cli", "-v", "peer", "--data-dir", str(folder),
            "--train", str(train), "--model", args.model, "--threads", "1", "--fanout", "1",
            "--steps-per-round", str(args.steps_per_round), "--batch-size", "4",
            "--seq-len", "32", *extra]


def paths(args: argparse.Namespace) -> list[str]:
    return [path.strip() for path in args.paths.split(",") if path.strip()]


def pin(pid: int, cpus: set[int]) -> None:
    """Keep a process on `cpus`, where the machine has them (Linux)."""
    if hasattr(os, "sched_setaffinity") and cpus <= set(os.sched_getaffinity(0)):
        os.sched_setaffinity(pid, cpus)


def read_status(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "status.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return {}


async def wait_for(folder: Path, round_: int, process: trio.Process) -> dict[str, Any]:
    """The peer's status once it has completed `round_` rounds (polled: it is another process)."""
    while (status := read_status(folder)).get("round", -1) < round_ or "http" not in status:
        if process.poll() is not None:
            raise SystemExit(f"the peer in {folder} exited ({process.returncode}); see its log")
        await trio.sleep(0.2)
    return status


async def get(host: str, port: int, path: str) -> bytes:
    """One GET, as a minimal client sends it; the reply's status line (raises on no reply)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


async def scrape(url: str, paths: Sequence[str], interval: float,
                 seconds: dict[str, list[float]], failed: dict[str, int]) -> None:
    """Fetch every path, then sleep `interval`; until cancelled."""
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    while True:
        for path in paths:
            started = trio.current_time()
            try:
                with trio.fail_after(10):
                    line = await get(host, int(port), path)
                ok = line.startswith(b"HTTP/1.1 200")
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                ok = False
            if ok:
                seconds[path].append(trio.current_time() - started)
            else:
                failed[path] += 1
        await trio.sleep(interval)


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    shards = write_shards(folder, seed=0)
    measured, neighbour = folder / "peer", folder / "neighbour"
    for old in (measured, neighbour):  # a peer would resume from an earlier run's folder
        shutil.rmtree(old, ignore_errors=True)
    processes: list[trio.Process] = []
    seconds: dict[str, list[float]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    phases: list[tuple[str, int, int]] = []  # (off|on, first round, last round)
    cpu_per_round: dict[str, list[float]] = defaultdict(list)
    try:
        processes.append(await spawn(peer_command(measured, shards[0], args, "--http", "0"),
                                     folder / "peer.log"))
        # The measured peer alone on CPU 0; its neighbour and the scraping client on CPU 1, so
        # that what the peer's serving costs shows in the peer's own rounds.
        pin(processes[0].pid, {0})
        pin(0, {1})
        status = await wait_for(measured, 0, processes[0])
        processes.append(await spawn(peer_command(
            neighbour, shards[1], args, "--bootstrap", status["listen_addrs"][0]),
            folder / "neighbour.log"))
        done = args.warmup
        await wait_for(measured, done, processes[0])
        for phase in range(args.phases):
            kind = "on" if phase % 2 else "off"
            started_cpu = cpu_seconds(processes[0].pid)
            async with trio.open_nursery() as nursery:
                if kind == "on":
                    nursery.start_soon(scrape, status["http"], paths(args), args.interval,
                                       seconds, failed)
                await wait_for(measured, done + args.rounds, processes[0])
                nursery.cancel_scope.cancel()
            cpu_per_round[kind].append((cpu_seconds(processes[0].pid) - started_cpu) / args.rounds)
            phases.append((kind, done + 1, done + args.rounds))
            print(f"phase {phase + 1} ({kind}): rounds {done + 1}..{done + args.rounds}",
                  file=sys.stderr)
            done += args.rounds
    finally:
        for process in processes:
            process.terminate()
        with trio.move_on_after(60):
            for process in processes:
                await process.wait()
        await reap(processes)
    result = summarise(read_metrics(measured), phases, seconds, failed, args)
    medians = {kind: statistics.median(values) for kind, values in cpu_per_round.items()}
    result["cpu_s_per_round"] = {**{k: round(v, 4) for k, v in medians.items()},
                                 "ratio": round(medians["on"] / medians["off"], 3),
                                 "phases": {k: _rounded(v) for k, v in cpu_per_round.items()}}
    return result


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used: what serving costs it, whatever else
    runs on the machine (its wall time is at the mercy of the other processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(value, 4) for value in values]


def summarise(lines: Sequence[dict[str, Any]], phases: Sequence[tuple[str, int, int]],
              seconds: dict[str, list[float]], failed: dict[str, int],
              args: argparse.Namespace) -> dict[str, Any]:
    by_round = {line["round"]: line for line in lines}
    result: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    for key in ("round_s", "train_s", "gather_s"):
        kinds = {kind: statistics.median(
            by_round[r][key] for k, first, last in phases if k == kind
            for r in range(first, last + 1) if by_round[r].get(key) is not None)
            for kind in ("off", "on")}
        result[key] = {kind: round(value, 4) for kind, value in kinds.items()}
        result[key]["ratio"] = round(kinds["on"] / kinds["off"], 3) if kinds["off"] else None
    result["requests"] = {path: {
        "answered": len(seconds[path]), "failed": failed[path],
        "median_s": round(statistics.median(seconds[path]), 5) if seconds[path] else None,
        "p95_s": round(sorted(seconds[path])[int(0.95 * (len(seconds[path]) - 1))], 5)
        if seconds[path] else None} for path in paths(args)}
    return result


async def _limited(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    with trio.fail_after(args.timeout):
        return await measure(args, folder)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = trio.run(_limited, args, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-http-") as folder:
            result = trio.run(_limited, args, Path(folder))
    text = json.dumps(result, indent=2)
    args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
