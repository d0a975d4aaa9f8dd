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



def merge_estimates(own: Contribution, public: AdapterState | None,
                    others: Sequence[Contribution], config: MergeConfig) -> AdapterState:
    """Merge when neighbours hold public estimates x̂ (lossy wire codecs), CHOCO-gossip style.

    The neighbours' adapters are their estimates x̂ⱼ, which lag behind their adapters by the
    steps not sent yet. Merged with our own adapter x, that lag would pull x back towards where
    the swarm started. So the rule merges like with like, our own public estimate x̂ with
    theirs, and our residual x - x̂ (what our next steps will send) is added back:

        x' = rule(x̂, x̂ⱼ, ...) + (x - x̂)

    With an exact codec (`public` None: x̂ = x) this is `merge_states`.
    """
    if public is None or not others:
        return merge_states(own, others, config)
    estimate = Contribution(state=public, samples=own.samples, age=own.age, peer=own.peer)
    merged = merge_states(estimate, others, config)
    for key, t in merged.items():
        t += own.state[key].detach().to("cpu", t.dtype) - public[key].to(t.dtype)
    return merged
