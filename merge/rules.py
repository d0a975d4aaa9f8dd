"""The registry of merge rules, and `merge_states`, the one entry point the daemon calls.

Every rule is a pure function `(own, others, config) -> merged state` whose docstring states its
math and how many bad neighbours per merge it tolerates:

  average       weighted average of the factors (cheap; B_bar A_bar != average of B A)
  product       exact weighted average of B A, re-factorised to rank r (any neighbour rank)
  trimmed-mean  coordinate-wise, unweighted, drops max(trim, trim_fraction n) values per end
  median        coordinate-wise, unweighted
  clipped       self-centered clipping of each neighbour's difference at radius tau
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from merge.average import average
from merge.product import product
from merge.robust import clipped, median, trimmed_mean
from merge.tensors import lora_pairs
from merge.types import AdapterState, Contribution
from merge.validate import validate_update
from merge.weights import merge_weights

if TYPE_CHECKING:
    from merge.config import MergeConfig

__all__ = [
    "REGISTRY",
    "RULES",
    "MergeRule",
    "RuleEntry",
    "accepts_rank_change",
    "lora_pairs",
    "merge_states",
    "merge_weights",
    "needs_buffer",
    "validate_update",
]

MergeRule: TypeAlias = "Callable[[Contribution, Sequence[Contribution], MergeConfig], AdapterState]"


@dataclass(frozen=True)
class RuleEntry:
    """A merge rule and what it needs from the daemon."""

    merge: MergeRule
    # Merges in weight space, where the LoRA rank of a neighbour does not matter.
    rank_free: bool = False
    # Coordinate-wise over many inputs: fed a `NeighbourBuffer`, not one round's fetches.
    buffered: bool = False


REGISTRY: dict[str, RuleEntry] = {
    "average": RuleEntry(average),
    "product": RuleEntry(product, rank_free=True),
    "trimmed-mean": RuleEntry(trimmed_mean, buffered=True),
    "median": RuleEntry(median, buffered=True),
    "clipped": RuleEntry(clipped),
}

# The functions alone, for callers that only merge.
RULES: dict[str, MergeRule] = {name: entry.merge for name, entry in REGISTRY.items()}


def accepts_rank_change(rule: str) -> bool:
    """Whether `rule` can merge neighbours of another LoRA rank (pass it to `validate_update`)."""
    return REGISTRY[rule].rank_free


def needs_buffer(rule: str) -> bool:
    """Whether `rule` merges over a `NeighbourBuffer` sized by `buffer_plan`, not one round's
    fetches."""
    return REGISTRY[rule].buffered


def merge_states(own: Contribution, others: Sequence[Contribution],
                 config: MergeConfig) -> AdapterState:
    """Merge our adapter with the accepted neighbours' by the rule `config.rule`.

    Every neighbour must have passed `validate_update` against `own.state`, the one check of
    keys, shapes and dtypes: the rules index and add tensors by our keys without looking again.

    Args:
        own: our adapter, samples and age (normally 0).
        others: accepted neighbours, in any order (the result does not depend on it).
        config: the rule and its parameters.

    Returns:
        A new state with own's keys, shapes and dtypes, contiguous, on the CPU, sharing no
        memory with any input; a copy of `own.state` when `others` is empty.
    """
    if not others:
        return {key: t.detach().to("cpu").clone().contiguous() for key, t in own.state.items()}
    return RULES[config.rule](own, others, config)
