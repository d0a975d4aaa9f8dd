"""Exponential backoff's ceiling, shared by re-dialling (`discovery`) and the draw (`admission`)."""

from __future__ import annotations

# Past this many doublings every sane base delay is beyond any sane cap; stopping here keeps the
# arithmetic in floats instead of growing an unbounded power of two.
_MAX_DOUBLINGS = 64


def backoff_ceiling(attempt: int, base_s: float, cap_s: float) -> float:
    """``min(cap_s, base_s * 2**attempt)``: the longest wait after `attempt` failed tries.

    A negative `attempt` counts as 0 (the base): callers that count failures from 1 pass
    ``failures - 1`` without a guard.
    """
    return min(cap_s, base_s * 2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS))
