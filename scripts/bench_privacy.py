"""Benchmark DP-SGD: what privacy costs in utility and speed, and what it buys against a canary.

Three measurements, one JSON (`--json OUT`):
  * utility: `scripts/simulate.py --compare`'s three runs (gossip, local-only, central; in
    process, real libp2p on 127.0.0.1) at each ε of `--epsilons` ("inf": no DP) with
    δ = `--delta`; each peer's noise is calibrated so that its --rounds x --steps-per-round
    steps spend ε on its own data. Mean final eval loss per mode, and each run's seconds.
    The runs go in `schedule`'s order and the JSON is rewritten after each, so a run stopped
    early keeps what it measured.
  * exposure (the secret-sharer test, `scripts/canary.py`): two random 6-digit canaries are
    inserted into peer 0's data, one once and one 10 times (`--repeats`), in every run above;
    after each gossip run, their exposure among `--candidates` never-inserted ones under the
    owner's exported adapter (p0) and a neighbour's (p1, which merged what reached it), and
    the spread of never-inserted canaries' exposure (null).
  * step_time_ratio: a DP-SGD step (per-example gradients, clipping, noise) over a plain step
    on the same real batch, the same model, in this process, alternated `--timing-steps`
    times (median). `grad_samplers_s` times the per-example gradients alone: torch.func
    (what the trainer uses) against Opacus's GradSampleModule hooks.

    With `--exposure-model`, the exposure is measured in runs of its own instead (gossip only,
    without DP and at the first DP ε of `--epsilons`, in OUT/exposure/): a model small
    enough for the utility sweep may be too weak to memorise anything (`builtin-small`'s
    4 layers left a canary inserted 10 times at the null's exposure after 48 steps).
    `--exposure-peers/-rounds/-steps-per-round` size those runs (default: the sweep's).
    `--only utility|exposure` runs one part; `--resume` keeps what the JSON already has.

    Each mode may take its own settings (a peer alone and a swarm are tuned apart):
    `--sim-arg` passes a simulate.py argument to every run, `--gossip-arg`, `--local-arg`
    and `--central-arg` to that mode's runs only (after the others, so they win).
    `--runs N` repeats each utility run N times (DP noise differs between runs): the mode's
    value is then the mean, and MODE_runs lists each run's loss.

    python scripts/bench_privacy.py --json bench-privacy.json
    python scripts/bench_privacy.py --json quick.json --epsilons inf,8 --rounds 2 --peers 3
    python scripts/bench_privacy.py --json b.json --rounds 24 --exposure-model builtin \
        --exposure-peers 3 --exposure-rounds 10 --exposure-steps-per-round 4
    python scripts/bench_privacy.py --json tuned.json --only utility --epsilons 8 --runs 2 \
        --model builtin --rounds 20 --steps-per-round 4 \
        --gossip-arg=--lr=0.01 --gossip-arg=--fanout=7 --gossip-arg=--settle-rounds=3 \
        --gossip-arg=--peer-arg=--lora-rank=2 --gossip-arg=--peer-arg=--dp-sample-rate=0.1 \
        --gossip-arg=--peer-arg=--merge-weights=equal --local-arg=--lr=0.004 \
        --central-arg=--batch-size=64 --central-arg=--lr=0.003
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scripts import canary, simulate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where the results go")
    parser.add_argument("--out", type=Path, default=Path("bench-privacy-out"),
                        help="the simulations' folders")
    parser.add_argument("--epsilons", default="inf,8,4,1", help="ε values; inf: no DP")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ of every DP peer")
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clip C")
    parser.add_argument("--peers", type=int, default=8, help="peers of gossip and local")
    # Sized to finish in about 20 minutes on 2 shared cores (12 simulations).
    parser.add_argument("--rounds", type=int, default=3, help="training rounds per peer")
    parser.add_argument("--steps-per-round", type=int, default=2, help="steps per round")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="examples per step (DP: the expected size of a Poisson sample)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per example")
    parser.add_argument("--lr", type=float, default=6e-3, help="AdamW learning rate")
    parser.add_argument("--model", default="builtin-small",
                        help="builtin-small (4 layers; the tests' model) or builtin")
    parser.add_argument("--repeats", default="1,10", help="canary insertions, one canary each")
    parser.add_argument("--candidates", type=int, default=1000,
                        help="never-inserted canaries each canary is ranked among")
    parser.add_argument("--nulls", type=int, default=100,
                        help="never-inserted canaries whose exposure gives the null spread")
    parser.add_argument("--timing-steps", type=int, default=5,
                        help="alternated timings of each step kind (median kept)")
    parser.add_argument("--seed", type=int, default=0, help="canaries, data split, LoRA init")
    parser.add_argument("--exposure-model", default=None, metavar="MODEL",
                        help="measure exposure in separate gossip runs of this model (see above)")
    parser.add_argument("--exposure-peers", type=int, default=None, metavar="N")
    parser.add_argument("--exposure-rounds", type=int, default=None, metavar="N")
    parser.add_argument("--exposure-steps-per-round", type=int, default=None, metavar="N")
    parser.add_argument("--only", choices=("utility", "exposure"), default=None,
                        help="run only this part")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs the JSON already holds; run the others")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="utility runs of each (ε, mode): their mean is the mode's value")
    parser.add_argument("--sim-arg", action="append", default=[], metavar="ARG",
                        help="extra scripts/simulate.py argument for every run (repeatable), "
                        "e.g. --sim-arg=--peer-arg=--dp-sample-rate=0.1")
    for mode in simulate.MODES:
        parser.add_argument(f"--{mode}-arg", action="append", default=[], metavar="ARG",
                            help=f"extra scripts/simulate.py argument for the {mode} runs only "
                            f"(repeatable; after --sim-arg), e.g. --{mode}-arg=--lr=0.004")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def exposure_args(args: argparse.Namespace) -> argparse.Namespace:
    """The settings of the separate exposure runs (`--exposure-*`), in OUT/exposure."""
    found = argparse.Namespace(**vars(args))
    found.model = args.exposure_model
    found.out = args.out / "exposure"
    for name in ("peers", "rounds", "steps_per_round"):
        value = getattr(args, f"exposure_{name}")
        if value is not None:
            setattr(found, name, value)
    return found


def _key(epsilon: str) -> str:
    return "inf" if epsilon == "inf" else f"{float(epsilon):g}"


def run_folder(args: argparse.Namespace, epsilon: str, mode: str, run: int = 0) -> Path:
    """Where a run's simulation goes: OUT/ε/MODE, then OUT/ε/MODE-2, ... for `--runs`."""
    return args.out / _key(epsilon) / (mode if run == 0 else f"{mode}-{run + 1}")


def run_mode(args: argparse.Namespace, epsilon: str, mode: str, inserted: Path,
             run: int = 0) -> float:
    """One `simulate.py` run (`--compare`'s settings, then --sim-arg and the mode's own) at
    `epsilon`; its mean final eval loss."""
    dp = [] if epsilon == "inf" else [f"--peer-arg=--dp-epsilon={epsilon}",
                                      f"--peer-arg=--dp-delta={args.delta}",
                                      f"--peer-arg=--dp-clip={args.clip}"]
    sim = simulate.parse_args([
        "--mode", mode, "--in-process", "--peers", str(args.peers), "--rounds",
        str(args.rounds), "--steps-per-round", str(args.steps_per_round), "--batch-size",
        str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--model",
        args.model, "--eval-every", str(args.rounds), "--seed", str(args.seed), "--insert",
        str(inserted), "--out", str(run_folder(args, epsilon, mode, run)), *dp,
        *args.sim_arg, *getattr(args, f"{mode}_arg")])
    return float(simulate.run(sim)["mean_eval_loss"])


def _losses(utility: dict[str, Any], mode: str) -> list[float]:
    """The losses of `mode`'s utility runs that a JSON holds (one written before --runs
    existed holds the mode's value alone)."""
    runs = utility.get(f"{mode}_runs")
    return list(runs) if runs else [utility[mode]] if mode in utility else []


def schedule(epsilons: list[str]) -> list[tuple[str, str]]:
    """(ε, mode) in the order that makes a stopped run most useful: the gossip runs of the
    first two ε (the canaries' exposure without and with DP) first, then their baselines,
    then the other ε."""
    first = epsilons[:2]
    order = [(eps, "gossip") for eps in first] + [(eps, mode) for eps in first
                                                  for mode in ("local", "central")]
    return order + [(eps, mode) for eps in epsilons[2:] for mode in simulate.MODES]


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Every run, in order: (ε, mode), where mode "exposure" is a separate exposure run."""
    epsilons = args.epsilons.split(",")
    runs = [] if args.only == "exposure" else schedule(epsilons)
    if args.exposure_model is not None and args.only != "utility":
        runs = [(eps, "exposure") for eps in epsilons[:2]] + runs
    return runs


def run_exposure(args: argparse.Namespace, epsilon: str, planted: dict[str, int],
                 candidates: list[str], nulls: list[float]) -> dict[str, Any]:
    """Exposure of the planted canaries under p0's (owner) and p1's (neighbour) adapters.

    `owner` and `neighbour` are the most-inserted canary's; `by_k` has each; the null
    exposures measured under both adapters are added to `nulls`.
    """
    from peft import PeftModel

    from peer.model import load_base, resolve_model

    peers = run_folder(args, epsilon, "gossip") / "peers"
    most = max(planted.values())
    found: dict[str, Any] = {"by_k": {str(k): {} for k in planted.values()}}
    for role, folder in (("owner", "p0"), ("neighbour", "p1")):
        base, tokenizer = load_base(resolve_model(args.model))
        model = PeftModel.from_pretrained(base, str(peers / folder / "export"))
        by_k, null = canary.measure(model, tokenizer, planted, candidates, nulls=args.nulls)
        found[role] = round(by_k[most], 3)
        for k, value in by_k.items():
            found["by_k"][str(k)][role] = round(value, 3)
        found[f"null_{role}"] = canary.spread(null)
        nulls.extend(null)
    return found


def time_steps(args: argparse.Namespace, shard: Path) -> dict[str, Any]:
    """A DP step's time over a plain step's on the same batch; per-example gradient paths."""
    from peer.config import TrainConfig
    from peer.data import TokenBatches, load_examples
    from peer.dpsgd import per_example_grads
    from peer.model import LoraSettings, attach_lora, load_base, resolve_model
    from peer.privacy import PrivacyConfig, plan
    from peer.trainer import LocalTrainer

    base, tokenizer = load_base(resolve_model(args.model))
    model = attach_lora(base, LoraSettings(), args.seed)
    config = TrainConfig(steps_per_round=1, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr)
    batches = TokenBatches(load_examples(shard), tokenizer, seq_len=args.seq_len,
                           batch_size=args.batch_size, seed=args.seed)
    ledger = plan(PrivacyConfig(epsilon=8.0, delta=args.delta, clip=args.clip, noise=1.0),
                  examples=len(batches), batch_size=args.batch_size, steps=0)
    trainer = LocalTrainer(model, batches, config, ledger=ledger)
    batch = batches.next_batch()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    gsm = _opacus_grad_sampler(args)
    paths = {"plain": lambda: trainer.step(batch), "dp": lambda: trainer.private_step(batch),
             "torch_func": lambda: per_example_grads(model, params, batch),
             "opacus_hooks": lambda: gsm(batch)}
    kept: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(args.timing_steps + 1):  # the first, untimed, warms every path up
        for name, path in paths.items():
            seconds = _timed(path)
            if rep:
                kept[name].append(seconds)
    median = {name: statistics.median(values) for name, values in kept.items()}
    return {"step_time_ratio": round(median["dp"] / median["plain"], 3),
            "step_s": {name: round(median[name], 4) for name in ("plain", "dp")},
            "grad_samplers_s": {name: round(median[name], 4)
                                for name in ("torch_func", "opacus_hooks")},
            "batch": list(batch["input_ids"].shape)}


def _opacus_grad_sampler(args: argparse.Namespace) -> Any:
    """Per-example gradients of the same LoRA factors by Opacus's GradSampleModule hooks:
    a function of a batch that returns {parameter name: (B, *shape)}."""
    from opacus import GradSampleModule

    from peer.model import LoraSettings, attach_lora, load_base, resolve_model

    base, _ = load_base(resolve_model(args.model))
    model = attach_lora(base, LoraSettings(), args.seed)
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def grads(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = wrapped(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                ignore_index=-100, reduction="none")
        per_example = nll.sum(dim=1) / (targets != -100).sum(dim=1).clamp(min=1)
        per_example.sum().backward()
        found = {n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}
        wrapped.zero_grad(set_to_none=True)
        return found

    return grads


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    repeats = [int(k) for k in args.repeats.split(",")]
    drawn = canary.secrets(len(repeats) + args.candidates, rng)
    planted = dict(zip(drawn[: len(repeats)], repeats, strict=True))
    candidates = drawn[len(repeats):]
    inserted = canary.write_canaries(args.out / "canaries.jsonl", planted)
    result: dict[str, Any] = {"utility": {}, "exposure": {}}
    if args.resume and args.json.exists():
        result = json.loads(args.json.read_text())
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    nulls: list[float] = []
    separate = args.exposure_model is not None
    for epsilon, mode in plan(args):
        started = time.monotonic()
        utility = result["utility"].setdefault(_key(epsilon), {})
        name = "no_dp" if epsilon == "inf" else f"dp_eps{_key(epsilon)}"
        if mode == "exposure":
            if not (args.resume and name in result["exposure"]):
                run_mode(exposure_args(args), epsilon, "gossip", inserted)
                result["exposure"][name] = run_exposure(exposure_args(args), epsilon, planted,
                                                        candidates, nulls)
                result["exposure"][name]["wall_s"] = round(time.monotonic() - started, 1)
        elif not (args.resume and len(_losses(utility, mode)) >= args.runs):
            losses = _losses(utility, mode) if args.resume else []
            for run in range(len(losses), args.runs):
                losses.append(run_mode(args, epsilon, mode, inserted, run))
                if run == 0 and mode == "gossip" and not separate and args.only != "utility":
                    result["exposure"][name] = run_exposure(args, epsilon, planted,
                                                            candidates, nulls)
                utility[f"{mode}_runs"] = losses
                utility[mode] = statistics.fmean(losses)
                args.json.write_text(json.dumps(result, indent=2))
            utility[f"{mode}_wall_s"] = round(time.monotonic() - started, 1)
        if nulls:
            result["exposure"]["null"] = canary.spread(nulls)
        if "step_time_ratio" not in result and mode != "exposure":  # on the first run's shard 0
            result.update(time_steps(args, run_folder(args, epsilon, mode) / "data"
                                     / "shard-0.jsonl"))
        args.json.write_text(json.dumps(result, indent=2))  # partial results survive a stop
    print(json.dumps({k: result.get(k) for k in ("utility", "exposure", "step_time_ratio")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
