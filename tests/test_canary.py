"""The secret-sharer measurement: exposure's arithmetic and the canaries' likelihoods."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from peer.data import eval_batches, load_examples, mean_loss
from peer.model import LoraSettings, attach_lora, load_base
from scripts.canary import (
    answer_nll,
    canary_text,
    exposure,
    null_exposures,
    secrets,
    spread,
    write_canaries,
)


def test_exposure_is_log_set_size_minus_log_rank() -> None:
    pool = [float(i) for i in range(1, 1000)]  # 999 candidates, all less likely than 0.5
    assert exposure(0.5, pool) == pytest.approx(math.log2(1000))  # ranked first
    assert exposure(1e9, pool) == pytest.approx(0.0)  # ranked last
    assert exposure(1.0, pool) == pytest.approx(math.log2(1000) - math.log2(1.5))  # one tie


def test_never_inserted_canaries_average_about_log2_e() -> None:
    rng = random.Random(0)
    pool = [rng.random() for _ in range(1000)]
    null = spread(null_exposures(pool, 1000))
    assert null["mean"] == pytest.approx(1 / math.log(2), abs=0.1) and null["n"] == 1000


def test_secrets_are_distinct_six_digits_and_canaries_are_training_records(
    tmp_path: Path,
) -> None:
    drawn = secrets(50, random.Random(1))
    assert len(set(drawn)) == 50 and all(len(s) == 6 and s.isdigit() for s in drawn)
    path = write_canaries(tmp_path / "c.jsonl", {drawn[0]: 1, drawn[1]: 3})
    assert load_examples(path) == [canary_text(drawn[0])] + [canary_text(drawn[1])] * 3


def test_answer_nll_sums_the_token_losses_mean_loss_averages(small_model_dir: Path) -> None:
    base, tokenizer = load_base(small_model_dir)
    model = attach_lora(base, LoraSettings(rank=4), seed=2)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    texts = [canary_text(s) for s in ("123456", "000001", "987654")]
    totals = answer_nll(model, tokenizer, texts, batch_size=2)
    for text, total in zip(texts, totals, strict=True):
        batch = eval_batches([text], tokenizer, seq_len=64, batch_size=1)
        tokens = int((batch[0]["labels"][:, 1:] != -100).sum())
        assert total == pytest.approx(mean_loss(model, batch) * tokens, rel=1e-4)
    assert totals[0] != totals[1] and all(torch.isfinite(torch.tensor(totals)))


def test_simulate_insert_puts_canaries_in_peer_0s_and_the_central_shard(tmp_path: Path) -> None:
    from scripts.simulate import parse_args, write_data

    planted = write_canaries(tmp_path / "c.jsonl", {"424242": 3})
    for mode, shards in (("gossip", 3), ("central", 1)):
        out = tmp_path / mode
        args = parse_args(["--peers", "3", "--mode", mode, "--insert", str(planted),
                           "--out", str(out)])
        paths, _ = write_data(args, out)
        assert len(paths) == shards
        counts = [load_examples(path).count(canary_text("424242")) for path in paths]
        assert counts == [3] + [0] * (shards - 1)
