"""The simulator's peers as `PeerConfig`s: the settings it gives them, and their TOML files.

A simulated peer is configured like any other, through `peer.options`: the same option names as
`loraswarm peer`'s flags and TOML keys, the same parsing and checks. In-process peers get the
`PeerConfig` itself; a peer process gets it as the TOML file its `--config` reads
(`write_toml`), never as a command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gossip.keyfile import write_swarm_key
from merge.registry import RULE_NAMES
from peer.config import PeerConfig
from peer.device import Hardware, fast_cpu_dtype
from peer.options import OPTIONS, Option, add_peer_arguments, build_config, read_toml

# Peer options that are simulate.py flags too, with the simulator's defaults and what each
# means there. The simulator runs a demo of minutes on two cores; the daemon's own defaults
# (64-token examples, lr 2e-3, an evaluation every round, no last round) suit a peer that runs
# for days. Every peer gets the flag's value; `--peer-arg` sets any other peer option.
SIMULATED: dict[str, tuple[Any, str]] = {
    "model": ("builtin", "builtin, builtin-small, or a local HF model folder"),
    "rounds": (10, "rounds per peer"),
    "settle_rounds": (0, "gossip mode: after --rounds, N more rounds that only exchange and "
                      "merge (no training); result.json then shows how fast the swarm reaches "
                      "consensus"),
    "steps_per_round": (4, "optimizer steps per round"),
    "batch_size": (8, "examples per step"),
    "seq_len": (32, "tokens per example (longer examples are cut)"),
    "lr": (6e-3, "AdamW learning rate"),
    "lr_schedule": ("constant", "constant, or linear or cosine: decay --lr to 0 over --rounds x "
                    "--steps-per-round steps"),
    "fanout": (2, "neighbours fetched per round"),
    "settle_fanout": (0, "gossip mode: neighbours fetched per settling round (0: --fanout)"),
    "eval_every": (5, "evaluate every N rounds (and always after the last)"),
    "merge_rule": ("average", f"one of {', '.join(RULE_NAMES)}"),
    "attack_scale": (50.0, "strength of --attack"),
    "dtype": (fast_cpu_dtype(Hardware.probe()),
              "dtype of each peer process's frozen base (auto, float32, bfloat16, float16); "
              "the default is bfloat16 on a CPU that computes it natively (AVX-512 BF16, AMX): "
              "1.5 times faster there at the same loss. In-process peers share one base, "
              "placed by it and --peer-arg=--device"),
}
# The benchmarks' recorded tables ran 48-token examples, the simulator's default until the demo
# went under 3 minutes with 32: they pass it, so that their commands still reproduce the README.
TABLE_SEQ_LEN = ["--seq-len", "48"]
_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}


def add_simulated_options(parser: argparse.ArgumentParser) -> None:
    """Add the `SIMULATED` peer options as flags: the peer's names and types, our defaults."""
    for name, (default, text) in SIMULATED.items():
        option = _BY_NAME[name]
        parser.add_argument(option.flag, dest=name, type=option.parse, default=default,
                            metavar=option.metavar, help=text)


def peer_folder(out: Path, index: int) -> Path:
    """Peer `index`'s data folder: its identity, checkpoint, metrics.jsonl and status.json."""
    return out / "peers" / f"p{index}"


def config_file(config: PeerConfig) -> Path:
    """Where a peer process's TOML file goes: OUT/peers/pN.toml beside its data folder."""
    return config.data_dir.parent / f"{config.data_dir.name}.toml"


def in_process_defaults(peers: int) -> dict[str, Any]:
    """Settings for peers that share one process: timeouts grow with the swarm, no pings.

    Every re-announcement (one per peer every third of `--peer-timeout`) reaches every peer,
    and one process pays for all of them: measured with 64 loopback peers, one wave of 64
    announcements cost 30 s of CPU. 10 s of peer timeout per peer keeps those waves under a
    fifth of a core; 1 s of fetch timeout per peer covers transfers queued behind them.
    Health pings find frozen peers, which one process cannot have (a crashed peer closes its
    sockets), and under load they failed by the thousand at 64 peers, each aborting a healthy
    connection that was then dialled again: new connections took a fifth of the loop (py-spy).
    A body that gets no byte for a while there is the one loop starving, not a link that
    stalled: the stall timeout grows like the fetch timeout (not measured yet).
    Each peer's membership wakes every tick to refresh liveness and top up connections: 1,000
    peers' ticks each second were a third of a 1,000-peer process (py-spy, trio's timers); a
    tick of 1 s per 100 peers keeps the wake-ups of one process near 100 per second.
    """
    return {"peer_timeout": max(30, 10 * peers), "fetch_timeout": max(30, peers),
            "stall_timeout": max(10, peers), "health_check": 0,
            "membership_tick": max(1.0, peers / 100)}


def peer_arg_values(argv: Sequence[str]) -> dict[str, Any]:
    """The peer options a list of `--peer-arg`s sets, parsed as `loraswarm peer` parses them.

    A `--config FILE` among them is read first and its keys lose to the flags, as in the CLI.
    """
    parser = argparse.ArgumentParser(prog="simulate.py --peer-arg")
    add_peer_arguments(parser)
    args = parser.parse_args(list(argv))
    values = read_toml(args.config) if args.config is not None else {}
    return values | {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}


def with_bootstrap(config: PeerConfig, address: str) -> PeerConfig:
    """`config` joining the swarm through `address` (before any bootstrap it had already)."""
    network = dataclasses.replace(config.network, bootstrap=(address, *config.network.bootstrap))
    return dataclasses.replace(config, network=network)


def read_config(path: Path) -> PeerConfig:
    """The `PeerConfig` that `loraswarm peer --config path` builds."""
    return build_config(read_toml(path))


def write_toml(config: PeerConfig, path: Path) -> Path:
    """Write `config` as a TOML file that `loraswarm peer --config` reads back to it.

    A swarm key is written to a file beside it (`path` with suffix .key, mode 0600), which the
    TOML names, as the `--swarm-key` flag does.

    Raises:
        ValueError: `config` holds a setting that no peer option expresses; the simulator
            builds its configs from options only, so this means a new field lacks one.
    """
    lines = []
    for option in OPTIONS:
        value = _value_of(config, option)
        if value is None:
            continue
        if option.name == "swarm_key":
            value = _key_file(path.with_suffix(".key"), value)
        lines.append(f"{option.name} = {_toml(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if read_config(path) != config:
        raise ValueError(f"{path}: a setting of this config has no peer option to carry it")
    return path


def _value_of(config: PeerConfig, option: Option) -> Any:
    section = config if option.section is None else getattr(config, option.section)
    return getattr(section, option.field)


def _key_file(path: Path, key: str) -> str:
    path.unlink(missing_ok=True)
    write_swarm_key(path, key)
    return os.fspath(path)


def _toml(value: Any) -> str:
    """One TOML value: booleans, numbers, strings (paths too) and arrays of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # Python's int and float literals, inf included, are TOML's
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    # JSON's string escapes are a subset of TOML's basic-string escapes.
    return json.dumps(os.fspath(value) if isinstance(value, Path) else str(value),
                      ensure_ascii=False)
