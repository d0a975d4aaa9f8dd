"""`--log-format json`: one JSON object per line, tagged with the running peer's id and round."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gossip.config import NodeConfig
from peer.cli import build_parser, main
from peer.config import PeerConfig
from peer.daemon import Peer
from peer.logs import configure_logging
from peer.options import config_from_args
from tests.conftest import write_jsonl
from tests.fakes import FakeNetwork, fake_runtime
from topology.config import TopologyConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put back the root logger's handlers (pytest's capture) and level after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_json_lines_name_the_peer_and_its_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None,
    autojump_clock: trio.testing.MockClock,
) -> None:
    logging.getLogger().handlers[:] = []  # as in a fresh process (pytest's are put back)
    configure_logging(1, "json")
    log = logging.getLogger("peer.test")
    log.info("before any peer runs")
    network = FakeNetwork()
    config = PeerConfig(data_dir=tmp_path / "p", train_path=tmp_path / "t.jsonl", rounds=2,
                        topology=TopologyConfig(peer_timeout_s=30), network=NodeConfig())
    peer = Peer(config, node_factory=network.node)  # type: ignore[arg-type]
    peer.runtime = fake_runtime(config.data_dir, train_s=1, seed=0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)  # runs its 2 rounds, then writes its final files
    lines = _lines(capsys.readouterr().err)
    first = lines[0]
    assert set(first) == {"ts", "level", "logger", "message"}, "no peer known yet"
    assert first["message"] == "before any peer runs" and first["level"] == "INFO"
    assert first["ts"].endswith("Z") and first["logger"] == "peer.test"
    # The daemon's own lines (the final export, written in a worker thread) are tagged.
    final = next(line for line in lines if line["message"].startswith("final checkpoint"))
    assert final["peer_id"] == peer.status()["peer_id"] and final["round"] == 2
    assert final["logger"] == "peer.records"


def test_log_format_is_a_peer_option_and_text_stays_the_default(tmp_path: Path) -> None:
    argv = ["peer", "--data-dir", str(tmp_path), "--train", "t.jsonl"]
    assert config_from_args(build_parser().parse_args(argv)).log_format == "text"
    args = build_parser().parse_args([*argv, "--log-format", "json"])
    assert config_from_args(args).log_format == "json"


def test_an_unknown_log_format_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], restore_logging: None,
) -> None:
    logging.getLogger().handlers[:] = []
    code = main(["peer", "--data-dir", str(tmp_path), "--train", "t.jsonl",
                 "--log-format", "xml"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "log_format must be text or json" in err


def test_a_second_call_replaces_our_handler_and_a_foreign_one_is_left_alone(
    restore_logging: None,
) -> None:
    root = logging.getLogger()
    root.handlers[:] = []
    configure_logging(0)
    configure_logging(2, "json")
    assert len(root.handlers) == 1 and root.level == logging.DEBUG
    assert type(root.handlers[0].formatter).__name__ == "JsonLines"
    foreign = logging.NullHandler()
    root.handlers[:] = [foreign]  # an embedding program configured logging itself
    configure_logging(1, "json")
    assert root.handlers == [foreign] and logging.getLogger("peer").level == logging.INFO


@pytest.mark.slow
def test_a_real_daemon_writes_only_json_lines(tmp_path: Path, small_model_dir: Path) -> None:
    """Warnings and the model loader's progress bar too: a log collector parses every line."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {j} of text"} for j in range(4)])
    done = subprocess.run(
        [sys.executable, "-m", "peer.cli", "-v", "peer", "--data-dir", str(tmp_path / "p"),
         "--train", str(train), "--model", str(small_model_dir), "--rounds", "1",
         "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "16", "--threads", "1",
         "--log-format", "json"],
        capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = _lines(done.stderr.decode())  # raises on any line that is not JSON
    assert lines and all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    peer_id = json.loads((tmp_path / "p" / "status.json").read_text())["peer_id"]
    tagged = [line for line in lines if "peer_id" in line]
    assert tagged and all(line["peer_id"] == peer_id for line in tagged)
    assert tagged[-1]["round"] == 1
