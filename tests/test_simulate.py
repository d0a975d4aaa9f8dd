"""scripts/simulate.py end to end: real peer processes, result.json, the plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from peer.config import PeerConfig

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _simulate(out: Path, mode: str, peers: int, small_model_dir: Path) -> dict:
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--mode", mode,
        "--peers", str(peers), "--out", str(out), "--model", str(small_model_dir),
        "--rounds", "3", "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "32",
        "--eval-every", "1", "--eval-per-category", "1", "--timeout", "300",
        "--peer-arg=--round-pause=0.5",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((out / "result.json").read_text())


def test_gossip_simulation_writes_result_and_plot(tmp_path: Path, small_model_dir: Path) -> None:
    result = _simulate(tmp_path, "gossip", 3, small_model_dir)
    assert result["mode"] == "gossip"
    assert math.isfinite(result["mean_eval_loss"]) and result["wall_s"] > 0
    assert len(result["peers"]) == 3
    assert len({p["peer_id"] for p in result["peers"]}) == 3
    for peer in result["peers"]:
        assert {"peer_id", "eval_loss", "merges", "adapters_received",
                "bytes_received"} <= set(peer)
        assert math.isfinite(peer["eval_loss"]) and math.isfinite(peer["eval_loss_before"])
        assert len(peer["series"]) == 4, "eval before training and after each of 3 rounds"
    assert sum(p["merges"] for p in result["peers"]) >= 1
    png = tmp_path / "eval_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shards = json.loads((tmp_path / "data" / "categories.json").read_text())
    assert len(shards) == 3 and not set(shards[0]) & set(shards[1]), "domain split: disjoint"
    # Peers that finished lingered (--linger), serving, until all were done; then one SIGTERM
    # stopped each, and each still wrote its final checkpoint and export.
    logs = [(tmp_path / "logs" / f"p{index}.log").read_text() for index in range(3)]
    assert all(log.count("SIGTERM: stopping") == 1 for log in logs)
    for index in range(3):
        assert (tmp_path / "peers" / f"p{index}" / "export" / "adapter_model.safetensors").is_file()


def test_local_peers_that_leave_by_themselves_all_exit_zero(tmp_path: Path,
                                                            small_model_dir: Path) -> None:
    """Local peers do not linger: each exits after its last round, and the run succeeds.

    Before, the watch loop sent every peer a SIGTERM once all rounds were done; a peer already
    past its signal receiver died of it (exit -15) and the run failed (4 of 4 peers here).
    """
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--mode", "local",
        "--peers", "4", "--out", str(tmp_path), "--model", str(small_model_dir),
        "--rounds", "2", "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "32",
        "--eval-per-category", "1", "--timeout", "300",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mode"] == "local" and [p["rounds"] for p in result["peers"]] == [2] * 4
    assert all(p["merges"] == 0 for p in result["peers"]), "local peers exchange nothing"
    logs = [(tmp_path / "logs" / f"p{index}.log").read_text() for index in range(4)]
    assert not any("SIGTERM" in log for log in logs), "only lingering peers are stopped"


def test_central_simulation_is_one_peer(tmp_path: Path, small_model_dir: Path) -> None:
    result = _simulate(tmp_path, "central", 3, small_model_dir)
    assert result["mode"] == "central" and len(result["peers"]) == 1
    assert result["peers"][0]["merges"] == 0


def test_in_process_simulation_of_eight_peers(tmp_path: Path, small_model_dir: Path) -> None:
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--in-process", "--peers", "8",
        "--out", str(tmp_path), "--model", str(small_model_dir), "--rounds", "3",
        "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
        "--eval-per-category", "1", "--timeout", "400",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mode"] == "gossip" and len(result["peers"]) == 8
    assert math.isfinite(result["mean_eval_loss"]) and result["wall_s"] > 0
    assert result["mean_eval_loss"] < result["mean_eval_loss_before"]
    for peer in result["peers"]:
        assert peer["rounds"] == 3 and peer["merges"] >= 1, peer
        assert math.isfinite(peer["eval_loss"]) and peer["bytes_received"] > 0
    memory = result["memory"]
    assert 0 < memory["base_mib"] <= memory["loaded_mib"] <= memory["peak_mib"]
    assert memory["base_mib"] < memory["running_mib"] <= memory["peak_mib"]
    assert memory["per_peer_mib"] > 0
    # One process, yet every peer kept its own data folder with an exported adapter.
    for index in range(8):
        assert (tmp_path / "peers" / f"p{index}" / "export" / "adapter_model.safetensors").is_file()


def test_in_process_timeouts_grow_with_the_swarm_unless_given(tmp_path: Path) -> None:
    from scripts.peerconfigs import in_process_defaults
    from scripts.simulate import parse_args, peer_configs

    def config(*extra: str) -> PeerConfig:
        args = parse_args(["--in-process", "--peers", "64", "--out", str(tmp_path), *extra])
        shards = [tmp_path / "train.jsonl"] * 64
        return peer_configs(args, tmp_path, shards, tmp_path / "eval.jsonl")[1]

    grown = config()
    assert grown.topology.peer_timeout_s == 640 and grown.network.fetch_timeout_s == 64
    assert grown.network.stall_s == 64 and grown.topology.tick_s == 1.0
    assert in_process_defaults(1000)["membership_tick"] == 10.0
    given = config("--peer-arg=--peer-timeout=90")
    assert given.topology.peer_timeout_s == 90, "a --peer-arg wins over the default"
    assert grown.network.health_check_s == 0
    small = in_process_defaults(2)
    assert (small["peer_timeout"], small["fetch_timeout"]) == (30, 30)


def test_settle_fanout_reaches_gossip_peers_only(tmp_path: Path) -> None:
    from scripts.simulate import parse_args, peer_configs

    def config(*extra: str) -> PeerConfig:
        args = parse_args(["--peers", "4", "--settle-rounds", "2", "--out", str(tmp_path),
                           *extra])
        shards = [tmp_path / "train.jsonl"] * 4
        return peer_configs(args, tmp_path, shards, tmp_path / "eval.jsonl")[1]

    assert config().topology.settling_fanout == 8, "0 (the default): settle at 8"
    gossip = config("--settle-fanout", "3")
    assert (gossip.topology.fanout, gossip.topology.settle_fanout) == (2, 3)
    local = config("--settle-fanout", "3", "--mode", "local")
    assert (local.topology.fanout, local.topology.settle_fanout, local.settle_rounds) == (0, 0, 0)


def test_in_process_peers_spread_over_two_workers(tmp_path: Path, small_model_dir: Path) -> None:
    """--workers 2: two processes of shared-model peers form one swarm and merge across."""
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--in-process", "--workers", "2",
        "--peers", "4", "--out", str(tmp_path), "--model", str(small_model_dir), "--rounds", "2",
        "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
        "--eval-per-category", "1", "--timeout", "400", "--fanout", "3",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert len({p["peer_id"] for p in result["peers"]}) == 4
    for peer in result["peers"]:
        assert peer["rounds"] == 2 and peer["merges"] >= 1, peer
    memory = result["memory"]
    assert memory["workers"] == 2 and memory["per_peer_mib"] > 0
    assert memory["base_mib"] < memory["running_mib"] <= memory["peak_mib"]
    # Each worker ran every other peer. In 2 rounds a peer fetched at most 2 adapters from its
    # one neighbour in the same worker, so 3 or more means the other worker's peers served it.
    for worker in (0, 1):
        assert "peer.daemon" in (tmp_path / "logs" / f"inprocess-w{worker}.log").read_text()
    for peer in result["peers"]:
        assert peer["adapters_received"] >= 3, peer


@pytest.mark.parametrize("argv", [["--workers", "2"], ["--in-process", "--workers", "0"]])
def test_workers_need_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.simulate import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "--workers K needs --in-process and K >= 1" in capsys.readouterr().err


def test_memory_network_simulation_with_links_and_churn(tmp_path: Path,
                                                         small_model_dir: Path) -> None:
    """The same daemons over gossip.memory: every peer merges, the links shape the transfers,
    and a churned peer rejoins under its old id."""
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--network", "memory",
        "--peers", "8", "--out", str(tmp_path), "--model", str(small_model_dir), "--rounds", "3",
        "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
        "--eval-per-category", "1", "--timeout", "400", "--settle-rounds", "1",
        "--link", "delay=5ms,rate=50mbit", "--churn", "0.25", "--churn-downtime", "1",
        "--eval-peers", "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["network"] == "memory" and result["config"]["in_process"]
    assert result["mean_eval_loss"] < result["mean_eval_loss_before"]
    network = result["network"]
    # Each peer announces itself when it (re)joins; rounds update what re-announcements carry.
    # An announcement reaches the others along connections: most of the 7, churn aside.
    assert network["publishes"] >= 8 and network["deliveries"] >= 4 * network["publishes"]
    churned = [peer for peer in result["peers"] if peer.get("churn")]
    assert len(churned) == 2, result["peers"]
    for index, peer in enumerate(result["peers"]):
        assert peer["rounds"] == 4 and peer["merges"] >= 2, peer
        assert peer["bytes_received"] > 0
        assert math.isfinite(peer["eval_loss"]) if index < 4 else peer["eval_loss"] is None
    assert result["memory"]["per_peer_mib"] > 0


def test_the_memory_network_runs_in_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.simulate import parse_args

    assert parse_args(["--network", "memory"]).in_process
    with pytest.raises(SystemExit):
        parse_args(["--network", "memory", "--workers", "2"])
    assert "--network memory runs every peer in this process" in capsys.readouterr().err


def _settling(out: Path, small_model_dir: Path, *schedule: str) -> tuple[dict, list[list[dict]]]:
    """6 peers on the memory network, 2 training and 2 settling rounds: the result and each
    peer's metrics lines of rounds 1 to 4."""
    command = [
        sys.executable, str(ROOT / "scripts" / "simulate.py"), "--network", "memory",
        "--peers", "6", "--out", str(out), "--model", str(small_model_dir), "--rounds", "2",
        "--steps-per-round", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "9",
        "--eval-per-category", "1", "--eval-peers", "2", "--timeout", "300",
        "--settle-rounds", "2", *schedule,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [[json.loads(line) for line in (out / "peers" / f"p{i}" / "metrics.jsonl")
              .read_text().splitlines()] for i in range(6)]
    return (json.loads((out / "result.json").read_text()),
            [[line for line in peer if line["round"] >= 1] for peer in lines])


def test_peers_of_one_process_settle_together_after_the_last_training_round(
        tmp_path: Path, small_model_dir: Path) -> None:
    """In one process, training takes turns on one model and the peers drift apart: by
    default (--settle-schedule together) every settling round starts after every peer has
    finished the round before, the first after the last peer's last training round; paced,
    the first peers to finish training settle while the last still trains."""
    result, rounds = _settling(tmp_path / "together", small_model_dir)
    assert result["config"]["settle_schedule"] == "together"
    # A line's wall time `ts` is written at its round's end, `round_s` after the round began.
    trained = max(peer[1]["ts"] for peer in rounds)
    assert min(peer[2]["ts"] - peer[2]["round_s"] for peer in rounds) >= trained
    assert min(peer[3]["ts"] - peer[3]["round_s"] for peer in rounds) >= max(
        peer[2]["ts"] for peer in rounds)
    # Peers done first keep serving: every settling round of every peer merged (of 5 others).
    assert min(line["merged"] for peer in rounds for line in peer[2:]) >= 4
    gate = result["settle_gate"]
    # Each settling round waits twice: for the round before to end, then for announcements.
    assert gate["timed_out"] == 0 and gate["opened"] == 6 * 2 * 2 and gate["members"] == 0
    assert result["consensus"][-1]["distance"] < result["consensus"][2]["distance"]

    result, rounds = _settling(tmp_path / "paced", small_model_dir, "--settle-schedule", "paced")
    assert "settle_gate" not in result
    trained = max(peer[1]["ts"] for peer in rounds)
    assert min(peer[2]["ts"] - peer[2]["round_s"] for peer in rounds) < trained


def test_settling_together_needs_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.simulate import parse_args

    assert parse_args(["--in-process"]).settle_schedule == "together"
    assert parse_args(["--network", "memory"]).settle_schedule == "together"
    assert parse_args(["--in-process", "--workers", "2"]).settle_schedule == "paced"
    assert parse_args([]).settle_schedule == "paced", "a process per peer: paced, as deployed"
    with pytest.raises(SystemExit):
        parse_args(["--in-process", "--workers", "2", "--settle-schedule", "together"])
    assert "--settle-schedule together needs every peer in one process" in (
        capsys.readouterr().err)
