"""Small random sketches of adapters, so that metrics can track how far peers are apart.

A metrics line cannot carry a whole adapter (hundreds of thousands of numbers), but it can
carry `dim` numbers. `sketch` is a count sketch of the flattened adapter θ: every coordinate i
has a fixed bucket h(i) ∈ [0, dim) and sign σ(i) = ±1, and s_j = Σ_{i: h(i) = j} σ(i)·θ_i.
Every peer that uses the same seed uses the same h and σ, so s is a fixed linear map of θ, and
distances between sketches approximate distances between adapters: E‖s₁ − s₂‖² = ‖θ₁ − θ₂‖²,
with variance (2/dim)·(‖δ‖₂⁴ − ‖δ‖₄⁴) for δ = θ₁ − θ₂, never more than the √(2/dim) relative
standard deviation of a Gaussian (Johnson–Lindenstrauss) projection (about 18 % for the squared
distance at dim = 64, 9 % for the distance itself).

Each tensor has its own h and σ, drawn once per process from a generator seeded with (seed,
tensor name) and kept (4 bytes a parameter: 1.8 MB for the built-in model's 460,800 LoRA
parameters), so the sketch depends on neither the order of the keys nor the other tensors,
and a sketch costs one pass over the adapter. An earlier version projected onto Gaussian
directions drawn anew for every sketch: 0.13 s a metrics line here, and 6.5 s on an H100
machine's CPU, where it was 92 % of a GPU peer's wall time.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping

import torch

__all__ = ["adapter_norm", "sketch"]

# Tensors whose buckets are kept: more than any adapter has (the built-in model's has 120).
_KEPT_TENSORS = 8192


def sketch(state: Mapping[str, torch.Tensor], dim: int = 64, seed: int = 0) -> list[float]:
    """Count-sketch a flattened adapter into `dim` numbers.

    Args:
        state: tensor name -> tensor, on any device and in any float dtype (summed in float64
            on the CPU).
        dim: the sketch length; distances are kept within a relative error of at most about
            1/√(2·dim) (one standard deviation).
        seed: peers must use the same seed for their sketches to be comparable.

    Returns:
        `dim` floats; the sketch of an empty state is all zeros.

    Raises:
        ValueError: dim is below 1.
    """
    if dim < 1:
        raise ValueError(f"the sketch dimension must be at least 1, got {dim}")
    # Bucket b < dim adds to s_b, bucket b >= dim subtracts from s_(b - dim).
    signed = torch.zeros(2 * dim, dtype=torch.float64)
    for name in sorted(state):
        flat = state[name].detach().reshape(-1).to("cpu", torch.float64)
        signed.index_add_(0, _buckets(seed, name, flat.numel(), dim), flat)
    return (signed[:dim] - signed[dim:]).tolist()


def adapter_norm(state: Mapping[str, torch.Tensor]) -> float:
    """The Euclidean norm of the flattened adapter: √(Σ over tensors of ‖tensor‖²)."""
    squares = sum(float(torch.sum(t.detach().to(torch.float64) ** 2)) for t in state.values())
    return squares ** 0.5


@functools.lru_cache(maxsize=_KEPT_TENSORS)
def _buckets(seed: int, name: str, numel: int, dim: int) -> torch.Tensor:
    """Each coordinate's signed bucket in [0, 2·dim), the same in every process (int32)."""
    generator = torch.Generator().manual_seed(_seed_of(seed, name))
    return torch.randint(0, 2 * dim, (numel,), generator=generator, dtype=torch.int32)


def _seed_of(seed: int, name: str) -> int:
    # Python's hash() of a str changes between processes; a digest is the same for every peer.
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes up to 2**63 - 1
