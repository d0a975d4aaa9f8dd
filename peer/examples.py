"""What one training record is: plain text, an instruction, or a chat; and how a row becomes one.

Rows of every file format go through one mapping, `example_of`, set by `DataConfig`: a row with
the text field is plain text, one with a `messages` list is a `Chat` (rendered later with the
model's tokenizer, `peer.data.render`), one with the instruction and output fields is an
instruction example rendered by `format_example`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from peer.config import DataConfig
from peer.errors import DataError

__all__ = ["MESSAGES", "RESPONSE", "Chat", "Example", "example_of", "format_example"]

RESPONSE = "\n\n### Response:\n"  # ends an instruction example's prompt
MESSAGES = "messages"  # the field of chat records
_DEFAULT_FIELDS = DataConfig()


@dataclass(frozen=True)
class Chat:
    """A chat record: its (role, content) turns, the last one the assistant's reply.

    Training covers that final reply; the turns before it are its context. `where` names the
    record ("file: row 3") in errors raised when it is rendered, and takes no part in equality.
    """

    messages: tuple[tuple[str, str], ...]
    where: str = field(default="", compare=False)

    def as_dicts(self, upto: int | None = None) -> list[dict[str, str]]:
        """The turns (the first `upto` of them) as chat-template messages."""
        return [{"role": role, "content": content} for role, content in self.messages[:upto]]


Example: TypeAlias = str | Chat


def format_example(instruction: str, output: str, input: str = "") -> str:
    """Render an instruction example as one training string (Alpaca-style headings).

    Args:
        instruction: the task or question.
        output: the desired response.
        input: optional context for the instruction; its block is left out when blank.
    """
    context = f"\n\n### Input:\n{input}" if input.strip() else ""
    return f"### Instruction:\n{instruction}{context}{RESPONSE}{output}"



# ---------------------------------------------------------------------------------------------
# rows to examples


def example_of(where: str, row: Any, fields: DataConfig = _DEFAULT_FIELDS) -> Example:
    """One record as an example: plain text, a chat, or a rendered instruction, in that order.

    Args:
        where: names the record in errors, e.g. "data.jsonl:3" or "data.csv: row 2".
        row: the record's fields (a JSON object or a table row).
        fields: which fields hold text and instructions. An optional instruction input that
            is missing or null is left out; every other value must be a non-blank string.

    Raises:
        DataError: one line "where: what is wrong", naming the fields found.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fields.text_field in row:
        return _string(where, row, fields.text_field)
    if MESSAGES in row:
        return _chat_of(where, row[MESSAGES])
    instruction, *middle, output = fields.instruction_fields
    if instruction in row and output in row:
        context = _optional(where, row, middle[0]) if middle else ""
        return format_example(_string(where, row, instruction), _string(where, row, output),
                              context)
    found = ", ".join(sorted(map(str, row))) or "none"
    raise DataError(f"{where}: needs a {fields.text_field!r} field or {instruction!r} and "
                    f"{output!r} fields or a {MESSAGES!r} list (found: {found})")


def _string(where: str, row: dict[str, Any], key: str) -> str:
    value = row[key]
    if value is None:
        raise DataError(f"{where}: field {key!r} is empty (null)")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _optional(where: str, row: dict[str, Any], key: str) -> str:
    # A table has every column in every row, so a missing input reads as null there.
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_of(where: str, value: Any) -> Chat:
    """Validate a `messages` list: string roles and contents, ending in the assistant's reply.

    A reply needs a prompt, so at least one message must come before it (plain text without
    a prompt belongs in a text field). CSV cells hold the list as JSON text.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: field {MESSAGES!r} is not a JSON list ({exc.msg})") from None
    if isinstance(value, dict) and set(value) >= {"role", "content"}:
        # datasets' Sequence({...}) feature gives a dict of lists instead of a list of dicts.
        value = [{"role": r, "content": c} for r, c in zip(value["role"], value["content"],
                                                           strict=False)]
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: field {MESSAGES!r} must be a list of at least 2 messages, "
                        "the last one the assistant's reply")
    turns = []
    for number, message in enumerate(value, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise DataError(f"{where}: message {number} needs string 'role' and 'content' "
                            "fields")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's reply, "
                        f"got role {turns[-1][0]!r}")
    if not turns[-1][1].strip():
        raise DataError(f"{where}: the assistant's last reply is empty")
    return Chat(tuple(turns), where)
