"""The registry of merge rules: what each rule needs, its names, and a config that imports no
rule; a rule added by one registry line is usable at once."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import merge.registry
from merge.config import MergeConfig
from merge.errors import MergeConfigError
from merge.quorum import min_buffered, no_minimum
from merge.registry import RULE_NAMES, RULES, Rule, rule
from merge.rules import merge_states
from merge.types import AdapterState, Contribution

MERGE = Path(merge.registry.__file__).parent


def test_each_entry_names_a_rule_function_with_the_rule_signature() -> None:
    assert tuple(RULES) == RULE_NAMES
    assert RULE_NAMES[:5] == ("average", "product", "trimmed-mean", "median", "clipped")
    for name, entry in RULES.items():
        assert entry.name == name and rule(name) is entry
        module, _, function = entry.target.partition(":")
        assert entry.fn.__module__ == module and entry.fn.__name__ == function
        assert list(inspect.signature(entry.fn).parameters) == ["own", "others", "config"]


@pytest.mark.parametrize(("name", "rank_free", "buffered", "start"), [
    ("average", False, False, 0),
    ("product", True, False, 0),
    # Both buffered rules start together (the README's "with the same start"): at 7.
    ("trimmed-mean", False, True, 7),
    ("median", False, True, 7),
    ("clipped", False, False, 0),
])
def test_the_registry_says_what_each_rule_needs(name: str, rank_free: bool, buffered: bool,
                                               start: int) -> None:
    entry, config = rule(name), MergeConfig(trim=1, trim_fraction=0.25)
    assert (entry.rank_free, entry.buffered, entry.min_neighbours(config)) == (
        rank_free, buffered, start)
    assert entry.min_neighbours is (min_buffered if buffered else no_minimum)


def test_an_unknown_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(MergeConfigError, match="unknown merge rule 'fedavg'") as info:
        rule("fedavg")
    assert str(info.value).endswith(f"known rules: {', '.join(sorted(RULE_NAMES))}")


def test_the_config_help_lists_the_registry() -> None:
    help_text = MergeConfig.__dataclass_fields__["rule"].metadata["help"]
    assert help_text.startswith("merge rule: average, product, trimmed-mean, median")
    assert help_text.endswith(f" or {RULE_NAMES[-1]}")
    assert all(name in help_text for name in RULE_NAMES)


def _merge_imports(path: Path) -> set[str]:
    """The `merge` modules `path` imports, at run time or for type checking alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "merge":
                found.update(alias.name for alias in node.names)
            elif module.startswith("merge."):
                found.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("merge."))
    return found


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for module in _merge_imports(MERGE / f"{todo.pop()}.py") - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_the_config_reaches_no_rule_and_nothing_that_imports_it_back() -> None:
    rule_modules = {entry.target.partition(":")[0].removeprefix("merge.")
                    for entry in RULES.values()}
    assert {"average", "product", "robust"} <= rule_modules
    for start in ("config", "registry"):
        reached = _reachable(start)
        assert not reached & rule_modules, (start, reached)
        assert "config" not in reached, (start, reached)
    # The rules do import the config (for its type), so the direction is one way.
    assert "config" in _merge_imports(MERGE / "robust.py")


def keep_own(own: Contribution, others: Sequence[Contribution],
             config: MergeConfig) -> AdapterState:
    """A stand-in rule: our own state, whatever the neighbours say."""
    return {key: t.clone() for key, t in own.state.items()}


def test_one_registry_line_adds_a_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    line = Rule("keep-own", f"{__name__}:keep_own")
    monkeypatch.setattr(merge.registry, "RULES", {**RULES, line.name: line})
    config = MergeConfig(rule="keep-own")
    own = Contribution({"x": torch.ones(2)}, samples=1)
    other = Contribution({"x": torch.zeros(2)}, samples=1, peer="p")
    assert torch.equal(merge_states(own, [other], config)["x"], torch.ones(2))
    assert rule("keep-own").min_neighbours(config) == 0 and not rule("keep-own").buffered
