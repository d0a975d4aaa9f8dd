"""The LoRA shape a swarm shares (`--lora-rank`, `--lora-alpha`, `--lora-targets`).

Kept apart from `peer.model`, which needs torch, so that the command line can describe and
check it at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA shape every peer of a swarm shares (it is part of the swarm id)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "module names that get LoRA factors"}
    )

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"LoRA rank must be in 1..1024, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module, e.g. q_proj")

    def to_dict(self) -> dict[str, Any]:
        """Canonical form for hashing into the swarm id."""
        return {"r": self.rank, "alpha": self.alpha, "targets": sorted(self.target_modules)}
