"""The merge rules by name, each with what it needs from the peer: the one table a rule joins.

A new rule is one new module holding a pure function `(own, others, config) -> AdapterState`
(a docstring that states its math and how many bad neighbours it tolerates), plus one `Rule`
line in `RULES` below.

An entry names its function as "module:function", imported on first use, as packaging entry
points do: `MergeConfig` checks a rule name against this table, and the rules take a
`MergeConfig`, so importing them here would tie the config and the rules to each other again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from merge.errors import MergeConfigError
from merge.quorum import TrimSettings, min_buffered, no_minimum

if TYPE_CHECKING:  # torch: `merge.config` reads this table and must load without it
    from merge.types import AdapterState, Contribution

# The third argument is the `MergeConfig` (not named here, see the module docstring).
MergeRule: TypeAlias = "Callable[[Contribution, Sequence[Contribution], Any], AdapterState]"


@dataclass(frozen=True)
class Rule:
    """A merge rule and what it needs from the peer that runs it."""

    name: str  # the `--merge-rule` value
    target: str  # "module:function" of the rule
    # Merges in weight space, where the LoRA rank of a neighbour does not matter (so the peer
    # validates with `allow_rank_change`).
    rank_free: bool = False
    # Coordinate-wise over many inputs: fed a `NeighbourBuffer`, not one round's fetches.
    buffered: bool = False
    # Neighbours it must have before it merges at all, from the trim settings.
    min_neighbours: Callable[[TrimSettings], int] = no_minimum

    @property
    def fn(self) -> MergeRule:
        """The rule's function, imported from `target`."""
        module, _, function = self.target.partition(":")
        return cast(MergeRule, getattr(importlib.import_module(module), function))


RULES: Mapping[str, Rule] = {entry.name: entry for entry in (
    Rule("average", "merge.average:average"),
    Rule("product", "merge.product:product", rank_free=True),
    Rule("trimmed-mean", "merge.robust:trimmed_mean", buffered=True,
         min_neighbours=min_buffered),
    Rule("median", "merge.robust:median", buffered=True, min_neighbours=min_buffered),
    Rule("clipped", "merge.robust:clipped"),
)}

# In table order, for a command line's choices and help.
RULE_NAMES: tuple[str, ...] = tuple(RULES)


def rule(name: str) -> Rule:
    """The registry entry of the rule called `name`.

    Raises:
        MergeConfigError: no rule has that name (the message lists the known ones).
    """
    try:
        return RULES[name]
    except KeyError:
        raise MergeConfigError(
            f"unknown merge rule {name!r}; known rules: {', '.join(sorted(RULES))}"
        ) from None
