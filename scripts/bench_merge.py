"""Benchmark the merge rules on a 0.5B-class adapter, and measure what averaging factors costs.

The shape is Qwen2-0.5B's: hidden size 896, 24 layers, LoRA r = 16 on q, k, v and o. Qwen2 uses
grouped-query attention (2 KV heads of 64), so k_proj and v_proj map 896 -> 128; q_proj and
o_proj map 896 -> 896. That is 96 LoRA pairs, 2,162,688 parameters (8.65 MB in float32) per adapter.

Two measurements:
  * time per rule to merge self + N neighbours (`merge_states`, as the daemon calls it), as a
    ratio to a bare torch weighted sum of the same tensors timed in the same run (median of
    `--repeats`, the rules and the sum timed in turn); the JSON's `worst` names the costliest
    rule, against `TIME_RATIO_LIMIT`;
  * relative error of the merged delta against the exact weighted average of the deltas,
    ||B A - sum_i w_i B_i A_i|| / ||sum_i w_i B_i A_i|| over all pairs, for `average`
    (B_bar A_bar) and `product`, on disagreeing adapters: independent random factors (the JSON's
    `rel_error`), adapters that drifted from a shared init by a relative amount, and optionally
    real adapters from safetensors files.

Examples:
    python scripts/bench_merge.py --json bench-merge.json
    python scripts/bench_merge.py --json out.json --neighbours 4 --repeats 3
    python scripts/bench_merge.py --json out.json --adapters peer0.safetensors peer1.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from merge.config import MergeConfig
from merge.errors import RejectedUpdate
from merge.registry import RULES
from merge.registry import rule as rule_entry
from merge.rules import merge_states
from merge.tensors import lora_pairs
from merge.types import AdapterState, Contribution
from merge.validate import validate_update
from merge.weights import merge_weights

HIDDEN, LAYERS, RANK, KV_OUT = 896, 24, 16, 128
MODULES = {"q_proj": HIDDEN, "k_proj": KV_OUT, "v_proj": KV_OUT, "o_proj": HIDDEN}
DRIFTS = (0.05, 0.2, 1.0)
# Issue 17's budget: no rule may cost more than this many bare weighted sums.
TIME_RATIO_LIMIT = 25.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="FILE",
                        help="where to write {time_ratio, worst, rel_error, ...}")
    parser.add_argument("--neighbours", type=int, default=8, help="adapters merged into ours")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per rule")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapters", type=Path, nargs="+", metavar="FILE",
                        help="safetensors adapters (ours first) for a real-data error row")
    args = parser.parse_args(argv)
    if args.neighbours < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--neighbours, --repeats and --threads must be at least 1")
    if args.adapters is not None and len(args.adapters) < 2:
        parser.error("--adapters needs at least two files (ours and a neighbour's)")
    return args


def random_adapter(gen: torch.Generator) -> AdapterState:
    """Independent factors at LoRA-like scales: A Kaiming-like, B as after some training."""
    state: AdapterState = {}
    for layer in range(LAYERS):
        for module, d_out in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=gen) / 30.0
            state[f"{prefix}.lora_B.weight"] = 0.01 * torch.randn(d_out, RANK, generator=gen)
    return state


def swarm(seed: int, count: int, drift: float | None) -> list[Contribution]:
    """Self and `count` neighbours: independent (drift None) or a shared init plus drift."""
    gen = torch.Generator().manual_seed(seed)
    shared = random_adapter(gen)
    states = []
    for _ in range(count + 1):
        fresh = random_adapter(gen)
        states.append(fresh if drift is None else
                      {key: shared[key] + drift * fresh[key] for key in shared})
    return [Contribution(state, samples=64 * (1 + i % 3), age=i % 2, peer=f"p{i}" if i else "")
            for i, state in enumerate(states)]


def median_seconds(works: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each work, timed round-robin: the load of a shared machine drifts, and
    a ratio of two works is only fair if each repeat of one is timed next to one of the other."""
    for work in works.values():
        work()  # warm-up: allocator and LAPACK workspaces
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bare_weighted_sum(states: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float]) -> AdapterState:
    """The baseline: sum_i w_i theta_i per tensor in plain torch, no checks and no casts."""
    out = {}
    for key in states[0]:
        total = states[0][key] * weights[0]
        for state, weight in zip(states[1:], weights[1:], strict=True):
            total.add_(state[key], alpha=weight)
        out[key] = total
    return out


def time_rules(contributions: list[Contribution], repeats: int) -> tuple[float, dict[str, float]]:
    own, others = contributions[0], contributions[1:]
    weights = merge_weights(own, others, MergeConfig())
    states = [c.state for c in contributions]
    works: dict[str, Callable[[], object]] = {
        "bare": lambda: bare_weighted_sum(states, weights),
        **{rule: partial(merge_states, own, others, MergeConfig(rule=rule, trim=1))
           for rule in RULES},
    }
    seconds = median_seconds(works, repeats)
    return seconds.pop("bare"), seconds


def delta_errors(contributions: list[Contribution],
                 merged: Mapping[str, AdapterState]) -> dict[str, float]:
    """Per merged state: ||B A - sum_i w_i B_i A_i|| / ||sum_i w_i B_i A_i|| over all pairs."""
    own, others = contributions[0], contributions[1:]
    weights = merge_weights(own, others, MergeConfig())
    error_sq, target_sq = dict.fromkeys(merged, 0.0), 0.0
    for a_key, b_key in lora_pairs(own.state).values():
        target = torch.zeros(own.state[b_key].shape[0], own.state[a_key].shape[1],
                             dtype=torch.float64)
        for contribution, weight in zip(contributions, weights, strict=True):
            target += weight * (contribution.state[b_key].double()
                                @ contribution.state[a_key].double())
        target_sq += float(torch.linalg.matrix_norm(target)) ** 2
        for name, state in merged.items():
            got = state[b_key].double() @ state[a_key].double()
            error_sq[name] += float(torch.linalg.matrix_norm(got - target)) ** 2
    return {name: math.sqrt(value / target_sq) if target_sq > 0 else 0.0
            for name, value in error_sq.items()}


def rule_errors(contributions: list[Contribution]) -> dict[str, float]:
    """Relative delta error of `average` and `product` over the neighbours each accepts."""
    own, others = contributions[0], contributions[1:]
    # A neighbour that fails validation is dropped, as the daemon would drop it; rules that
    # accept the same neighbours share one exact target (the dense products are the slow part).
    merged: dict[tuple[str, ...], dict[str, AdapterState]] = {}
    for rule in ("average", "product"):
        config = MergeConfig(rule=rule)
        accepted = [other for other in others if _valid(own, other, config)]
        if accepted:
            peers = tuple(other.peer for other in accepted)
            merged.setdefault(peers, {})[rule] = merge_states(own, accepted, config)
    by_peer = {c.peer: c for c in others}
    errors: dict[str, float] = {}
    for peers, states in merged.items():
        errors.update(delta_errors([own, *(by_peer[p] for p in peers)], states))
    return errors


def _valid(own: Contribution, other: Contribution, config: MergeConfig) -> bool:
    try:
        validate_update(own.state, other.state, config,
                        allow_rank_change=rule_entry(config.rule).rank_free)
    except RejectedUpdate:
        return False
    return True


def load_adapters(paths: Sequence[Path]) -> list[Contribution]:
    from safetensors.torch import load_file

    return [Contribution(load_file(str(path)), samples=1, peer=f"p{i}" if i else "")
            for i, path in enumerate(paths)]


def worst_rule(ratios: Mapping[str, float], errors: Mapping[str, float],
               limit: float = TIME_RATIO_LIMIT) -> dict[str, object]:
    """The costliest rule, its time ratio against `limit`, and its relative delta error (None
    for a rule whose error is not measured)."""
    name = max(ratios, key=lambda rule: ratios[rule])
    return {"rule": name, "time_ratio": ratios[name], "limit": limit,
            "within_limit": ratios[name] <= limit, "rel_error": errors.get(name)}


def show(console: Console, bare: float, seconds: dict[str, float],
         errors: dict[str, dict[str, float]], neighbours: int, worst: Mapping[str, object]) -> None:
    timing = Table(title=f"merge of self + {neighbours} neighbours "
                         f"({LAYERS} layers x q,k,v,o, r={RANK}, k/v out {KV_OUT})")
    for column in ("rule", "median ms", "x bare weighted sum"):
        timing.add_column(column, justify="right")
    timing.add_row("bare torch sum", f"{1e3 * bare:.1f}", "1.0")
    for rule, value in seconds.items():
        timing.add_row(rule, f"{1e3 * value:.1f}", f"{value / bare:.1f}")
    console.print(timing)
    verdict = "within" if worst["within_limit"] else "OVER"
    console.print(f"worst: {worst['rule']} at {worst['time_ratio']:.1f}x, {verdict} the "
                  f"{worst['limit']:g}x limit")
    table = Table(title="relative error of the merged delta vs sum_i w_i B_i A_i")
    for column in ("adapters", "average (B_bar A_bar)", "product (rank-r SVD)"):
        table.add_column(column, justify="right")
    for name, row in errors.items():
        table.add_row(name, *(f"{row[r]:.4f}" if r in row else "-" for r in ("average", "product")))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random_swarm = swarm(args.seed, args.neighbours, drift=None)
    bare, seconds = time_rules(random_swarm, args.repeats)
    errors = {"independent random": rule_errors(random_swarm)}
    for drift in DRIFTS:
        errors[f"shared init + {drift:g} drift"] = rule_errors(
            swarm(args.seed + 1, args.neighbours, drift))
    if args.adapters:
        errors["--adapters files"] = rule_errors(load_adapters(args.adapters))
    ratios = {rule: value / bare for rule, value in seconds.items()}
    worst = worst_rule(ratios, errors["independent random"])
    show(Console(), bare, seconds, errors, args.neighbours, worst)
    result = {
        "time_ratio": ratios,
        "worst": worst,
        "rel_error": errors["independent random"],
        "rel_error_by_drift": {f"{d:g}": errors[f"shared init + {d:g} drift"] for d in DRIFTS},
        "seconds": {"bare": bare, **seconds},
        "shape": {"hidden": HIDDEN, "layers": LAYERS, "rank": RANK, "kv_out": KV_OUT,
                  "neighbours": args.neighbours, "threads": args.threads,
                  "repeats": args.repeats},
    }
    if args.adapters:
        result["rel_error_adapters"] = errors["--adapters files"]
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
