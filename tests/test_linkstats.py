"""Link estimates and the fetch budgets they give: pure properties (no network, no clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip.linkstats import LATENCY_RTTS, LinkStats

FLOOR, CAP = 30.0, 300.0
sizes = st.integers(min_value=0, max_value=1 << 30)
rates = st.floats(min_value=1.0, max_value=1e9)
rtts = st.floats(min_value=0.0, max_value=10.0)


def stats(**changes: float) -> LinkStats:
    return LinkStats(floor_s=FLOOR, cap_s=CAP, **changes)  # type: ignore[arg-type]


@given(rate=rates, rtt=rtts, small=sizes, extra=sizes)
def test_budget_grows_with_size_and_stays_within_floor_and_cap(
        rate: float, rtt: float, small: int, extra: int) -> None:
    links = stats()
    links.record("p", 1 << 20, (1 << 20) / rate, rtt)
    for peer in ("p", "unknown"):
        shorter, longer = links.deadline_for(peer, small), links.deadline_for(peer, small + extra)
        assert FLOOR <= shorter <= longer <= CAP


@given(fast=st.floats(min_value=1e3, max_value=1e9),
       slower_by=st.floats(min_value=1, max_value=1e3))
def test_a_slower_link_gets_at_least_as_long(fast: float, slower_by: float) -> None:
    links = stats()
    links.record("fast", 1 << 20, (1 << 20) / fast, 0.1)
    links.record("slow", 1 << 20, (1 << 20) / (fast / slower_by), 0.1)
    for nbytes in (0, 1 << 20, 64 << 20):
        assert links.deadline_for("slow", nbytes) >= links.deadline_for("fast", nbytes)


@given(start=rates, target=rates, rtt=rtts, n=st.integers(min_value=1, max_value=60))
def test_the_average_converges_to_a_steady_link(
        start: float, target: float, rtt: float, n: int) -> None:
    links = stats(alpha=0.25)
    links.record("p", 1 << 20, (1 << 20) / start, 0.0)
    for _ in range(n):
        links.record("p", 1 << 20, (1 << 20) / target, rtt)
    link = links.estimate("p")
    # Each sample keeps (1 - alpha) of the distance to the steady value.
    assert abs(link.rate_bps - target) <= 0.75 ** n * abs(start - target) * (1 + 1e-9) + 1e-6
    assert abs(link.rtt_s - rtt) <= 0.75 ** n * rtt * (1 + 1e-9) + 1e-9
    assert link.transfers == n + 1


def test_a_large_adapter_on_a_slow_link_gets_its_time() -> None:
    # 80 MB measured at 1 MB/s: 80 s at the measured rate, 160 s at half of it, plus 4 RTT.
    links = stats()
    links.record("p", 8_000_000, 8.0, 0.2)
    assert links.deadline_for("p", 80_000_000) == pytest.approx(160 + LATENCY_RTTS * 0.2)
    assert links.deadline_for("p", 1000) == FLOOR  # small adapters: the floor
    assert links.deadline_for("p", 10**12) == CAP


def test_unknown_peers_get_the_prior_and_memory_is_bounded() -> None:
    links = stats(max_peers=3)  # type: ignore[arg-type]
    assert links.estimate("nobody").transfers == 0
    for index in range(5):
        links.record(f"p{index}", 1000, 1.0, 0.1)
    links.record("p2", 1000, 1.0, 0.1)  # recently used: kept
    links.record("p5", 1000, 1.0, 0.1)
    assert len(links) == 3 and set(links.statistics()) == {"p4", "p2", "p5"}
    assert links.statistics(["p2", "p0", "ghost"]).keys() == {"p2"}
    assert links.estimate("p0") == links.prior


@pytest.mark.parametrize("bad", [dict(floor_s=0.0), dict(floor_s=500.0), dict(alpha=0.0),
                                 dict(safety=1.5), dict(max_peers=0)])
def test_nonsense_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LinkStats(**{"floor_s": FLOOR, "cap_s": CAP, **bad})  # type: ignore[arg-type]
