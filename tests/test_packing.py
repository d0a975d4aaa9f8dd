"""Sequence packing (`--pack`): every token once per epoch, label masks kept, fewer rows."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from peer.data import (
    Chat,
    TokenBatches,
    eval_batches,
    format_example,
)
from tests.test_data import VOCAB, WORDS, decode, make_tokenizer
from tests.test_data_formats import CHAT_RECORD


def one_epoch(stream: TokenBatches) -> tuple[list[list[int]], list[list[bool]], int]:
    """Rows (real tokens) and their label masks of the first epoch, and its example count.

    Needs batch_size 1: a larger batch may run across the end of the epoch.
    """
    rows: list[list[int]] = []
    targets: list[list[bool]] = []
    examples = 0
    while True:
        batch = stream.next_batch()
        if stream.epoch > 0:
            return rows, targets, examples
        examples += stream.last_examples
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"],
                                     batch["labels"], strict=True):
            rows.append(ids[mask == 1].tolist())
            targets.append((labels[mask == 1] != -100).tolist())


def split_at_eos(row: list[int]) -> list[tuple[int, ...]]:
    pieces, current = [], []
    for token in row:
        current.append(token)
        if token == VOCAB["[EOS]"]:
            pieces.append(tuple(current))
            current = []
    return pieces + ([tuple(current)] if current else [])


texts = st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join),
                 min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(texts, st.integers(4, 16), st.integers(0, 5))
def test_packing_covers_every_token_once_per_epoch(examples: list[str], seq_len: int,
                                                   seed: int) -> None:
    tokenizer = make_tokenizer()
    packed = TokenBatches(examples, tokenizer, seq_len=seq_len, batch_size=1, seed=seed,
                          pack=True)
    rows, targets, count = one_epoch(packed)
    expected: Counter[tuple[int, ...]] = Counter()
    for text in examples:
        ids = tokenizer(text, truncation=True, max_length=seq_len)["input_ids"]
        expected[tuple(ids + [VOCAB["[EOS]"]] if len(ids) < seq_len else ids)] += 1
    assert Counter(piece for row in rows for piece in split_at_eos(row)) == expected
    assert all(len(row) <= seq_len for row in rows)
    assert count == len(examples)
    # Each example is predicted on all its tokens but the first, as it would be unpacked.
    for row, mask in zip(rows, targets, strict=True):
        starts, at = set(), 0
        for piece in split_at_eos(row)[:-1]:
            at += len(piece)
            starts.add(at)
        assert mask == [i not in starts for i in range(len(row))]


def test_packing_needs_fewer_rows_for_short_examples() -> None:
    tokenizer = make_tokenizer()
    texts = ["bird sang", "a song", "the dog sat", "dog ran far away", "the cat"] * 4
    plain, _, _ = one_epoch(TokenBatches(texts, tokenizer, seq_len=16, batch_size=1, seed=0))
    packed, _, count = one_epoch(TokenBatches(texts, tokenizer, seq_len=16, batch_size=1,
                                              seed=0, pack=True))
    assert len(plain) == count == 20 and len(packed) < len(plain) / 3


def test_packed_rows_keep_each_examples_label_mask() -> None:
    tokenizer = make_tokenizer()
    examples: list[str | Chat] = [format_example("the cat", "sat on a mat"), "dog ran far",
                                  CHAT_RECORD]
    stream = TokenBatches(examples, tokenizer, seq_len=64, batch_size=1, seed=0, pack=True)
    batch = stream.next_batch()
    assert batch["input_ids"].shape[0] == 1 and stream.last_examples == 3
    labelled = decode(tokenizer, batch["input_ids"][0], batch["labels"][0] != -100)
    alone = [eval_batches([example], tokenizer, seq_len=64, batch_size=1)[0]
             for example in examples]
    # Unpacked, the first token is never predicted; packed, it is masked.
    wanted = [decode(tokenizer, b["input_ids"][0][1:], b["labels"][0][1:] != -100)
              for b in alone]
    assert sorted(piece.strip() for piece in labelled.split("[EOS]")[:-1]) == sorted(
        w.removesuffix(" [EOS]") for w in wanted)
    assert set(batch.keys()) == {"input_ids", "attention_mask", "labels"}


def test_example_longer_than_seq_len_is_cut_and_alone() -> None:
    tokenizer = make_tokenizer()
    long = " ".join(WORDS[:10])
    rows, _, count = one_epoch(TokenBatches([long, "bird sang", "a song"], tokenizer,
                                            seq_len=6, batch_size=1, seed=3, pack=True))
    assert [VOCAB[w] for w in WORDS[:6]] in rows
    assert count == 3 and all(len(row) <= 6 for row in rows)


def test_unpacked_batches_count_their_rows() -> None:
    stream = TokenBatches(["bird sang", "a song", "the cat"], make_tokenizer(), seq_len=8,
                          batch_size=5, seed=0)
    assert stream.next_batch()["input_ids"].shape[0] == stream.last_examples == 5


# -- wiring ------------------------------------------------------------------------------------
