"""Measure whether a 4-bit (nf4) base can share a swarm with the same base in bf16.

A QLoRA peer's frozen base is the nf4-quantized version of the swarm's weights (double
quantization, bf16 compute), so its LoRA factors train against a slightly different function
than a bf16 peer's. Peers average factors coordinate-wise; this bench measures what that costs.

2-peer swarms run as a synchronous loop, real trainer and real merge, no network: both peers
train one round, both adopt `merge_states` of the two adapters, repeat `--rounds` times.
  * bf16+bf16, bf16+nf4 (mixed) and nf4+nf4; peer 1 always trains on shard 1, peer 2 on shard 2,
    with the same batch seeds, so the only difference between the swarms is the bases; a fourth,
    bf16+bf16 with other batch seeds, shows how much batch order alone moves the loss;
  * each swarm's final adapter is evaluated on the bf16 base and on the nf4 base, next to the
    untrained bases (the quantization gap) and the distance between the mixed and bf16 adapters;
  * decision: the mixed swarm shares the swarm id when, on each base, its eval loss is within
    `--tolerance` x the training gain of that base's own swarm (gain = base loss - trained loss).
Also the speed of one training step (tokens/s) on the nf4, bf16 and float32 bases.

Decide on `--model builtin`: `builtin-small` keeps 4 of 30 layers, so its base loss is near 19
nats and most of its gain repairs the cut, which dwarfs any penalty.

`peer.device.resolve` refuses 4-bit without CUDA; this bench builds the placement itself and runs
bitsandbytes' CPU path only to measure, on the same CPU as the other bases.

Examples:
    python scripts/bench_quant.py --json bench-quant.json
    python scripts/bench_quant.py --json out.json --model builtin --rounds 4 --steps 2 --seed 1
    python scripts/bench_quant.py --json out.json --rounds 8 --steps 4 --speed-steps 0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.table import Table

from merge.config import MergeConfig
from merge.rules import merge_states
from merge.tensors import lora_pairs, state_norm
from merge.types import AdapterState, Contribution
from peer.config import TrainConfig
from peer.data import TokenBatches, eval_batches
from peer.device import Placement
from peer.model import LoraSettings, attach_lora, load_base, resolve_model
from peer.trainer import LocalTrainer
from testbed.corpora import split_builtin

PLACEMENTS = {
    "float32": Placement(dtype=torch.float32),
    "bf16": Placement(dtype=torch.bfloat16),
    "nf4": Placement(device=torch.device("cpu"), dtype=torch.bfloat16, quantize="4bit"),
}
MIXED, RESHUFFLED = "bf16+nf4", "bf16+bf16 reshuffled"
# name -> (peer 1's base, peer 2's base), offset of both peers' batch seeds. The reshuffled
# bf16 swarm sees the same shards in another order: how far batch order alone moves the loss.
SWARMS = {"bf16+bf16": (("bf16", "bf16"), 0), MIXED: (("bf16", "nf4"), 0),
          "nf4+nf4": (("nf4", "nf4"), 0), RESHUFFLED: (("bf16", "bf16"), 1000)}
T = TypeVar("T")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="FILE",
                        help="where to write {base_loss, swarms, gain, decision, speed, ...}")
    parser.add_argument("--model", default="builtin-small", help="as `loraswarm peer --model`")
    parser.add_argument("--rounds", type=int, default=5, help="train + merge rounds per swarm")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--corpus", default="chat", help="built-in corpus: chat or plays")
    parser.add_argument("--eval-per-category", type=int, default=2,
                        help="held-out eval examples per category")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="the mixed swarm's allowed penalty, as a fraction of the gain")
    parser.add_argument("--speed-steps", type=int, default=5,
                        help="timed training steps per base, after a warm-up step (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="split, LoRA init and batch seeds")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.batch_size, args.threads) < 1 or args.speed_steps < 0:
        parser.error("--rounds, --steps, --batch-size and --threads must be >= 1, "
                     "--speed-steps >= 0")
    if not 0 <= args.tolerance < 1:
        parser.error("--tolerance must be in [0, 1)")
    return args


@dataclass
class Setup:
    """Everything the swarms share: one LoRA-wrapped model per base, the data, the start."""

    models: dict[str, Any]
    shards: list[list[str]]
    eval: list[dict[str, torch.Tensor]]
    initial: AdapterState
    tokenizer: Any


def build(args: argparse.Namespace) -> Setup:
    """1. Split the data; 2. load each base and attach the seeded adapter (equal on all)."""
    split = split_builtin(2, seed=args.seed, eval_per_category=args.eval_per_category,
                          corpus=args.corpus)
    model_dir = resolve_model(args.model)
    models: dict[str, Any] = {}
    tokenizer: Any = None
    for name, placement in PLACEMENTS.items():
        base, tokenizer = load_base(model_dir, placement)
        if placement.quantize:
            keep_training_path(base)
        models[name] = attach_lora(base, LoraSettings(), args.seed)
    held_out = eval_batches(split.eval, tokenizer, seq_len=args.seq_len,
                            batch_size=args.batch_size)
    initial = trainer_for(models["bf16"], split.shards[0], tokenizer, args, 0).state()
    return Setup(models, split.shards, held_out, initial, tokenizer)


def keep_training_path(base: Any) -> None:
    """Keep bitsandbytes' CPU inference repacking off, so a 4-bit base still trains after eval.

    On a CPU with AVX512-BF16, the first forward of a Linear4bit in eval mode without grad
    repacks its weight for a fused kernel (`gemv_4bit`, absmax rounded to bf16) and keeps that
    format; that kernel has no backward, so every later training step gives no LoRA factor a
    gradient (measured: after one eval, no A had a grad and every B stayed zero, with only a
    "gemv_4bit: an autograd kernel was not registered" warning) and the nf4 peer silently stops
    learning. Turned off, eval runs the same dequantize-and-matmul as training.
    """
    for module in base.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def trainer_for(model: Any, texts: Sequence[str], tokenizer: Any, args: argparse.Namespace,
                data_seed: int, *, steps: int = 0, stream: type[TokenBatches] = TokenBatches,
                ) -> LocalTrainer:
    config = TrainConfig(steps_per_round=steps or args.steps, batch_size=args.batch_size,
                         seq_len=args.seq_len, lr=args.lr, data_seed=data_seed)
    batches = stream(texts, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                     seed=data_seed)
    return LocalTrainer(model, batches, config)


def run_swarm(setup: Setup, bases: tuple[str, str], args: argparse.Namespace,
              reshuffle: int = 0) -> AdapterState:
    """Train both peers a round from the shared state, then both adopt the merge; repeat.

    Peers on the same base share its model but each has its own trainer (batch stream and
    AdamW moments, as a real peer keeps them across merges); each loads the merged state
    before it trains, so sharing the weights changes nothing.
    """
    peers = [trainer_for(setup.models[base], shard, setup.tokenizer, args,
                         args.seed + reshuffle + i)
             for i, (base, shard) in enumerate(zip(bases, setup.shards, strict=True))]
    state = setup.initial
    for _ in range(args.rounds):
        states = []
        for trainer in peers:
            trainer.load_state(state)
            trainer.train_round()
            states.append(trainer.state())
        own, other = (Contribution(s, samples=t.samples, peer=f"p{i}")
                      for i, (s, t) in enumerate(zip(states, peers, strict=True)))
        state = merge_states(own, [other], MergeConfig())
    return state


def eval_on(setup: Setup, base: str, state: AdapterState, args: argparse.Namespace) -> float:
    probe = trainer_for(setup.models[base], setup.shards[0], setup.tokenizer, args, 0)
    probe.load_state(state)
    return probe.eval_loss(setup.eval)


def distances(state: AdapterState, reference: AdapterState,
              initial: AdapterState) -> dict[str, float]:
    """How far `state` is from `reference`, relative to three scales.

    `factors`: ||theta - theta_ref|| / ||theta_ref|| over all factors (dominated by the seeded
    A, which training barely moves); `update`: the same distance over ||theta_ref - theta_0||,
    how far training moved the reference; `delta`: ||B A - B_ref A_ref|| / ||B_ref A_ref||
    over all pairs, the distance between the weight changes the two adapters make.
    """
    diff = {k: state[k] - reference[k] for k in state}
    moved = {k: reference[k] - initial[k] for k in state}
    delta_sq, ref_sq = 0.0, 0.0
    for a_key, b_key in lora_pairs(state).values():
        ours = state[b_key].double() @ state[a_key].double()
        theirs = reference[b_key].double() @ reference[a_key].double()
        delta_sq += float(torch.linalg.matrix_norm(ours - theirs)) ** 2
        ref_sq += float(torch.linalg.matrix_norm(theirs)) ** 2
    return {"factors": state_norm(diff) / state_norm(reference),
            "update": state_norm(diff) / state_norm(moved),
            "delta": math.sqrt(delta_sq / ref_sq)}


class _CountingBatches(TokenBatches):
    """A batch stream that counts the real (unpadded) tokens it hands out."""

    tokens = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = super().next_batch()
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def train_speed(setup: Setup, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median tokens/s, seconds and time / float32's of a training step, after a warm-up step.

    Every base sees the same batches, and the timed steps take turns between the bases, so a
    burst of load from another process on the machine slows all of them alike; the medians
    drop the step that such a burst hit.
    """
    trainers = {name: trainer_for(model, setup.shards[0], setup.tokenizer, args, args.seed,
                                  steps=1, stream=_CountingBatches)
                for name, model in setup.models.items()}
    streams = {name: trainer.batches for name, trainer in trainers.items()
               if isinstance(trainer.batches, _CountingBatches)}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for trainer in trainers.values():
        trainer.load_state(setup.initial)
        trainer.train_round()
    for _ in range(args.speed_steps):
        for name, trainer in trainers.items():
            tokens, start = streams[name].tokens, time.perf_counter()
            trainer.train_round()
            times[name].append(time.perf_counter() - start)
            rates[name].append((streams[name].tokens - tokens) / times[name][-1])
    for trainer in trainers.values():
        trainer.load_state(setup.initial)
    # Step i is the same batch on every base: its time ratio is a paired comparison.
    return {name: {"tokens_per_s": statistics.median(rates[name]),
                   "s_per_step": statistics.median(times[name]),
                   "time_vs_float32": statistics.median(
                       t / f for t, f in zip(times[name], times["float32"], strict=True))}
            for name in trainers}


def decide(base_loss: Mapping[str, float], swarms: Mapping[str, Mapping[str, float]],
           tolerance: float) -> tuple[dict[str, dict[str, float]], str]:
    """Per base: its own swarm's gain, the mixed swarm's penalty; then the verdict.

    `noise` is how far the reshuffled bf16 swarm lands from the bf16 swarm on that base: a
    penalty of that size is what batch order alone does, not the base.
    """
    margins: dict[str, dict[str, float]] = {}
    for base in ("bf16", "nf4"):
        trained = swarms[f"{base}+{base}"][f"eval_{base}"]
        gain = base_loss[base] - trained
        penalty = swarms[MIXED][f"eval_{base}"] - trained
        noise = abs(swarms[RESHUFFLED][f"eval_{base}"] - swarms["bf16+bf16"][f"eval_{base}"])
        margins[base] = {"gain": gain, "penalty": penalty, "noise": noise,
                         "penalty_over_gain": penalty / gain if gain > 0 else math.inf,
                         "noise_over_gain": noise / gain if gain > 0 else math.inf}
    if any(m["gain"] <= 0 for m in margins.values()):
        return margins, "inconclusive: training did not beat the base; run more rounds"
    if all(m["penalty_over_gain"] <= tolerance for m in margins.values()):
        return margins, "same swarm: a 4-bit base is the peer's own business, like its dtype"
    return margins, "separate swarms: the swarm id must include the quantization"


def show(console: Console, result: Mapping[str, Any]) -> None:
    table = Table(title=f"eval loss after {result['rounds']} rounds x {result['steps']} steps "
                        f"({result['model']}, {result['eval_examples']} eval examples)")
    for column in ("adapter", "on bf16 base", "on nf4 base"):
        table.add_column(column, justify="right")
    base = result["base_loss"]
    table.add_row("untrained base", f"{base['bf16']:.4f}", f"{base['nf4']:.4f}")
    for name, row in result["swarms"].items():
        table.add_row(f"swarm {name}", f"{row['eval_bf16']:.4f}", f"{row['eval_nf4']:.4f}")
    labels = {"gain": "gain (own swarm)", "penalty": "penalty (mixed)",
              "penalty_over_gain": "penalty / gain", "noise_over_gain": "batch-order noise / gain"}
    for name, label in labels.items():
        table.add_row(label, *(f"{result['margins'][b][name]:.4f}" for b in ("bf16", "nf4")))
    console.print(table)
    console.print(f"untrained float32 base: {base['float32']:.4f}")
    far = Table(title="distance from the bf16+bf16 swarm's adapter")
    for column in ("swarm", "/ ||factors||", "/ ||bf16 update||", "||BA - B'A'|| / ||B'A'||"):
        far.add_column(column, justify="right")
    for name, row in result["distance"].items():
        far.add_row(name, f"{row['factors']:.4f}", f"{row['update']:.4f}", f"{row['delta']:.4f}")
    console.print(far)
    if result["speed"]:
        show_speed(console, result)
    console.print(f"[bold]decision:[/bold] {result['decision']}")
    if result["model"] == "builtin-small":
        console.print("(builtin-small's gain mostly repairs its 4-layer cut: decide on "
                      "--model builtin)")


def show_speed(console: Console, result: Mapping[str, Any]) -> None:
    speed = Table(title=f"one training step, batch {result['batch_size']} x seq "
                        f"{result['seq_len']}, {result['threads']} CPU thread(s), medians")
    for column in ("base", "tokens/s", "s/step", "time / float32's (same batch)"):
        speed.add_column(column, justify="right")
    for name, row in result["speed"].items():
        speed.add_row(name, f"{row['tokens_per_s']:.0f}", f"{row['s_per_step']:.2f}",
                      f"{row['time_vs_float32']:.2f}")
    console.print(speed)


def timed(seconds: dict[str, float], phase: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = work()
    seconds[phase] = time.perf_counter() - start
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seconds: dict[str, float] = {}
    setup = timed(seconds, "load", lambda: build(args))
    base_loss = timed(seconds, "eval_bases", lambda: {
        name: eval_on(setup, name, setup.initial, args) for name in PLACEMENTS})
    speed = timed(seconds, "speed", lambda: train_speed(setup, args) if args.speed_steps else {})
    final = timed(seconds, "swarms", lambda: {
        name: run_swarm(setup, bases, args, offset) for name, (bases, offset) in SWARMS.items()})
    swarms = timed(seconds, "eval_swarms", lambda: {
        name: {f"eval_{b}": eval_on(setup, b, state, args) for b in ("bf16", "nf4")}
        for name, state in final.items()})
    margins, decision = decide(base_loss, swarms, args.tolerance)
    result = {
        "base_loss": base_loss, "swarms": swarms,
        "gain": {b: m["gain"] for b, m in margins.items()}, "margins": margins,
        "decision": decision, "tolerance": args.tolerance,
        "distance": {name: distances(final[name], final["bf16+bf16"], setup.initial)
                     for name in (MIXED, "nf4+nf4", RESHUFFLED)},
        "speed": speed, "model": args.model, "rounds": args.rounds, "steps": args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
        "threads": args.threads, "eval_examples": sum(len(b["input_ids"]) for b in setup.eval),
        "seconds": seconds, "wall_s": sum(seconds.values()),
    }
    show(Console(), result)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
