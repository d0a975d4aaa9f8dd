"""scripts/bench_wire.py: a real two-peer swarm over an emulated link per codec, the issue's
JSON keys, and a resumed bench that reads the runs the first one made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from scripts.bench_wire import _timed_fetch, main, merged_every_round
from testbed.wan import Link

TINY = ["--", "--rounds", "1", "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "16"]


@pytest.mark.slow
def test_bench_wire_writes_the_issue_keys_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "wire.json"
    common = ["--json", str(out), "--out", str(tmp_path / "runs"), "--peers", "2",
              "--fanout", "1", "--settle-rounds", "1", "--links", "400mbit", "--delay", "5ms"]
    # A fast link: at 20 Mbit/s the Qwen-shaped fp32 fetches alone took 28 of the test's 49 s.
    assert main([*common, "--no-local", "--codecs", "fp32", *TINY]) == 0
    fp32_run = tmp_path / "runs" / "fp32" / "400mbit" / "result.json"
    first_mtime = fp32_run.stat().st_mtime
    assert main([*common, "--resume", "--codecs", "fp32", "ternary:0.05+zstd", *TINY]) == 0
    result = json.loads(out.read_text())
    assert result["default"] == "sign"
    assert result["local"]["eval_loss"] > 0  # the peers alone: the resumed run made it
    assert list(result["codecs"]) == ["fp32", "ternary:0.05+zstd"]
    assert fp32_run.stat().st_mtime == first_mtime, "--resume read fp32's run, not ran it again"
    for row in result["codecs"].values():
        assert {"bytes_per_peer_round", "eval_loss", "consensus", "wall_s",
                "merged_every_round"} <= row.keys()
        assert row["bytes_per_peer_round"] > 0 and row["wall_s"]["400mbit"] > 0
        assert row["merged_every_round"] is True  # 2 peers, fanout 1: each merged the other
    ternary = result["codecs"]["ternary:0.05+zstd"]
    assert ternary["fewer_bytes_than_fp32"] > 5
    assert set(result["qwen_fetch_s"]) == {"fp32", "ternary:0.05+zstd"}
    assert result["qwen_fetch_s"]["fp32"]["bytes"] > 30 * result["qwen_fetch_s"][
        "ternary:0.05+zstd"]["bytes"]


def test_merged_every_round_needs_every_peer_and_round() -> None:
    def result(*merged: list[int], settled: int = 0) -> dict:
        """Peers' round series: round 0, a training round per entry, then `settled` more."""
        def series(per_peer: list[int]) -> list[dict]:
            rounds = [{"round": 0, "merged": 0, "train_loss": None}]
            rounds += [{"round": r, "merged": m, "train_loss": 1.0}
                       for r, m in enumerate(per_peer, start=1)]
            return rounds + [{"round": len(rounds) + i, "merged": 0, "train_loss": None}
                             for i in range(settled)]
        return {"peers": [{"round_series": series(per_peer)} for per_peer in merged]}

    assert merged_every_round(result([2, 2], [2, 3], settled=2), fanout=2)
    assert not merged_every_round(result([2, 2], [2, 1]), fanout=2)
    assert not merged_every_round(result(), fanout=2)


@pytest.mark.serial  # bounds the seconds of a shaped fetch
async def test_a_timed_fetch_takes_the_link_round_trip_and_rate() -> None:
    link = Link.parse("delay=20ms,rate=8mbit")
    with trio.fail_after(30):
        seconds = await _timed_fetch(100_000, link)
    expected = 2 * 0.020 + 100_000 * 8 / 8e6  # a round trip, then 0.1 s on the wire
    assert expected * 0.9 < seconds < expected * 1.5
