"""bench_privacy.py's speed comparison: both per-example gradient paths compute the same thing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from peer.data import TokenBatches
from peer.dpsgd import per_example_grads
from peer.model import LoraSettings, attach_lora, load_base
from scripts import bench_privacy, simulate
from scripts.bench_privacy import (
    _opacus_grad_sampler,
    exposure_args,
    parse_args,
    plan,
    schedule,
    time_steps,
)
from scripts.canary import canary_text
from tests.conftest import write_jsonl

TEXTS = [canary_text(f"{n:06d}") + " " + "and more" * (n % 4) for n in range(12)]


def test_torch_func_and_opacus_hooks_give_the_same_per_example_gradients(
    small_model_dir: Path,
) -> None:
    args = parse_args(["--json", "unused.json", "--model", str(small_model_dir)])
    hooks = _opacus_grad_sampler(args)
    base, tokenizer = load_base(small_model_dir)
    model = attach_lora(base, LoraSettings(), args.seed)  # the same seeded factors
    batch = TokenBatches(TEXTS, tokenizer, seq_len=32, batch_size=5, seed=0).next_batch()
    assert int(batch["attention_mask"].sum(dim=1).min()) < batch["input_ids"].shape[1], "padded"
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    ours, _ = per_example_grads(model, params, batch)
    theirs = hooks(batch)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, grad in ours.items():
        assert grad.shape[0] == 5
        torch.testing.assert_close(grad, theirs[name], rtol=1e-3, atol=1e-5)


def test_step_timings_are_taken_on_the_same_batch(tmp_path: Path, small_model_dir: Path) -> None:
    shard = write_jsonl(tmp_path / "shard.jsonl", [{"text": t} for t in TEXTS])
    args = parse_args(["--json", "unused.json", "--model", str(small_model_dir),
                       "--batch-size", "4", "--seq-len", "32", "--timing-steps", "1",
                       "--delta", "1e-3"])
    found = time_steps(args, shard)
    assert found["batch"][0] == 4
    plain, dp = found["step_s"]["plain"], found["step_s"]["dp"]
    assert plain > 0 and dp > 0
    assert found["step_time_ratio"] == pytest.approx(dp / plain, rel=0.01)
    assert set(found["grad_samplers_s"]) == {"torch_func", "opacus_hooks"}


def test_the_schedule_measures_the_exposure_pair_first_and_every_run_once() -> None:
    order = schedule(["inf", "8", "4", "1"])
    assert order[:2] == [("inf", "gossip"), ("8", "gossip")]
    assert sorted(order) == sorted((e, m) for e in ("inf", "8", "4", "1")
                                   for m in ("gossip", "local", "central"))


def test_separate_exposure_runs_come_first_with_their_own_model_and_size() -> None:
    args = parse_args(["--json", "b.json", "--out", "o", "--epsilons", "inf,8,1",
                       "--exposure-model", "builtin", "--exposure-peers", "3",
                       "--exposure-rounds", "10"])
    assert plan(args)[:3] == [("inf", "exposure"), ("8", "exposure"), ("inf", "gossip")]
    assert len(plan(args)) == 2 + 9
    found = exposure_args(args)
    assert (found.model, found.peers, found.rounds, found.steps_per_round) == (
        "builtin", 3, 10, args.steps_per_round)
    assert found.out == Path("o") / "exposure" and args.out == Path("o")
    only = parse_args(["--json", "b.json", "--epsilons", "inf,8", "--exposure-model", "builtin",
                       "--only", "exposure"])
    assert plan(only) == [("inf", "exposure"), ("8", "exposure")]
    assert [mode for _, mode in plan(parse_args(["--json", "b.json", "--only", "utility",
                                                 "--exposure-model", "builtin"]))] == \
        [mode for _, mode in schedule(["inf", "8", "4", "1"])]


def test_each_mode_takes_its_own_settings_and_repeated_runs_are_averaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[argparse.Namespace] = []

    def fake_run(sim: argparse.Namespace) -> dict[str, float]:  # each run ends 1 higher
        seen.append(sim)
        return {"mean_eval_loss": 3.0 + len(seen)}

    monkeypatch.setattr(simulate, "run", fake_run)
    monkeypatch.setattr(bench_privacy, "time_steps", lambda args, shard: {"step_time_ratio": 1})
    out, report = tmp_path / "o", tmp_path / "b.json"
    common = ["--json", str(report), "--out", str(out), "--only", "utility", "--epsilons", "8",
              "--sim-arg=--peer-arg=--dp-sample-rate=0.1", "--gossip-arg=--lr=0.01",
              "--gossip-arg=--fanout=7", "--local-arg=--lr=0.004"]
    assert bench_privacy.main([*common, "--runs", "2"]) == 0
    assert [(Path(sim.out).name, sim.mode, sim.lr, sim.fanout) for sim in seen] == [
        ("gossip", "gossip", 0.01, 7), ("gossip-2", "gossip", 0.01, 7),
        ("local", "local", 0.004, 2), ("local-2", "local", 0.004, 2),
        ("central", "central", 0.006, 2), ("central-2", "central", 0.006, 2)]
    assert all({"--dp-epsilon=8", "--dp-sample-rate=0.1"} <= set(sim.peer_arg) for sim in seen)
    utility = json.loads(report.read_text())["utility"]["8"]
    assert utility["gossip_runs"] == [4.0, 5.0] and utility["gossip"] == 4.5
    assert utility["central_runs"] == [8.0, 9.0]
    # --resume with more runs adds only the missing ones, into new folders.
    assert bench_privacy.main([*common, "--runs", "3", "--resume"]) == 0
    assert [Path(sim.out).name for sim in seen[6:]] == ["gossip-3", "local-3", "central-3"]
    utility = json.loads(report.read_text())["utility"]["8"]
    assert utility["gossip_runs"] == [4.0, 5.0, 10.0] and utility["local"] == pytest.approx(
        (6.0 + 7.0 + 11.0) / 3)
    with pytest.raises(SystemExit):
        parse_args(["--json", "b.json", "--runs", "0"])
