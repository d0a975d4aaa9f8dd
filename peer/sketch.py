"""Small random sketches of adapters, so that metrics can track how far peers are apart.

A metrics line cannot carry a whole adapter (hundreds of thousands of numbers), but it can
carry `dim` numbers. `sketch` projects the flattened adapter θ onto `dim` fixed Gaussian
directions, s = Rᵀθ / √dim with R ∈ ℝ^{n×dim}, Rᵢⱼ ~ N(0, 1). Every peer that uses the same
seed uses the same R, so by the Johnson–Lindenstrauss lemma distances between sketches
approximate distances between adapters: ‖s₁ − s₂‖² / ‖θ₁ − θ₂‖² follows χ²(dim)/dim, whose
standard deviation is √(2/dim) (about 18 % for the squared distance at dim = 64, 9 % for the
distance itself).

R is never held whole: each tensor gets its own generator, seeded from (seed, tensor name), and
its rows are drawn in chunks of `_CHUNK` entries, so memory stays at `_CHUNK × dim` floats and
the sketch depends on neither the order of the keys nor the other tensors. Drawing R dominates
the cost: about 0.3 µs per adapter parameter at dim = 64 on one CPU core (0.13 s for the
built-in model's 460,800 LoRA parameters).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

__all__ = ["adapter_norm", "sketch"]

_CHUNK = 1 << 14  # rows of R drawn at a time: 16384 × 64 float32 is 4 MiB


def sketch(state: Mapping[str, torch.Tensor], dim: int = 64, seed: int = 0) -> list[float]:
    """Project a flattened adapter onto `dim` fixed Gaussian directions scaled by 1/√dim.

    Args:
        state: tensor name -> tensor; names are visited in sorted order.
        dim: the sketch length; distances are kept within a relative error of about
            1/√(2·dim) (one standard deviation).
        seed: peers must use the same seed for their sketches to be comparable.

    Returns:
        `dim` floats; the sketch of an empty state is all zeros.

    Raises:
        ValueError: dim is below 1.
    """
    if dim < 1:
        raise ValueError(f"the sketch dimension must be at least 1, got {dim}")
    total = torch.zeros(dim, dtype=torch.float64)
    for name in sorted(state):
        flat = state[name].detach().reshape(-1).to(torch.float32)
        generator = torch.Generator().manual_seed(_seed_of(seed, name))
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK]
            directions = torch.randn(chunk.numel(), dim, generator=generator)
            total += (chunk @ directions).to(torch.float64)
    return (total / math.sqrt(dim)).tolist()


def adapter_norm(state: Mapping[str, torch.Tensor]) -> float:
    """The Euclidean norm of the flattened adapter: √(Σ over tensors of ‖tensor‖²)."""
    squares = sum(float(torch.sum(t.detach().to(torch.float64) ** 2)) for t in state.values())
    return math.sqrt(squares)


def _seed_of(seed: int, name: str) -> int:
    # Python's hash() of a str changes between processes; a digest is the same for every peer.
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes up to 2**63 - 1
