"""scripts/bench_settle.py: a tiny real bench writes the issue's keys and resumes; its summary
counts settling bytes from the metrics lines' bytes_in deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.bench_settle import main, parse_args, simulate_command, summarize

KEYS = {"settle_rounds_to_consensus", "settle_bytes_per_peer", "all_settle_bytes_per_peer",
        "merged_per_settle_round", "consensus_after_training", "final_consensus", "settle_s",
        "wall_s", "mean_eval_loss"}


@pytest.mark.slow
def test_bench_settle_writes_a_row_per_fanout_and_resumes(tmp_path: Path,
                                                          small_model_dir: Path) -> None:
    out = tmp_path / "settle.json"
    common = ["--json", str(out), "--out", str(tmp_path / "runs"), "--peers", "3",
              "--rounds", "1", "--settle-rounds", "2", "--model", str(small_model_dir),
              "--network", "memory", "--", "--seq-len", "16", "--eval-per-category", "1"]
    assert main(["--fanouts", "1", *common]) == 0
    first = tmp_path / "runs" / "p3-f1" / "result.json"
    first_mtime = first.stat().st_mtime
    assert main(["--fanouts", "1,2", "--resume", *common]) == 0
    assert first.stat().st_mtime == first_mtime, "--resume kept fanout 1's row, not ran it again"
    result = json.loads(out.read_text())
    assert result["setup"]["settle_rounds"] == 2 and result["setup"]["network"] == "memory"
    rows = result["runs"]["3"]
    assert list(rows) == ["1", "2"]
    for row in rows.values():
        assert set(row) == KEYS
        assert row["all_settle_bytes_per_peer"] > 0 and row["wall_s"] > 0
        assert row["final_consensus"] is not None
    # Each of 3 peers has 2 neighbours: fanout 2 settles with both whenever both answer.
    assert rows["2"]["merged_per_settle_round"] > rows["1"]["merged_per_settle_round"]


def _series(bytes_in: list[int]) -> list[dict]:
    return [{"round": r, "t": 10.0 * r, "merged": 0 if r == 0 else 2, "bytes_in": b}
            for r, b in enumerate(bytes_in)]


def test_settling_bytes_are_the_deltas_until_consensus() -> None:
    # 2 training rounds, then 3 settling rounds; consensus below 1 % after the second of them.
    result = {
        "settle_rounds_to_consensus": 2, "wall_s": 50.0, "mean_eval_loss": 3.0,
        "consensus": [{"round": r, "distance": d}
                      for r, d in enumerate([0.0, 0.2, 0.1, 0.03, 0.008, 0.004])],
        "peers": [{"round_series": _series([0, 100, 200, 300, 400, 500])},
                  {"round_series": _series([0, 100, 200, 330, 460, 590])}],
    }
    row = summarize(result, trained=2)
    assert row["settle_bytes_per_peer"] == (200 + 260) / 2
    assert row["all_settle_bytes_per_peer"] == (300 + 390) / 2
    assert row["settle_s"] == 20.0 and row["merged_per_settle_round"] == 2
    assert (row["consensus_after_training"], row["final_consensus"]) == (0.1, 0.004)
    unsettled = summarize({**result, "settle_rounds_to_consensus": None}, trained=2)
    assert unsettled["settle_bytes_per_peer"] is None and unsettled["settle_s"] == 30.0


def test_network_is_passed_on_only_when_given(tmp_path: Path) -> None:
    plain = simulate_command(parse_args(["--json", "x.json"]), 8, 4, tmp_path)
    assert "--network" not in plain
    assert plain[plain.index("--settle-fanout") + 1] == "4"
    memory = simulate_command(parse_args(["--json", "x.json", "--network", "memory"]), 8, 4,
                              tmp_path)
    assert memory[memory.index("--network") + 1] == "memory"
    assert parse_args(["--json", "x.json", "--peers", "8,16,64"]).peers == [8, 16, 64]


def test_timeout_grows_with_the_swarm_and_a_given_one_wins(tmp_path: Path) -> None:
    def timeout(command: list[str]) -> str:  # the last --timeout's value: simulate.py takes it
        return command[max(i for i, arg in enumerate(command) if arg == "--timeout") + 1]

    args = parse_args(["--json", "x.json"])
    assert timeout(simulate_command(args, 8, 4, tmp_path)) == "1800"
    assert timeout(simulate_command(args, 1000, 4, tmp_path)) == "8000"
    given = parse_args(["--json", "x.json", "--", "--timeout", "99"])
    assert timeout(simulate_command(given, 1000, 4, tmp_path)) == "99"
