"""Churn in scripts/simulate.py: the plan (pure), and a peer killed with SIGKILL that resumes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.churn import plan_churn

ROOT = Path(__file__).resolve().parent.parent


def test_plan_never_churns_the_bootstrap_and_is_reproducible() -> None:
    for seed in range(20):
        plan = plan_churn(3, 0.34, rounds=4, seed=seed)
        assert len(plan.kill_after) == 1 and 0 not in plan.kill_after
        assert all(1 <= after <= 2 for after in plan.kill_after.values()), "1..rounds-2"
        assert plan == plan_churn(3, 0.34, rounds=4, seed=seed)
    assert len({tuple(plan_churn(9, 0.3, rounds=8, seed=s).kill_after.items())
                for s in range(10)}) > 1, "the seed chooses"
    assert len(plan_churn(8, 0.5, rounds=10, seed=1).kill_after) == 4
    assert sorted(plan_churn(4, 0.99, rounds=5, seed=1).kill_after) == [1, 2, 3], "all but p0"
    assert len(plan_churn(10, 0.01, rounds=5, seed=1).kill_after) == 1, "at least one"
    assert not plan_churn(4, 0.0, rounds=5, seed=1).kill_after
    assert not plan_churn(1, 0.5, rounds=5, seed=1).kill_after, "a lone peer is the bootstrap"
    with pytest.raises(ValueError):
        plan_churn(4, 1.0, rounds=5, seed=1)
    with pytest.raises(ValueError):
        plan_churn(4, 0.5, rounds=2, seed=1)


def _churned_run(out: Path, model_dir: Path, *extra: str) -> dict:
    """3 peers, 4 rounds, seed 0 (which plans p2 for churn), restarted after 1 s."""
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--peers", "3", "--out", str(out),
        "--model", str(model_dir), "--rounds", "4", "--steps-per-round", "1",
        "--batch-size", "2", "--seq-len", "32", "--eval-per-category", "1", "--seed", "0",
        "--timeout", "300", "--churn", "0.34", "--churn-downtime", "1", *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((out / "result.json").read_text())


def _churned_p2(result: dict, out: Path, *, last_round: int) -> dict:
    """Only p2 was churned, once, and resumed from its checkpoint; returns its record."""
    churned = [p for p in result["peers"] if "churn" in p]
    assert [p["name"] for p in churned] == ["p2"], "seed 0 plans p2 (never p0)"
    record = churned[0]["churn"]
    assert record["restarts"] == 1 and record["killed_at_round"] >= 2
    assert record["resumed_version"] >= max(1, record["version_before_kill"] - 1)
    assert record["checkpoint_loads"] is True
    rounds = [json.loads(line)["round"] for line in
              (out / "peers" / "p2" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == sorted(set(rounds)) and rounds[-1] == last_round, "rounds never reset"
    return record


@pytest.mark.slow
def test_a_killed_peer_restarts_from_its_checkpoint(tmp_path: Path,
                                                    small_model_dir: Path) -> None:
    from peer.store import PeerStore

    # Idle rounds keep the others running while p2 restarts, so it usually rejoins them.
    result = _churned_run(tmp_path, small_model_dir, "--mode", "gossip",
                          "--peer-arg=--round-pause=3")
    assert result["churn"] == 0.34 and math.isfinite(result["mean_eval_loss"])
    assert [p["rounds"] for p in result["peers"]] == [4, 4, 4], "restarts keep --rounds total"
    record = _churned_p2(result, tmp_path, last_round=4)
    folder = tmp_path / "peers" / "p2"
    log = (tmp_path / "logs" / "p2.log").read_text()
    assert log.count("resumed from") == 1 and "restarting ---" in log, "one log, appended"
    swarm = json.loads((folder / "status.json").read_text())["swarm_id"]
    checkpoint = PeerStore(folder).load_checkpoint(swarm)
    assert checkpoint is not None and checkpoint.round == 4
    assert checkpoint.version >= record["resumed_version"] + 1


@pytest.mark.slow
def test_an_in_process_peer_crashes_and_resumes_from_its_checkpoint(
    tmp_path: Path, small_model_dir: Path
) -> None:
    result = _churned_run(tmp_path, small_model_dir, "--in-process", "--settle-rounds", "1",
                          "--peer-arg=--round-pause=2")
    assert [p["rounds"] for p in result["peers"]] == [5, 5, 5], "4 trained + 1 settling"
    _churned_p2(result, tmp_path, last_round=5)  # the same seeded plan as process mode
    log = (tmp_path / "logs" / "inprocess.log").read_text()
    assert "churn: crashed p2" in log and log.count("resumed from") == 1
    assert "settle_rounds_to_consensus" in result
