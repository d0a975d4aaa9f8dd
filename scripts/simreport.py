"""Reading peers' metrics into a result document, and showing it: a rich table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peer_summaries(folders: list[Path]) -> list[dict[str, Any]]:
    """One entry per peer: ids, eval loss before/after, exchange counters, the eval series."""
    summaries = []
    for folder in folders:
        metrics = read_metrics(folder)
        status = json.loads((folder / "status.json").read_text())
        evals = [m for m in metrics if m.get("eval_loss") is not None]
        last = metrics[-1] if metrics else {}
        summaries.append({
            "name": folder.name,
            "peer_id": status["peer_id"],
            "eval_loss_before": evals[0]["eval_loss"] if evals else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "rounds": last.get("round", 0),
            "merges": last.get("merges", 0),
            "adapters_received": last.get("adapters_received", 0),
            "bytes_received": last.get("bytes_in", 0),
            "bytes_sent": last.get("bytes_out", 0),
            "rejected": status.get("rejected", {}),
            "series": [{"t": m["t"], "round": m["round"], "eval_loss": m["eval_loss"]}
                       for m in evals],
        })
    return summaries


def print_table(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"mode {result['mode']}: {len(result['peers'])} peer(s), "
                  f"{result['wall_s']} s")
    for column in ("peer", "eval loss before", "eval loss after", "received", "merged",
                   "rejected", "bytes in", "bytes out"):
        table.add_column(column, justify="right")
    for peer in result["peers"]:
        marker = " (byzantine)" if peer.get("byzantine") else ""
        table.add_row(
            f"{peer['name']}{marker} {peer['peer_id'][-8:]}", _fmt(peer["eval_loss_before"]),
            _fmt(peer["eval_loss"]), str(peer["adapters_received"]), str(peer["merges"]),
            str(sum(peer["rejected"].values())), _bytes(peer["bytes_received"]),
            _bytes(peer["bytes_sent"]),
        )
    console.print(table)
    console.print(f"mean eval loss: before {_fmt(result.get('mean_eval_loss_before'))}, "
                  f"after {_fmt(result['mean_eval_loss'])}")
    if any(peer.get("byzantine") for peer in result["peers"]):
        console.print(f"mean eval loss of honest peers: {_fmt(result['honest_mean_eval_loss'])}")


def plot_eval_loss(peers: list[dict[str, Any]], path: Path, *, title: str,
                   baselines: dict[str, float] | None = None) -> None:
    """Eval loss over wall time, one line per peer, baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for peer in peers:
        series = peer["series"]
        axes.plot([s["t"] for s in series], [s["eval_loss"] for s in series], marker="o",
                  markersize=3, label=peer["name"])
    for name, value in (baselines or {}).items():
        axes.axhline(value, linestyle="--", linewidth=1, label=name)
    axes.set_xlabel("seconds since the peer started")
    axes.set_ylabel("eval loss (shared held-out set)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _bytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count} B"
