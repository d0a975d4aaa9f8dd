"""`merge_states`, the one entry point the daemon calls: run the rule the config names.

The rules, and what each needs from the peer, are listed in `merge.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merge.registry import rule
from merge.types import AdapterState, Contribution

if TYPE_CHECKING:
    from merge.config import MergeConfig


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
    return rule(config.rule).fn(own, others, config)

