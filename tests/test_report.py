"""The simulator's reporting side on hand-written files, without running a simulation.

scripts/report.py, the consensus metrics and plots of scripts/simreport.py, and the data split
that scripts/simulate.py writes for `--split dirichlet`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.report import COLUMNS, main
from scripts.simreport import (
    consensus_series,
    peer_summaries,
    plot_swarm,
    rounds_to_consensus,
    swarm_consensus,
)
from scripts.simulate import parse_args, write_data

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def peer(name: str, loss: float, sent: int, *, byzantine: bool = False) -> dict[str, Any]:
    return {"name": name, "peer_id": f"12D3KooW{name}", "eval_loss_before": 3.0,
            "eval_loss": loss, "merges": 2, "adapters_received": 2, "bytes_received": sent,
            "bytes_sent": sent, "rejected": {}, "series": [], "byzantine": byzantine}


def result(mode: str, **extra: Any) -> dict[str, Any]:
    peers = [peer("p0", 2.0, 300_000), peer("p1", 2.5, 200_000),
             peer("p2", 9.0, 500_000, byzantine=True)]
    return {"mode": mode, "merge_rule": "median", "mean_eval_loss": 4.5,
            "honest_mean_eval_loss": 2.25, "mean_eval_loss_before": 3.0, "wall_s": 61.25,
            "peers": peers, "consensus": [], "rounds_to_consensus": 4,
            "settle_rounds_to_consensus": 2, **extra}


def write(folder: Path, document: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(document))
    return folder


def table_rows(text: str) -> list[list[str]]:
    lines = text.strip().splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and set(lines[1]) <= set("|-: ")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


# -- scripts/report.py -------------------------------------------------------------------------


def test_one_row_per_run_and_per_compared_mode(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    single = write(tmp_path / "median", result("gossip"))
    compared = write(tmp_path / "cmp", {m: result(m) for m in ("gossip", "local", "central")})
    assert main([str(single), str(compared / "result.json")]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == [f"{single} (gossip)", f"{compared}/gossip",
                                    f"{compared}/local", f"{compared}/central"]
    assert rows[0][1:] == ["median", "3", "1", "4.500", "2.250", "3.000", "4", "2", "61.2",
                           "1.0 MB"]


def test_older_results_show_missing_values_as_dashes(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    old = result("local")
    for key in ("merge_rule", "rounds_to_consensus", "settle_rounds_to_consensus", "consensus",
                "honest_mean_eval_loss"):
        del old[key]
    old["peers"] = [{"name": "p0", "bytes_sent": 1234}]
    assert main([str(write(tmp_path / "old", old))]) == 0
    (cells,) = table_rows(capsys.readouterr().out)
    assert cells[1:] == ["-", "1", "0", "4.500", "-", "3.000", "-", "-", "61.2", "1234 B"]


def test_out_file_holds_the_printed_table(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = write(tmp_path / "run", result("gossip"))
    assert main([str(folder), "--out", str(tmp_path / "table.md")]) == 0
    assert (tmp_path / "table.md").read_text() == capsys.readouterr().out


@pytest.mark.parametrize("content, fragment", [
    (None, "no such folder"),
    ("", "no result.json"),
    ("{not json", "bad JSON (Expecting property name enclosed in double quotes at line 1"),
    ('{"mode": "gossip"}', "not a scripts/simulate.py result"),
    ('{"gossip": {"peers": 3}}', "'peers' must be a list"),
    ("[1, 2]", "not a scripts/simulate.py result"),
])
def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     content: str | None, fragment: str) -> None:
    folder = tmp_path / "run"
    if content is not None:
        folder.mkdir()
        if content:
            (folder / "result.json").write_text(content)
    assert main([str(folder)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"report: error: {folder}")
    assert fragment in captured.err and captured.err.count("\n") == 1


def test_script_runs_as_a_command(tmp_path: Path) -> None:
    folder = write(tmp_path / "run", result("gossip"))
    command = [sys.executable, str(ROOT / "scripts" / "report.py"), str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert table_rows(done.stdout)[0][0] == f"{folder} (gossip)"
    missing = subprocess.run([*command[:2], str(tmp_path / "nope")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr == f"report: error: {tmp_path / 'nope'}: no such folder\n"


# -- consensus distance from sketches (scripts/simreport.py) ---------------------------------


def line(round_: int, sketch: list[float] | None, **extra: Any) -> dict[str, Any]:
    return {"round": round_, "t": float(round_), "train_loss": 1.0, "merged": 1,
            "bytes_in": 10 * round_, "bytes_out": 100 * round_, "sketch": sketch, **extra}


def test_consensus_distance_per_round() -> None:
    peers = [
        [line(0, [1.0, 0.0]), line(1, [1.0, 0.0]), line(2, [2.0, 2.0])],
        [line(0, [1.0, 0.0]), line(1, [3.0, 0.0]), line(2, [2.0, 2.0]), line(2, [2.0, 2.02])],
        [line(0, [1.0, 0.0]), line(1, None), line(3, [5.0, 5.0])],  # round 1: no sketch
        [line(0, [1.0, 0.0])],
    ]
    series = consensus_series(peers)
    # Round 1: sketches (1,0) and (3,0), mean (2,0): both 1 away, relative 1/2. Round 2 takes
    # peer 1's last line. Round 3 has one peer only, so no distance.
    assert [e["round"] for e in series] == [0, 1, 2]
    assert series[0]["distance"] == 0.0 and series[1]["distance"] == 0.5
    # The mean of three equal floats can be an ulp off; equal sketches are still exactly 0.
    assert consensus_series([[line(0, [0.1, 0.7])]] * 3)[0]["distance"] == 0.0
    assert series[2]["distance"] == pytest.approx(0.01 / math.hypot(2, 2.01), rel=1e-5)
    assert rounds_to_consensus(series) == 2  # round 0 is the common start, not consensus
    assert rounds_to_consensus(series, threshold=1e-3) is None


def test_consensus_is_undefined_around_a_zero_mean() -> None:
    series = consensus_series([[line(1, [1.0, 0.0])], [line(1, [-1.0, 0.0])],
                               [line(2, [0.0, 0.0])], [line(2, [0.0, 0.0])]])
    assert series == [{"round": 1, "distance": None}, {"round": 2, "distance": 0.0}]
    assert rounds_to_consensus(series) == 2


def test_summaries_keep_eval_series_and_add_round_series(tmp_path: Path) -> None:
    folders = []
    for index, offset in enumerate((0.0, 1.0)):
        folder = tmp_path / f"p{index}"
        folder.mkdir()
        metrics = [line(0, [1.0, 1.0], eval_loss=3.0),
                   line(1, [1.0 + offset, 1.0], eval_loss=None),
                   line(2, [1.0 + offset / 100, 1.0], eval_loss=2.0)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (folder / "status.json").write_text(json.dumps({"peer_id": f"id{index}"}))
        folders.append(folder)
    summaries = peer_summaries(folders)
    assert summaries[0]["rounds"] == 2 and summaries[0]["bytes_sent"] == 200
    assert summaries[0]["series"] == [{"t": 0.0, "round": 0, "eval_loss": 3.0},
                                      {"t": 2.0, "round": 2, "eval_loss": 2.0}]
    assert summaries[0]["round_series"][1] == {"round": 1, "t": 1.0, "train_loss": 1.0,
                                               "merged": 1, "bytes_in": 10, "bytes_out": 100}
    report = swarm_consensus(folders, trained_rounds=1)
    assert [e["round"] for e in report["consensus"]] == [0, 1, 2]
    assert report["rounds_to_consensus"] == 2
    assert report["settle_rounds_to_consensus"] == 1  # round 2 is the first after training
    assert swarm_consensus(folders, trained_rounds=2)["settle_rounds_to_consensus"] is None
    paths = plot_swarm({"peers": summaries, **report}, tmp_path, title="gossip")
    assert [p.name for p in paths] == ["consensus.png", "bytes.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    # One peer (central mode): no distance at all, and the plot says so instead of failing.
    assert swarm_consensus(folders[:1], trained_rounds=1) == {
        "consensus": [], "rounds_to_consensus": None, "settle_rounds_to_consensus": None}
    plot_swarm({"peers": summaries[:1]}, tmp_path / "p0", title="central")
    assert (tmp_path / "p0" / "consensus.png").read_bytes()[:8] == PNG


# -- scripts/simulate.py --split dirichlet ------------------------------------------------------


def test_dirichlet_split_files(tmp_path: Path) -> None:
    args = parse_args(["--peers", "3", "--split", "dirichlet", "--alpha", "0.2",
                       "--out", str(tmp_path)])
    shards, eval_path = write_data(args, tmp_path)
    assert [p.name for p in shards] == ["shard-0.jsonl", "shard-1.jsonl", "shard-2.jsonl"]
    counts = json.loads((tmp_path / "data" / "categories.json").read_text())
    lines = [len(p.read_text().splitlines()) for p in shards]
    assert [sum(c.values()) for c in counts] == lines and all(lines) and eval_path.is_file()


@pytest.mark.parametrize("alpha", ["0", "-0.5", "nan", "inf"])
def test_alpha_must_be_positive(alpha: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--split", "dirichlet", "--alpha", alpha])
    assert exited.value.code == 2
    assert "error: --alpha must be a positive number" in capsys.readouterr().err
