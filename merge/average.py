"""`average`: the weighted average of the factors, what most federated LoRA systems do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merge.tensors import finish, weighted_sum
from merge.types import AdapterState, Contribution
from merge.weights import merge_weights

if TYPE_CHECKING:
    from merge.config import MergeConfig


def average(own: Contribution, others: Sequence[Contribution],
            config: MergeConfig) -> AdapterState:
    """Weighted coordinate-wise average of every tensor, LoRA factors included.

    Math: theta = sum_i w_i theta_i with the weights of `merge_weights` (capped samples times
    discount**age, normalised). For a LoRA pair the merged delta is therefore
    (sum_i w_i B_i)(sum_j w_j A_j), which is not the average delta sum_i w_i B_i A_i: the gap is

        sum_i w_i B_i A_i - B_bar A_bar = 1/2 sum_{i,j} w_i w_j (B_i - B_j)(A_i - A_j),

    quadratic in how much the peers disagree. It vanishes when all A are equal (a shared,
    frozen A as in FFA-LoRA), is small while adapters stay close to their common seed, and
    grows as they drift apart; `product` has no such gap.

    Robustness: none. One neighbour can move the result anywhere within the validation norm
    bound, scaled by its weight (at most cap / (cap + own samples)): it tolerates 0 bad
    neighbours per merge.
    """
    weights = merge_weights(own, others, config)
    states = [own.state, *(other.state for other in others)]
    merged = {
        key: weighted_sum([state[key] for state in states], weights, ref)
        for key, ref in own.state.items()
    }
    return finish(merged, own.state)
