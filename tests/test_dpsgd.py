"""DP-SGD steps on a real peft adapter: per-example gradients, clipping, noise and the budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from peer import accounting
from peer.config import TrainConfig
from peer.data import TokenBatches
from peer.device import Placement
from peer.dpsgd import clip_rows, noisy_mean, per_example_grads, per_example_norms
from peer.model import LoraSettings, attach_lora, load_base
from peer.privacy import PrivacyConfig, plan
from peer.trainer import LocalTrainer

TEXTS = [f"Example number {i} says {'abc'[i % 3] * (1 + i % 5)} once." for i in range(40)]


@pytest.fixture(scope="module")
def peft_and_tokenizer(small_model_dir: Path):
    base, tokenizer = load_base(small_model_dir)
    return attach_lora(base, LoraSettings(rank=4, alpha=8), seed=1), tokenizer


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _batch(tokenizer, rows: int) -> dict[str, torch.Tensor]:
    batches = TokenBatches(TEXTS, tokenizer, seq_len=32, batch_size=rows, seed=0)
    return batches.next_batch()


def test_per_example_grads_match_one_backward_per_example(peft_and_tokenizer) -> None:
    model, tokenizer = peft_and_tokenizer
    model.eval()  # no dropout: the two computations must see the same function
    batch = _batch(tokenizer, 4)
    grads, losses = per_example_grads(model, _trainable(model), batch)
    for i in range(4):
        width = int(batch["attention_mask"][i].sum())
        row = {k: v[i : i + 1, :width] for k, v in batch.items()}
        model.zero_grad()
        loss = model(**row).loss
        loss.backward()
        assert losses[i] == pytest.approx(loss.item(), rel=1e-4)
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(grads[name][i], param.grad, rtol=1e-3, atol=1e-6)
    model.zero_grad()


def test_eager_attention_gives_the_same_per_example_grads(peft_and_tokenizer,
                                                          small_model_dir: Path) -> None:
    model, tokenizer = peft_and_tokenizer
    base, _ = load_base(small_model_dir, Placement(attention="eager"))
    eager = attach_lora(base, LoraSettings(rank=4, alpha=8), seed=1)
    assert base.config._attn_implementation == "eager"
    assert model.base_model.model.config._attn_implementation == "sdpa", "auto: sdpa here"
    batch = _batch(tokenizer, 5)
    fused, fused_losses = per_example_grads(model, _trainable(model), batch)
    plain, plain_losses = per_example_grads(eager, _trainable(eager), batch)
    torch.testing.assert_close(plain_losses, fused_losses, rtol=1e-5, atol=1e-6)
    for name, grads in fused.items():
        torch.testing.assert_close(plain[name], grads, rtol=1e-4, atol=1e-6)


def test_no_example_gradient_is_above_the_clip_after_clipping(peft_and_tokenizer) -> None:
    model, tokenizer = peft_and_tokenizer
    grads, _ = per_example_grads(model, _trainable(model), _batch(tokenizer, 6))
    before = per_example_norms(grads)
    clip = float(before.median())  # some rows above it, some below
    after = per_example_norms(clip_rows(grads, clip))
    assert (before > clip).any() and (before < clip).any()
    assert bool((after <= clip * (1 + 1e-5)).all())
    small = before < clip
    torch.testing.assert_close(after[small], before[small])  # rows under C are left as they are


def test_noise_has_the_promised_scale() -> None:
    zeros = {"w": torch.zeros(200_000)}
    noisy = noisy_mean(zeros, noise=1.5, clip=0.5, expected_batch=3.0,
                       generator=torch.Generator().manual_seed(0))["w"]
    assert float(noisy.std()) == pytest.approx(1.5 * 0.5 / 3.0, rel=0.02)


def test_a_private_trainer_stops_at_its_budget(peft_and_tokenizer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[object] = []
    prv = accounting._prv_epsilon

    def counted(*args: Any) -> float:
        asked.append(args)
        return prv(*args)

    monkeypatch.setattr(accounting, "_prv_epsilon", counted)
    model, tokenizer = peft_and_tokenizer
    config = TrainConfig(steps_per_round=4, batch_size=4, seq_len=32, lr=1e-2, grad_accum=2)
    batches = TokenBatches(TEXTS, tokenizer, seq_len=32, batch_size=4, seed=0)
    budget = PrivacyConfig(epsilon=3.0, delta=1e-3, clip=0.5, noise=1.0)
    ledger = plan(budget, examples=len(batches), batch_size=4, steps=0)
    trainer = LocalTrainer(model, batches, config, ledger=ledger)
    before = trainer.state()
    rounds = 0
    while trainer.can_train():
        loss = trainer.train_round()
        rounds += 1
        assert loss > 0 and rounds < 50
        # The round's ε was worked out in the training thread: the event loop's status line,
        # announcement and budget check find it cached.
        before_status = len(asked)
        ledger.record_dict(), ledger.announced(), trainer.can_train()
        assert len(asked) == before_status
    assert ledger.epsilon() <= 3.0 and not ledger.affords(1)
    assert ledger.history == [(1.0, 4 / len(TEXTS), ledger.steps)]
    after = trainer.state()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the steps moved it"
    assert json.loads(json.dumps(ledger.record_dict()))["steps"] == ledger.steps
    steps = ledger.steps
    trainer.train_round()  # over budget: no step is taken, the ledger stays
    assert ledger.steps == steps and trainer.state().keys() == after.keys()
    assert all(torch.equal(trainer.state()[k], after[k]) for k in after)


def test_a_large_poisson_sample_is_taken_in_micro_batches(peft_and_tokenizer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import peer.trainer as trainer_module

    model, tokenizer = peft_and_tokenizer
    sizes: list[int] = []
    sums: list[dict[str, torch.Tensor]] = []

    def recorded(model_: Any, params: Any, batch: dict[str, torch.Tensor]) -> Any:
        sizes.append(len(batch["input_ids"]))
        return per_example_grads(model_, params, batch)

    def kept(total: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        sums.append({k: v.clone() for k, v in total.items()})
        return noisy_mean(total, **kwargs)

    monkeypatch.setattr(trainer_module, "per_example_grads", recorded)
    monkeypatch.setattr(trainer_module, "noisy_mean", kept)
    config = TrainConfig(steps_per_round=1, batch_size=4, seq_len=32, lr=1e-2, grad_accum=2)
    batches = TokenBatches(TEXTS, tokenizer, seq_len=32, batch_size=4, seed=0)
    budget = PrivacyConfig(epsilon=3.0, delta=1e-3, clip=0.5, noise=1.0, sample_rate=0.5)
    ledger = plan(budget, examples=len(batches), batch_size=4, steps=0)
    trainer = LocalTrainer(model, batches, config, ledger=ledger)
    sample = _batch(tokenizer, 7)  # a Poisson sample far above --batch-size
    whole = clip_rows(per_example_grads(model, _trainable(model), sample)[0], 0.5)
    trainer.private_step(sample)
    assert sizes == [2, 2, 2, 1]  # --batch-size 4 / --grad-accum 2 rows at a time
    for name, clipped in whole.items():
        torch.testing.assert_close(sums[0][name], clipped.sum(dim=0), rtol=1e-4, atol=1e-6)
