"""What `loraswarm status` and `loraswarm swarm` read from a peer's data folder, as plain data.

Both work on a running or a stopped peer: they only read status.json (rewritten every round)
and the tail of metrics.jsonl (one line per round), never the network. Every value read is
checked for its type before it is used: the folder may be damaged, hand-edited or someone
else's, and a wrong value must give a one-line message, not a traceback.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from peer.errors import PeerError

MAX_STATUS_BYTES = 8 * 1024 * 1024  # status.json holds one row per live peer: kilobytes
METRICS_TAIL_BYTES = 256 * 1024  # enough for the last rounds (a line is about 1.5 kB)
RECENT_ROUNDS = 5
# A peer on another host (or one from before status.json had a pid) counts as running while its
# status is younger than this many rounds, and at least this many seconds.
_QUIET_ROUNDS = 3
_QUIET_MIN_S = 120.0


def read_status(folder: Path) -> dict[str, Any]:
    """The status.json of a peer's data folder.

    Raises:
        PeerError: one line: no such folder, not a peer's folder, or a damaged status.json.
    """
    if not folder.exists():
        raise PeerError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise PeerError(f"{folder} is a file, not a peer's data folder")
    path = folder / "status.json"
    if not path.is_file():
        if (folder / "node.key").is_file():
            raise PeerError(f"{folder}: no status.json yet (the peer is still loading, or "
                            "stopped before it joined)")
        raise PeerError(f"{folder}: not a peer's data folder (no status.json; a peer writes "
                        "one there with `loraswarm peer --data-dir DIR`)")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_STATUS_BYTES + 1)
    except OSError as exc:
        raise PeerError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_STATUS_BYTES:
        raise PeerError(f"{path}: larger than {MAX_STATUS_BYTES} bytes; not a peer's status")
    try:
        status = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise PeerError(f"{path}: damaged ({type(exc).__name__}); the peer rewrites it every "
                        "round") from exc
    if not isinstance(status, dict) or not isinstance(status.get("peer_id"), str):
        raise PeerError(f"{path}: not a peer's status (no peer_id)")
    return status


def recent_rounds(folder: Path, count: int = RECENT_ROUNDS) -> list[dict[str, Any]]:
    """The last `count` rounds of metrics.jsonl (round 0's evaluation included), oldest first.

    Only the file's tail is read; a line cut short (being written) or damaged is skipped.
    """
    path = folder / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - METRICS_TAIL_BYTES))
            tail = handle.read(METRICS_TAIL_BYTES)
    except OSError:
        return []
    rows: list[dict[str, Any]] = []
    for line in tail.splitlines()[-count - 2:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            rows.append({key: record.get(key) for key in
                         ("round", "train_loss", "eval_loss", "merged", "round_s", "ts")})
    return rows[-count:]


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    except (OverflowError, OSError):
        return False
    return True


def liveness(status: Mapping[str, Any], recent: list[dict[str, Any]], *, now: float,
             host: str, alive: Callable[[int], bool] = pid_alive) -> tuple[str, str]:
    """("running" | "stopped" | "gone" | "unknown", one line saying why).

    A peer that stopped cleanly says so (`running: false`). Otherwise, on this host, its
    process decides: alive, it runs; gone, it was killed or crashed. A peer of another host
    counts as running while its status is younger than a few of its rounds.
    """
    updated = _number(status.get("updated"))
    age = None if updated is None else max(0.0, now - updated)
    said = "never updated" if age is None else f"updated {_ago(age)} ago"
    if status.get("running") is False:
        return "stopped", f"stopped cleanly; {said}"
    pid = status.get("pid")
    if type(pid) is int and pid > 0 and status.get("host") == host:
        if alive(pid):
            return "running", f"process {pid} is running; {said}"
        return "gone", f"process {pid} is gone without a clean stop (killed or crashed); {said}"
    round_s = [s for s in (_number(r.get("round_s")) for r in recent) if s is not None]
    quiet = max(_QUIET_MIN_S, _QUIET_ROUNDS * max(round_s, default=0.0))
    where = f"on host {status.get('host')}" if isinstance(status.get("host"), str) else ""
    if age is not None and age <= quiet:
        return "running", " ".join(filter(None, ["probably running", where, f"({said})"]))
    return "unknown", " ".join(filter(None, ["probably stopped", where, f"({said})"]))


def status_document(folder: Path, *, now: float | None = None) -> dict[str, Any]:
    """Everything `loraswarm status` shows, as one JSON-ready document.

    Raises:
        PeerError: see `read_status`.
    """
    status = read_status(folder)
    recent = recent_rounds(folder)
    now = time.time() if now is None else now
    state, why = liveness(status, recent, now=now, host=socket.gethostname())
    live = status.get("live_peers")
    document = {
        "folder": str(folder), "state": state, "state_detail": why,
        **{key: status.get(key) for key in (
            "peer_id", "listen_addrs", "swarm_id", "topic", "model", "device", "round",
            "version", "samples", "merges", "adapters_received", "bytes_in", "bytes_out",
            "eval_loss", "updated", "rejected", "uploads_refused")},
        "live_peers": live if isinstance(live, list) else [],
        "recent_rounds": recent,
    }
    if "privacy" in status:
        document["privacy"] = status["privacy"]
    return document


def swarm_document(folder: Path) -> dict[str, Any]:
    """Everything `loraswarm swarm` shows: status.json's self-reported "swarm" and its figures.

    Raises:
        PeerError: see `read_status`; or the status has no swarm view (an older peer).
    """
    status = read_status(folder)
    swarm = status.get("swarm")
    if not isinstance(swarm, dict) or not isinstance(swarm.get("peers"), list):
        raise PeerError(f"{folder / 'status.json'}: no swarm view (written by an older "
                        "loraswarm, or damaged); it appears after the peer's next round")
    rows = [row for row in swarm["peers"] if isinstance(row, dict)]
    return {"peer_id": status["peer_id"], "self_reported": True, "peers": rows,
            "figures": swarm_figures(rows)}


def swarm_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Swarm-wide figures over the rows: counts, version spread, train-loss spread, devices."""
    versions = sorted(v for v in (row.get("version") for row in rows) if type(v) is int)
    losses = [x for x in (_number(row.get("train_loss")) for row in rows) if x is not None]
    samples = [s for s in (row.get("samples") for row in rows) if type(s) is int]
    devices: dict[str, int] = {}
    for row in rows:
        device = row.get("device")
        kind = device if isinstance(device, str) else "unknown"
        devices[kind] = devices.get(kind, 0) + 1
    return {
        "peers": len(rows), "total_samples": sum(samples),
        "version_min": versions[0] if versions else None,
        "version_median": statistics.median(versions) if versions else None,
        "version_max": versions[-1] if versions else None,
        "train_loss_min": min(losses, default=None), "train_loss_max": max(losses, default=None),
        "train_loss_spread": max(losses) - min(losses) if losses else None,
        "devices": dict(sorted(devices.items())),
    }


def _number(value: object) -> float | None:
    """`value` if it is a finite number (not a bool), else None."""
    if type(value) in (int, float) and math.isfinite(value):  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    return None


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"
