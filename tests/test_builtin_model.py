"""The built-in model's conversion: its tokenizer must not hang on the installed transformers,
and peers whose tokenizers differ must not share a swarm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gguf import GGUFReader
from transformers import AutoTokenizer

from peer import model
from peer.errors import ModelError
from peer.fingerprint import FINGERPRINT_FILE, fingerprint
from peer.model import LoraSettings, is_converted, pin_special_tokens
from peer.shared import SharedModel


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
    (old / FINGERPRINT_FILE).write_text("ab" * 32)  # a finished conversion 1
    assert not is_converted(old)
    (old / model._CONVERSION_FILE).write_text("1")
    assert not is_converted(old)
    (old / model._CONVERSION_FILE).write_text(model._CONVERSION)
    assert is_converted(old)


def _copy_without_fingerprint(source: Path, target: Path) -> Path:
    """A user's folder of the same files: weights linked, the rest copied, hashed on start."""
    target.mkdir()
    for item in source.iterdir():
        if item.suffix == ".safetensors":
            (target / item.name).symlink_to(item)
        elif item.name != FINGERPRINT_FILE:
            shutil.copy(item, target / item.name)
    return target


def test_a_tokenizer_that_differs_alone_gives_another_fingerprint(tmp_path: Path,
                                                                   small_model_dir: Path) -> None:
    same = _copy_without_fingerprint(small_model_dir, tmp_path / "same")
    assert fingerprint(same) == fingerprint(small_model_dir), "stored = hashed on start"
    edited = _copy_without_fingerprint(small_model_dir, tmp_path / "edited")
    settings = json.loads((edited / "tokenizer_config.json").read_text())
    settings["eos_token"] = "<|im_start|>"  # what transformers 5.17 read from the GGUF
    (edited / "tokenizer_config.json").write_text(json.dumps(settings))
    assert fingerprint(edited) != fingerprint(same)
    (edited / "tokenizer.json").unlink()
    (edited / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match="cannot load its tokenizer"):
        fingerprint(edited)


def test_a_start_loads_a_user_folders_tokenizer_once(tmp_path: Path, small_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _copy_without_fingerprint(small_model_dir, tmp_path / "user")
    loads: list[str] = []
    load = AutoTokenizer.from_pretrained

    def counted(*args: object, **kwargs: object) -> object:
        loads.append(str(args[0]))
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counted)
    shared = SharedModel.load(str(folder), LoraSettings(), init_seed=0)
    assert loads == [str(folder)], "the fingerprint hashes the tokenizer the model loaded"
    assert shared.fingerprint == fingerprint(small_model_dir)
