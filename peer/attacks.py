"""Poisoned adapters, for measuring how merge rules hold up against Byzantine peers.

A peer started with `--attack NAME` trains honestly but serves a poisoned copy of its adapter
to every neighbour. It exists for simulations (`scripts/simulate.py --byzantine N`); an honest
peer never sets it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from merge.types import AdapterState
from peer.config import ATTACKS


def poison(state: Mapping[str, torch.Tensor], attack: str, *, scale: float = 50.0,
           seed: int = 0) -> AdapterState:
    """Return the poisoned version of `state` that an attacker serves.

    - `scale`: every tensor multiplied by `scale` (a loud, norm-inflating update);
    - `noise`: every tensor replaced by Gaussian noise of `scale` times its own RMS;
    - `signflip`: every tensor multiplied by -`scale` (pulls the swarm backwards).

    Raises:
        ValueError: an unknown attack name.
    """
    generator = torch.Generator().manual_seed(seed)
    makers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "scale": lambda t: t * scale,
        "signflip": lambda t: t * -scale,
        "noise": lambda t: torch.randn(t.shape, generator=generator).to(t.dtype)
        * scale * t.float().pow(2).mean().sqrt().clamp_min(1e-3).to(t.dtype),
    }
    if attack not in makers:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    return {key: makers[attack](value).contiguous() for key, value in state.items()}
