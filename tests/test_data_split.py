"""The built-in corpora (chatterbot Q/A, Shakespeare) and how they split into peer shards."""

from __future__ import annotations

import copy
import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from peer.data import format_example
from peer.errors import ConfigError, DataError
from testbed.corpora import (
    _pairs_of,
    _passages,
    _play_blocks,
    builtin_categories,
    split_builtin,
    split_categories,
)

# -- built-in corpora --------------------------------------------------------------------------


def test_chat_pairs_take_consecutive_turns_and_skip_bad_ones() -> None:
    pairs, skipped = _pairs_of([
        ["Hi", "Hello", "How are you?"],
        "not a conversation",
        ["Year?", 1984],
        ["Q", ["a", "list"]],
        ["A", None, "B", "C"],
        ["Flag?", True],
    ])
    assert pairs == [("Hi", "Hello"), ("Hello", "How are you?"), ("Year?", "1984"), ("B", "C")]
    assert skipped == 4


def test_builtin_chat_categories() -> None:
    spec = importlib.util.find_spec("chatterbot_corpus")
    assert spec is not None and spec.submodule_search_locations
    english = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    categories = builtin_categories()
    assert sorted(categories) == sorted(p.stem for p in english.glob("*.yml"))
    assert len(categories) >= 20
    every = [x for examples in categories.values() for x in examples]
    assert len(every) == len(set(every)) > 1000
    assert all(x.startswith("### Instruction:\n") and "\n\n### Response:\n" in x for x in every)
    assert all(examples for examples in categories.values())
    assert builtin_categories() == categories
    # Multi-turn conversations chain: an answer is the next pair's question.
    assert format_example("I am doing well, how about you?", "I'm also good.") in every


def test_play_markdown_to_passages() -> None:
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter three Witches_\n\n"
        "**FIRST WITCH**  \nWhen shall we three meet again  \nIn thunder?\n\n"
        "**SECOND WITCH**  \n__\\[Aside]_ When the hurlyburly's done,\\--\n\n"
        "_\\[Exeunt]_\n\n### SCENE II. A camp.\n\n**DUNCAN**  \nWhat bloody man is that?\n"
    )
    blocks = _play_blocks(markdown)
    assert blocks == [
        None, None, None, ["[Thunder. Enter three Witches]"],
        ["FIRST WITCH: When shall we three meet again", "In thunder?"],
        ["SECOND WITCH: [Aside] When the hurlyburly's done,--"], ["[Exeunt]"],
        None, ["DUNCAN: What bloody man is that?"],
    ]
    # Lines are packed up to the limit (60 here, hit exactly by the third passage); a scene
    # break always ends a passage.
    assert _passages(blocks, 60) == [
        "[Thunder. Enter three Witches]",
        "FIRST WITCH: When shall we three meet again\nIn thunder?",
        "SECOND WITCH: [Aside] When the hurlyburly's done,--\n[Exeunt]",
        "DUNCAN: What bloody man is that?",
    ]
    # A speech longer than the limit is split at line boundaries.
    assert _passages([["A: one two", "three four", "five"]], 15) == [
        "A: one two", "three four\nfive"
    ]


def test_builtin_plays_by_genre() -> None:
    plays = builtin_categories("plays")
    assert sorted(plays) == ["comedies", "histories", "problems", "roman", "romances",
                             "tragedies"]
    every = [x for examples in plays.values() for x in examples]
    assert len(every) == len(set(every)) > 5000
    assert not any(marker in x for x in every for marker in ("**", "\\", "_", "#"))
    assert any("HAMLET: To be, or not to be" in x for x in plays["tragedies"])
    assert all(len(x) <= 200 or "\n" not in x for x in every)  # the default passage bound


def test_unknown_corpus() -> None:
    with pytest.raises(ConfigError, match="unknown built-in corpus"):
        builtin_categories("klingon")


# -- splitting ---------------------------------------------------------------------------------


def check_split_invariants(categories: dict[str, list[str]], split: Any, per_category: int,
                           n_shards: int) -> None:
    home = {x: name for name, examples in categories.items() for x in examples}
    shard_items = [x for shard in split.shards for x in shard]
    assert len(split.shards) == len(split.shard_categories) == n_shards
    assert all(split.shards)
    assert len(shard_items) == len(set(shard_items))  # shards are disjoint
    assert not set(shard_items) & set(split.eval)
    assert sorted(shard_items + split.eval) == sorted(home)  # nothing lost
    for name, examples in categories.items():
        held = [x for x in split.eval if home[x] == name]
        assert len(held) == min(per_category, len(examples) - 1)
    for shard, names, counts in zip(split.shards, split.shard_categories, split.shard_counts,
                                    strict=True):
        assert names == sorted({home[x] for x in shard})
        assert counts == dict(Counter(home[x] for x in shard)) and list(counts) == names


@pytest.mark.parametrize("mode", ["domain", "iid"])
@pytest.mark.parametrize("n_shards", [1, 4, 8])
def test_builtin_split(n_shards: int, mode: str) -> None:
    categories = builtin_categories()
    split = split_builtin(n_shards, seed=3, eval_per_category=4, mode=mode)
    check_split_invariants(categories, split, 4, n_shards)
    assert split_builtin(n_shards, seed=3, mode=mode) == split
    assert split_builtin(n_shards, seed=4, mode=mode) != split
    if mode == "domain":
        names = [name for group in split.shard_categories for name in group]
        assert len(names) == len(set(names)) == len(categories)  # each category in one shard
    else:
        sizes = [len(shard) for shard in split.shards]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("seed", range(5))
def test_eval_prefers_questions_not_asked_in_training(seed: int) -> None:
    categories = {"a": ["q1|x", "q1|y", "q2|z", "q3|w", "q1|v"], "b": ["q4|u", "q4|t"]}
    split = split_categories(categories, 1, seed=seed, eval_per_category=2,
                             prompt_of=lambda x: x.split("|")[0])
    assert sorted(split.eval[:2]) == ["q2|z", "q3|w"]  # the only questions asked once
    assert split.eval[2] in categories["b"]  # b has no such question: it still gives one


def test_builtin_eval_questions_leak_only_where_unavoidable() -> None:
    categories = builtin_categories()
    question = {x: x.split("### Response:")[0] for xs in categories.values() for x in xs}
    asked = Counter(question.values())
    unavoidable = sum(max(0, min(4, len(xs) - 1) - sum(asked[question[x]] == 1 for x in xs))
                      for xs in categories.values())
    split = split_builtin(4, seed=0, eval_per_category=4)
    in_training = {question[x] for shard in split.shards for x in shard}
    leaked = [x for x in split.eval if question[x] in in_training]
    assert len(leaked) <= unavoidable < len(split.eval) // 10


def test_more_domain_shards_than_categories() -> None:
    categories = {"big": [f"b{i}" for i in range(40)], "mid": [f"m{i}" for i in range(20)],
                  "small": [f"s{i}" for i in range(5)]}
    split = split_categories(categories, 6, seed=1, eval_per_category=1)
    check_split_invariants(categories, split, 1, 6)
    assert all(len(names) == 1 for names in split.shard_categories)
    # The extra shards go to the categories with the most examples per shard.
    assert sorted(names[0] for names in split.shard_categories) == [
        "big", "big", "big", "mid", "mid", "small"
    ]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8), n_shards=st.integers(1, 12),
       per_category=st.integers(0, 5), seed=st.integers(0, 2**32),
       mode=st.sampled_from(["domain", "iid", "dirichlet"]))
def test_split_invariants_hold_for_any_corpus(sizes: list[int], n_shards: int,
                                              per_category: int, seed: int, mode: str) -> None:
    categories = {f"c{c}": [f"c{c}-{i}" for i in range(size)] for c, size in enumerate(sizes)}
    try:
        split = split_categories(categories, n_shards, seed=seed,
                                 eval_per_category=per_category, mode=mode)
    except DataError as exc:
        assert "would be empty" in str(exc)
        train = sum(size - min(per_category, size - 1) for size in sizes)
        assert n_shards > train or (mode == "domain" and n_shards > len(sizes))
        return
    check_split_invariants(categories, split, per_category, n_shards)
    if mode == "domain" and n_shards <= len(sizes):
        names = [name for group in split.shard_categories for name in group]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("kwargs, match", [
    ({"n_shards": 0}, "at least 1"), ({"eval_per_category": -1}, "eval_per_category"),
    ({"mode": "shuffled"}, "split mode"), ({"mode": "dirichlet", "alpha": 0.0}, "alpha"),
    ({"mode": "dirichlet", "alpha": -1.0}, "alpha"),
    ({"mode": "dirichlet", "alpha": float("nan")}, "alpha"),
])
def test_split_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"n_shards": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        split_categories({"a": ["x", "y"], "b": ["z", "w"]}, **arguments)


@pytest.mark.parametrize("mode", ["iid", "dirichlet"])
def test_split_too_many_shards(mode: str) -> None:
    with pytest.raises(DataError, match="2 training examples cannot fill 5 shards"):
        split_categories({"a": ["x", "y", "z"]}, 5, eval_per_category=1, mode=mode)


def test_builtin_dirichlet_split_is_seeded() -> None:
    categories = builtin_categories()
    split = split_builtin(6, seed=3, eval_per_category=2, mode="dirichlet", alpha=0.3)
    check_split_invariants(categories, split, 2, 6)
    assert split_builtin(6, seed=3, eval_per_category=2, mode="dirichlet", alpha=0.3) == split
    assert split_builtin(6, seed=4, eval_per_category=2, mode="dirichlet", alpha=0.3) != split
    # Categories are shared out, not dealt whole: some category reaches several shards.
    holders = Counter(name for counts in split.shard_counts for name in counts)
    assert max(holders.values()) > 1


def mean_top_share(split: Any) -> float:
    """Mean over shards of the share of the shard's most common category (1.0: one category)."""
    shares = [max(counts.values()) / sum(counts.values()) for counts in split.shard_counts]
    return sum(shares) / len(shares)


def test_dirichlet_alpha_controls_skew() -> None:
    categories = {f"c{c}": [f"c{c}-{i}" for i in range(100)] for c in range(10)}
    skew = {alpha: [mean_top_share(split_categories(categories, 5, seed=seed, alpha=alpha,
                                                    mode="dirichlet", eval_per_category=1))
                    for seed in range(5)]
            for alpha in (0.05, 1.0, 100.0)}
    mean = {alpha: sum(values) / len(values) for alpha, values in skew.items()}
    assert mean[0.05] > mean[1.0] > mean[100.0]
    assert mean[0.05] > 0.5  # a few categories dominate each shard
    assert max(skew[100.0]) < 0.2  # close to the iid share of 1/10
    iid = split_categories(categories, 5, seed=0, mode="iid", eval_per_category=1)
    assert abs(mean_top_share(iid) - mean[100.0]) < 0.05


@pytest.mark.parametrize("seed", range(20))
def test_dirichlet_fills_every_shard_even_when_alpha_is_tiny(seed: int) -> None:
    categories = {"a": [f"a{i}" for i in range(4)], "b": [f"b{i}" for i in range(3)]}
    split = split_categories(categories, 5, seed=seed, eval_per_category=0, mode="dirichlet",
                             alpha=0.001)
    check_split_invariants(categories, split, 0, 5)
    assert sorted(map(len, split.shards))[:3] == [1, 1, 1]


def test_same_seed_gives_the_same_initial_adapter() -> None:
    from peer.model import LoraSettings, attach_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64,
    ))

    def initial(seed: int) -> dict[str, torch.Tensor]:
        model = attach_lora(copy.deepcopy(base), LoraSettings(rank=4), seed=seed)
        return {k: v for k, v in model.state_dict().items() if "lora_" in k}

    first, again, other = initial(7), initial(7), initial(8)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    a_keys = [k for k in first if "lora_A" in k]
    assert a_keys and all(not torch.equal(first[k], other[k]) for k in a_keys)
    assert all(not other[k].any() for k in first if "lora_B" in k)  # B starts at zero
