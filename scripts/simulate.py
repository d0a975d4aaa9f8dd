"""Run a swarm of real `loraswarm peer` daemons on this machine and report what collaboration gave.

Each peer is its own OS process (or, with --in-process, a `Peer` object of this process) talking
real libp2p on 127.0.0.1, with its own non-IID slice of the built-in data (a group of
chatterbot-corpus categories) and the shared held-out eval set.

    python scripts/simulate.py                          # 4 peers gossiping, the default demo
    python scripts/simulate.py --mode local --out OUT   # same peers, no exchange (baseline)
    python scripts/simulate.py --mode central --out OUT # one peer with all the data (baseline)
    python scripts/simulate.py --split dirichlet --alpha 0.1 --out OUT  # skewed topic mixes
    python scripts/simulate.py --link delay=50ms,rate=20mbit --out OUT  # peers across a WAN
    python scripts/simulate.py --network memory --peers 256 --model builtin-small --out OUT

Writes OUT/result.json, the plots OUT/eval_loss.png, OUT/consensus.png (how far apart the
peers' adapters are, per round) and OUT/bytes.png (bytes each peer sent), and, per peer,
OUT/peers/pN/ (the peer's data folder: metrics.jsonl, status.json, checkpoint, export/) and
OUT/logs/pN.log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from peer.config import PeerConfig
from peer.errors import PeerError
from peer.options import build_config
from scripts.churn import annotate, plan_churn
from scripts.links import assign_links, read_profile
from scripts.peerconfigs import (
    SIMULATED,
    add_simulated_options,
    in_process_defaults,
    peer_arg_values,
    peer_folder,
)
from scripts.simreport import (
    peer_summaries,
    plot_eval_loss,
    plot_swarm,
    print_table,
    swarm_consensus,
)
from scripts.swarm import Settings, SimulationError, run_swarm
from testbed.wan import Link

console = Console()
MODES = ("gossip", "local", "central")
SCHEDULES = ("together", "paced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Simulate a loraswarm swarm: N real peer daemons over libp2p on 127.0.0.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--peers", type=int, default=4, help="number of peers (gossip/local)")
    parser.add_argument("--mode", choices=MODES, default="gossip",
                        help="gossip: exchange adapters; local: no exchange; "
                        "central: one peer trains on all the data")
    parser.add_argument("--compare", action="store_true",
                        help="run gossip, local and central one after another into OUT/<mode> "
                        "and write one combined OUT/result.json")
    parser.add_argument("--out", type=Path, default=Path("sim-out"), help="output folder")
    add_simulated_options(parser)
    parser.add_argument("--eval-per-category", type=int, default=2,
                        help="held-out examples per category in the shared eval set")
    parser.add_argument("--eval-peers", type=int, default=0, metavar="N",
                        help="only the first N peers evaluate (0: all). With hundreds of peers, "
                        "evaluating costs more than training (a held-out pass of the built-in "
                        "model is mostly its 49,152-word output layer), and every peer's shard is "
                        "drawn alike, so N of them give the mean")
    parser.add_argument("--split", choices=("domain", "iid", "dirichlet"), default="domain",
                        help="domain: each peer gets different categories (non-IID); "
                        "dirichlet: each category is divided among peers in proportions drawn "
                        "from Dirichlet(--alpha)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet concentration for --split dirichlet: small (0.1) is "
                        "strongly skewed, large (100) is close to iid")
    parser.add_argument("--corpus", choices=("chat", "plays"), default="chat",
                        help="chat: chatterbot-corpus Q/A pairs by topic; plays: Shakespeare "
                        "passages by genre (plain text)")
    parser.add_argument("--seed", type=int, default=0, help="data split and LoRA init seed")
    parser.add_argument("--insert", type=Path, metavar="FILE",
                        help="add the training examples of FILE (any format the peer reads) "
                        "to peer 0's shard, and to the central shard: e.g. canaries for a "
                        "memorisation test (scripts/bench_privacy.py)")
    parser.add_argument("--byzantine", type=int, default=0, metavar="N",
                        help="the last N peers train honestly but serve poisoned adapters")
    parser.add_argument("--attack", choices=("scale", "noise", "signflip"), default="scale",
                        help="what the Byzantine peers serve")
    parser.add_argument("--churn", type=float, default=0.0, metavar="FRACTION",
                        help="kill this fraction of the peers (never peer 0) after a random "
                        "round (SIGKILL; with --in-process, an abrupt cancel) and restart them "
                        "from their checkpoint")
    parser.add_argument("--churn-downtime", type=float, default=5.0, metavar="SECONDS",
                        help="how long a churned peer stays down before its restart")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many s")
    parser.add_argument("--in-process", action="store_true",
                        help="run every peer in this one process, sharing one frozen base model "
                        "(for many peers: each costs only its adapter, optimizer and batches)")
    parser.add_argument("--workers", type=int, default=1, metavar="K",
                        help="with --in-process: spread the peers over K processes, each with "
                        "its own copy of the base model and its own event loop (use up to one "
                        "per core for 32 peers and more)")
    parser.add_argument("--network", choices=("libp2p", "memory"), default="libp2p",
                        help="libp2p: real hosts on 127.0.0.1; memory: every peer in this "
                        "process over an in-memory network (gossip.memory), for hundreds to "
                        "thousands of peers: the same daemon code above the network, the same "
                        "encoded bytes and checks, announcements spread along connections and "
                        "transfers at each peer's --link delay and rate (implies --in-process)")
    parser.add_argument("--settle-schedule", choices=SCHEDULES, default=argparse.SUPPRESS,
                        help="with --settle-rounds: together (the default for peers in one "
                        "process, --in-process or --network memory) starts every settling "
                        "round once every peer of the process has finished the round before, "
                        "so the first starts after the last peer's last training round; paced "
                        "(the default otherwise, and the only one across processes or "
                        "--workers) makes each peer's settling round last as long as its own "
                        "last training round, as deployed peers do. In one process, training "
                        "takes turns on one model and the peers drift apart in time: 256 peers "
                        "took 3 settling rounds to 1 %% together, 4 paced, and ended at 0.00008 "
                        "against 0.0034 after 6 (README: Settling together in one process)")
    parser.add_argument("--link", metavar="LINK",
                        help="put every peer behind a wide-area link emulated by a proxy in "
                        "this process, e.g. delay=50ms,rate=20mbit,jitter=10ms (units: us, ms, "
                        "s; bit, kbit, mbit, gbit per second, each way)")
    parser.add_argument("--link-profile", type=Path, metavar="FILE",
                        help="TOML file of [[links]] entries (share = 0.25, link = \"...\"): "
                        "that share of the peers, drawn by --seed, gets that link; the rest get "
                        "--link (or none)")
    parser.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                        help="extra argument passed to every peer (repeatable), e.g. "
                        "--peer-arg=--merge-rule=product")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.rounds < 1 or args.settle_rounds < 0:
        parser.error("--peers and --rounds must be at least 1, --settle-rounds at least 0")
    if args.eval_peers < 0:
        parser.error(f"--eval-peers must be at least 0, got {args.eval_peers}")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        parser.error(f"--alpha must be a positive number, got {args.alpha}")
    if not 0 <= args.byzantine < args.peers or (args.byzantine and args.mode != "gossip"
                                                 and not args.compare):
        parser.error("--byzantine N needs --mode gossip and 0 <= N < --peers")
    if not 0 <= args.churn < 1 or args.churn_downtime < 0:
        parser.error("--churn must be in [0, 1) and --churn-downtime >= 0")
    if args.network == "memory":
        if args.workers > 1:
            parser.error("--network memory runs every peer in this process: not with --workers")
        args.in_process = True
    if args.workers < 1 or (args.workers > 1 and not args.in_process):
        parser.error("--workers K needs --in-process and K >= 1")
    one_process = args.in_process and args.workers == 1
    schedule = getattr(args, "settle_schedule", None)  # absent unless given
    if schedule == "together" and not one_process:
        parser.error("--settle-schedule together needs every peer in one process "
                     "(--in-process or --network memory, without --workers)")
    args.settle_schedule = schedule or ("together" if one_process else "paced")
    if args.churn and args.rounds < 3:
        parser.error("--churn needs --rounds >= 3 (a peer is killed after 1..rounds-2 rounds)")
    try:
        peer_arg_values(args.peer_arg)  # a bad --peer-arg fails here, before anything runs
    except PeerError as exc:
        parser.error(str(exc))
    if (args.link or args.link_profile) and args.workers > 1:
        parser.error("--link and --link-profile run proxies in this process: not with --workers")
    try:
        peer_links(args, args.peers)  # a bad link or profile fails here too
    except ValueError as exc:
        parser.error(str(exc))
    return args


def peer_links(args: argparse.Namespace, peers: int) -> tuple[str, ...]:
    """Each peer's link as text ("": none), from --link and --link-profile.

    Raises:
        ValueError: a bad link or profile file, in one line.
    """
    default = Link.parse(args.link) if args.link else None
    profile = read_profile(args.link_profile) if args.link_profile else []
    return tuple(str(link) if link else "" for link in assign_links(peers, default, profile,
                                                                    args.seed))


def write_data(args: argparse.Namespace, out: Path) -> tuple[list[Path], Path]:
    """Split the built-in data into per-peer shard files and the shared eval file."""
    from peer.data import load_examples, write_jsonl
    from peer.errors import ConfigError
    from testbed.corpora import split_builtin

    shards = 1 if args.mode == "central" else args.peers
    split = split_builtin(shards, seed=args.seed, eval_per_category=args.eval_per_category,
                          mode=args.split, alpha=args.alpha, corpus=args.corpus)
    examples = load_examples(args.insert) if args.insert else []
    inserted = [example for example in examples if isinstance(example, str)]
    if len(inserted) != len(examples):
        raise ConfigError(f"--insert {args.insert}: give text or instruction records (the "
                          "built-in shards are written as text), not chats")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, shard in enumerate(split.shards):
        path = data / f"shard-{index}.jsonl"
        write_jsonl(path, [*shard, *inserted] if index == 0 else shard)
        paths.append(path)
    eval_path = data / "eval.jsonl"
    write_jsonl(eval_path, split.eval)
    # domain/iid: the categories of each shard; dirichlet: {category: examples} per shard.
    categories = split.shard_counts if args.split == "dirichlet" else split.shard_categories
    (data / "categories.json").write_text(json.dumps(categories, indent=1))
    return paths, eval_path


def is_byzantine(args: argparse.Namespace, index: int) -> bool:
    """The last `--byzantine` peers attack; peer 0, the bootstrap, is always honest."""
    return args.mode == "gossip" and index >= args.peers - args.byzantine


def peer_configs(args: argparse.Namespace, model_dir: Path, shards: list[Path],
                 eval_path: Path) -> list[PeerConfig]:
    """Every peer's config: our flags, then the in-process defaults, then `--peer-arg`s, which
    win. None has a bootstrap address yet: peer 0's is known once it listens."""
    workers = min(args.workers, len(shards))
    # One torch thread pool per process: a process per peer gets one thread; in process, all
    # the cores, shared out among the workers.
    threads = 0 if workers == 1 else max(1, (os.cpu_count() or 1) // workers)
    placed = ({**in_process_defaults(len(shards)), "threads": threads} if args.in_process
              else {"threads": 1})
    given = peer_arg_values(args.peer_arg)
    evaluating = args.eval_peers or len(shards)
    return [build_config({**_settings(args, index, len(shards)), "model": str(model_dir),
                          "data_dir": peer_folder(args.out, index), "train": shard,
                          **({"eval": eval_path} if index < evaluating else {}), **placed,
                          **given})
            for index, shard in enumerate(shards)]


def _settings(args: argparse.Namespace, index: int, peers: int) -> dict[str, Any]:
    """Peer `index`'s settings from our flags and mode."""
    gossip = args.mode == "gossip"
    settings = {name: getattr(args, name) for name in SIMULATED}
    settings.update(init_seed=args.seed, data_seed=args.seed * 1000 + index,
                    fanout=args.fanout if gossip else 0,
                    settle_fanout=args.settle_fanout if gossip else 0,
                    settle_rounds=args.settle_rounds if gossip else 0)
    if is_byzantine(args, index):
        settings["attack"] = args.attack
    if gossip:
        # Serve the final adapter until every peer is done (the simulator then stops them
        # all): peers finish at different times, and slower ones still fetch from faster ones.
        settings["linger"] = args.timeout
    if gossip and peers > 1:
        # Start together, or the first peer's early rounds find no neighbours: the bootstrap
        # peer waits until everyone has joined it, the others until they have joined.
        settings["wait_peers"] = peers - 1 if index == 0 else 1
    return settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one simulation and return its result document (also written to OUT/result.json)."""
    from peer.model import resolve_model

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with console.status("preparing the model (converted once, then cached) and the data"):
        model_dir = resolve_model(args.model)
        shards, eval_path = write_data(args, out)
    configs = peer_configs(args, model_dir, shards, eval_path)
    plan = plan_churn(len(configs), args.churn, rounds=args.rounds, seed=args.seed,
                      downtime_s=args.churn_downtime)
    settings = Settings(rounds=configs[0].total_rounds, timeout=args.timeout,
                        bootstrap=args.mode == "gossip", in_process=args.in_process,
                        workers=min(args.workers, len(configs)), out=out,
                        links=peer_links(args, len(configs)), network=args.network,
                        settle_schedule=args.settle_schedule)
    swarm = run_swarm(configs, plan, settings, console)
    folders = [config.data_dir for config in configs]
    summaries = peer_summaries(folders)
    missed = annotate(summaries, swarm.churn, planned=[folders[i].name for i in plan.kill_after])
    for name in missed:
        console.print(f"[yellow]churn: {name} finished before its planned kill round[/yellow]")
    for index, summary in enumerate(summaries):
        summary["byzantine"] = is_byzantine(args, index)
    honest = [s for s in summaries if not s["byzantine"]]
    result = {
        "mode": args.mode,
        "merge_rule": args.merge_rule,
        "churn": args.churn,
        "mean_eval_loss": _mean([s["eval_loss"] for s in summaries]),
        "honest_mean_eval_loss": _mean([s["eval_loss"] for s in honest]),
        "mean_eval_loss_before": _mean([s["eval_loss_before"] for s in summaries]),
        "wall_s": round(time.monotonic() - started, 1),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "peers": summaries,
    }
    if swarm.memory is not None:
        result["memory"] = swarm.memory
    if swarm.links is not None:
        result["links"] = swarm.links
    if swarm.network is not None:
        result["network"] = swarm.network
    if swarm.gate is not None:
        result["settle_gate"] = swarm.gate
    result.update(swarm_consensus(folders, trained_rounds=args.rounds))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    plot_eval_loss(summaries, out / "eval_loss.png", title=f"{args.mode}: eval loss per peer")
    plot_swarm(result, out, title=args.mode)
    print_table(console, result)
    console.print(f"wrote {out / 'result.json'} and eval_loss.png, consensus.png, bytes.png")
    return result


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three modes on the same data and seed; one combined report and plot."""
    results = {}
    for mode in MODES:
        console.rule(f"mode {mode}")
        results[mode] = run(argparse.Namespace(**{**vars(args), "mode": mode,
                                                  "out": args.out / mode}))
    (args.out / "result.json").write_text(json.dumps(results, indent=2))
    baselines = {f"{mode} (mean)": results[mode]["mean_eval_loss"] for mode in ("local", "central")}
    plot_eval_loss(results["gossip"]["peers"], args.out / "eval_loss.png",
                   title="gossip peers vs local and central baselines", baselines=baselines)
    for mode in MODES:
        console.print(f"{mode:>8}: mean eval loss {results[mode]['mean_eval_loss']:.3f}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.compare:
            compare(args)
        else:
            run(args)
    except PeerError as exc:  # bad model, data or settings: one line, no traceback
        console.print(f"simulate.py: error: {exc}", style="red", highlight=False, soft_wrap=True)
        return 2
    except SimulationError as exc:  # a peer failed or the run took too long: see the logs
        console.print(f"simulate.py: error: {exc}", style="red", highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
