"""The local trainer: real peft LoRA steps, state exchange, and frozen-A (FFA-LoRA) mode."""

from __future__ import annotations

import pytest
import torch

from peer.config import TrainConfig
from peer.data import TokenBatches
from peer.model import LoraSettings, attach_lora
from peer.trainer import LocalTrainer, lr_share


def _trainer(frozen_a: bool, *, schedule: str = "constant", horizon: int = 0) -> LocalTrainer:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]", "a", "b", "c", "d", "e", "f", "g"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]",
                                        pad_token="[PAD]", eos_token="[EOS]")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, vocab_size=len(words)))
    model = attach_lora(base, LoraSettings(rank=4), seed=5, frozen_a=frozen_a)
    config = TrainConfig(steps_per_round=3, batch_size=2, seq_len=16, lr=1e-2, frozen_a=frozen_a,
                         lr_schedule=schedule)
    batches = TokenBatches(["a b c d", "e f g a", "b d f"], tokenizer, seq_len=16,
                           batch_size=2, seed=0)
    return LocalTrainer(model, batches, config, horizon=horizon)


def test_training_changes_the_adapter_and_counts_samples() -> None:
    trainer = _trainer(frozen_a=False)
    before = trainer.state()
    loss = trainer.train_round()
    after = trainer.state()
    assert loss > 0 and trainer.samples == 6
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.load_state(before)
    assert all(torch.equal(trainer.state()[k], before[k]) for k in before)


def test_frozen_a_trains_and_exchanges_only_b() -> None:
    trainer = _trainer(frozen_a=True)
    full = _trainer(frozen_a=False)
    a_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_A" in k}
    trainer.train_round()
    state = trainer.state()
    assert state and all("lora_B" in k for k in state)
    for name, param in trainer.model.named_parameters():
        if "lora_A" in name:
            assert torch.equal(param, a_before[name]), "A must keep its seeded value"
    assert sum(v.numel() for v in state.values()) < sum(v.numel() for v in full.state().values())
    trainer.load_state(state)  # a B-only state loads back


def test_lr_share_decays_to_zero_over_the_horizon_and_never_stalls_past_it() -> None:
    assert [lr_share("constant", step, 4) for step in (0, 3, 9)] == [1.0, 1.0, 1.0]
    assert [lr_share("linear", step, 4) for step in range(6)] == [1, 0.75, 0.5, 0.25, 0.25, 0.25]
    cosine = [lr_share("cosine", step, 4) for step in range(6)]
    assert cosine[0] == 1.0 and abs(cosine[2] - 0.5) < 1e-12
    assert cosine[0] > cosine[1] > cosine[2] > cosine[3] == cosine[5] > 0
    assert lr_share("cosine", 7, 0) == 1.0  # no horizon (no --rounds): constant


def test_scheduled_steps_take_the_decayed_rate_and_resume_from_the_ledger() -> None:
    trainer = _trainer(frozen_a=False, schedule="linear", horizon=6)
    rates = []  # the optimizer's rate as each step ran
    original = trainer.optimizer.step

    def spy(*args: object, **kwargs: object) -> object:
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return original(*args, **kwargs)

    trainer.optimizer.step = spy  # type: ignore[method-assign]
    trainer.train_round()
    trainer.train_round()  # 3 steps a round
    expected = [1e-2 * (1 - step / 6) for step in range(6)]
    assert rates == [pytest.approx(rate) for rate in expected]
    assert trainer.lr == pytest.approx(1e-2 / 6)  # past the horizon: the last step's rate
    restarted = _trainer(frozen_a=False, schedule="linear", horizon=6)
    restarted.ledger.record(4)  # a restart's ledger holds the steps already taken
    assert restarted.lr == pytest.approx(1e-2 * (1 - 4 / 6))
