"""scripts/bench_merge.py's verdict: the costliest rule against issue 17's time budget."""

from __future__ import annotations

from functools import partial

from scripts.bench_merge import TIME_RATIO_LIMIT, median_seconds, worst_rule


def test_worst_rule_names_the_costliest_rule_with_its_error() -> None:
    ratios = {"average": 1.3, "product": 21.0, "median": 4.0}
    worst = worst_rule(ratios, {"average": 0.89, "product": 0.76})
    assert worst == {"rule": "product", "time_ratio": 21.0, "limit": TIME_RATIO_LIMIT,
                     "within_limit": True, "rel_error": 0.76}


def test_worst_rule_over_the_limit_and_without_a_measured_error() -> None:
    worst = worst_rule({"average": 1.3, "median": 31.0}, {"average": 0.89}, limit=25.0)
    assert worst["rule"] == "median" and worst["within_limit"] is False
    assert worst["rel_error"] is None


def test_median_seconds_times_every_work_in_turn() -> None:
    calls: list[str] = []
    works = {name: partial(calls.append, name) for name in ("bare", "product")}
    seconds = median_seconds(works, repeats=3)
    assert set(seconds) == {"bare", "product"} and all(v >= 0 for v in seconds.values())
    # One warm-up call each, then the repeats alternate, so a drifting load hits both alike.
    assert calls == ["bare", "product"] * 4
