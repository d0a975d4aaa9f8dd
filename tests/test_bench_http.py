"""scripts/bench_http.py end to end, tiny: two peer processes, one phase without and one with
a client scraping the measured peer's pages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # two peer processes (about 40 s)


def test_bench_http_writes_its_json(tmp_path: Path, small_model_dir: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_http.py"), "--json", str(out),
               "--model", str(small_model_dir), "--rounds", "2", "--phases", "2",
               "--warmup", "1", "--steps-per-round", "1", "--timeout", "240",
               "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("round_s", "train_s", "cpu_s_per_round"):  # seconds: 4 decimals are plenty
        off, on, ratio = (result[key][k] for k in ("off", "on", "ratio"))
        assert math.isfinite(ratio) and ratio == pytest.approx(on / off, rel=1e-2), key
    gather = result["gather_s"]
    assert gather["ratio"] is None if gather["off"] == 0 else gather["ratio"] >= 0
    for path, requests in result["requests"].items():
        assert requests["answered"] >= 1 and requests["failed"] == 0, path
        assert 0 < requests["median_s"] <= requests["p95_s"] < 10, path
    assert "phase 2 (on): rounds 4..5" in done.stderr
