"""Training where the device says: bf16 bases, gradient accumulation and checkpointing.

A bf16 base (bf16 runs on a CPU too) must give the same float32 factors, the same swarm id and
adapters a float32 peer merges; accumulation and checkpointing must not change the gradient.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio

from gossip.node import NodeConfig
from merge.config import MergeConfig
from merge.rules import merge_states
from merge.types import Contribution
from peer.config import PeerConfig, TrainConfig
from peer.daemon import Peer
from peer.data import TokenBatches
from peer.device import CPU_FLOAT32, DeviceConfig, Placement
from peer.errors import ConfigError
from peer.model import LoraSettings, attach_lora, load_base
from peer.setup import build_runtime
from peer.shared import SharedModel
from peer.trainer import LocalTrainer, labelled_tokens, split_batch
from tests.conftest import write_jsonl
from topology.config import TopologyConfig

# Lengths differ a lot, so micro-batches hold different numbers of labelled tokens: a plain
# mean of the micro-batch losses would weigh the short examples' tokens too much.
TEXTS = ["Once upon a time there was a cat.", "Hi.",
         "The quick brown fox jumps over the lazy dog, again and again, until night fell.",
         "Yes.", "A fairly long sentence about gossip learning of LoRA adapters among peers.",
         "No.", "Short one here.", "Peers average what they fetch from their neighbours."]
BF16 = Placement(dtype=torch.bfloat16)


def _trainer(model_dir: Path, placement: Placement = CPU_FLOAT32, *, grad_accum: int = 1,
             batch_size: int = 8, seed: int = 0) -> LocalTrainer:
    base, tokenizer = load_base(model_dir, placement)
    model = attach_lora(base, LoraSettings(rank=4), seed=11)
    config = TrainConfig(steps_per_round=1, batch_size=batch_size, seq_len=32, lr=1e-2,
                         grad_accum=grad_accum)
    batches = TokenBatches(TEXTS, tokenizer, seq_len=32, batch_size=batch_size, seed=seed)
    return LocalTrainer(model, batches, config)


def _gradient(trainer: LocalTrainer) -> dict[str, torch.Tensor]:
    trainer.model.train()
    trainer.accumulate(trainer.batches.next_batch())
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_split_batch_keeps_every_labelled_token() -> None:
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0], [5, 0, 0, 0], [5, 6, 7, 8]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape for p in parts] == [(2, 3), (2, 4)]  # trimmed to longest row
    assert sum(labelled_tokens(p) for p in parts) == labelled_tokens(batch) == 6


@pytest.mark.parametrize("grad_accum", [2, 4, 8])
def test_accumulation_gives_the_large_batch_gradient(small_model_dir: Path,
                                                     grad_accum: int) -> None:
    whole = _gradient(_trainer(small_model_dir))
    parts = _gradient(_trainer(small_model_dir, grad_accum=grad_accum))
    assert whole.keys() == parts.keys() and whole
    for name, grad in whole.items():
        # float32 sums in another order: an element's error scales with the tensor's largest
        # terms, not its own size (8 one-example parts missed rtol 1e-4 by 6e-9 on an AMX CPU;
        # a weighting bug in accumulation is off by percent).
        scale = grad.abs().max().item()
        torch.testing.assert_close(parts[name], grad, rtol=1e-4, atol=1e-7 + 1e-5 * scale,
                                   msg=name)


def test_accumulated_round_matches_the_large_batch_round(small_model_dir: Path) -> None:
    whole, parts = _trainer(small_model_dir), _trainer(small_model_dir, grad_accum=4)
    assert whole.train_round() == pytest.approx(parts.train_round(), rel=1e-5)
    assert whole.samples == parts.samples == 8
    # AdamW's first step is about lr * sign(gradient): where a gradient is ~0, float noise in
    # it flips a sign, so compare the adapters as a whole (the gradients are compared above).
    gap = _distance(parts.state(), whole.state()) / _distance(whole.state(), {})
    assert gap < 1e-2


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((v - b.get(k, 0)).pow(2).sum()) for k, v in a.items()) ** 0.5


def test_checkpointing_recomputes_the_same_gradient(small_model_dir: Path) -> None:
    plain = _trainer(small_model_dir)
    checkpointed = _trainer(small_model_dir, Placement(grad_checkpointing=True))
    assert checkpointed.model.base_model.model.is_activation_checkpointing
    assert not plain.model.base_model.model.is_activation_checkpointing
    expected, got = _gradient(plain), _gradient(checkpointed)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_bf16_base_trains_float32_factors_from_the_same_start(small_model_dir: Path) -> None:
    full, half = _trainer(small_model_dir), _trainer(small_model_dir, BF16)
    assert half.model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    start = full.state()
    assert all(torch.equal(half.state()[k], v) for k, v in start.items())
    half.train_round()
    state = half.state()
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert any(not torch.equal(state[k], start[k]) for k in start)
    full.train_round()
    own = Contribution(state=full.state(), samples=full.samples)
    merged = merge_states(own, [Contribution(state=state, samples=half.samples)], MergeConfig())
    full.load_state(merged)  # the float32 peer takes the bf16 peer's adapter as it is
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_base_dtype_is_not_part_of_the_swarm_id(tmp_path: Path, small_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": text} for text in TEXTS])
    config = PeerConfig(data_dir=tmp_path / "a", train_path=train, model=str(small_model_dir))
    full = build_runtime(config)
    half = build_runtime(replace(config, data_dir=tmp_path / "b",
                                 device=DeviceConfig(dtype="bfloat16")))
    assert full.swarm == half.swarm
    assert full.shapes == half.shapes  # what the validator demands of every adapter


def test_in_process_peers_share_a_base_placed_as_they_ask(tmp_path: Path,
                                                         small_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": text} for text in TEXTS])
    config = PeerConfig(data_dir=tmp_path / "p0", train_path=train, model=str(small_model_dir),
                        train=TrainConfig(steps_per_round=1, batch_size=4, seq_len=32),
                        device=DeviceConfig(device="cpu", dtype="bfloat16"))
    shared = SharedModel.load(config.model, config.lora, config.init_seed, placement=BF16)
    runtime = build_runtime(config, shared)
    assert runtime.placement == BF16
    assert shared.model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert runtime.swarm == build_runtime(replace(config, data_dir=tmp_path / "alone")).swarm
    start = runtime.trainer.state()
    runtime.trainer.train_round()
    state = runtime.trainer.state()
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert any(not torch.equal(state[k], start[k]) for k in start)
    with pytest.raises(ConfigError, match="same --device, --dtype, --quantize and --attention"):
        build_runtime(replace(config, data_dir=tmp_path / "p1",
                              device=DeviceConfig(device="cpu", dtype="float32")), shared)


def _peer_config(tmp: Path, name: str, model: Path, train: Path, dtype: str,
                 bootstrap: tuple[str, ...]) -> PeerConfig:
    return PeerConfig(
        data_dir=tmp / name, train_path=train, model=str(model),
        train=TrainConfig(steps_per_round=1, batch_size=2, seq_len=24, lr=1e-3, threads=1),
        device=DeviceConfig(device="cpu", dtype=dtype),
        network=NodeConfig(bootstrap=bootstrap, fetch_timeout_s=20),
        topology=TopologyConfig(fanout=1, peer_timeout_s=60), round_pause_s=0.2)


async def test_a_float32_peer_and_a_bf16_peer_merge_each_other(tmp_path: Path,
                                                               small_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": text} for text in TEXTS])
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            full = Peer(_peer_config(tmp_path, "full", small_model_dir, train, "float32", ()))
            node = await nursery.start(full.run)
            half = Peer(_peer_config(tmp_path, "half", small_model_dir, train, "bfloat16",
                                     (node.listen_addrs[0],)))
            await nursery.start(half.run)
            for peer in (full, half):
                while peer.stats.merges < 2:
                    await peer.wait_rounds(peer.round + 1)
            nursery.cancel_scope.cancel()
    assert full.status()["swarm_id"] == half.status()["swarm_id"]
    assert (full.status()["device"], half.status()["device"]) == (
        "cpu, float32 base", "cpu, bfloat16 base")
    for peer in (full, half):
        assert not peer.stats.rejected, peer.stats.rejected
