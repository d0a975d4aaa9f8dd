"""Operating a peer: `loraswarm status`, `swarm` and `export` on real peers' data folders.

The peers are real (`Peer` on real libp2p hosts on 127.0.0.1, the small built-in model), in
this trio process to spare the CPU; the commands run as real `loraswarm` processes, as a user
runs them, while the swarm runs and after it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio

from gossip.node import NodeConfig
from peer.cli import main
from peer.config import PeerConfig, TrainConfig
from peer.daemon import Peer
from peer.store import PeerStore
from tests.conftest import write_jsonl
from topology.config import TopologyConfig

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _config(folder: Path, model: Path, train: Path, bootstrap: tuple[str, ...] = (),
            **extra: object) -> PeerConfig:
    return PeerConfig(**extra,  # type: ignore[arg-type]
        data_dir=folder, train_path=train, model=str(model),
        train=TrainConfig(steps_per_round=1, batch_size=2, seq_len=24, lr=1e-3, threads=1),
        network=NodeConfig(bootstrap=bootstrap, fetch_timeout_s=20),
        topology=TopologyConfig(fanout=2, peer_timeout_s=60), round_pause_s=0.2,
    )


def _train(tmp_path: Path, i: int) -> Path:
    return write_jsonl(tmp_path / f"train{i}.jsonl",
                       [{"text": f"peer {i} writes line {j} of its text"} for j in range(6)])


async def _loraswarm(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with trio.fail_after(120):
        return await trio.run_process([sys.executable, "-m", "peer.cli", *args], env=env,
                                      capture_stdout=True, capture_stderr=True, check=False)


def _swarm_rows(folder: Path) -> list[dict]:
    status = json.loads((folder / "status.json").read_text())
    return status.get("swarm", {}).get("peers", [])


async def test_status_and_swarm_of_a_live_three_peer_swarm(
    tmp_path: Path, small_model_dir: Path,
) -> None:
    folders = [tmp_path / f"p{i}" for i in range(3)]
    peers: list[Peer] = []
    with trio.fail_after(400):
        async with trio.open_nursery() as nursery:
            node0 = await nursery.start(
                Peer(_config(folders[0], small_model_dir, _train(tmp_path, 0))).run)
            for i in (1, 2):
                peer = Peer(_config(folders[i], small_model_dir, _train(tmp_path, i),
                                    (node0.listen_addrs[0],)))
                await nursery.start(peer.run)
                peers.append(peer)
            # Until peer 1 has merged and written a status that lists all three.
            while peers[0].stats.merges < 1 or len(_swarm_rows(folders[1])) < 3:
                await peers[0].wait_rounds(peers[0].round + 1)
            status = await _loraswarm("status", str(folders[1]), "--json")
            swarm = await _loraswarm("swarm", str(folders[1]), "--json")
            table = await _loraswarm("swarm", str(folders[1]))
            readable = await _loraswarm("status", str(folders[1]))
            nursery.cancel_scope.cancel()
    for done in (status, swarm, table, readable):
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    document = json.loads(status.stdout)
    ids = {json.loads((f / "status.json").read_text())["peer_id"] for f in folders}
    assert document["state"] == "running" and document["peer_id"] in ids
    assert document["round"] >= 1 and document["merges"] >= 1
    assert len(document["live_peers"]) == 2 and document["bytes_in"] > 0
    assert document["recent_rounds"] and document["recent_rounds"][-1]["train_loss"] > 0
    assert document["privacy"]["epsilon"] is None  # trained without DP: no guarantee

    view = json.loads(swarm.stdout)
    assert view["self_reported"] is True and {row["peer_id"] for row in view["peers"]} == ids
    assert view["peers"][0]["peer_id"] == document["peer_id"]
    assert all(row["device"] == "cpu" and row["rank"] == 8 and row["merge_rule"] == "average"
               for row in view["peers"])
    figures = view["figures"]
    assert figures["peers"] == 3 and figures["devices"] == {"cpu": 3}
    assert figures["total_samples"] == sum(row["samples"] for row in view["peers"]) > 0
    assert figures["version_min"] <= figures["version_median"] <= figures["version_max"]

    text = table.stdout.decode()
    assert "self-reported" in text and "3 peers" in text
    assert sum(document["peer_id"][-8:] in line for line in text.splitlines()) == 1
    assert "running" in readable.stdout.decode() and "recent rounds" in readable.stdout.decode()

    # Stopped (cancelled: a clean stop with a final status), the folder still tells.
    stopped = await _loraswarm("status", str(folders[1]), "--json")
    assert json.loads(stopped.stdout)["state"] == "stopped"


async def test_export_merged_gives_the_logits_of_base_plus_adapter(
    tmp_path: Path, small_model_dir: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "peer"
    config = replace(_config(folder, small_model_dir, _train(tmp_path, 0), rounds=2),
                     train=TrainConfig(steps_per_round=2, batch_size=2, seq_len=24, lr=0.05,
                                       threads=1))
    with trio.fail_after(300):
        await Peer(config).run()
    merged_dir = tmp_path / "merged"
    done = await _loraswarm("export", str(folder), "--merged", str(merged_dir))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "wrote the merged model" in done.stdout.decode()

    ids = torch.tensor([[1, 200, 300, 400, 500]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert AutoTokenizer.from_pretrained(merged_dir)("hello")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(small_model_dir)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, folder / "export")(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (adapted - plain).abs().max().item() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)


def test_export_takes_the_values_of_the_newest_checkpoint(
    tmp_path: Path, small_model_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A running peer rewrites its checkpoint every round, its export/ only when it stops."""
    from safetensors.torch import load_file

    folder = tmp_path / "peer"
    trio.run(Peer(_config(folder, small_model_dir, _train(tmp_path, 0), rounds=1)).run)
    store = PeerStore(folder)
    checkpoint = store.load_checkpoint(json.loads((folder / "status.json").read_text())[
        "swarm_id"])
    assert checkpoint is not None
    newer = {name: tensor + 0.5 for name, tensor in checkpoint.state.items()}
    store.save_checkpoint(replace(checkpoint, state=newer, round=2))
    assert main(["export", str(folder), "--out", str(tmp_path / "adapter")]) == 0
    assert "wrote the PEFT adapter" in capsys.readouterr().out
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == newer.keys()
    for name, tensor in newer.items():
        torch.testing.assert_close(saved[name], tensor)
