"""`loraswarm status` / `swarm` / `export` on folders that are missing, damaged or not a peer's,
and how a peer is judged running, stopped or gone. (Live peers: tests/test_operating.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peer.cli import main
from peer.summary import liveness, pid_alive, recent_rounds

ROOT = Path(__file__).resolve().parent.parent
HOST = "this-host"
STATUS: dict[str, Any] = {
    "peer_id": "12D3KooWGzXKrLVBzgqQZ3uMCfNiVRxk3gAXZpETYPHbCpbyT3Sq", "round": 4,
    "version": 4, "samples": 32, "merges": 3, "live_peers": [], "rejected": {"replay": 2},
    "uploads_refused": {"slow_reader": 1}, "updated": 1000.0, "pid": 4242, "host": HOST,
    "running": True,
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _folder(tmp_path: Path, status: object, name: str = "peer") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    text = status if isinstance(status, str) else json.dumps(status)
    (folder / "status.json").write_text(text)
    return folder


@pytest.mark.parametrize(("make", "says"), [
    (lambda tmp: tmp / "nowhere", "no such folder"),
    (lambda tmp: _file(tmp / "a-file"), "is a file, not a peer's data folder"),
    (lambda tmp: _made(tmp / "empty"), "not a peer's data folder (no status.json"),
    (lambda tmp: _made(tmp / "loading", "node.key"), "no status.json yet"),
    (lambda tmp: _folder(tmp, '{"peer_id": "12D3', "cut"), "damaged (JSONDecodeError)"),
    (lambda tmp: _folder(tmp, "[1, 2]", "list"), "not a peer's status (no peer_id)"),
    (lambda tmp: _folder(tmp, "[" * 100_000, "deep"), "damaged"),
])
@pytest.mark.parametrize("command", ["status", "swarm", "export"])
def test_a_bad_folder_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, says: str, command: str,
) -> None:
    target = ["--out", str(tmp_path / "out")] if command == "export" else []
    code, out, err = _run(capsys, command, str(make(tmp_path)), *target)
    assert code == 2 and out == ""
    assert err.startswith("loraswarm: error: ") and err.count("\n") == 1 and says in err


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def _made(path: Path, *files: str) -> Path:
    path.mkdir()
    for name in files:
        (path / name).write_bytes(b"")
    return path


def test_swarm_of_a_status_without_a_swarm_view(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "swarm", str(_folder(tmp_path, STATUS)))
    assert code == 2 and "no swarm view" in err and err.count("\n") == 1


def test_export_refuses_what_it_cannot_export_from_or_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    model = _made(tmp_path / "model", "config.json")  # enough to be taken for a model folder
    folder = _folder(tmp_path, {**STATUS, "model": str(model)})
    cases = [
        (["--merged", str(_made(tmp_path / "busy", "something"))], "is not an empty folder"),
        (["--out", str(tmp_path / "o")], "no export/ yet"),
        (["--out", str(tmp_path / "o"), "--model", str(tmp_path / "busy")],
         "not a Hugging Face model folder"),
    ]
    for args, says in cases:
        code, out, err = _run(capsys, "export", str(folder), *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and says in err, err
    code, _, err = _run(capsys, "export", str(_folder(tmp_path, STATUS, "no-model")),
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "names no base model; pass --model PATH" in err
    assert not (tmp_path / "o").exists()


def test_a_user_gets_exit_2_from_a_real_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "peer.cli", "status", str(tmp_path / "none")],
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.decode().splitlines() == [
        f"loraswarm: error: {tmp_path / 'none'}: no such folder"]


def test_status_prints_the_privacy_ledger_and_refusals_when_there_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    privacy = {"epsilon": 2.5, "delta": 1e-5, "steps": 40, "noise_multiplier": 1.1, "clip": 1.0}
    folder = _folder(tmp_path, {**STATUS, "running": False, "privacy": privacy})
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "train_loss": 3.0 - r / 10, "eval_loss": None, "merged": 1,
                    "round_s": 2.0}) + "\n" for r in range(1, 9)) + '{"round": 9, "tra')
    code, out, _ = _run(capsys, "status", str(folder))
    assert code == 0 and "stopped" in out
    for text in ("privacy ledger", "epsilon", "2.5", "replay (refused)",
                 "slow_reader (upload refused)", "recent rounds"):
        assert text in out, text
    code, out, _ = _run(capsys, "status", str(folder), "--json")
    document = json.loads(out)
    assert document["privacy"] == privacy and document["state"] == "stopped"
    # The last 5 whole rounds; the line being written is skipped.
    assert [row["round"] for row in document["recent_rounds"]] == [4, 5, 6, 7, 8]
    assert recent_rounds(tmp_path / "nothing-here") == []


def test_liveness() -> None:
    def alive(pid: int) -> bool:
        return pid == 4242

    now = 1030.0
    assert liveness(STATUS, [], now=now, host=HOST, alive=alive)[0] == "running"
    gone = liveness({**STATUS, "pid": 777}, [], now=now, host=HOST, alive=alive)
    assert gone[0] == "gone" and "killed or crashed" in gone[1]
    assert liveness({**STATUS, "running": False}, [], now=now, host=HOST,
                    alive=alive)[0] == "stopped"
    # Another host's peer (or an older status without a pid): by the age of its status,
    # against its rounds' length.
    other = {**STATUS, "host": "elsewhere"}
    slow = [{"round_s": 100.0}]
    assert liveness(other, [], now=1100.0, host=HOST, alive=alive)[0] == "running"
    assert liveness(other, [], now=1200.0, host=HOST, alive=alive)[0] == "unknown"
    assert liveness(other, slow, now=1200.0, host=HOST, alive=alive)[0] == "running"
    assert liveness({"peer_id": "x"}, [], now=now, host=HOST, alive=alive)[0] == "unknown"
    assert pid_alive(os.getpid()) and not pid_alive(2**22 + 12345)
