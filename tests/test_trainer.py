"""The local trainer: real peft LoRA steps, state exchange, and frozen-A (FFA-LoRA) mode."""

from __future__ import annotations

import torch

from peer.config import TrainConfig
from peer.data import TokenBatches
from peer.model import LoraSettings, attach_lora
from peer.trainer import LocalTrainer


def _trainer(frozen_a: bool) -> LocalTrainer:
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
    config = TrainConfig(steps_per_round=3, batch_size=2, seq_len=16, lr=1e-2, frozen_a=frozen_a)
    batches = TokenBatches(["a b c d", "e f g a", "b d f"], tokenizer, seq_len=16,
                           batch_size=2, seed=0)
    return LocalTrainer(model, batches, config)


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
