"""Private peers on real libp2p hosts with real peft adapters: ledger, budget, --require-dp."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from gossip.node import NodeConfig
from peer.config import PeerConfig, TrainConfig
from peer.daemon import Peer
from peer.privacy import PrivacyConfig
from tests.conftest import write_jsonl
from topology.config import TopologyConfig

DP = PrivacyConfig(epsilon=2.5, delta=1e-2, clip=1.0, noise=1.0)  # 9 steps (5 by RDP alone)


def _config(tmp: Path, name: str, model: Path, train: Path, *, rounds: int,
            privacy: PrivacyConfig, bootstrap: tuple[str, ...] = (),
            schedule: str = "constant") -> PeerConfig:
    return PeerConfig(
        data_dir=tmp / name, train_path=train, model=str(model), rounds=rounds,
        train=TrainConfig(steps_per_round=2, batch_size=2, seq_len=24, lr=1e-3, threads=1,
                          lr_schedule=schedule),
        network=NodeConfig(bootstrap=bootstrap, fetch_timeout_s=20),
        topology=TopologyConfig(fanout=2, peer_timeout_s=6), privacy=privacy,
    )


def _train(tmp: Path, name: str) -> Path:
    return write_jsonl(tmp / f"{name}.jsonl",
                       [{"text": f"{name} says line {j} of its private notes"} for j in range(8)])


async def test_a_private_peer_spends_its_budget_then_settles_and_resumes_its_ledger(
    tmp_path: Path, small_model_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    train = _train(tmp_path, "alone")
    config = _config(tmp_path, "alone", small_model_dir, train, rounds=6, privacy=DP,
                     schedule="linear")
    caplog.set_level(logging.WARNING, logger="peer.daemon")
    peer = Peer(config)
    with trio.fail_after(300):
        await peer.run()
    lines = [json.loads(line) for line in (config.data_dir / "metrics.jsonl").open()]
    privacy = [line["privacy"] for line in lines]
    steps = [p["steps"] for p in privacy]
    assert steps == sorted(steps) and 0 < steps[-1] < 6 * 2, "stopped before --rounds"
    assert {p["delta"] for p in privacy} == {0.01} and {p["clip"] for p in privacy} == {1.0}
    assert {p["noise_multiplier"] for p in privacy} == {1.0}
    assert steps[-1] == 9 and 2.4 < privacy[-1]["epsilon"] <= 2.5
    trained = [line for line in lines if line["train_loss"] is not None]
    assert 0 < len(trained) < len(lines), "later rounds only serve and merge"
    # --lr-schedule linear over 6 x 2 steps: each line gives the rate of the next step.
    assert [line["lr"] for line in lines] == [
        pytest.approx(1e-3 * (1 - p["steps"] / 12)) for p in privacy]
    spent = [r for r in caplog.records if "privacy budget spent" in r.getMessage()]
    assert len(spent) == 1, "said once"
    status = json.loads((config.data_dir / "status.json").read_text())
    assert status["privacy"] == privacy[-1]
    # A restart resumes the ledger: same steps, same ε, and no more training.
    again = Peer(_config(tmp_path, "alone", small_model_dir, train, rounds=8, privacy=DP,
                         schedule="linear"))
    runtime = await again.load()
    assert runtime.trainer.ledger.steps == steps[-1]
    assert runtime.trainer.lr == pytest.approx(1e-3 * (1 - 9 / 16)), "the schedule resumes"
    assert runtime.trainer.ledger.record_dict() == privacy[-1]
    assert not again.training()


async def test_require_dp_merges_only_private_neighbours(tmp_path: Path,
                                                         small_model_dir: Path) -> None:
    public = PrivacyConfig(require_dp=50.0)
    private = PrivacyConfig(epsilon=40.0, delta=1e-2, noise=1.0)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            picky = Peer(_config(tmp_path, "picky", small_model_dir, _train(tmp_path, "picky"),
                                 rounds=0, privacy=public))
            node = await nursery.start(picky.run)
            boot = (node.listen_addrs[0],)
            others = {}
            for name, privacy in (("dp", private), ("plain", PrivacyConfig())):
                others[name] = await nursery.start(Peer(_config(
                    tmp_path, name, small_model_dir, _train(tmp_path, name), rounds=0,
                    privacy=privacy, bootstrap=boot)).run)
            while picky.stats.merges < 2 or picky.stats.rejected["not_private"] < 1:
                await picky.wait_rounds(picky.round + 1)
            nursery.cancel_scope.cancel()
    assert set(picky.stats.rejected) == {"not_private"}
    # The public neighbour was refused before a byte moved; the private one was fetched.
    links = picky.status()["links"]
    assert links[others["dp"].peer_id]["transfers"] >= 1
    assert links.get(others["plain"].peer_id, {}).get("transfers", 0) == 0
    assert picky.status()["rejected"]["not_private"] == picky.stats.rejected["not_private"]


async def test_a_sample_rate_sets_the_sample_instead_of_the_batch_size(
    tmp_path: Path, small_model_dir: Path,
) -> None:
    train = _train(tmp_path, "rated")  # 8 examples; the config's --batch-size is 2
    privacy = PrivacyConfig(epsilon=50.0, delta=1e-2, noise=1.0, sample_rate=1.0)
    runtime = await Peer(_config(tmp_path, "rated", small_model_dir, train, rounds=1,
                                 privacy=privacy)).load()
    trainer = runtime.trainer
    assert trainer.ledger.rate == 1.0
    await trio.to_thread.run_sync(trainer.train_round)
    # q = 1 takes every example in each of the round's 2 steps: 16, not 2 x --batch-size.
    assert trainer.samples == 16 and trainer.ledger.steps == 2
