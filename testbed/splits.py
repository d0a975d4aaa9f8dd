"""The seeded split of a categorised corpus into per-peer training shards and an eval set.

Three ways to deal categories to peers: by domain (each peer its own categories: non-IID),
IID, or with Dirichlet(alpha) category proportions per peer. Every split holds the same
examples of every category out for the shared evaluation set.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from peer.errors import ConfigError, DataError

SPLIT_MODES = ("domain", "iid", "dirichlet")


@dataclass(frozen=True)
class BuiltinSplit:
    """Per-peer training shards plus the shared held-out eval set.

    Attributes:
        shards: one list of training examples per peer; no example is in two shards.
        eval: examples held out from every category, in none of the shards.
        shard_categories: for each shard, the sorted categories its examples come from.
        shard_counts: for each shard, category -> how many of its examples come from it.
    """

    shards: list[list[str]]
    eval: list[str]
    shard_categories: list[list[str]]
    shard_counts: list[dict[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.shards) != len(self.shard_categories):
            raise ValueError("shards and shard_categories must have the same length")
        if self.shard_counts and len(self.shard_counts) != len(self.shards):
            raise ValueError("shards and shard_counts must have the same length")


def split_categories(
    categories: Mapping[str, Sequence[str]], n_shards: int, *, seed: int = 0,
    eval_per_category: int = 4, mode: str = "domain", alpha: float = 0.5,
    prompt_of: Callable[[str], str] | None = None,
) -> BuiltinSplit:
    """Hold out eval examples from every category, then deal the rest into training shards.

    1. Each category is shuffled with the seed; `eval_per_category` of its examples (at most
       all but one) go to the shared eval set. Examples whose prompt (`prompt_of`) occurs only
       once in the corpus are preferred, so an eval question is not also a training question.
    2. "domain": the categories, shuffled, are dealt round-robin, so shards hold different
       categories. With more shards than categories, each category goes to one or more shards
       (extra shards to the categories with the most examples per shard) and is split evenly.
    3. "iid": all training examples are shuffled together and dealt round-robin.
    4. "dirichlet": each category is divided among all shards in proportions drawn from
       Dirichlet(alpha, ..., alpha) (Hsu et al., 2019): a small alpha gives each shard a few
       dominant categories, a large one approaches "iid". A shard left empty then gets one
       example from the largest shard.

    Args:
        categories: category name -> distinct examples (no example in two categories).
        n_shards: number of peers; 1 puts all training data in one shard.
        seed: the same seed gives the same split.
        eval_per_category: held-out examples per category.
        mode: "domain" (non-IID by category), "iid" or "dirichlet".
        alpha: the Dirichlet concentration of "dirichlet" mode (> 0; ignored otherwise).
        prompt_of: the part of an example that identifies its question (default: all of it).

    Raises:
        ConfigError: n_shards, eval_per_category, mode or alpha is invalid.
        DataError: there is not enough training data for n_shards non-empty shards.
    """
    if n_shards < 1:
        raise ConfigError(f"the number of shards must be at least 1, got {n_shards}")
    if eval_per_category < 0:
        raise ConfigError(f"eval_per_category must be >= 0, got {eval_per_category}")
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split mode must be one of {', '.join(SPLIT_MODES)}, got {mode!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"the Dirichlet alpha must be a positive number, got {alpha}")
    rng = random.Random(seed)
    train, held_out = _hold_out(categories, eval_per_category, rng, prompt_of or (lambda x: x))
    if mode == "dirichlet":
        shards, shard_categories = _deal_dirichlet(train, n_shards, rng, alpha)
    else:
        deal = _deal_domain if mode == "domain" else _deal_iid
        shards, shard_categories = deal(train, n_shards, rng)
    for index, shard in enumerate(shards):
        if not shard:
            total = sum(len(items) for items in train.values())
            raise DataError(f"shard {index} would be empty: {total} training examples cannot "
                            f"fill {n_shards} shards in {mode} mode; use fewer peers")
    home = {x: name for name, items in train.items() for x in items}
    counts = [dict(sorted(Counter(home[x] for x in shard).items())) for shard in shards]
    return BuiltinSplit(shards=shards, eval=held_out, shard_categories=shard_categories,
                        shard_counts=counts)


def _hold_out(
    categories: Mapping[str, Sequence[str]], per_category: int, rng: random.Random,
    prompt_of: Callable[[str], str],
) -> tuple[dict[str, list[str]], list[str]]:
    prompts = Counter(prompt_of(x) for items in categories.values() for x in items)
    train: dict[str, list[str]] = {}
    held_out: list[str] = []
    for name in sorted(categories):
        items = list(categories[name])
        rng.shuffle(items)
        # A stable sort keeps the shuffled order within "unique prompt" and "repeated prompt".
        ranked = sorted(range(len(items)), key=lambda i: prompts[prompt_of(items[i])] > 1)
        chosen = set(ranked[: min(per_category, max(len(items) - 1, 0))])
        held_out.extend(items[i] for i in sorted(chosen))
        train[name] = [x for i, x in enumerate(items) if i not in chosen]
    return train, held_out


def _deal_iid(
    train: Mapping[str, list[str]], n_shards: int, rng: random.Random
) -> tuple[list[list[str]], list[list[str]]]:
    pool = [(name, x) for name in sorted(train) for x in train[name]]
    rng.shuffle(pool)
    dealt = [pool[i::n_shards] for i in range(n_shards)]
    return ([[x for _, x in shard] for shard in dealt],
            [sorted({name for name, _ in shard}) for shard in dealt])


def _deal_dirichlet(
    train: Mapping[str, list[str]], n_shards: int, rng: random.Random, alpha: float
) -> tuple[list[list[str]], list[list[str]]]:
    dealt: list[list[tuple[str, str]]] = [[] for _ in range(n_shards)]
    for name in sorted(train):
        items = train[name]
        start = 0
        for shard, count in zip(dealt, _dirichlet_counts(len(items), n_shards, rng, alpha),
                                strict=True):
            shard.extend((name, x) for x in items[start : start + count])
            start += count
    # Keep every peer training: an empty shard takes one random example of the largest one.
    # With alpha small or few examples this happens; it moves at most n_shards - 1 examples.
    for shard in dealt:
        donor = max(dealt, key=len)
        if not shard and len(donor) > 1:  # else fewer examples than shards: the caller says so
            shard.append(donor.pop(rng.randrange(len(donor))))
    return ([[x for _, x in shard] for shard in dealt],
            [sorted({name for name, _ in shard}) for shard in dealt])


def _dirichlet_counts(total: int, n_shards: int, rng: random.Random, alpha: float) -> list[int]:
    """Split `total` items by proportions p ~ Dirichlet(alpha): largest-remainder rounding."""
    # A Dirichlet draw is independent Gamma(alpha, 1) draws, normalised.
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(n_shards)]
    mass = sum(draws)
    if not mass > 0:  # every draw underflowed (alpha ~ 0.001): the limit is one random shard
        draws = [0.0] * n_shards
        draws[rng.randrange(n_shards)] = 1.0
        mass = 1.0
    shares = [total * draw / mass for draw in draws]
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(n_shards), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _deal_domain(
    train: Mapping[str, list[str]], n_shards: int, rng: random.Random
) -> tuple[list[list[str]], list[list[str]]]:
    order = sorted(name for name in train if train[name])
    rng.shuffle(order)
    if n_shards <= len(order) or not order:
        names = [order[i::n_shards] for i in range(n_shards)]
        return [[x for name in group for x in train[name]] for group in names], \
            [sorted(group) for group in names]
    # More shards than categories: give each extra shard to the category whose shards would
    # otherwise be the largest, so shard sizes stay as even as the categories allow.
    counts = dict.fromkeys(order, 1)
    for _ in range(n_shards - len(order)):
        widest = max(order, key=lambda name: len(train[name]) / counts[name])
        counts[widest] += 1
    shards: list[list[str]] = []
    shard_categories: list[list[str]] = []
    for name in order:
        shards.extend(train[name][i::counts[name]] for i in range(counts[name]))
        shard_categories.extend([name] for _ in range(counts[name]))
    return shards, shard_categories
