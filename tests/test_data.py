"""Training data: file formats and their errors, batching, and the token-weighted loss."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peer.data import (
    TokenBatches,
    eval_batches,
    format_example,
    load_examples,
    mean_loss,
    write_jsonl,
)
from peer.errors import ConfigError, DataError, PeerError

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "bird", "sang", "loud",
         "song", "fish", "swam", "deep", "blue", "sea"]
VOCAB = {token: i for i, token in enumerate(["[UNK]", "[PAD]", "[EOS]", *WORDS])}
TEXTS = [
    "the cat sat on a mat",
    "dog ran far away",
    "bird sang",
    "fish swam deep in the blue sea and the cat sat",
    "a song",
    "the dog sat",
    "blue bird sang a loud song",
]


def make_tokenizer(pad: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB, built locally (no download)."""
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    special: dict[str, str] = {"unk_token": "[UNK]"}
    if pad:
        special["pad_token"] = "[PAD]"
    if eos:
        special["eos_token"] = "[EOS]"
    return PreTrainedTokenizerFast(tokenizer_object=model, **special)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=len(VOCAB),
    ))


def jsonl(path: Path, *rows: Any) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def raises_one_line(call: Callable[[], object], *fragments: str) -> str:
    """Run call, expect a DataError whose single-line message holds every fragment."""
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- formatting and file formats ---------------------------------------------------------------


def test_format_example_with_and_without_input() -> None:
    assert format_example("Add 2 and 3.", "5") == (
        "### Instruction:\nAdd 2 and 3.\n\n### Response:\n5"
    )
    assert format_example("Translate.", "Bonjour", input="Hello") == (
        "### Instruction:\nTranslate.\n\n### Input:\nHello\n\n### Response:\nBonjour"
    )
    assert format_example("Q?", "A", input="  ") == format_example("Q?", "A")


def test_jsonl_text_and_instruction_rows(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"text": "plain row", "meta": 1}) + "\n\n   \n"
        + json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n"
        + json.dumps({"instruction": "Echo.", "input": "x", "output": "x"}),  # no final newline
        encoding="utf-8",
    )
    assert load_examples(path) == [
        "plain row", format_example("Say hi.", "Hi!"), format_example("Echo.", "x", input="x")
    ]


def test_json_suffix_is_read_as_json_lines(tmp_path: Path) -> None:
    assert load_examples(jsonl(tmp_path / "d.json", {"text": "one"}, {"text": "two"})) == [
        "one", "two"
    ]


def test_txt_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\r\nsame paragraph  \r\n\r\n \t \n\n\nsecond\n\n\nthird\n")
    assert load_examples(path) == ["first line\nsame paragraph", "second", "third"]


def test_folder_reads_supported_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    jsonl(tmp_path / "a.jsonl", {"text": "from a"})
    jsonl(tmp_path / "c.json", {"text": "from c"})
    (tmp_path / "notes.xlsx").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("ignored", encoding="utf-8")
    assert load_examples(tmp_path) == ["from a", "from b", "from c"]


# -- error paths: one line naming the file (and line) ------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    raises_one_line(lambda: load_examples(tmp_path / "nope.jsonl"), "nope.jsonl", "no such file")


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n \n"),
                                           ("e.txt", ""), ("e.txt", "\n\t\n  \n")])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    raises_one_line(lambda: load_examples(tmp_path / name), f"{tmp_path / name}: empty file")


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "ok"}\n', encoding="utf-8")
    raises_one_line(lambda: load_examples(path), f"{path}:3: bad JSON", "column")


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "p", "completion": "c"}, "needs a 'text' field or 'instruction' and 'output'"),
    ({"instruction": "only half"}, "(found: instruction)"),
    ({"text": 5}, "field 'text' must be a string, got int"),
    ({"instruction": "i", "output": ["a"]}, "field 'output' must be a string"),
    ({"text": "   "}, "field 'text' is empty"),
    ({"instruction": "", "output": "o"}, "field 'instruction' is empty"),
    (["text", "a list"], "expected a JSON object, got list"),
])
def test_line_without_usable_fields(tmp_path: Path, row: Any, fragment: str) -> None:
    path = jsonl(tmp_path / "rows.jsonl", {"text": "fine"}, row)
    raises_one_line(lambda: load_examples(path), f"{path}:2:", fragment)


def test_error_in_a_folder_names_the_file(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", {"text": "fine"})
    jsonl(tmp_path / "b.jsonl", {"text": "fine"}, {"txt": "typo"})
    raises_one_line(lambda: load_examples(tmp_path), f"{tmp_path / 'b.jsonl'}:2:")


def test_empty_folder_and_folder_without_data_files(tmp_path: Path) -> None:
    raises_one_line(lambda: load_examples(tmp_path), str(tmp_path), "no .jsonl")
    (tmp_path / "data.xlsx").write_text("a,b\n", encoding="utf-8")
    raises_one_line(lambda: load_examples(tmp_path), "no .jsonl")


def test_unsupported_suffix_and_bad_encoding(tmp_path: Path) -> None:
    (tmp_path / "data.xlsx").write_text("a,b\n", encoding="utf-8")
    raises_one_line(lambda: load_examples(tmp_path / "data.xlsx"), "unsupported file type '.xlsx'")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    raises_one_line(lambda: load_examples(tmp_path / "latin.txt"), "not UTF-8", "byte 3")


def test_data_error_is_a_peer_error() -> None:
    assert issubclass(DataError, PeerError) and issubclass(ConfigError, PeerError)


# -- write_jsonl -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=6))
def test_write_jsonl_round_trips(tmp_path_factory: pytest.TempPathFactory,
                                 examples: list[str]) -> None:
    # Newlines, U+2028, \x85 and the like must survive: only "\n" separates JSON lines.
    path = tmp_path_factory.mktemp("rt") / "out" / "shard.jsonl"
    write_jsonl(path, examples)
    assert load_examples(path) == examples


def test_write_jsonl_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "shard.jsonl"
    write_jsonl(path, ["old line one", "old line two"])
    before = path.read_bytes()
    assert before == b'{"text": "old line one"}\n{"text": "old line two"}\n'
    with pytest.raises(TypeError):
        write_jsonl(path, cast(Any, ["new", {"not", "serialisable"}]))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["shard.jsonl"]


# -- batching ----------------------------------------------------------------------------------


def decode(tokenizer: PreTrainedTokenizerFast, row: torch.Tensor, mask: torch.Tensor) -> str:
    return " ".join(tokenizer.convert_ids_to_tokens(row[mask.bool()].tolist()))


def test_batches_shapes_padding_and_labels() -> None:
    tokenizer = make_tokenizer()
    stream = TokenBatches(TEXTS, tokenizer, seq_len=8, batch_size=3, seed=0)
    for _ in range(5):
        batch = stream.next_batch()
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 3
        assert ids.shape[1] <= 8 and ids.dtype == mask.dtype == labels.dtype == torch.long
        assert mask.sum(dim=1).max() == ids.shape[1]  # padded to the longest row
        # Right padding: each mask row is ones, then zeros.
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
        assert torch.equal(labels[mask == 1], ids[mask == 1])
        assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == VOCAB["[PAD]"]).all()


def test_instruction_examples_train_on_the_response_only() -> None:
    tokenizer = make_tokenizer()
    text = format_example("the cat", "sat on a mat")
    batch = eval_batches([text, "dog ran far"], tokenizer, seq_len=32, batch_size=2)[0]
    labelled = batch["labels"][0] != -100
    assert decode(tokenizer, batch["input_ids"][0], labelled) == "sat on a mat [EOS]"
    # Plain text has no prompt: every real token is a target.
    assert torch.equal(batch["labels"][1][batch["attention_mask"][1] == 1],
                       batch["input_ids"][1][batch["attention_mask"][1] == 1])


def test_example_whose_prompt_fills_seq_len_is_dropped() -> None:
    tokenizer = make_tokenizer()
    long_prompt = format_example(" ".join(WORDS), "cat")
    with pytest.raises(DataError, match="no training examples"):
        TokenBatches([long_prompt], tokenizer, seq_len=8, batch_size=1, seed=0)


def test_batches_truncate_and_end_with_eos() -> None:
    tokenizer = make_tokenizer()
    stream = TokenBatches(["bird sang", TEXTS[3]], tokenizer, seq_len=6, batch_size=2, seed=0)
    batch = stream.next_batch()
    rows = sorted(decode(tokenizer, r, m) for r, m in zip(batch["input_ids"],
                                                            batch["attention_mask"], strict=True))
    assert rows == ["bird sang [EOS]", "fish swam deep [UNK] the blue"]


def test_batches_are_seeded_and_reshuffled_each_epoch() -> None:
    tokenizer = make_tokenizer()

    def epochs(seed: int, count: int) -> list[list[str]]:
        stream = TokenBatches(TEXTS[:6], tokenizer, seq_len=16, batch_size=2, seed=seed)
        result = []
        for _ in range(count):
            seen = []
            for _ in range(3):
                batch = stream.next_batch()
                seen += [decode(tokenizer, r, m) for r, m in zip(batch["input_ids"],
                                                                 batch["attention_mask"],
                                                                 strict=True)]
            result.append(seen)
        assert stream.epoch == count - 1
        return result

    first = epochs(7, 4)
    assert epochs(7, 4) == first
    assert epochs(8, 4) != first
    assert all(sorted(epoch) == sorted(first[0]) and len(set(epoch)) == 6 for epoch in first)
    assert len({tuple(epoch) for epoch in first}) > 1  # the order changes between epochs


def test_batch_runs_across_the_epoch_boundary() -> None:
    stream = TokenBatches(TEXTS[:3], make_tokenizer(), seq_len=16, batch_size=5, seed=0)
    assert stream.next_batch()["input_ids"].shape[0] == 5 and len(stream) == 3


@pytest.mark.parametrize("eos", [True, False])
def test_no_pad_token_pads_with_eos_or_zero_without_mutating(eos: bool) -> None:
    tokenizer = make_tokenizer(pad=False, eos=eos)
    batch = TokenBatches(["bird sang", TEXTS[3]], tokenizer, seq_len=16, batch_size=2,
                         seed=0).next_batch()
    pad = VOCAB["[EOS]"] if eos else 0
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    if eos:  # the real EOS that ends a text is a labelled token, unlike the padding
        short = batch["attention_mask"].sum(dim=1).argmin()
        length = int(batch["attention_mask"][short].sum())
        assert batch["labels"][short, length - 1] == VOCAB["[EOS]"]
    assert tokenizer.pad_token is None


def test_batch_argument_errors() -> None:
    tokenizer = make_tokenizer()
    with pytest.raises(DataError, match="no training examples"):
        TokenBatches([], tokenizer, seq_len=8, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="batch_size"):
        TokenBatches(TEXTS, tokenizer, seq_len=8, batch_size=0, seed=0)
    with pytest.raises(ConfigError, match="seq_len"):
        TokenBatches(TEXTS, tokenizer, seq_len=1, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="batch_size"):
        eval_batches(TEXTS, tokenizer, seq_len=8, batch_size=0)


def test_eval_batches_keep_order_and_cover_every_text() -> None:
    tokenizer = make_tokenizer(eos=False)
    batches = eval_batches(TEXTS, tokenizer, seq_len=32, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    decoded = [decode(tokenizer, r, m) for b in batches
               for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
    assert decoded == [" ".join(tokenizer.tokenize(text)) for text in TEXTS]
    assert eval_batches([], tokenizer, seq_len=32, batch_size=3) == []


# -- mean_loss ---------------------------------------------------------------------------------


def test_mean_loss_is_token_weighted(tiny_llama: LlamaForCausalLM) -> None:
    tokenizer = make_tokenizer()
    batches = eval_batches(TEXTS, tokenizer, seq_len=16, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:  # transformers' own loss is the mean over a batch's tokens
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += tiny_llama(**batch).loss.item() * tokens
            count += tokens
    assert mean_loss(tiny_llama, batches) == pytest.approx(total / count, rel=1e-5)
    # Padding changes nothing: one text alone scores as it does inside a padded batch.
    alone = [eval_batches([text], tokenizer, seq_len=16, batch_size=1)[0] for text in TEXTS]
    assert mean_loss(tiny_llama, alone) == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_mean_loss_restores_mode_and_keeps_no_grad(tiny_llama: LlamaForCausalLM,
                                                   training: bool) -> None:
    batches = eval_batches(TEXTS[:2], make_tokenizer(), seq_len=16, batch_size=2)
    tiny_llama.train(training)
    loss = mean_loss(tiny_llama, batches)
    assert tiny_llama.training is training
    assert all(module.training is training for module in tiny_llama.modules())
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert 0 < loss < 2 * torch.log(torch.tensor(float(len(VOCAB)))).item()


def test_mean_loss_without_tokens(tiny_llama: LlamaForCausalLM) -> None:
    with pytest.raises(DataError, match="no labelled tokens"):
        mean_loss(tiny_llama, [])
