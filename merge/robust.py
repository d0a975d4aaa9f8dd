"""Robust rules: coordinate-wise `trimmed-mean` and `median`, and centered `clipped` gossip.

`trimmed-mean` and `median` are unweighted and need many inputs to mean anything: over 2-3
adapters they are barely different from the mean. Feed them a `NeighbourBuffer` (the latest
adapter of each recently heard neighbour) rather than one round's fetches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from merge.quorum import trim_count
from merge.tensors import as_work, finish, floored_norm, state_distance
from merge.types import AdapterState, Contribution
from merge.weights import merge_weights

if TYPE_CHECKING:
    from merge.config import MergeConfig


def trimmed_mean(own: Contribution, others: Sequence[Contribution],
                 config: MergeConfig) -> AdapterState:
    """Coordinate-wise trimmed mean over self and the neighbours, unweighted.

    Math: for each coordinate, sort the n = 1 + len(others) values, drop the k smallest and k
    largest and average the n - 2k left, where k = `trim_count(n, config)`: the larger of
    `trim` and floor(`trim_fraction` x n), so that the cut grows with the buffer and keeps
    pace with the share of bad neighbours in it. Sample counts and ages are ignored: a weight
    would be a lever for the very inputs this rule distrusts.

    Robustness: tolerates up to k arbitrary inputs per coordinate (so per merge), since every
    surviving value lies between two honest ones. With fewer than 2k + 1 inputs it trims
    (n - 1) // 2 from each end, which for n <= 2 is the plain mean and tolerates nothing.
    """
    states = [own.state, *(other.state for other in others)]
    return _sorted_slice_mean(states, own.state, trim_count(len(states), config))


def median(own: Contribution, others: Sequence[Contribution],
           config: MergeConfig) -> AdapterState:
    """Coordinate-wise median over self and the neighbours, unweighted.

    Math: for each coordinate, the middle of the n = 1 + len(others) sorted values (the mean of
    the two middle ones when n is even). Sample counts and ages are ignored.

    Robustness: tolerates floor((n - 1) / 2) arbitrary inputs per merge, the most any
    coordinate-wise rule can; a median over 2 inputs is their mean and tolerates none.
    """
    states = [own.state, *(other.state for other in others)]
    return _sorted_slice_mean(states, own.state, (len(states) - 1) // 2)


def _sorted_slice_mean(states: Sequence[Mapping[str, torch.Tensor]],
                       own: Mapping[str, torch.Tensor], cut: int) -> AdapterState:
    # The median is the trimmed mean that cuts all but the middle one (odd n) or two (even n).
    merged: dict[str, torch.Tensor] = {}
    for key, ref in own.items():
        rows = _settle_extremes([as_work(state[key], ref) for state in states], cut)
        merged[key] = torch.stack(rows[cut:len(rows) - cut]).mean(dim=0)
    return finish(merged, own)


def _settle_extremes(rows: list[torch.Tensor], cut: int) -> list[torch.Tensor]:
    """Reorder `rows` coordinate-wise so the `cut` smallest lead and the `cut` largest trail.

    Cocktail-shaker passes of element-wise compare-exchanges: for the few inputs a merge has,
    this is 10-20x faster than `torch.sort` across them, and leaves the middle unsorted since
    only its mean is needed.
    """
    n = len(rows)
    for settled in range(cut):
        # Upward pass: the largest of the unsettled rows moves to position n - 1 - settled.
        for i in range(settled, n - 1 - settled):
            _exchange(rows, i, i + 1)
        # Downward pass: the smallest of the rest moves to position `settled`.
        for i in range(n - 2 - settled, settled, -1):
            _exchange(rows, i - 1, i)
    return rows


def _exchange(rows: list[torch.Tensor], low: int, high: int) -> None:
    first, second = rows[low], rows[high]
    rows[low], rows[high] = torch.minimum(first, second), torch.maximum(first, second)


def clipped(own: Contribution, others: Sequence[Contribution],
            config: MergeConfig) -> AdapterState:
    """Centered clipping around ourselves, as in ClippedGossip (He, Karimireddy, Jaggi 2022).

    Math: with the weights w_i of `merge_weights` and tau = clip_tau * max(||theta_self||, floor),

        theta <- theta_self + sum_{i>=1} w_i clip(theta_i - theta_self, tau),
        clip(d, tau) = d * min(1, tau / ||d||),

    norms taken over the whole state. Honest neighbours within tau of us are averaged exactly
    as by `average`.

    Robustness: it never excludes anyone but bounds everyone: each neighbour moves us by at most
    w_i tau, so f bad neighbours (any f) move the result at most tau * sum_{bad} w_i away from
    what the honest ones alone would give, and capped sample counts keep each w_i at most
    cap / (cap + own samples). ClippedGossip's convergence guarantee needs that bad weight to be
    a small fraction of the total, so pick tau of the order of honest disagreement.
    """
    weights = merge_weights(own, others, config)
    radius = config.clip_tau * floored_norm(own.state)
    base = {key: as_work(ref, ref) for key, ref in own.state.items()}
    merged = {key: value.clone() for key, value in base.items()}
    for other, weight in zip(others, weights[1:], strict=True):
        distance = state_distance(other.state, own.state)
        if distance == 0.0 or weight == 0.0:
            continue
        step = weight * min(1.0, radius / distance)
        for key, value in merged.items():
            value.add_(as_work(other.state[key], own.state[key]) - base[key], alpha=step)
    return finish(merged, own.state)
