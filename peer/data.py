"""Training data: files to example strings, and token batches.

One training example is one string. Instruction data is rendered with `format_example`;
plain text is used as it is. Batches are causal-LM batches: the labels are the input ids, with
padding masked out (-100), so the loss covers every real token of the example.
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
from typing import TYPE_CHECKING, Any

import torch

from peer.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TokenBatches", "eval_batches", "format_example", "load_examples", "mean_loss", "write_jsonl",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
_RESPONSE = "\n\n### Response:\n"


def format_example(instruction: str, output: str, input: str = "") -> str:
    """Render an instruction example as one training string (Alpaca-style headings).

    Args:
        instruction: the task or question.
        output: the desired response.
        input: optional context for the instruction; its block is left out when blank.
    """
    context = f"\n\n### Input:\n{input}" if input.strip() else ""
    return f"### Instruction:\n{instruction}{context}{_RESPONSE}{output}"


def _prompt_of(example: str) -> str:
    return example.split(_RESPONSE, 1)[0]


# ---------------------------------------------------------------------------------------------
# files


def load_examples(path: Path) -> list[str]:
    """Read training examples from a .jsonl/.json-lines file, a .txt file, or a folder of them.

    JSON lines hold either a `text` field or `instruction` and `output` fields (plus an
    optional `input`); blank lines are skipped. A .txt file gives one example per paragraph
    (paragraphs are separated by blank lines). A folder gives the examples of all its
    .jsonl/.json/.txt files, in sorted file-name order (hidden files are ignored).

    Raises:
        DataError: one line "path:line: what is wrong", for a missing, unreadable or empty
            file, an empty folder, bad JSON, or a line without the fields.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in JSON_SUFFIXES + TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl, .json or .txt files")
        return [example for file in files for example in _load_file(file)]
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass a .jsonl or .txt file or a folder")
    return _load_file(path)


def _load_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + TEXT_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                        "use .jsonl (JSON lines) or .txt (paragraphs)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                        "re-save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if suffix in JSON_SUFFIXES:
        examples = _parse_jsonl(path, text)
    else:
        examples = [p.strip() for p in _paragraphs(text) if p.strip()]
    if not examples:
        raise DataError(f"{path}: empty file, it holds no training examples")
    logger.debug("%s: %d examples", path, len(examples))
    return examples


def _paragraphs(text: str) -> list[str]:
    paragraphs: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip():
            paragraphs[-1].append(line.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return ["\n".join(lines) for lines in paragraphs]


def _parse_jsonl(path: Path, text: str) -> list[str]:
    examples = []
    # Split on "\n" only: str.splitlines would also break inside strings holding U+2028 etc.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: bad JSON ({exc.msg} at column {exc.colno}); each line "
                            "must be one JSON object") from None
        examples.append(_example_of(where, row))
    return examples


def _example_of(where: str, row: Any) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    fields = {key: row[key] for key in ("text", "instruction", "input", "output") if key in row}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if "text" in fields:
        if not fields["text"].strip():
            raise DataError(f"{where}: field 'text' is empty")
        return fields["text"]
    if "instruction" in fields and "output" in fields:
        if not fields["instruction"].strip() or not fields["output"].strip():
            raise DataError(f"{where}: fields 'instruction' and 'output' must not be empty")
        return format_example(fields["instruction"], fields["output"], fields.get("input", ""))
    found = ", ".join(sorted(map(str, row))) or "none"
    raise DataError(f"{where}: needs a 'text' field or 'instruction' and 'output' fields "
                    f"(found: {found})")


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


def _tokenize(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase,
              seq_len: int) -> list[_Row]:
    """Token ids per text, cut to seq_len, with EOS appended to texts that were not cut.

    Instruction examples are trained on their response only (standard supervised fine-tuning):
    the prompt is context, and its length is kept so that its labels can be masked.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 for a next-token loss, got {seq_len}")
    encoded = tokenizer(list(texts), truncation=True, max_length=seq_len)["input_ids"]
    eos = tokenizer.eos_token_id
    rows = []
    for text, ids in zip(texts, encoded, strict=True):
        ids = list(ids)
        # EOS teaches the model where an example ends; a cut text did not end, so it gets none.
        if eos is not None and len(ids) < seq_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        rows.append(_Row(ids, _prompt_tokens(text, tokenizer)))
    kept = [row for row in rows if len(row.ids) >= 2 and row.prompt < len(row.ids)]
    if len(kept) < len(rows):
        logger.debug("dropped %d examples with nothing to predict", len(rows) - len(kept))
    return kept


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    prompt: int  # leading tokens that are context, not targets


def _prompt_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> int:
    if _RESPONSE not in text:
        return 0
    prompt = _prompt_of(text) + _RESPONSE
    return len(tokenizer(prompt)["input_ids"])


def _collate(rows: Sequence[_Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding and prompts are masked out of the labels."""
    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        attention_mask[i, : len(row.ids)] = 1
        prompt_mask[i, : row.prompt] = True
    labels = input_ids.masked_fill((attention_mask == 0) | prompt_mask, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Without a pad token, EOS pads: its value never matters because padding is masked out.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


class TokenBatches:
    """An endless, seeded stream of training batches over a list of texts.

    The texts are tokenized once. Each epoch visits every example once in a fresh seeded
    order; a batch that runs past the end of an epoch is completed from the next one, so every
    batch has `batch_size` rows.

    Args:
        texts: the training examples.
        tokenizer: a Hugging Face tokenizer (not modified).
        seq_len: tokens per example; longer examples are cut.
        batch_size: rows per batch.
        seed: the same seed gives the same batch sequence.

    Raises:
        ConfigError: seq_len or batch_size out of range.
        DataError: no example has at least two tokens.
    """

    def __init__(self, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *,
                 seq_len: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if not texts:
            raise DataError("no training examples")
        self._rows = _tokenize(texts, tokenizer, seq_len)
        if not self._rows:
            raise DataError("no training examples (none has a token to predict within seq_len)")
        self._pad_id = _pad_id(tokenizer)
        self.batch_size = batch_size
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._cursor = 0
        self.epoch = 0  # completed passes over the data

    def __len__(self) -> int:
        """Number of usable examples."""
        return len(self._rows)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch: `input_ids`, `attention_mask` and `labels` (padding: -100)."""
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if self._cursor == len(self._order):
                if self._order:
                    self.epoch += 1
                self._order = list(range(len(self._rows)))
                self._rng.shuffle(self._order)
                self._cursor = 0
            take = min(self.batch_size - len(picked), len(self._order) - self._cursor)
            picked.extend(self._order[self._cursor : self._cursor + take])
            self._cursor += take
        return _collate([self._rows[i] for i in picked], self._pad_id)


def eval_batches(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, seq_len: int,
                 batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Held-out texts as fixed batches in their given order (the last one may be smaller).

    Raises:
        ConfigError: seq_len or batch_size out of range.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    rows = _tokenize(texts, tokenizer, seq_len) if texts else []
    pad_id = _pad_id(tokenizer)
    return [_collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


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
