"""Training data: examples (from `peer.formats`), their tokens, and token batches.

An example is a string (plain text, or an instruction rendered by `format_example`) or a
`Chat` record, which `render` turns into a string with the tokenizer's chat template. Batches
are causal-LM batches: the labels are the input ids with padding and each example's prompt
masked out (-100), so the loss covers the tokens the example is meant to teach.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peer.errors import ConfigError, DataError
from peer.examples import RESPONSE, Chat, Example, format_example
from peer.formats import load_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Chat", "Example", "TokenBatches", "eval_batches", "format_example", "load_examples",
    "mean_loss", "render", "write_jsonl",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def write_jsonl(path: Path, examples: Sequence[str]) -> None:
    """Write examples as JSON lines `{"text": ...}`, atomically (temp file, fsync, rename).

    Args:
        path: the target file; its folder is created if needed.
        examples: the training strings; `load_examples(path)` gives them back unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for example in examples:
                handle.write(json.dumps({"text": example}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# token batches


def render(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """An example as its training string and its prompt, the leading part that is context.

    A string is its own text; an instruction's prompt runs up to its response heading. A chat
    is rendered by the tokenizer's chat template, its prompt being the turns before the last
    (the assistant's reply) with the template's generation prompt, so that the reply is
    learnt as the model will be asked for it. Without a chat template, each turn is a line
    "role: content" and the prompt ends with "assistant: ".

    Raises:
        DataError: the chat template rejects a record (e.g. roles that do not alternate).
    """
    if isinstance(example, str):
        cut = example.find(RESPONSE)
        return example, example[: cut + len(RESPONSE)] if cut >= 0 else ""
    if not getattr(tokenizer, "chat_template", None):
        prompt = "".join(f"{role}: {content}\n" for role, content in example.messages[:-1])
        return f"{prompt}assistant: {example.messages[-1][1]}", f"{prompt}assistant: "
    from jinja2 import TemplateError

    try:
        whole = tokenizer.apply_chat_template(example.as_dicts(), tokenize=False)
        context = tokenizer.apply_chat_template(example.as_dicts(-1), tokenize=False,
                                                add_generation_prompt=True)
    except (TemplateError, ValueError) as exc:
        raise DataError(f"{example.where or 'chat record'}: the tokenizer's chat template "
                        f"rejects it ({(str(exc).strip().splitlines() or ['no reason'])[0]})"
                        ) from None
    # Templates put a newline after each turn's end-of-turn token, often the EOS itself: kept,
    # the newline would be a target and get a second EOS appended after it.
    return str(whole).rstrip(), str(context)


def _tokenize(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
              seq_len: int) -> list[_Row]:
    """Token ids per example, cut to seq_len, with EOS appended to those that were not cut.

    Instruction and chat examples are trained on their response only (standard supervised
    fine-tuning): the prompt is context, and its length is kept so that its labels can be
    masked. A chat template writes its own special tokens, so none are added to it.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 for a next-token loss, got {seq_len}")
    rendered = [render(example, tokenizer) for example in examples]
    special = [isinstance(example, str) or not getattr(tokenizer, "chat_template", None)
               for example in examples]
    encoded = _encode(tokenizer, [text for text, _ in rendered], special, seq_len)
    prompts = _encode(tokenizer, [prompt for _, prompt in rendered], special, seq_len)
    eos = tokenizer.eos_token_id
    rows = []
    for ids, prompt in zip(encoded, prompts, strict=True):
        # EOS teaches the model where an example ends; a cut text did not end, so it gets none.
        if eos is not None and len(ids) < seq_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        rows.append(_Row(ids, _common_prefix(ids, prompt)))
    kept = [row for row in rows if len(row.ids) >= 2 and row.prompt < len(row.ids)]
    if len(kept) < len(rows):
        logger.debug("dropped %d examples with nothing to predict", len(rows) - len(kept))
    return kept


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], special: Sequence[bool],
            seq_len: int) -> list[list[int]]:
    """Token ids per text (none for ""), in one tokenizer call per kind of special tokens."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        picked = [i for i, text in enumerate(texts) if text and special[i] is flag]
        if picked:
            encoded = tokenizer([texts[i] for i in picked], add_special_tokens=flag,
                                truncation=True, max_length=seq_len)["input_ids"]
            for i, ids in zip(picked, encoded, strict=True):
                out[i] = list(ids)
    return out


def _common_prefix(ids: Sequence[int], prompt: Sequence[int]) -> int:
    # The prompt's tokens as they occur in the whole text: where a tokenizer merges the
    # prompt's last characters with the reply's first, the merged token stays a target.
    count = 0
    for a, b in zip(ids, prompt, strict=False):
        if a != b:
            break
        count += 1
    return count


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    prompt: int  # leading tokens that are context, not targets


def _pack(order: Sequence[int], lengths: Sequence[int], seq_len: int) -> list[tuple[int, ...]]:
    """Group examples, in the given order, into rows of at most seq_len tokens (next-fit).

    Next-fit keeps the shuffled order's randomness in which examples share a row; an example
    that fills seq_len on its own (a cut one) gets a row to itself.
    """
    rows: list[list[int]] = []
    used = seq_len  # no open row yet
    for index in order:
        if used + lengths[index] > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += lengths[index]
    return [tuple(row) for row in rows]


def _collate(rows: Sequence[Sequence[_Row]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding and prompts are masked out of the labels.

    A row holds one example, or several packed ones back to back. The first token of a
    packed example after the first is masked too: an example alone in its row is never
    predicted from before its start, so each example has the same targets either way.
    """
    width = max(sum(len(example.ids) for example in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    context = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        start = 0
        for n, example in enumerate(row):
            end = start + len(example.ids)
            input_ids[i, start:end] = torch.tensor(example.ids, dtype=torch.long)
            context[i, start : start + max(example.prompt, 1 if n else 0)] = True
            start = end
        attention_mask[i, :start] = 1
    labels = input_ids.masked_fill((attention_mask == 0) | context, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Without a pad token, EOS pads: its value never matters because padding is masked out.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


class TokenBatches:
    """An endless, seeded stream of training batches over a list of examples.

    The examples are tokenized once. Each epoch visits every example once in a fresh seeded
    order; a batch that runs past the end of an epoch is completed from the next one, so every
    batch has `batch_size` rows.

    With `pack`, each epoch's shuffled examples are packed back to back (each ending in EOS)
    into rows of at most `seq_len` tokens, so that short examples waste less compute on
    padding. This is naive packing, as in GPT pretraining: tokens attend to the earlier
    examples of their row, and positions run on across them. Labels stay per example: its
    prompt, and its first token, are masked as they would be in a row of its own.
    `batch_size` then counts rows, and `last_examples` says how many examples a batch held.

    Args:
        texts: the training examples (strings or `Chat` records).
        tokenizer: a Hugging Face tokenizer (not modified).
        seq_len: tokens per row; longer examples are cut.
        batch_size: rows per batch.
        seed: the same seed gives the same batch sequence.
        pack: pack several examples into each row.

    Raises:
        ConfigError: seq_len or batch_size out of range.
        DataError: no example has a token to predict, or the chat template rejects one.
    """

    def __init__(self, texts: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *,
                 seq_len: int, batch_size: int, seed: int, pack: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if not texts:
            raise DataError("no training examples")
        self._rows = _tokenize(texts, tokenizer, seq_len)
        if not self._rows:
            raise DataError("no training examples (none has a token to predict within seq_len)")
        self._pad_id = _pad_id(tokenizer)
        self._seq_len = seq_len
        self.batch_size = batch_size
        self.pack = pack
        self._rng = random.Random(seed)
        self._order: list[tuple[int, ...]] = []  # this epoch's rows, as example indices
        self._cursor = 0
        self.epoch = 0  # completed passes over the data
        self.last_examples = 0  # examples in the batch last returned (rows, unless packed)

    def __len__(self) -> int:
        """Number of usable examples."""
        return len(self._rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch: `input_ids`, `attention_mask` and `labels` (masked: -100).

        It holds `last_examples` examples, afterwards; the dict holds only model inputs.
        """
        picked: list[tuple[int, ...]] = []
        while len(picked) < self.batch_size:
            if self._cursor == len(self._order):
                self._next_epoch()
            take = min(self.batch_size - len(picked), len(self._order) - self._cursor)
            picked.extend(self._order[self._cursor : self._cursor + take])
            self._cursor += take
        self.last_examples = sum(len(row) for row in picked)
        return _collate([[self._rows[i] for i in row] for row in picked], self._pad_id)

    def poisson_batch(self, rate: float, rng: random.Random) -> dict[str, torch.Tensor] | None:
        """A batch that holds each example independently with probability `rate`, or None.

        The sampling DP-SGD's accounting assumes (privacy amplification by Poisson
        subsampling): the batch size varies, and may be zero. `last_examples` says how many.
        """
        picked = [[row] for row in self._rows if rng.random() < rate]
        self.last_examples = len(picked)
        return _collate(picked, self._pad_id) if picked else None

    def _next_epoch(self) -> None:
        if self._order:
            self.epoch += 1
        order = list(range(len(self._rows)))
        self._rng.shuffle(order)
        if self.pack:
            self._order = _pack(order, [len(row.ids) for row in self._rows], self._seq_len)
        else:
            self._order = [(i,) for i in order]
        self._cursor = 0


def eval_batches(texts: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, seq_len: int,
                 batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Held-out examples as fixed batches in their given order (the last one may be smaller).

    Never packed: each example's loss is measured without the others as context.

    Raises:
        ConfigError: seq_len or batch_size out of range.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    rows = _tokenize(texts, tokenizer, seq_len) if texts else []
    pad_id = _pad_id(tokenizer)
    return [_collate([[row] for row in rows[i : i + batch_size]], pad_id)
            for i in range(0, len(rows), batch_size)]


def mean_loss(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token cross-entropy of a causal LM over batches.

    Every labelled token counts once, so a batch of long examples weighs more than one of short
    ones. Runs under `torch.no_grad()` in eval mode, and restores the model's previous mode.

    Raises:
        DataError: the batches hold no labelled token to predict.
    """
    was_training = model.training
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                # Position t predicts token t + 1.
                targets = batch["labels"][:, 1:].to(device)
                total += torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                    ignore_index=IGNORE_INDEX, reduction="sum").item()
                count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("no labelled tokens to evaluate on")
    return total / count
