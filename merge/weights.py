"""Merge weights from sample counts and staleness, with the caps that stop a liar buying weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from merge.types import Contribution

if TYPE_CHECKING:
    from merge.config import MergeConfig


def clamp_age(age: int, config: MergeConfig) -> int:
    """A self-reported age clamped to `0..config.max_age`."""
    return min(max(int(age), 0), config.max_age)


def sample_cap(own: Contribution, config: MergeConfig) -> float:
    """The most samples a neighbour may claim: `max_samples_ratio` x our own, and at least 1."""
    return max(1.0, config.max_samples_ratio * max(own.samples, 0))


def merge_weights(own: Contribution, others: Sequence[Contribution],
                  config: MergeConfig) -> list[float]:
    """Normalised merge weights of self and each neighbour.

    Math: with n_0 = own samples, cap = max(1, max_samples_ratio * n_0), n_i = min(n_i, cap) for
    each neighbour (negative claims count as 0) and a_i = min(max(age_i, 0), max_age),

        w_i = n_i * discount**a_i / sum_j n_j * discount**a_j.

    When every n_i is 0 (a swarm that has not trained yet) the weights fall back to the staleness
    factors alone. A neighbour's weight therefore never exceeds
    cap / (cap + n_0) however many samples it claims: a liar cannot buy more than that.
    With `config.weights == "equal"` every n_i is 1 (the claims are not read at all): the
    weights are the staleness factors alone.

    Args:
        own: this peer's adapter; its sample count sets the cap.
        others: the neighbours, in any order.
        config: `staleness_discount`, `max_age`, `max_samples_ratio`.

    Returns:
        `[w_self, w_1, ..., w_k]`, non-negative, summing to 1.
    """
    decay = [config.staleness_discount ** clamp_age(c.age, config) for c in (own, *others)]
    if config.weights == "equal":
        samples = [1.0] * len(decay)
    else:
        cap = sample_cap(own, config)
        samples = [float(max(own.samples, 0))] + [min(float(max(c.samples, 0)), cap)
                                                  for c in others]
    raw = [n * d for n, d in zip(samples, decay, strict=True)]
    total = sum(raw)
    if total <= 0.0:
        # Nobody has trained yet: samples say nothing, so only freshness decides.
        raw, total = decay, sum(decay)
    return [value / total for value in raw]
