"""The `loraswarm` commands that read a peer's data folder: status, swarm and export.

    loraswarm status ./peer1            # what the peer is doing, running or stopped
    loraswarm status ./peer1 --json     # the same, one JSON document
    loraswarm swarm ./peer1             # the swarm as its members describe themselves
    loraswarm export ./peer1 --out ./adapter        # a PEFT adapter folder
    loraswarm export ./peer1 --merged ./model       # the base with the adapter merged in

They read files only (status.json, metrics.jsonl, the checkpoint and export), never the
network, so they work the same on a running peer, a stopped one and a copied folder. A
problem with the folder is one line and exit code 2 (see `peer.cli.main`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from peer.summary import status_document, swarm_document


def add_commands(commands: Any) -> None:
    """Add the status, swarm and export subcommands, each with its `handler` default."""
    status = commands.add_parser(
        "status", help="summarise a peer from its data folder",
        description="Summarise a peer from its data folder: identity, addresses, round and "
        "version, samples, merges, live peers, recent losses, bytes, rejections by reason and "
        "its privacy ledger (when it keeps one), and whether it is running. Reads the folder "
        "only; works on a stopped peer too.")
    swarm = commands.add_parser(
        "swarm", help="list the swarm as its live members describe themselves",
        description="List every live peer this peer knows, with the round, version, samples, "
        "losses, device, LoRA rank and merge rule it announced, then swarm-wide figures. "
        "These figures are self-reported by each peer: never proof of anything.")
    export = commands.add_parser(
        "export", help="write the peer's adapter, or the base model with it merged in",
        description="Write the peer's newest adapter (its checkpoint, with the LoRA settings of "
        "its export/ folder, which a peer writes when it stops). --out OUT: a PEFT adapter "
        "folder (PeftModel.from_pretrained(base, OUT)). --merged OUT: the base model with the "
        "adapter merged into its weights, and its tokenizer "
        "(AutoModelForCausalLM.from_pretrained(OUT)).")
    for parser in (status, swarm, export):
        parser.add_argument("folder", type=Path, metavar="DIR", help="the peer's --data-dir")
    for parser in (status, swarm):
        parser.add_argument("--json", action="store_true",
                            help="print one machine-readable JSON document instead of tables")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, metavar="OUT", help="write a PEFT adapter folder")
    target.add_argument("--merged", type=Path, metavar="OUT",
                        help="write the base model with the adapter merged in")
    export.add_argument("--model", metavar="PATH", help="the base model folder (default: the "
                        "one the peer used, from its status.json)")
    for parser, handler in ((status, show_status), (swarm, show_swarm), (export, run_export)):
        parser.set_defaults(handler=handler)


def show_status(args: argparse.Namespace) -> int:
    document = status_document(args.folder)
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0
    console = Console(highlight=False)
    console.print(Text(f"peer {document['peer_id']}: {document['state']} "
                       f"({document['state_detail']})", style="bold"))
    console.print(_facts(document))
    console.print(_recent(document["recent_rounds"]))
    refusals = {**_counts(document.get("rejected"), "refused"),
                **_counts(document.get("uploads_refused"), "upload refused")}
    if refusals:
        console.print(_pairs("rejections by reason", refusals))
    if "privacy" in document:
        privacy = document["privacy"]
        rows = privacy if isinstance(privacy, Mapping) else {"ledger": privacy}
        console.print(_pairs("privacy ledger", rows))
    return 0


def show_swarm(args: argparse.Namespace) -> int:
    document = swarm_document(args.folder)
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0
    console = Console(highlight=False)
    console.print(swarm_table(document))
    figures = document["figures"]
    versions = "/".join(_cell(figures[f"version_{k}"]) for k in ("min", "median", "max"))
    console.print(Text(
        f"{figures['peers']} peers, {figures['total_samples']} samples in all; versions "
        f"min/median/max {versions}; train loss {_cell(figures['train_loss_min'])} to "
        f"{_cell(figures['train_loss_max'])} (spread {_cell(figures['train_loss_spread'])}); "
        "devices " + ", ".join(f"{k} x{v}" for k, v in figures["devices"].items())))
    return 0


def swarm_table(document: Mapping[str, Any]) -> Table:
    """The swarm as a table, this peer first and marked with *."""
    table = Table(title="swarm (self-reported by each peer, unverified)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    columns = ("peer", "round", "ver", "samples", "train", "eval", "device", "rank", "rule",
               "age s")
    for name in columns:
        table.add_column(name, justify="left" if name in ("peer", "device", "rule") else "right",
                         no_wrap=name in ("peer", "rule"))
    for row in document["peers"]:
        peer = str(row.get("peer_id"))
        mark = "*" if peer == document["peer_id"] else " "
        table.add_row(Text(f"{mark}…{peer[-8:]}"), *(Text(_cell(row.get(key))) for key in (
            "round", "version", "samples", "train_loss", "eval_loss", "device", "rank",
            "merge_rule", "age_s")))
    return table


def run_export(args: argparse.Namespace) -> int:
    from peer.merged import export_adapter  # loads torch and transformers: only when asked

    out = export_adapter(args.folder, args.merged or args.out, merged=args.merged is not None,
                         model=args.model)
    kind = "merged model" if args.merged else "PEFT adapter"
    print(f"wrote the {kind} of {args.folder} to {out}")
    return 0


def _facts(document: Mapping[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    addrs = document.get("listen_addrs")
    live = document.get("live_peers") or []
    rows = {
        "addresses": "\n".join(map(str, addrs)) if isinstance(addrs, list) and addrs else "-",
        "swarm": f"{_cell(document.get('swarm_id'))}  {_cell(document.get('topic'))}",
        "model": f"{_cell(document.get('model'))} on {_cell(document.get('device'))}",
        "round / version": f"{_cell(document.get('round'))} / {_cell(document.get('version'))}",
        "samples": _cell(document.get("samples")),
        "merges": f"{_cell(document.get('merges'))} "
                  f"({_cell(document.get('adapters_received'))} adapters received)",
        "live peers": f"{len(live)}" + (f": {', '.join('…' + str(p)[-8:] for p in live[:8])}"
                                       if live else ""),
        "bytes in / out": f"{_bytes(document.get('bytes_in'))} / "
                          f"{_bytes(document.get('bytes_out'))}",
    }
    for name, value in rows.items():
        grid.add_row(Text(name, style="dim"), Text(value))
    return grid


def _recent(rounds: list[dict[str, Any]]) -> Table:
    table = Table(title="recent rounds", title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("round", "train loss", "eval loss", "merged", "round s"):
        table.add_column(name, justify="right")
    for row in rounds:
        table.add_row(*(Text(_cell(row.get(key))) for key in (
            "round", "train_loss", "eval_loss", "merged", "round_s")))
    return table


def _pairs(title: str, rows: Mapping[Any, Any]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    for key, value in rows.items():
        table.add_row(Text(str(key)[:60]), Text(_cell(value)))
    return table


def _counts(value: object, label: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        return {}
    return {f"{reason} ({label})": count for reason, count in sorted(value.items())}


def _cell(value: object) -> str:
    """A value as table text: floats to 4 digits, nothing longer than 60 characters."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)[:60]


def _bytes(value: object) -> str:
    if type(value) is not int:
        return _cell(value)
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
