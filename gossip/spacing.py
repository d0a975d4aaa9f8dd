"""Spacing requests out per key: a server's answer to free identities.

A service that costs us work per request (a dial-back, a catch-up reply) serves each peer, and
each IP address the request came from, at most once per interval. Identities are free, so the
IP key is what bounds a flood of them; the keys kept are bounded too (oldest forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import trio

__all__ = ["Spacing"]

_REMEMBERED = 1024  # keys whose last request is kept


class Spacing:
    """Admits a request only when none of its keys was admitted within `min_interval_s`."""

    def __init__(self, min_interval_s: float, *, remembered: int = _REMEMBERED) -> None:
        self.min_interval_s = min_interval_s
        self._remembered = remembered
        self._last: OrderedDict[str, float] = OrderedDict()

    def ready(self, keys: Iterable[str]) -> bool:
        """Whether no key was admitted within the interval (nothing changes)."""
        now = trio.current_time()
        return all(now - self._last.get(key, -float("inf")) >= self.min_interval_s
                   for key in keys)

    def admit(self, keys: Iterable[str]) -> bool:
        """True (and each key's clock restarts) unless a key was admitted too recently."""
        now, keys = trio.current_time(), list(keys)
        if not self.ready(keys):
            return False
        for key in keys:
            self._last.pop(key, None)
            self._last[key] = now
        while len(self._last) > self._remembered:
            self._last.popitem(last=False)
        return True
