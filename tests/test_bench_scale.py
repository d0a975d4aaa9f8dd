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


def test_a_row_reads_peer_folders_only(tmp_path: Path) -> None:
    """Worker processes keep pN.toml beside the peers' folders: a file is no peer (it once
    counted as a peer that merged nothing)."""
    sys.path.insert(0, str(ROOT))
    from scripts.bench_scale import row

    for name in ("p0", "p1"):
        folder = tmp_path / "peers" / name
        folder.mkdir(parents=True)
        lines = [{"round": r, "merged": 2, "round_s": 1.0, "bytes_in": 10 * r} for r in (1, 2)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (tmp_path / "peers" / f"{name}.toml").write_text("rounds = 2\n")
    result = {"wall_s": 1.0, "consensus": [{"round": 1, "distance": 0.5},
                                           {"round": 2, "distance": 0.1}]}
    got = row(result, tmp_path, trained=1)
    assert got["merges_per_peer"] == {"min": 4, "median": 4.0}
    assert got["training_rounds"] == 2 and got["training_rounds_merged_none"] == 0
    assert (got["distance_trained"], got["distance_settled"]) == (0.5, 0.1)
