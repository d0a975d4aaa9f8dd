"""One base model shared by in-process peers: separate adapters, same start, exact exports."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import trio
import trio.testing
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from peer.config import TrainConfig
from peer.data import TokenBatches
from peer.errors import ConfigError
from peer.model import LoraSettings
from peer.shared import SharedModel, settle_turn, take_turn
from peer.store import PeerStore
from peer.trainer import LocalTrainer

TEXTS = [f"### Instruction:\nSay {n}.\n\n### Response:\n{n} is a number." for n in range(16)]
TRAIN = TrainConfig(steps_per_round=2, batch_size=2, seq_len=32, lr=1e-2)


def _trainer(shared: SharedModel, name: str, seed: int, train: TrainConfig = TRAIN
             ) -> LocalTrainer:
    adapter = shared.add_adapter(name, shared.lora, shared.init_seed, shared.frozen_a)
    batches = TokenBatches(TEXTS, shared.tokenizer, seq_len=32, batch_size=2, seed=seed)
    return LocalTrainer(shared.model, batches, train, adapter=adapter, lock=shared.lock,
                        isolate=shared.isolated)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peers_start_equal_and_train_only_their_own_adapter(
    small_model_dir: Path, tmp_path: Path
) -> None:
    shared = SharedModel.load(str(small_model_dir), LoraSettings(), init_seed=5)
    first, second = _trainer(shared, "p0", seed=0), _trainer(shared, "p1", seed=1)
    assert _equal(first.state(), shared.initial) and _equal(second.state(), shared.initial)
    assert any(v.abs().sum() > 0 for k, v in shared.initial.items() if "lora_A" in k)

    first.train_round()
    assert not _equal(first.state(), shared.initial), "training moved p0's adapter"
    assert _equal(second.state(), shared.initial), "p1's adapter is untouched"
    default = get_peft_model_state_dict(shared.model)
    assert _equal(default, shared.initial), "the shared initial adapter never trains"

    second.train_round()
    second_state = second.state()
    assert not _equal(second_state, first.state())
    assert first.eval_loss([first.batches.next_batch()]) > 0
    # Loading a merged state into p1 leaves p0 alone.
    merged = {k: (v + second_state[k]) / 2 for k, v in first.state().items()}
    before = first.state()
    second.load_state(merged)
    assert _equal(second.state(), merged) and _equal(first.state(), before)
    # The trainer reads its own factors directly; peft's reading of the same adapter agrees.
    assert _equal(get_peft_model_state_dict(shared.model, adapter_name=second.adapter), merged)
    key = next(iter(merged))
    with pytest.raises(KeyError):
        second.load_state({**merged, "not.a.lora_A.weight": merged[key]})
    with pytest.raises(ValueError):
        second.load_state({**merged, key: torch.zeros(1, 1)})
    assert _equal(second.state(), merged), "a refused state changes nothing"

    # The export of a named adapter is a standard PEFT folder holding exactly its values,
    # written while the adapter is the model's only one (peft's save walks them all), under
    # the lock; afterwards every layer holds every adapter again.
    layers = shared._lora_layers()
    with second.alone():
        assert shared.lock.locked()
        assert all(set(layer.lora_A) == {second.adapter} for layer in layers)
        export = PeerStore(tmp_path).export(shared.model, second.adapter)
    assert not shared.lock.locked()
    assert all(set(layer.lora_A) == {"default", first.adapter, second.adapter}
               for layer in layers)
    assert _equal(first.state(), before), "the other adapter came back whole"
    assert (export / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, export)
    assert _equal({k: v.detach() for k, v in get_peft_model_state_dict(loaded).items()}, merged)


def test_frozen_a_stays_frozen_in_a_shared_model(small_model_dir: Path) -> None:
    shared = SharedModel.load(str(small_model_dir), LoraSettings(), init_seed=5, frozen_a=True)
    frozen = TrainConfig(steps_per_round=2, batch_size=2, seq_len=32, lr=1e-2, frozen_a=True)
    first, second = _trainer(shared, "p0", 0, frozen), _trainer(shared, "p1", 1, frozen)
    first.train_round()
    second.train_round()  # switching the active adapter must not unfreeze A
    first.train_round()
    for trainer in (first, second):
        state = get_peft_model_state_dict(shared.model, adapter_name=trainer.adapter)
        for key, value in state.items():
            if "lora_A" in key:
                assert torch.equal(value, shared.initial[key]), f"{key} moved"
        assert all("lora_B" in key for key in trainer.state())


def test_mismatched_settings_and_taken_names_are_refused(small_model_dir: Path) -> None:
    shared = SharedModel.load(str(small_model_dir), LoraSettings(), init_seed=5)
    shared.add_adapter("p0", LoraSettings(), 5, False)
    with pytest.raises(ConfigError, match="taken"):
        shared.add_adapter("p0", LoraSettings(), 5, False)
    with pytest.raises(ConfigError, match="init seed"):
        shared.add_adapter("p1", LoraSettings(rank=4), 5, False)


def test_a_removed_adapter_can_be_added_again_from_the_start(small_model_dir: Path) -> None:
    shared = SharedModel.load(str(small_model_dir), LoraSettings(), init_seed=5)
    first, other = _trainer(shared, "p0", seed=0), _trainer(shared, "p1", seed=1)
    first.train_round()
    other.train_round()
    kept = other.state()
    shared.remove_adapter("p0")  # a churned peer: its restart resumes from its checkpoint
    with pytest.raises(ConfigError, match="no in-process adapter"):
        shared.remove_adapter("p0")
    again = _trainer(shared, "p0", seed=0)
    assert _equal(again.state(), shared.initial), "a re-added adapter starts from the seed"
    assert _equal(other.state(), kept), "other peers' adapters are untouched"
    again.train_round()
    assert _equal(other.state(), kept)


async def test_peers_waiting_for_the_shared_model_leave_the_worker_threads_free() -> None:
    # 100 peers' passes queue for one model; trio lends a whole process 40 worker threads.
    shared: Any = SimpleNamespace(lock=threading.Lock(), threads=trio.CapacityLimiter(8))
    threads = trio.to_thread.current_default_thread_limiter()

    def one_pass() -> None:
        with shared.lock:
            time.sleep(0.03)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(take_turn, shared, one_pass)
        await trio.testing.wait_all_tasks_blocked()
        # In trio's own threads, 40 waiting passes held them all, and a transfer's hashing
        # waited behind 60 more passes (1.8 s here; with 64 peers, past the 64 s fetch timeout).
        assert threads.statistics().borrowed_tokens == 0
        assert shared.threads.statistics().borrowed_tokens == 8  # a few wait, not 100
        started = trio.current_time()
        await trio.to_thread.run_sync(lambda: None)
        assert trio.current_time() - started < 0.5
        nursery.cancel_scope.cancel()


async def test_settling_rounds_of_one_process_take_turns_and_training_rounds_do_not() -> None:
    # 1,000 peers that settle in lock step each held 8 neighbours' adapters at once.
    shared: Any = SimpleNamespace(settling=trio.CapacityLimiter(3))
    inside = {"settling": 0, "training": 0, "alone": 0}
    most = dict(inside)

    async def one_round(kind: str) -> None:
        owner = None if kind == "alone" else shared
        async with settle_turn(owner, settling=kind != "training"):
            inside[kind] += 1
            most[kind] = max(most[kind], inside[kind])
            await trio.sleep(0.01)
            inside[kind] -= 1

    async with trio.open_nursery() as nursery:
        for kind in ("settling", "training", "alone"):
            for _ in range(20):
                nursery.start_soon(one_round, kind)
    assert most == {"settling": 3, "training": 20, "alone": 20}
    assert shared.settling.statistics().borrowed_tokens == 0  # every turn was given back


def test_adding_the_nth_adapter_leaves_the_others_whole(small_model_dir: Path) -> None:
    """Adapters are added with the others taken out of the LoRA layers (peft walks them all);
    afterwards every layer holds every adapter again, each still at its own values."""
    shared = SharedModel.load(str(small_model_dir), LoraSettings(), init_seed=0)
    first = shared.add_adapter("p0", LoraSettings(), 0, False)
    with torch.no_grad():
        for _, param in shared.own[first]:
            param.add_(1.0)  # p0 trained: it must not be reset by later adds
    for index in range(1, 4):
        shared.add_adapter(f"p{index}", LoraSettings(), 0, False)
    names = {n for n, _ in shared.model.named_parameters() if "lora_" in n}
    for index in range(4):
        own = {n for n, _ in shared.own[f"p{index}"]}
        assert own and own == {n for n in names if f".p{index}." in n}
    initial = shared.initial
    for name, param in shared.own["p3"]:
        assert torch.equal(param, initial[name.replace(".p3.", ".")])
    for name, param in shared.own["p0"]:
        assert torch.equal(param, initial[name.replace(".p0.", ".")] + 1.0)
    layers = shared._lora_layers()
    assert layers and all(set(layer.lora_A) == {"default", "p0", "p1", "p2", "p3"}
                          for layer in layers)
