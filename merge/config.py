"""Configuration of the merge step: which rule, and the caps that keep neighbours honest."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from merge import registry
from merge.errors import MergeConfigError

_NAMES = registry.RULE_NAMES
WEIGHTINGS = ("samples", "equal")


@dataclass(frozen=True)
class MergeConfig:
    """How a peer merges itself with the neighbour adapters it accepted."""

    rule: str = field(
        default="average",
        metadata={"help": f"merge rule: {', '.join(_NAMES[:-1])} or {_NAMES[-1]}"},
    )
    weights: str = field(
        default="samples",
        metadata={"help": "what a merge weight starts from, before staleness: samples (the "
                          "training samples each adapter claims, capped) or equal (every "
                          "accepted adapter the same: for DP peers at a shared "
                          "--dp-sample-rate, whose steps already scale with their data)"},
    )
    staleness_discount: float = field(
        default=0.5, metadata={"help": "weight multiplier per version of age (w *= x**age)"}
    )
    max_age: int = field(
        default=16, metadata={"help": "ages are clamped to 0..max_age before the discount"}
    )
    max_samples_ratio: float = field(
        default=4.0,
        metadata={"help": "a neighbour's claimed samples are capped at this x our own (min 1)"},
    )
    max_norm_ratio: float = field(
        default=20.0,
        metadata={"help": "reject an adapter whose norm, or distance from ours, exceeds this x "
                          "the lower median of the norms accepted lately (our own floored "
                          "norm before any)"},
    )
    trim: int = field(
        default=1,
        metadata={"help": "values cut at least from each end of every coordinate (trimmed-mean)"},
    )
    trim_fraction: float = field(
        default=0.25,
        metadata={"help": "fraction of buffered neighbours a buffered rule tolerates as bad "
                          "(trimmed-mean cuts this share from each end)"},
    )
    clip_tau: float = field(
        default=1.0,
        metadata={"help": "clipping radius of `clipped`, relative to our own (floored) norm"},
    )

    def __post_init__(self) -> None:
        registry.rule(self.rule)  # raises MergeConfigError for a name it does not know
        if self.weights not in WEIGHTINGS:
            raise MergeConfigError(
                f"weights must be one of {', '.join(WEIGHTINGS)}, got {self.weights!r}"
            )
        # NaN fails every comparison, so each float check is written to reject it too.
        if not 0 < self.staleness_discount <= 1:
            raise MergeConfigError(
                f"staleness_discount must be in (0, 1], got {self.staleness_discount}"
            )
        if self.max_age < 0:
            raise MergeConfigError(f"max_age must be >= 0, got {self.max_age}")
        if not (math.isfinite(self.max_samples_ratio) and self.max_samples_ratio > 0):
            raise MergeConfigError(
                f"max_samples_ratio must be a positive number, got {self.max_samples_ratio}"
            )
        if not (math.isfinite(self.max_norm_ratio) and self.max_norm_ratio >= 1):
            raise MergeConfigError(
                f"max_norm_ratio must be >= 1 (our own adapter must pass), "
                f"got {self.max_norm_ratio}"
            )
        if self.trim < 0:
            raise MergeConfigError(f"trim must be >= 0, got {self.trim}")
        # Half or more bad is a majority no rule can outvote.
        if not 0 <= self.trim_fraction < 0.5:
            raise MergeConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not (math.isfinite(self.clip_tau) and self.clip_tau > 0):
            raise MergeConfigError(f"clip_tau must be a positive number, got {self.clip_tau}")
