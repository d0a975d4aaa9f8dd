"""Summarise simulation results as one markdown table, one row per run.

Each OUT is a folder written by scripts/simulate.py (or its result.json itself); a `--compare`
folder gives one row per mode.

    python scripts/report.py out/gossip out/local out/central
    python scripts/report.py out/cmp-average out/cmp-median --out results.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLUMNS = ("run", "merge rule", "peers", "byzantine", "mean eval loss",
           "honest mean eval loss", "mean eval loss before", "rounds to consensus",
           "settle rounds to consensus", "wall s", "bytes sent")
COMPARE_MODES = ("gossip", "local", "central")


class ReportError(Exception):
    """A result folder or file that cannot be read; the message is one line."""


def load_runs(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The runs of one result folder (or result.json) as (label, result document) pairs.

    The label is "OUT (mode)" for one run and "OUT/mode" for each run of a --compare folder.

    Raises:
        ReportError: the folder or file is missing, is not JSON, or is not a simulate result.
    """
    file = path / "result.json" if path.is_dir() else path
    label = str(path.parent if path.is_file() else path)
    if not path.exists():
        raise ReportError(f"{path}: no such folder")
    if not file.is_file():
        raise ReportError(f"{path}: no result.json in it (run scripts/simulate.py --out {path})")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{file}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{file}: bad JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno})") from None
    if isinstance(document, dict) and "peers" in document:
        return [(f"{label} ({document.get('mode', '?')})", _checked(file, document))]
    if isinstance(document, dict) and document and set(document) <= set(COMPARE_MODES):
        return [(f"{label}/{mode}", _checked(file, document[mode]))
                for mode in COMPARE_MODES if mode in document]
    raise ReportError(f"{file}: not a scripts/simulate.py result (no 'peers', and not a "
                      "--compare result of gossip/local/central)")


def _checked(file: Path, result: Any) -> dict[str, Any]:
    if not isinstance(result, dict) or not isinstance(result.get("peers"), list) or not all(
            isinstance(peer, dict) for peer in result["peers"]):
        raise ReportError(f"{file}: not a scripts/simulate.py result ('peers' must be a list "
                          "of objects)")
    return result


def row(label: str, result: Mapping[str, Any]) -> list[str]:
    """The table cells of one run; a value the result lacks (an older simulate) shows as -."""
    peers = result["peers"]
    sent = [peer["bytes_sent"] for peer in peers if isinstance(peer.get("bytes_sent"), int)]
    return [
        label,
        str(result.get("merge_rule", "-")),
        str(len(peers)),
        str(sum(bool(peer.get("byzantine")) for peer in peers)),
        _number(result.get("mean_eval_loss")),
        _number(result.get("honest_mean_eval_loss")),
        _number(result.get("mean_eval_loss_before")),
        _count(result.get("rounds_to_consensus")),
        _count(result.get("settle_rounds_to_consensus")),
        _number(result.get("wall_s"), digits=1),
        _bytes(sum(sent) if sent else None),
    ]


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table with the COLUMNS header; numbers right-aligned."""
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "| " + " | ".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
              for cells in rows]
    return "\n".join(lines) + "\n"


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) else "-"


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="One markdown table of scripts/simulate.py results, one row per run.")
    parser.add_argument("folders", nargs="+", type=Path, metavar="OUT",
                        help="a simulate --out folder (or its result.json)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        rows = [row(label, result) for folder in args.folders
                for label, result in load_runs(folder)]
        table = markdown_table(rows)
        if args.out is not None:
            try:
                args.out.write_text(table, encoding="utf-8")
            except OSError as exc:
                raise ReportError(f"{args.out}: cannot write ({exc.strerror or exc})") from None
    except ReportError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
