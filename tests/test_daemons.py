"""End to end: real `loraswarm peer` processes, joined by bootstrap, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _start(folder: Path, model: Path, train: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "peer.cli", "-v", "peer", "--data-dir", str(folder),
               "--train", str(train), "--model", str(model), "--steps-per-round", "1",
               "--batch-size", "2", "--seq-len", "24", "--threads", "1",
               "--round-pause", "0.3", *extra]
    log = open(folder.with_suffix(".log"), "wb")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _status(folder: Path) -> dict:
    path = folder / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _wait(predicate, what: str, procs, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"a peer exited while waiting for {what}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_daemons_join_merge_stop_and_export(tmp_path: Path, small_model_dir: Path) -> None:
    trains = [write_jsonl(tmp_path / f"t{i}.jsonl", [{"text": f"peer {i} line {j} of text"}
                                                    for j in range(8)]) for i in range(3)]
    folders = [tmp_path / f"p{i}" for i in range(3)]
    procs = [_start(folders[0], small_model_dir, trains[0])]
    try:
        _wait(lambda: bool(_status(folders[0]).get("listen_addrs")), "peer 0 to listen", procs)
        boot = _status(folders[0])["listen_addrs"][0]
        for i in (1, 2):
            procs.append(_start(folders[i], small_model_dir, trains[i], "--bootstrap", boot))
        # Every peer merged and served: the restart below checks that both totals go on.
        _wait(lambda: all(_status(f).get("merges", 0) >= 1 and _status(f).get("bytes_out", 0) > 0
                          for f in folders), "merges and uploads", procs)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=90) for proc in procs]
    assert codes == [0, 0, 0]
    for folder in folders:
        status = _status(folder)
        assert status["merges"] >= 1 and status["adapters_received"] >= 1
        assert (folder / "export" / "adapter_model.safetensors").is_file()
    _check_export_changes_output(small_model_dir, folders[1] / "export")
    _check_restart_resumes(folders[1], small_model_dir, trains[1])


def _check_export_changes_output(model_dir: Path, export: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, export)(input_ids=ids).logits
    assert (plain - adapted).abs().max().item() > 1e-6


def _check_restart_resumes(folder: Path, model_dir: Path, train: Path) -> None:
    before = _status(folder)
    proc = _start(folder, model_dir, train, "--rounds", str(before["round"] + 1))
    assert proc.wait(timeout=180) == 0
    after = _status(folder)
    assert after["peer_id"] == before["peer_id"], "the identity key must persist"
    assert after["version"] == before["version"] + 1, "the version continues from the checkpoint"
    # Alone now, it merges nothing and receives nothing: its totals go on from the checkpoint.
    for total in ("merges", "adapters_received", "bytes_in", "bytes_out"):
        assert after[total] == before[total] > 0, total


def test_sigterm_while_stopping_still_exits_zero(tmp_path: Path, small_model_dir: Path) -> None:
    """A second SIGTERM, or one during exit, finds the daemon stopping: it still exits 0.

    The first SIGTERM starts the stop; the ones after it land while the final checkpoint and
    export are written and while the interpreter exits. Before, the first one closed the
    signal receiver and the next killed the daemon (exit -15) mid-export.
    """
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {j} of text"} for j in range(8)])
    folder = tmp_path / "p0"
    proc = _start(folder, small_model_dir, train)
    try:
        _wait(lambda: bool(_status(folder).get("listen_addrs")), "the peer to listen", [proc])
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait(timeout=30) == 0
    assert (folder / "export" / "adapter_model.safetensors").is_file()
    assert folder.with_suffix(".log").read_text().count("SIGTERM: stopping") == 1
