"""scripts/bench_train.py end to end, tiny: a peer, a neighbour process and a bare loop."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a neighbour peer process (about 30 s)


def test_bench_train_writes_the_issue_json(tmp_path: Path, small_model_dir: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--json", str(out),
        "--model", str(small_model_dir), "--rounds", "1", "--steps-per-round", "2",
        "--batch-size", "2", "--seq-len", "16", "--threads", "1", "--timeout", "150",
        "--out", str(tmp_path / "run"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout.splitlines()[-1]) == result, "the last stdout line is the JSON"
    assert {"device", "dtype", "tokens_per_s", "ratio", "overhead_share"} <= set(result)
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    rates = result["tokens_per_s"]
    assert {"bare", "daemon"} <= set(rates)
    for value in (*rates.values(), result["ratio"]):
        assert math.isfinite(value) and value > 0
    assert result["ratio"] == pytest.approx(rates["daemon"] / rates["bare"], rel=1e-3)
    assert 0 <= result["overhead_share"] <= 1
    assert sum(result["shares"].values()) == pytest.approx(1, abs=1e-3)
    # Both ways ran the same steps: their first, untimed rounds end at the same loss.
    losses = result["warmup_loss"]
    assert losses["daemon"] == pytest.approx(losses["bare"], rel=1e-4)


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_a_quantized_peer_measures_beside_a_neighbour_of_its_own_swarm(quantize: str) -> None:
    """A quantized base is in a swarm of its own: an unquantized neighbour would never be heard,
    and the measured peer waited for it until --timeout (found on an H100)."""
    sys.path.insert(0, str(ROOT))
    from scripts.bench_train import parse_args
    from scripts.trainpeer import neighbour_placement

    args = parse_args(["--json", "x.json", "--device", "cuda", "--quantize", quantize])
    placement = neighbour_placement(args)
    assert (placement.device, placement.quantize) == ("cuda", quantize)
    plain = neighbour_placement(parse_args(["--json", "x.json", "--device", "cpu"]))
    assert (plain.device, plain.quantize) == ("cpu", "")
