"""Reading peers' metrics into a result document, and showing it: a rich table and PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

_ROUND_KEYS = ("round", "t", "train_loss", "merged", "bytes_in", "bytes_out")
CONSENSUS_THRESHOLD = 0.01  # rounds_to_consensus: the first round below 1 %


def progress_columns() -> tuple[ProgressColumn, ...]:
    """The columns of the simulator's live progress: name, bar, rounds done, time elapsed."""
    return (TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"), TimeElapsedColumn())


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rounds_done(folder: Path) -> int:
    """The round of a peer's last metrics line: how many it has completed (0 before one)."""
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["round"])
        except ValueError:
            continue  # a blank line, or one the peer is appending this very moment
    return 0


def peer_summaries(folders: list[Path]) -> list[dict[str, Any]]:
    """One entry per peer: ids, eval loss before/after, exchange counters and two series.

    `series` holds the evaluations ({t, round, eval_loss}); `round_series` holds one
    {round, t, train_loss, merged, bytes_in, bytes_out} per metrics line.
    """
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
            "round_series": [{key: m.get(key) for key in _ROUND_KEYS} for m in metrics],
        })
    return summaries


def swarm_consensus(folders: list[Path], *, trained_rounds: int) -> dict[str, Any]:
    """Consensus figures from the peers' sketches.

    Returns:
        `consensus` (distance per round), `rounds_to_consensus` (the first round below 1 %)
        and `settle_rounds_to_consensus`: how many rounds after the last of `trained_rounds`
        it took (None if never: training keeps peers apart, settling rounds pull them in).
    """
    series = consensus_series([read_metrics(folder) for folder in folders])
    first = rounds_to_consensus(series)
    settled = rounds_to_consensus([e for e in series if e["round"] > trained_rounds])
    return {"consensus": series, "rounds_to_consensus": first,
            "settle_rounds_to_consensus": None if settled is None else settled - trained_rounds}


def consensus_series(metrics: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Consensus distance per round: mean over peers of ‖sᵢ − s̄‖ / ‖s̄‖ over adapter sketches.

    sᵢ is peer i's adapter sketch (`peer.sketch`) in its metrics line of that round and s̄ their
    mean; by Johnson–Lindenstrauss this approximates the same ratio over whole adapters. A round
    is reported when at least two peers logged a sketch for it (a peer that logged a round
    twice, after a restart, counts with its last line). The distance is None when s̄ = 0 and the
    sketches differ.

    Args:
        metrics: per peer, its metrics lines.
    """
    by_round: dict[int, list[list[float]]] = {}
    for lines in metrics:
        latest = {int(m["round"]): m["sketch"] for m in lines if m.get("sketch")}
        for number, sketched in latest.items():
            by_round.setdefault(number, []).append(sketched)
    return [{"round": number, "distance": consensus_distance(by_round[number])}
            for number in sorted(by_round) if len(by_round[number]) >= 2]


def consensus_distance(sketches: Sequence[Sequence[float]]) -> float | None:
    """Mean of ‖sᵢ − s̄‖ / ‖s̄‖, to 6 significant digits (0 for identical sketches)."""
    if all(s == sketches[0] for s in sketches):
        return 0.0  # exactly: the mean of equal floats can be an ulp off each of them
    mean = [sum(column) / len(sketches) for column in zip(*sketches, strict=True)]
    spread = sum(math.dist(s, mean) for s in sketches) / len(sketches)
    scale = math.hypot(*mean)
    if scale == 0:
        return 0.0 if spread == 0 else None
    return float(f"{spread / scale:.6g}")


def rounds_to_consensus(series: Sequence[Mapping[str, Any]],
                        threshold: float = CONSENSUS_THRESHOLD) -> int | None:
    """The first trained round (>= 1) whose consensus distance is below threshold, else None.

    Round 0 is left out: every peer starts from the same seeded adapter, so it is trivially 0.
    """
    return next((e["round"] for e in series if e["round"] >= 1 and e["distance"] is not None
                 and e["distance"] < threshold), None)


def print_table(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"mode {result['mode']}: {len(result['peers'])} peer(s), "
                  f"{result['wall_s']} s")
    for column in ("peer", "eval loss before", "eval loss after", "received", "merged",
                   "rejected", "bytes in", "bytes out"):
        table.add_column(column, justify="right")
    for peer in result["peers"]:
        marker = " (byzantine)" if peer.get("byzantine") else ""
        marker += " (churned)" if peer.get("churn") else ""
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
    styles = [("black", "--"), ("dimgray", ":"), ("gray", "-.")]
    for (name, value), (color, style) in zip((baselines or {}).items(), styles * 4, strict=False):
        axes.axhline(value, color=color, linestyle=style, linewidth=1.2, label=name)
    axes.set_xlabel("seconds since the peer started")
    axes.set_ylabel("eval loss (shared held-out set)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_swarm(result: Mapping[str, Any], out: Path, *, title: str) -> list[Path]:
    """Write OUT/consensus.png and OUT/bytes.png for a result document; returns their paths."""
    paths = [out / "consensus.png", out / "bytes.png"]
    plot_consensus(result.get("consensus", []), paths[0], title=f"{title}: consensus distance")
    plot_bytes(result["peers"], paths[1], title=f"{title}: bytes sent per peer")
    return paths


def plot_consensus(series: Sequence[Mapping[str, Any]], path: Path, *, title: str,
                   threshold: float = CONSENSUS_THRESHOLD) -> None:
    """Consensus distance against round (log scale), with the `rounds_to_consensus` threshold."""
    plt, figure, axes = _figure()
    # A log scale shows the approach to consensus; it cannot show 0 (round 0: one seeded start).
    points = [(e["round"], e["distance"]) for e in series if e["distance"]]
    if points:
        axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label="mean over peers")
        axes.axhline(threshold, linestyle="--", linewidth=1, color="grey",
                     label=f"{threshold:.0%} (rounds_to_consensus)")
        axes.set_yscale("log")
        axes.legend(fontsize=8)
    else:
        note = ("the peers' adapters are identical" if series
                else "no consensus distance: fewer than two peers logged sketches")
        axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("round")
    axes.set_ylabel(r"mean $\Vert\theta_i - \bar\theta\Vert \,/\, \Vert\bar\theta\Vert$"
                    " (64-d sketches)")
    _save(plt, figure, axes, path, title)


def plot_bytes(peers: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """Cumulative adapter bytes each peer served, against round."""
    plt, figure, axes = _figure()
    for peer in peers:
        rows = [r for r in peer.get("round_series", []) if r.get("bytes_out") is not None]
        axes.plot([r["round"] for r in rows], [r["bytes_out"] / 1e6 for r in rows], marker="o",
                  markersize=3, label=peer["name"] + (" (byzantine)" if peer.get("byzantine")
                                                      else ""))
    axes.set_xlabel("round")
    axes.set_ylabel("MB sent (cumulative)")
    if peers:
        axes.legend(fontsize=8)
    _save(plt, figure, axes, path, title)


def _figure() -> tuple[Any, Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    return plt, figure, axes


def _save(plt: Any, figure: Any, axes: Any, path: Path, title: str) -> None:
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _bytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count} B"
