"""scripts/bench_scale.py end to end, tiny: one memory-network run and its row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_a_memory_run_gives_its_row(tmp_path: Path, small_model_dir: Path) -> None:
    out = tmp_path / "scale.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--json", str(out),
               "--runs", "memory:3", "--out", str(tmp_path / "runs"), "--eval-peers", "2",
               f"--extra=--model={small_model_dir}", "--extra=--settle-rounds=1",
               "--extra=--seq-len=16", "--extra=--eval-per-category=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    row = json.loads(out.read_text())["runs"]["memory:3"]
    assert "error" not in row, row
    assert row["rounds"] == 4 and row["training_rounds"] == 9
    assert row["merges_per_peer"]["min"] >= 1 and row["bytes_in_per_peer"] > 0
    assert row["peak_mib"] > 0 and row["network"]["publishes"] >= 3
    assert row["mean_eval_loss"] < row["mean_eval_loss_before"]
    # --resume keeps a finished row and runs nothing.
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "running" not in again.stdout
