"""What each neighbour's link delivered lately, and how long a fetch from it may take.

Pure bookkeeping (no trio, no libp2p): the node records every completed transfer and asks for
a deadline before reading the next body.

The estimates are exponentially weighted moving averages (weight `alpha` on the newest
sample) of a peer's throughput (body bytes / body seconds) and its latency (request sent to
header received, dial excluded). A peer never measured gets the prior: a home uplink
(`PRIOR_RATE`, `PRIOR_RTT_S`). The prior is optimistic on purpose: every unknown identity gets
it, so a slow prior would hand a sybil that trickles a long deadline; an honest slow link
keeps its transfer alive by progressing (see `gossip.fetcher`), not by its prior.

The body budget of a fetch of `n` bytes is::

    budget(n) = clamp(LATENCY_RTTS * rtt + n / (safety * rate), floor_s, cap_s)

`safety` (0.5) allows the link to run at half its usual rate before the budget is spent;
`floor_s` is the node's `fetch_timeout_s` (never shorter than the fixed limit it replaces),
`cap_s` its `max_fetch_s`. Memory is bounded: at most `max_peers` peers, the least recently
recorded forgotten first (identities are free).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["LinkEstimate", "LinkStats"]

PRIOR_RATE = float(1 << 20)  # bytes/s: 8 Mbit/s, a home uplink
PRIOR_RTT_S = 0.5
LATENCY_RTTS = 4.0  # the latency allowance of a budget, in round trips
MIN_BODY_S = 1e-3  # a body timed at less than this counts as this (clock granularity)


@dataclass(frozen=True)
class LinkEstimate:
    """One peer's link as we measured it; `transfers` is 0 for the prior."""

    rate_bps: float
    rtt_s: float
    transfers: int

    def to_status(self) -> dict[str, float | int]:
        return {"rate_bps": round(self.rate_bps), "rtt_s": round(self.rtt_s, 4),
                "transfers": self.transfers}


class LinkStats:
    """Per-peer EWMA of throughput and latency, and the fetch budgets they give.

    Args:
        floor_s: the least budget of a fetch body.
        cap_s: the most budget of a fetch body (and of the whole fetch).
        alpha: weight of the newest sample, in (0, 1].
        safety: fraction of the estimated rate a budget counts on, in (0, 1].
        max_peers: peers remembered at most.
        prior_rate / prior_rtt_s: the estimate of a peer never measured.
    """

    def __init__(self, *, floor_s: float, cap_s: float, alpha: float = 0.25,
                 safety: float = 0.5, max_peers: int = 256, prior_rate: float = PRIOR_RATE,
                 prior_rtt_s: float = PRIOR_RTT_S) -> None:
        if not 0 < floor_s <= cap_s:
            raise ValueError("need 0 < floor_s <= cap_s")
        if not (0 < alpha <= 1 and 0 < safety <= 1):
            raise ValueError("alpha and safety must be in (0, 1]")
        if max_peers < 1 or not prior_rate > 0 or prior_rtt_s < 0:
            raise ValueError("need max_peers >= 1, prior_rate > 0 and prior_rtt_s >= 0")
        self.floor_s, self.cap_s = floor_s, cap_s
        self.alpha, self.safety, self.max_peers = alpha, safety, max_peers
        self.prior = LinkEstimate(rate_bps=prior_rate, rtt_s=prior_rtt_s, transfers=0)
        self._links: OrderedDict[str, LinkEstimate] = OrderedDict()

    def __len__(self) -> int:
        return len(self._links)

    def estimate(self, peer: str) -> LinkEstimate:
        """The peer's estimate, or the prior if it was never measured (or forgotten)."""
        return self._links.get(peer, self.prior)

    def record(self, peer: str, nbytes: int, body_s: float, rtt_s: float) -> LinkEstimate:
        """Fold one completed transfer into the peer's estimate.

        Args:
            nbytes: body bytes received.
            body_s: seconds from the header to the last body byte.
            rtt_s: seconds from sending the request to receiving the header.
        """
        rate = max(nbytes, 1) / max(body_s, MIN_BODY_S)
        rtt = max(rtt_s, 0.0)
        old = self._links.pop(peer, None)
        if old is None:  # the first sample replaces the prior: it says more about this link
            new = LinkEstimate(rate_bps=rate, rtt_s=rtt, transfers=1)
        else:
            a = self.alpha
            new = LinkEstimate(rate_bps=(1 - a) * old.rate_bps + a * rate,
                               rtt_s=(1 - a) * old.rtt_s + a * rtt, transfers=old.transfers + 1)
        self._links[peer] = new
        while len(self._links) > self.max_peers:
            self._links.popitem(last=False)
        return new

    def deadline_for(self, peer: str, nbytes: int) -> float:
        """Seconds a fetch of `nbytes` from `peer` may take: `budget(n)` of the module doc."""
        link = self.estimate(peer)
        wanted = LATENCY_RTTS * link.rtt_s + max(nbytes, 0) / (self.safety * link.rate_bps)
        return min(self.cap_s, max(self.floor_s, wanted))

    def forget(self, peer: str) -> None:
        self._links.pop(peer, None)

    def statistics(self, peers: Iterable[str] | None = None) -> dict[str, LinkEstimate]:
        """The measured estimates, of `peers` only when given (never the prior)."""
        if peers is None:
            return dict(self._links)
        return {peer: self._links[peer] for peer in peers if peer in self._links}
