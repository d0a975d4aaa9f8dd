"""Shared fixtures: small real models and data files, made locally (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Tests share one converted copy of the built-in model across runs (the first run converts it).
os.environ.setdefault("LORASWARM_CACHE", str(Path.home() / ".cache" / "loraswarm"))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    """The built-in SmolLM2 cut to its first layers: real weights and tokenizer, cheap to run."""
    from peer.model import BUILTIN_SMALL, resolve_model

    return resolve_model(BUILTIN_SMALL)


@pytest.fixture
def tiny_lora_model():
    """A randomly initialised 2-layer Llama wrapped with LoRA (for store and merge plumbing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peer.model import LoraSettings, attach_lora

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128,
    ))
    return attach_lora(base, LoraSettings(rank=4), seed=3)


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def require(missing: str | None) -> None:
    """Fail the test, naming what this machine lacks, when `missing` says something is missing.

    The NAT lab, its UPnP router and the dashboard's browser are part of the suite: `.ci/run`
    installs them, and a machine without them reports a failure with the fix, never a skip.
    """
    if missing:
        pytest.fail(f"{missing} (`make test` needs it; .ci/run installs it)", pytrace=False)
