"""Measure the wire codecs on a Qwen2-0.5B-shaped adapter: bytes, error, and error-feedback lag.

The adapter is `bench_merge.random_adapter`'s (hidden 896, 24 layers, r = 16 on q, k, v, o:
96 pairs, 2,162,688 float32 parameters, 8.65 MB). Training is imitated by `--rounds` dense
drifts of every tensor (Gaussian, `--drift` x the tensor's RMS per round, rows moving by
lognormal factors), not by real gradients: real updates may compress differently under zstd.

Per codec:
  * whole_bytes, rel_error: the whole adapter encoded once by the codec (a one-shot lossy copy;
    the estimate's keyframes are always fp32, zstd-wrapped when the codec is), and
    ||decode(x) - x|| / ||x||;
  * step_bytes: mean bytes of one error-feedback step while the adapter drifts;
  * lag: ||x - x̂|| / ||x_R - x_0|| after the last round, the share of the training movement
    still "in flight" in the residual (0 for exact codecs; the price of sparsity);
  * lag_rounds: ||x - x̂|| / ||x_R - x_(R-1)||, the residual in units of one round's movement
    (it settles after a few rounds, where `lag` keeps shrinking as the walk grows);
  * encode_s, decode_s: one step's codec time on one CPU thread.

Examples:
    python scripts/bench_codecs.py --json bench-codecs.json
    python scripts/bench_codecs.py --json out.json --rounds 20 --codecs int8+zstd topk:0.05+zstd
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gossip.compress import parse_codec, shapes_of
from gossip.estimate import PublicEstimate
from scripts.bench_merge import HIDDEN, KV_OUT, LAYERS, RANK, random_adapter

CODECS = ("fp32", "bf16", "int8", "topk:0.01", "topk:0.05", "topk:0.1")
State = dict[str, torch.Tensor]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, metavar="FILE")
    parser.add_argument("--codecs", nargs="+", metavar="SPEC",
                        default=[c + z for c in CODECS for z in ("", "+zstd")])
    parser.add_argument("--rounds", type=int, default=10, help="drift rounds (steps) per codec")
    parser.add_argument("--drift", type=float, default=0.01, help="per-round drift / tensor RMS")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def norm(state: State) -> float:
    return float(sum(float((t.double() ** 2).sum()) for t in state.values())) ** 0.5


def drift(state: State, gen: torch.Generator, amount: float) -> State:
    out = {}
    for name, t in state.items():
        rows = torch.exp(0.5 * torch.randn(t.shape[0], 1, generator=gen))
        step = torch.randn(t.shape, generator=gen) * rows
        out[name] = t + amount * float(t.pow(2).mean().sqrt()) * step
    return out


def measure(spec: str, start: State, rounds: int, amount: float, seed: int) -> dict:
    codec = parse_codec(spec)
    shapes = shapes_of(start)
    whole = codec.encode(start)
    decoded = codec.decode(whole, shapes=shapes, max_bytes=len(whole))
    gen = torch.Generator().manual_seed(seed)
    server = PublicEstimate(start, codec, keep=1)
    x, sizes, encode_s, decode_s = start, [], 0.0, 0.0
    for _ in range(rounds):
        previous, x = x, drift(x, gen, amount)
        began = time.perf_counter()
        payload = codec.encode({k: x[k] - v for k, v in server.estimate.items()})
        encode_s += time.perf_counter() - began
        began = time.perf_counter()
        codec.decode(payload, shapes=shapes, max_bytes=len(payload))
        decode_s += time.perf_counter() - began
        sizes.append(len(server.step(x).payload))
    moved = norm({k: x[k] - start[k] for k in x})
    behind = norm({k: x[k] - v for k, v in server.estimate.items()})
    return {
        "whole_bytes": len(whole),
        "rel_error": norm({k: decoded[k] - start[k] for k in start}) / norm(start),
        "step_bytes": sum(sizes) / len(sizes),
        "lag": behind / moved,
        "lag_rounds": behind / norm({k: x[k] - previous[k] for k in x}),
        "encode_s": encode_s / rounds, "decode_s": decode_s / rounds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = random_adapter(torch.Generator().manual_seed(args.seed))
    rows = {spec: measure(spec, start, args.rounds, args.drift, args.seed)
            for spec in args.codecs}
    fp32 = 4 * sum(t.numel() for t in start.values())
    for spec, row in rows.items():
        row["ratio_vs_fp32"] = fp32 / row["whole_bytes"]
        row["ratio_vs_bf16"] = fp32 / 2 / row["whole_bytes"]
        row["step_ratio_vs_fp32"] = fp32 / row["step_bytes"]
        print(f"{spec:16} whole {row['whole_bytes']:>10,} B  x{row['ratio_vs_fp32']:5.1f}"
              f"  err {row['rel_error']:.2e}  step {row['step_bytes']:>12,.0f} B"
              f"  lag {row['lag']:.3f} ({row['lag_rounds']:.2f} rounds)"
              f"  enc {row['encode_s']:.3f}s dec {row['decode_s']:.3f}s")
    result = {"shape": {"hidden": HIDDEN, "layers": LAYERS, "rank": RANK, "kv_out": KV_OUT,
                        "params": fp32 // 4, "fp32_bytes": fp32},
              "rounds": args.rounds, "drift": args.drift, "codecs": rows}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
