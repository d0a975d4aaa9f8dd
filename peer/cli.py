"""The `loraswarm` command line.

Start a new swarm on this machine (prints the address others join with):

    loraswarm peer --data-dir ./peer1 --train my-data.jsonl

Join it from another device (or another terminal):

    loraswarm peer --data-dir ./peer2 --train other.jsonl \\
        --bootstrap /ip4/192.0.2.10/tcp/40001/p2p/12D3KooW...

Read the same settings from a file (flags win over it):

    loraswarm peer --config peer.toml

Watch it in a browser at http://127.0.0.1:8080/ (Prometheus scrapes /metrics there):

    loraswarm peer --data-dir ./peer1 --train my-data.jsonl --http 8080

Make a key for a private swarm, then pass `--swarm-key swarm.key` to every peer:

    loraswarm keygen swarm.key

Watch a peer, and the swarm as it sees it, from its data folder (running or stopped):

    loraswarm status ./peer1
    loraswarm swarm ./peer1 --json

Write its adapter merged into the base model (loadable with from_pretrained):

    loraswarm export ./peer1 --merged ./merged-model
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gossip.errors import GossipError
from gossip.keyfile import write_swarm_key
from peer.commands import add_commands
from peer.config import PeerConfig
from peer.errors import PeerError
from peer.logs import configure_logging
from peer.options import add_peer_arguments, config_from_args

if TYPE_CHECKING:
    from peer.daemon import Peer

logger = logging.getLogger("loraswarm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraswarm",
        description="Fine-tune a LoRA adapter together with other peers, with no server: "
        "each peer trains on its own data and averages adapters with random neighbours.",
        epilog="See `loraswarm COMMAND --help` and the README for examples.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    peer = commands.add_parser(
        "peer", help="run a peer daemon",
        description="Run a peer: train locally, gossip adapters, merge, repeat. Without "
        "--bootstrap it starts a new swarm and prints the address others join with. "
        "Every flag is also a key of the --config TOML file (dashes become underscores).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_peer_arguments(peer)
    keygen = commands.add_parser(
        "keygen", help="write a new private-swarm key file",
        description="Write a new pre-shared key. Peers started with --swarm-key FILE only "
        "connect to peers holding the same key; others cannot connect at all.",
    )
    keygen.add_argument("path", type=Path, metavar="FILE", help="where to write the key (0600)")
    add_commands(commands)  # status, swarm, export: each sets its `handler`
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `loraswarm` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args))
        if args.command == "keygen":
            write_swarm_key(args.path)
            print(f"wrote a new swarm key to {args.path}; give it to every peer "
                  f"with --swarm-key {args.path}")
            return 0
        config = config_from_args(args)
        configure_logging(args.verbose, config.log_format)
        _hold_stop_signals()
        try:
            return trio.run(_run_peer, config)
        finally:
            _ignore_stop_signals()
    except (PeerError, GossipError) as exc:
        print(f"loraswarm: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # Errors raised inside the daemon's nursery arrive wrapped in exception groups.
        found = _first_user_error(group)
        if found is None:
            raise
        print(f"loraswarm: error: {found}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _run_peer(config: PeerConfig) -> int:
    from peer.daemon import Peer  # torch and transformers: not for the folder commands

    peer = Peer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, peer, nursery.cancel_scope)
        node = await nursery.start(_run_then_stop, peer, nursery.cancel_scope)
        print(f"peer {node.peer_id} is up in swarm {node.topic}", flush=True)
        print("others join with:", flush=True)
        for addr in node.announce_addrs:  # --announce's, or where it listens
            print(f"  --bootstrap {addr}", flush=True)
        if peer.parts is not None and peer.parts.records.http:
            print(f"dashboard and metrics: {peer.parts.records.http}", flush=True)
    return 0


async def _run_then_stop(peer: Peer, scope: trio.CancelScope, *,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    # `peer.run` returns after --rounds rounds; then the signal watcher must stop too.
    await peer.run(task_status=task_status)
    scope.cancel()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held: list[int] = []  # stop signals that arrived while no receiver was open


def _hold_stop_signals() -> None:
    """Own SIGINT and SIGTERM from before the daemon starts until the process exits.

    trio's signal receiver puts back, when it closes, the handler it found; Python's default
    for SIGTERM is death by the signal. A peer that had left its receiver (stopping already,
    or done with its rounds and exiting) then died of a SIGTERM with -15 instead of 0, and
    `scripts/simulate.py --mode local` failed 4 peers of 4. This handler only records the
    signal: one that arrives before the receiver opens stops the peer as soon as it does
    (`_stop_on_signal`); `_ignore_stop_signals` takes over once the daemon has stopped.
    """
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda number, _frame: _held.append(number))


def _ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM for the rest of the process: it is exiting already.

    Not a Python handler: the interpreter resets those to the default while it finalizes, and
    a signal in that last stretch still killed the process.
    """
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def _stop_on_signal(peer: Peer, scope: trio.CancelScope, *,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        task_status.started()
        signum = _held[0] if _held else await signals.__anext__()
        logger.info("%s: stopping after the current step", signal.Signals(signum).name)
        peer.request_stop()
        scope.cancel()


def _first_user_error(group: BaseExceptionGroup) -> Exception | None:
    found: BaseException | None = group.split((PeerError, GossipError))[0]
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found if isinstance(found, Exception) else None


if __name__ == "__main__":
    raise SystemExit(main())
