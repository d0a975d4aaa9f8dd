"""Every rule on real peft adapters of a tiny Llama: peft loads the result and it runs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from merge.config import MergeConfig
from merge.registry import RULES
from merge.rules import merge_states
from merge.tensors import lora_pairs
from merge.types import AdapterState, Contribution

# peft 0.21's get_peft_model calls an alias that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


@pytest.fixture(scope="module")
def peft_copies() -> list[Any]:
    """Three LoRA-wrapped copies of one tiny Llama: the same seeded A, different random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128,
    ))
    models = []
    for index in range(3):
        torch.manual_seed(1)  # the swarm seed: identical A in every copy, B = 0
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=True)
        model = get_peft_model(copy.deepcopy(base), config)
        gen = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        models.append(model.eval())
    return models


def peft_state(model: Any) -> AdapterState:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_gives_an_adapter_peft_loads_and_runs(peft_copies: list[Any],
                                                         rule: str) -> None:
    from peft import set_peft_model_state_dict

    states = [peft_state(model) for model in peft_copies]
    assert len(lora_pairs(states[0])) == 4  # q and v in each of 2 layers
    own = Contribution(states[0], samples=32)
    others = [Contribution(s, samples=16 * (i + 1), age=i, peer=f"p{i}")
              for i, s in enumerate(states[1:])]
    merged = merge_states(own, others, MergeConfig(rule=rule))
    target = peft_copies[0]
    try:
        result = set_peft_model_state_dict(target, merged)
        assert not getattr(result, "unexpected_keys", [])
        loaded = peft_state(target)
        for key, value in merged.items():
            assert torch.equal(loaded[key], value), key
        assert any(not torch.equal(merged[k], states[0][k]) for k in merged)
        input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        logits = target(input_ids=input_ids).logits
        assert logits.shape == (2, 8, 128) and bool(torch.isfinite(logits).all())
    finally:
        set_peft_model_state_dict(target, states[0])  # the fixture is shared by every rule

def test_with_a_shared_a_product_and_average_give_the_same_delta(peft_copies: list[Any]) -> None:
    # sum_i w_i B_i A = (sum_i w_i B_i) A: with one A for all (the swarm's seeded init, or
    # FFA-LoRA), averaging the factors is already exact and product must agree with it.
    states = [peft_state(model) for model in peft_copies]
    own = Contribution(states[0], samples=10)
    others = [Contribution(s, samples=30, peer=str(i)) for i, s in enumerate(states[1:])]
    product = merge_states(own, others, MergeConfig(rule="product"))
    average = merge_states(own, others, MergeConfig(rule="average"))
    for a_key, b_key in lora_pairs(states[0]).values():
        torch.testing.assert_close(product[b_key] @ product[a_key],
                                   average[b_key] @ average[a_key], atol=1e-5, rtol=1e-4)
