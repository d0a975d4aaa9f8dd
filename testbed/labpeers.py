"""Real `loraswarm peer` daemons in NAT lab namespaces, for the lab tests and bench_nat.py."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from testbed.natlab import NatLab, Node

__all__ = ["Daemon", "PORT", "wait_for"]

ROOT = Path(__file__).resolve().parent.parent
PORT = 4001


def _write_lines(path: Path, name: str, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"text": f"{name} line {j} of text"}) + "\n"
                            for j in range(n)))
    return path


class Daemon:
    """A `loraswarm peer` process in a lab namespace (listening on 0.0.0.0:`PORT`, a small
    training set of its own), and its status.json."""

    def __init__(self, lab: NatLab, node: Node, folder: Path, model: Path, *extra: str) -> None:
        self.folder = folder
        train = _write_lines(folder.with_suffix(".jsonl"), folder.name)
        argv = [sys.executable, "-m", "peer.cli", "-v", "peer", "--data-dir", str(folder),
                "--train", str(train), "--model", str(model), "--steps-per-round", "1",
                "--batch-size", "2", "--seq-len", "24", "--threads", "1", "--round-pause", "0.3",
                "--listen", f"/ip4/0.0.0.0/tcp/{PORT}", *extra]
        self.log = folder.with_suffix(".log")
        with self.log.open("wb") as log:
            self.proc = lab.popen(node, argv, stdout=log, stderr=log,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})

    def status(self) -> dict[str, Any]:
        path = self.folder / "status.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:  # caught mid-rename on a slow disk: read it next time
            return {}


def wait_for(predicate: Callable[[], bool], what: str, daemons: Sequence[Daemon],
             timeout_s: float = 240.0) -> None:
    """Poll `predicate` until true; fail at once, with its log, if a daemon exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                tail = daemon.log.read_text()[-3000:]
                raise AssertionError(f"{daemon.folder.name} exited waiting for {what}:\n{tail}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


