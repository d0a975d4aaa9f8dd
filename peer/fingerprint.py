"""Model fingerprints: what the swarm id hashes of a base (config, weights, tokenizer).

Adapters only average between peers of one base; a fingerprint tells bases apart. The
built-in folders store theirs (`FINGERPRINT_FILE`) when they are converted; other folders are
hashed on every start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from peer.device import Placement
from peer.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FINGERPRINT_FILE = "loraswarm-fingerprint.txt"
# Text whose token ids show a tokenizer's normalisation, pre-tokenisation and added specials.
_PROBE_TEXT = "Hello, world!  It's 2026: caf\u00e9\tna\u00efve\n<|im_end|> 1234567 x=y**2;"


def fingerprint(model_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """A sha256 over the model's config, weights and tokenizer: peers of different bases never mix.

    Adapters trained on other token ids do not average into anything: peers whose tokenizers
    disagree (an edited folder, or a transformers version that reads the same files otherwise,
    as 5.17 read the built-in GGUF's end token) must not share a swarm.

    The built-in folders store theirs at conversion time; other folders are hashed on every
    start (about a second per GB), since a user may change the files between runs; pass the
    `tokenizer` already loaded from the folder to spare loading it again.
    """
    stored = model_dir / FINGERPRINT_FILE
    if stored.is_file():
        return stored.read_text().strip()
    return hash_folder(model_dir, tokenizer)


def base_fingerprint(model_dir: Path, placement: Placement,
                     tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """What the swarm id hashes of a base: its `fingerprint`, and its quantization if any.

    A 4-bit base is another function of the same weights, and averaging with bf16 peers cost
    a 4-bit peer an eighth of its gain (README: "Design decisions"), so it has a swarm of its
    own; the device and a float dtype are each peer's own business.
    """
    print_ = fingerprint(model_dir, tokenizer)
    return f"{print_}/{placement.quantize}" if placement.quantize else print_


def hash_folder(model_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """A sha256 over the folder's config (less `transformers_version`), its safetensors files
    in name order and its `tokenizer_print`: what `fingerprint` stores or computes."""
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(model_dir.glob("*.safetensors")):
        with open(weights, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    digest.update(tokenizer_print(model_dir, tokenizer).encode())
    return digest.hexdigest()


def tokenizer_print(model_dir: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """A sha256 of what the folder's tokenizer does, as the installed transformers loads it.

    Its vocabulary, its special tokens, its chat template and the ids it gives a probe text:
    what training turns examples into. Hashed from the loaded tokenizer, not its files, so
    that a library reading the same files otherwise gives another print. `tokenizer`, if
    given, must be the folder's, loaded as `AutoTokenizer.from_pretrained` loads it.

    Raises:
        ModelError: the folder holds no tokenizer that transformers can load.
    """
    from transformers import AutoTokenizer

    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: cannot load its tokenizer ({exc})") from exc
    document = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {name: getattr(tokenizer, f"{name}_token_id", None)
                    for name in ("bos", "eos", "unk", "pad")},
        "template": getattr(tokenizer, "chat_template", None),
        "probe": [tokenizer(_PROBE_TEXT, add_special_tokens=flag)["input_ids"]
                  for flag in (False, True)],
    }
    text = json.dumps(document, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()
