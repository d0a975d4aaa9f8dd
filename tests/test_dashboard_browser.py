"""The `--http` dashboard in a real headless browser, against a real `loraswarm peer` process.

The page draws itself from /status.json and /rounds.json with its inline script, so only a
browser that runs the script shows whether the numbers arrive: the test reads the DOM that
Chromium rendered and keeps a screenshot. CI installs Chromium (.ci/run); on a machine without
it, these tests fail, naming the package to install.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from peer.daemon import Peer
from tests.conftest import require, write_jsonl
from tests.test_http import http_peer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _start_peer(folder: Path, model: Path, train: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "peer.cli", "peer", "--data-dir", str(folder),
               "--train", str(train), "--eval", str(train), "--model", str(model),
               "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "24",
               "--threads", "1", "--rounds", "2", "--linger", "300", "--http", "0",
               "--dp-epsilon", "8", "--dp-delta", "0.01"]
    log = open(folder.with_suffix(".log"), "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _status(folder: Path) -> dict:
    path = folder / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _chromium(url: str, *args: str) -> list[str]:
    return [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=8000", *args, url]


def _browse(url: str, *args: str) -> str:
    """Run headless Chromium on `url`; its stdout (the DOM, with --dump-dom)."""
    done = subprocess.run(_chromium(url, *args), capture_output=True, timeout=120, check=True)
    return done.stdout.decode()


def test_dashboard_renders_the_peers_numbers(tmp_path: Path, small_model_dir: Path) -> None:
    require(None if CHROMIUM else "needs Chromium: apt-get install chromium")
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {j} of some text"}
                                                for j in range(8)])
    folder = tmp_path / "p0"
    proc = _start_peer(folder, small_model_dir, train)
    try:
        deadline = time.monotonic() + 240
        while _status(folder).get("round", 0) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "timed out waiting for 2 rounds"
            time.sleep(0.3)
        assert proc.poll() is None, "the peer exited"
        status = _status(folder)
        url = status["http"]
        dom = _browse(url, "--dump-dom")
        screenshot = tmp_path / "dashboard.png"
        _browse(url, f"--screenshot={screenshot}", "--window-size=1280,900")
        print(f"dashboard screenshot: {screenshot}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    assert code == 0
    assert f'<code id="peer-id">{status["peer_id"]}</code>' in dom
    assert '<div class="v" id="round">2</div>' in dom
    assert f'<div class="v" id="eval-loss">{status["eval_loss"]:.4f}</div>' in dom
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert f'<div class="v" id="train-loss">{lines[-1]["train_loss"]:.4f}</div>' in dom
    assert html.escape(status["device"]) in dom
    epsilon = status["privacy"]["epsilon"]
    assert 0 < epsilon <= 8 and f'<div class="v" id="epsilon">{epsilon:.3f} of 8</div>' in dom
    # The swarm table: a lone peer's telemetry is its own row, in bold, with its real id.
    assert '<table id="swarm-table">' in dom and 'id="swarm-empty"' not in dom
    assert f'<tr style="font-weight:600"><td title="{status["peer_id"]}">' in dom
    assert dom.count("<path ") >= 2, "the loss chart drew its train and eval lines"
    assert screenshot.stat().st_size > 10_000


# Swarm telemetry as another branch gossips it: self-reported, so hostile text included.
HOSTILE = '<img src=x onerror="document.title=1">'
SWARM = {"self_reported": True, "peers": [
    {"peer_id": "12D3KooWNeighbourAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "round": 7,
     "version": 7, "samples": 56, "train_loss": 2.5, "eval_loss": 2.75, "device": HOSTILE,
     "rank": 8, "merge_rule": "average", "age_s": 4.2}]}


async def test_dashboard_shows_swarm_telemetry_as_text(tmp_path: Path, monkeypatch) -> None:
    require(None if CHROMIUM else "needs Chromium: apt-get install chromium")
    plain = Peer.status
    monkeypatch.setattr(Peer, "status", lambda self: {**plain(self), "swarm": SWARM})
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            peer = http_peer(tmp_path, "p0", rounds=1)
            await nursery.start(peer.run)
            await peer.wait_rounds(1)
            done = await trio.run_process(_chromium(peer.status()["http"], "--dump-dom"),
                                          capture_stdout=True, capture_stderr=True)
            nursery.cancel_scope.cancel()
    dom = done.stdout.decode()
    assert '<table id="swarm-table">' in dom and 'id="swarm-empty"' not in dom
    assert "<td>2.5000</td><td>2.7500</td>" in dom and "<td>4 s</td>" in dom
    assert html.escape(HOSTILE, quote=False) in dom, "telemetry is shown as text"
    assert "<img" not in dom and "<title>loraswarm 12D3Ko" in dom
    assert 'id="epsilon"' not in dom, "no privacy card without --dp-epsilon"
