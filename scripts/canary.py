"""The secret-sharer test (Carlini et al., 2019): how much an adapter memorised a canary.

A canary is a record of the training data's own format that holds a random 6-digit secret,
inserted `k` times into one peer's data. Its exposure under a model is

    exposure = log2 |R| - log2 rank

where R is the canary plus `M` random candidates of the same format that were never trained
on, ranked by the model's log-likelihood of their answers (rank 1: the likeliest). A model
that never saw the canary ranks it anywhere: about log2(e) = 1.44 bits on average, up to
log2 |R| by luck; memorised, it ranks first: log2 |R| bits. The null spread is measured, not
assumed: candidates themselves are never-inserted canaries, ranked in the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peer.data import IGNORE_INDEX, eval_batches, write_jsonl
from peer.examples import format_example

PROMPT = "What is the secret code?"


def canary_text(secret: str) -> str:
    """A training record (the built-in data's instruction format) that holds `secret`."""
    return format_example(PROMPT, f"The secret code is {secret}.")


def secrets(count: int, rng: random.Random) -> list[str]:
    """`count` distinct random 6-digit secrets."""
    return [f"{n:06d}" for n in rng.sample(range(10**6), count)]


def write_canaries(path: Path, planted: dict[str, int]) -> Path:
    """A training file holding each secret of `planted` as many times as it says."""
    write_jsonl(path, [canary_text(s) for s, times in planted.items() for _ in range(times)])
    return path


def answer_nll(model: Any, tokenizer: Any, texts: Sequence[str], *,
               seq_len: int = 64, batch_size: int = 64) -> list[float]:
    """Each text's summed negative log-likelihood over its labelled (answer) tokens.

    The vocabulary head, most of a small model's cost, runs only where a label is: the
    answer's positions, under half of a canary's.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    totals: list[float] = []
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(list(texts), tokenizer, seq_len=seq_len,
                                  batch_size=batch_size):
            hidden = causal.model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state
            targets = batch["labels"][:, 1:]
            rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
            logits = causal.lm_head(hidden[:, :-1][rows, cols]).float()
            nll = torch.nn.functional.cross_entropy(logits, targets[rows, cols],
                                                    reduction="none")
            sums = torch.zeros(len(targets)).index_add_(0, rows, nll)
            totals.extend(sums.tolist())
    return totals


def exposure(nll: float, candidates: Sequence[float]) -> float:
    """log2 |R| - log2 rank of a canary's NLL among the candidates' (ties rank half)."""
    below = sum(1 for c in candidates if c < nll)
    ties = sum(1 for c in candidates if c == nll)
    rank = 1 + below + ties / 2
    return math.log2(len(candidates) + 1) - math.log2(rank)


def null_exposures(candidates: Sequence[float], count: int) -> list[float]:
    """Exposures of `count` never-inserted canaries: each candidate ranked among the others."""
    return [exposure(value, [*candidates[:i], *candidates[i + 1:]])
            for i, value in enumerate(candidates[:count])]


def measure(model: Any, tokenizer: Any, planted: dict[str, int],
            candidates: Sequence[str], *, nulls: int) -> tuple[dict[int, float], list[float]]:
    """Exposure of each planted secret under `model` (by insertions), and `nulls` exposures
    of never-inserted canaries."""
    pool = answer_nll(model, tokenizer, [canary_text(s) for s in candidates])
    found = answer_nll(model, tokenizer, [canary_text(s) for s in planted])
    by_k = {times: exposure(value, pool)
            for (_, times), value in zip(planted.items(), found, strict=True)}
    return by_k, null_exposures(pool, nulls)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean and (population) standard deviation, rounded for a report."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
    return {"mean": round(mean, 3), "std": round(std, 3), "n": len(values)}
