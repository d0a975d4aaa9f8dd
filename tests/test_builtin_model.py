"""The built-in model's conversion: its tokenizer must not hang on the installed transformers."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader
from transformers import AutoTokenizer

from peer import model
from peer.model import is_converted, pin_special_tokens


def _gguf() -> Path:
    return model._gguf_folder() / model._GGUF_FILE


def _gguf_id(key: str) -> int:
    field = GGUFReader(_gguf()).get_field(f"tokenizer.ggml.{key}_token_id")
    assert field is not None
    return int(field.contents())


def test_the_builtin_tokenizer_ends_examples_with_the_ggufs_end_token(
    small_model_dir: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
    assert tokenizer.eos_token_id == _gguf_id("eos") == 2
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token_id == _gguf_id("bos")
    assert tokenizer.pad_token_id == _gguf_id("padding")


def test_pinning_mends_a_tokenizer_that_misread_the_gguf(small_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
    tokenizer.eos_token = "<|im_start|>"  # what transformers 5.17 read from this file
    tokenizer.pad_token = None
    pin_special_tokens(tokenizer, _gguf())
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_a_folder_of_an_older_conversion_is_made_again(tmp_path: Path,
                                                       small_model_dir: Path) -> None:
    assert is_converted(small_model_dir)
    old = tmp_path / "old"
    old.mkdir()
    (old / model._FINGERPRINT_FILE).write_text("ab" * 32)  # a finished conversion 1
    assert not is_converted(old)
    (old / model._CONVERSION_FILE).write_text("1")
    assert not is_converted(old)
    (old / model._CONVERSION_FILE).write_text(model._CONVERSION)
    assert is_converted(old)
