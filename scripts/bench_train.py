"""Benchmark training throughput: a peer's rounds against a bare peft + torch training loop.

Both run the same LoRA training steps, one after the other in this process: the same model,
LoRA settings and seed, the same batches (shard 0 of the built-in chat corpus, the same batch
size, sequence length and data seed), the same optimizer and the same torch thread count.
  * daemon: a real `peer.daemon.Peer` (libp2p on 127.0.0.1) runs `--rounds` + 1 rounds of
    `--steps-per-round` steps and gossips with one neighbour each round: serve and announce
    its adapter, fetch and validate the neighbour's, merge, checkpoint, append a metrics line
    and rewrite status.json. No held-out set is given, so it does not evaluate.
  * bare: the same base and adapter, and AdamW steps in a plain loop (`LocalTrainer`'s step
    written out: forward, backward, clip to norm 1, step).
Each warms up untimed: the peer's first round (in which it may also wait for the neighbour's
first adapter), the bare loop's first `--steps-per-round` steps. Both then time the next
`--rounds` x `--steps-per-round` batches of the same stream, so they see the same tokens,
counted as non-padding input tokens. The peer runs first because the neighbour joins through
it. Both first rounds must give the same mean loss (`warmup_loss`): they run the same steps.

Fairness on a small CPU: the neighbour is a real peer (a `loraswarm peer` process on shard 1)
that trains without pause from before the peer's first round to after the bare loop, so both
measurements share the machine with the same load. With `--threads T` (default 1) this
process is pinned to the first T CPUs and the neighbour to the next T (`os.sched_setaffinity`;
on 2 cores, one each): the peer pays for its event loop and for serving the neighbour from
the core its training uses, as much as the bare loop has. The neighbour computes on the CPU
even when `--device` is a GPU, so it never shares the accelerator; only beside a quantized
base (`--quantize`) does it load the same quantized base on the same GPU, because a quantized
peer is in a swarm of its own.

The JSON (`--json OUT`):
  * tokens_per_s: `bare` (timed tokens / seconds of the bare steps), `daemon` (the same
    tokens / the peer's wall time from its warm-up round's metrics line to its last round's,
    by their `t`) and `daemon_training` (over its seconds inside training steps only, the
    `train_s` of its metrics lines: its gap to `bare` is what the event loop, serving the
    neighbour, took from the training core, or other processes did);
  * ratio: daemon / bare;
  * overhead_share: the share of the peer's wall time spent outside training steps, split in
    `shares`: `gather` (fetching and validating the neighbour's adapter, and waiting for it
    if it has not trained yet), `announce_merge` (encoding, hashing and offering ours,
    merging) and `records` (the round before's checkpoint, metrics line with its sketch and
    status.json); `train` completes them to 1;
  * loop_cpu_share: CPU time of the peer's event-loop thread over the same wall time (it runs
    beside training, so it is not in `overhead_share`);
  * core_share: this process's CPU time over wall time x its CPUs, in each way's timed part:
    below 1 on a CPU, other processes took the rest, and `ratio` compares unequal shares;
    cpu_ratio compares this process's CPU seconds instead (bare / daemon), which other
    processes do not change (nor does any wait of the daemon's);
  * per_round_s: each timed round's seconds, to spot a round that other processes slowed;
  * warmup_loss, tokens, merged (neighbour adapters merged in the timed rounds), settings.
Run it on an otherwise idle machine: anything else on the pinned cores slows one way and not
the other.

Examples:
    python scripts/bench_train.py --json bench-train.json --device cpu
    python scripts/bench_train.py --json bench-train-bf16.json --device cpu --dtype bfloat16
    python scripts/bench_train.py --json gpu-fp32.json --device cuda --dtype float32
    python scripts/bench_train.py --json gpu-bf16.json --device cuda --dtype bfloat16
    python scripts/bench_train.py --json gpu-4bit.json --device cuda --quantize 4bit
    python scripts/bench_train.py --json quick.json --model builtin-small --rounds 2 \\
        --batch-size 2 --seq-len 16 --out bench-train-out
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import trio
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as transformers_logging

from peer.config import PeerConfig, TrainConfig
from peer.data import write_jsonl
from peer.device import DeviceConfig, resolve
from peer.errors import PeerError
from scripts.backends import reap
from scripts.inprocess import logging_to
from scripts.trainloop import BareRun, BenchError, run_bare
from scripts.trainpeer import (
    Cores,
    DaemonRun,
    log,
    neighbour_placement,
    peer_configs,
    pin_this_process,
    plan_cores,
    run_daemon,
    stop,
)
from testbed.corpora import split_builtin

TRAIN_DEFAULTS = TrainConfig()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="FILE",
                        help="where to write {device, dtype, tokens_per_s, ratio, ...}")
    parser.add_argument("--model", default="builtin",
                        help="builtin, builtin-small, or a local HF model folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto",
                        help="dtype of the frozen base: auto, float32, bfloat16, float16")
    parser.add_argument("--quantize", default="", choices=("", "4bit", "8bit"),
                        help="load the base in 4 or 8 bits (CUDA and bitsandbytes)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up")
    parser.add_argument("--steps-per-round", type=int, default=TRAIN_DEFAULTS.steps_per_round,
                        help="optimizer steps per round (the daemon's default)")
    parser.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS.batch_size,
                        help="examples per step (the daemon's default)")
    parser.add_argument("--seq-len", type=int, default=TRAIN_DEFAULTS.seq_len,
                        help="tokens per example (the daemon's default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, of the peer, the bare loop and the neighbour")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus split")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="give up after this many seconds")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="keep the peers' folders and logs here (default: a temporary one)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps_per_round, args.threads) < 1:
        parser.error("--rounds, --steps-per-round and --threads must be at least 1")
    try:
        args.train = TrainConfig(steps_per_round=args.steps_per_round,
                                 batch_size=args.batch_size, seq_len=args.seq_len,
                                 threads=args.threads)
        args.placement = DeviceConfig(device=args.device, dtype=args.dtype,
                                      quantize=args.quantize)
    except ValueError as exc:
        parser.error(str(exc))
    return args


# -- the run -----------------------------------------------------------------------------------


def write_shards(folder: Path, seed: int) -> list[Path]:
    """Two shards of the built-in chat corpus: ours (for both ways) and the neighbour's."""
    split = split_builtin(2, seed=seed)
    paths = [folder / "data" / f"shard{index}.jsonl" for index in range(2)]
    for path, shard in zip(paths, split.shards, strict=True):
        write_jsonl(path, shard)
    return paths


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    for name in ("peer", "neighbour", "logs"):  # a peer would resume from an earlier run's
        shutil.rmtree(folder / name, ignore_errors=True)
    cores = plan_cores(args.threads)
    if cores.ours:
        pin_this_process(cores.ours)
    measured, neighbour = peer_configs(args, folder, write_shards(folder, args.seed))
    processes: list[trio.Process] = []
    try:
        with logging_to(folder / "logs" / "peer.log", mode="w"):
            daemon = await run_daemon(measured, neighbour, cores, processes)
        log(f"daemon: {args.rounds} timed rounds in {sum(daemon.wall_s):.1f} s; bare loop next")
        if not daemon.merged:
            log("warning: the peer merged nothing in its timed rounds (see logs/peer.log)")
        gc.collect()  # the peer's model goes before the bare loop loads its own
        bare = await trio.to_thread.run_sync(run_bare, measured, args.rounds)
        log(f"bare loop: {sum(bare.seconds):.1f} s; stopping the neighbour")
        await stop(processes[0])
    finally:
        await reap(processes)
    return result(args, measured, cores, bare, daemon)


def result(args: argparse.Namespace, config: PeerConfig, cores: Cores, bare: BareRun,
           daemon: DaemonRun) -> dict[str, Any]:
    placement = resolve(config.device)
    seconds = {"bare": sum(bare.seconds), "daemon": sum(daemon.wall_s),
               "daemon_train": sum(daemon.train_s)}
    rates = {"bare": bare.tokens / seconds["bare"], "daemon": bare.tokens / seconds["daemon"],
             "daemon_training": bare.tokens / seconds["daemon_train"]}
    wall, round_s = seconds["daemon"], sum(daemon.round_s)
    cpus = len(cores.ours) or args.threads
    parts = {"train": seconds["daemon_train"], "gather": sum(daemon.gather_s),
             "announce_merge": round_s - seconds["daemon_train"] - sum(daemon.gather_s),
             "records": wall - round_s}
    return {
        "device": str(placement.device),
        "device_name": device_name(placement.device),
        "dtype": str(placement.dtype).removeprefix("torch."),
        "quantize": placement.quantize,
        "tokens_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        "ratio": round(rates["daemon"] / rates["bare"], 4),
        "overhead_share": round(1 - seconds["daemon_train"] / wall, 4),
        "shares": {name: round(value / wall, 4) for name, value in parts.items()},
        "loop_cpu_share": round(daemon.clocks.thread / daemon.clocks.wall, 4),
        "cpu_ratio": round(bare.clocks.process / daemon.clocks.process, 4),
        "core_share": {"bare": round(bare.clocks.core_share(cpus), 3),
                       "daemon": round(daemon.clocks.core_share(cpus), 3)},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "per_round_s": {"bare": _rounded(bare.seconds), "daemon": _rounded(daemon.wall_s),
                        "daemon_train": _rounded(daemon.train_s)},
        "tokens": bare.tokens,
        "tokens_counted": "non-padding input tokens of the timed steps",
        "warmup_loss": {"bare": round(bare.warmup_loss, 6),
                        "daemon": round(daemon.warmup_loss, 6)},
        "merged": daemon.merged,
        "settings": {"model": args.model, "rounds": args.rounds,
                     "steps_per_round": args.train.steps_per_round,
                     "batch_size": args.train.batch_size, "seq_len": args.train.seq_len,
                     "threads": args.threads, "cores": list(cores.ours),
                     "neighbour_cores": list(cores.neighbour),
                     "neighbour_device": neighbour_placement(args).device,
                     "cpus": os.cpu_count()},
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo where there is one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine() or device.type


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(value, 3) for value in values]


def show(console: Console, result: dict[str, Any]) -> None:
    rates, seconds = result["tokens_per_s"], result["seconds"]
    settings = result["settings"]
    table = Table(title=f"LoRA training on {result['device']} ({result['dtype']}"
                        f"{', ' + result['quantize'] if result['quantize'] else ''}), "
                        f"{settings['model']}, {settings['rounds']} rounds x "
                        f"{settings['steps_per_round']} steps of {settings['batch_size']} x "
                        f"{settings['seq_len']} tokens, {settings['threads']} thread(s)")
    for column in ("way", "seconds", "tokens/s", "x bare"):
        table.add_column(column, justify="right")
    for name, label, time_key in (("bare", "bare peft + torch loop", "bare"),
                                  ("daemon", "daemon, whole rounds", "daemon"),
                                  ("daemon_training", "daemon, training steps only",
                                   "daemon_train")):
        table.add_row(label, f"{seconds[time_key]:.2f}", f"{rates[name]:.1f}",
                      f"{rates[name] / rates['bare']:.3f}")
    console.print(table)
    shares = Table(title="the daemon's wall time (timed rounds)")
    for column in ("part", "share"):
        shares.add_column(column, justify="right")
    for name, value in result["shares"].items():
        shares.add_row(name.replace("_", " + "), f"{100 * value:.1f} %")
    console.print(shares)


async def _limited(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    with trio.fail_after(args.timeout):
        return await measure(args, folder)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    failed: BaseException | None = None
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        try:
            measured = trio.run(_limited, args, args.out or Path(scratch))
        except* trio.TooSlowError:
            failed = BenchError(f"not done within --timeout {args.timeout:.0f} s")
        except* (BenchError, PeerError) as group:
            failed = _first(group)
    if failed is not None:
        Console(stderr=True).print(f"bench_train.py: error: {failed}", style="red", highlight=False)
        return 2
    show(Console(), measured)
    args.json.write_text(json.dumps(measured, indent=2) + "\n")
    print(json.dumps(measured))
    return 0


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    raise SystemExit(main())
