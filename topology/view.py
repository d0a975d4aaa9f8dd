"""A bounded partial view of the swarm, and uniform random sampling of neighbours from it.

The view is fed by two kinds of events: announcements (a peer says "I have adapter version v")
and connection events (we merely heard from a peer). Peers that stay silent for longer than
`TopologyConfig.peer_timeout_s` stop being live; `expire` drops them. The clock and the random
generator are arguments, so every decision here is reproducible in tests.

Replays: an announcement whose version is not newer than one already seen from that peer is
reported as `Observation.REPLAY` and changes nothing, in particular not the peer's last-heard
time, so that re-broadcasting a dead peer's old announcement cannot keep it alive. The highest
version of peers that left the view is remembered too (in a bounded table), so that the same
trick cannot resurrect a peer right after it expired either.
"""

from __future__ import annotations

import enum
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from topology.admission import (
    draw_rank,
    eviction_candidate,
    per_prefix_cap,
    public_prefix,
    retry_after_s,
)
from topology.config import TopologyConfig
from topology.errors import InvalidArgument

logger = logging.getLogger(__name__)

NO_VERSION = -1
"""`PeerInfo.version` of a peer that has not announced an adapter yet."""


@dataclass(frozen=True)
class PeerInfo:
    """What the view knows about one peer."""

    peer_id: str
    addrs: tuple[str, ...]
    last_heard: float  # on the caller's clock, in seconds
    version: int  # latest adapter version announced, NO_VERSION if none yet
    samples: int  # training samples embodied in that version
    admitted: float = 0.0  # when it entered the view: seniority
    trusted: bool = False  # it served us an adapter that passed validation
    failures: int = 0  # fetches from it that failed since it last served a valid adapter
    retry_at: float = 0.0  # until then its failures rank it after the others (`failed`)
    reached: bool = False  # we held a connection to it: a real host answers for this id


class Observation(enum.Enum):
    """What `MembershipView.observe` concluded about an event."""

    NEW = "new"  # the peer was not in the view and now is
    UPDATED = "updated"  # a known peer announced a newer version
    REFRESHED = "refreshed"  # a known peer is alive; nothing else changed
    REPLAY = "replay"  # a version not newer than one already seen: ignored entirely
    REFUSED = "refused"  # a new peer the full view has no room for (see `_admit`)


@dataclass(frozen=True)
class ViewStatistics:
    """A snapshot of the view for status reports; counters are totals since creation."""

    known: int  # peers held, live or not yet expired
    live: int  # peers heard within the timeout
    announced: int  # live peers that have announced an adapter (eligible as neighbours)
    newest_version: int  # highest version among known peers, NO_VERSION if none
    stalest_age_s: float | None  # seconds since the least recently heard live peer; None if none
    replays: int
    evictions: int  # peers pushed out to make room for a new one
    expirations: int  # peers dropped by `expire` for silence
    trusted: int = 0  # live peers that served a valid adapter
    refused: int = 0  # new peers turned away: the view was full of senior or trusted ones


class MembershipView:
    """Bounded set of peers with liveness, versions and random sampling.

    Args:
        config: sizes and timeout.
        self_id: this node's peer id; it is never stored and so never sampled.
    """

    def __init__(self, config: TopologyConfig, self_id: str) -> None:
        self._config = config
        self._self_id = self_id
        self._peers: dict[str, PeerInfo] = {}
        # Highest versions of departed peers, oldest departure first; bounded like the view.
        self._departed: OrderedDict[str, int] = OrderedDict()
        self._replays = 0
        self._evictions = 0
        self._expirations = 0
        self._refused = 0

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def get(self, peer_id: str) -> PeerInfo | None:
        """The view's record of `peer_id`, live or not, or None if it holds none."""
        return self._peers.get(peer_id)

    def observe(
        self,
        peer_id: str,
        now: float,
        *,
        addrs: Sequence[str] = (),
        version: int | None = None,
        samples: int = 0,
        fresh: bool = False,
    ) -> Observation:
        """Record that `peer_id` was heard from at time `now`.

        Args:
            peer_id: the peer heard from.
            now: the caller's clock, in seconds.
            addrs: addresses to reach the peer at; empty keeps the ones already known.
            version: the adapter version announced, or None for a connection event (liveness
                only: it refreshes the last-heard time and is never a replay).
            samples: training samples embodied in `version`; ignored when `version` is None.
            fresh: the caller has proven the message newer than any before from this peer (a
                higher signed sequence number). Then a peer that expired or was forgotten may
                come back with the version it had: a re-announcement, not a replay.

        Returns:
            What the event meant. A REPLAY leaves the view untouched. Observing `self_id`
            changes nothing and returns REFRESHED: a node never holds itself in its view.

        Raises:
            InvalidArgument: `now` is not finite, or `version` or `samples` is negative.
        """
        _check_time(now)
        if version is not None and version < 0:
            raise InvalidArgument(f"version must be >= 0 or None, got {version}")
        if samples < 0:
            raise InvalidArgument(f"samples must be >= 0, got {samples}")
        if peer_id == self._self_id:
            return Observation.REFRESHED
        known = self._peers.get(peer_id)
        if version is not None and self._is_replay(peer_id, known, version, fresh):
            self._replays += 1
            logger.debug("replayed version %d from %s ignored", version, peer_id)
            return Observation.REPLAY
        if known is None:
            return self._admit(peer_id, now, tuple(addrs), version, samples)
        # An event delivered late must not move the last-heard time backwards.
        heard = max(known.last_heard, now)
        new_addrs = tuple(addrs) or known.addrs
        if version is None:
            self._peers[peer_id] = replace(known, last_heard=heard, addrs=new_addrs)
            return Observation.REFRESHED
        self._departed.pop(peer_id, None)
        self._peers[peer_id] = replace(
            known, last_heard=heard, addrs=new_addrs, version=version, samples=samples
        )
        return Observation.UPDATED

    def trust(self, peer_id: str) -> None:
        """Mark `peer_id` as having served an adapter that passed validation.

        Trust is earned, never claimed: admission never evicts a trusted peer (only silence
        does), and `sample` draws half its peers from the trusted ones.
        """
        info = self._peers.get(peer_id)
        if info is not None:
            self._peers[peer_id] = replace(info, trusted=True, failures=0, retry_at=0.0)

    def reached(self, peer_id: str) -> None:
        """We hold a connection to `peer_id`: Noise proved a host answers for its id.

        Minting an identity is free; keeping a host up for it is not. Untrusted peers that
        were reached are drawn before those never reached.
        """
        info = self._peers.get(peer_id)
        if info is not None and not info.reached:
            self._peers[peer_id] = replace(info, reached=True)

    def failed(self, peer_id: str, now: float) -> None:
        """A fetch from `peer_id` failed (unreachable, timed out): draw it after the others
        for a while, twice as long after each failure in a row (`retry_after_s`).

        It keeps its place: an honest peer on a loaded machine times out too, and dropped, it
        would come back as a newcomer, the first to be evicted under a flood. And it comes
        back to the draw: ranked after the others for good, a peer that failed once (asked
        before it held an address we could dial) was never drawn again while others served.
        """
        _check_time(now)
        info = self._peers.get(peer_id)
        if info is not None:
            failures = info.failures + 1
            self._peers[peer_id] = replace(info, failures=failures,
                                           retry_at=now + retry_after_s(failures))

    def distrust(self, peer_id: str) -> None:
        """Drop `peer_id`: it served something invalid."""
        self.forget(peer_id)

    def is_trusted(self, peer_id: str) -> bool:
        """Whether `peer_id` is in the view and trusted."""
        info = self._peers.get(peer_id)
        return info is not None and info.trusted

    def forget(self, peer_id: str) -> None:
        """Drop `peer_id` from the view (nothing happens if it is not there).

        Its highest version is still remembered, so replays of its old announcements stay
        replays.
        """
        info = self._peers.pop(peer_id, None)
        if info is not None:
            self._remember_departure(info)

    def expire(self, now: float) -> list[str]:
        """Drop every peer silent for longer than the timeout.

        A peer heard exactly `peer_timeout_s` seconds before `now` is still live.

        Returns:
            The ids of the dropped peers, sorted.
        """
        _check_time(now)
        gone = sorted(p for p, info in self._peers.items() if not self._is_live(info, now))
        for peer_id in gone:
            self._remember_departure(self._peers.pop(peer_id))
        self._expirations += len(gone)
        if gone:
            logger.info("%d silent peer(s) dropped from the view: %s", len(gone), ", ".join(gone))
        return gone

    def live(self, now: float) -> list[PeerInfo]:
        """Peers heard within the timeout, sorted by id (expired ones are not dropped here)."""
        _check_time(now)
        return [self._peers[p] for p in sorted(self._peers) if self._is_live(self._peers[p], now)]

    def sample(
        self,
        k: int,
        rng: random.Random,
        now: float,
        *,
        exclude: Collection[str] = (),
        require_version: bool = True,
    ) -> list[PeerInfo]:
        """Draw `k` distinct live peers uniformly at random (all of them if fewer are live).

        Args:
            k: how many peers to draw.
            rng: the source of randomness; the same seed and view give the same draw.
            now: the caller's clock, in seconds.
            exclude: peer ids never to draw (for instance those already fetched from).
            require_version: draw only peers that have announced an adapter.

        Returns:
            The drawn peers, in the order drawn.

        Raises:
            InvalidArgument: `k` is negative.
        """
        if k < 0:
            raise InvalidArgument(f"k must be >= 0, got {k}")
        candidates = [
            info
            for info in self.live(now)
            if info.peer_id not in exclude and (info.version >= 0 or not require_version)
        ]
        # Half the draw comes from trusted peers when there are any (an odd draw's last peer
        # with even odds): a flood of identities can fill the untrusted part of the view, never
        # the trusted one; and the other half keeps reaching peers not trusted yet, who earn
        # trust only by being fetched from.
        # Candidates are in id order, so the draw depends only on the rng state and the view.
        trusted = [info for info in candidates if info.trusted]
        share = k // 2 + (k % 2 if rng.random() < 0.5 else 0)
        drawn = rng.sample(trusted, min(share, len(trusted)))
        # The rest, level by level: peers whose fetches failed least lately first, and among
        # those the ones a host answered for (identities that never serve sink to the end).
        rest = [(draw_rank(info, now), info) for info in candidates if info not in drawn]
        for level in sorted({rank for rank, _ in rest}):
            if len(drawn) == k:
                break
            tier = [info for rank, info in rest if rank == level]
            drawn += rng.sample(tier, min(k - len(drawn), len(tier)))
        return drawn

    def statistics(self, now: float) -> ViewStatistics:
        """Counts and ages describing the view at time `now`."""
        live = self.live(now)
        return ViewStatistics(
            trusted=sum(1 for info in live if info.trusted),
            refused=self._refused,
            known=len(self._peers),
            live=len(live),
            announced=sum(1 for info in live if info.version >= 0),
            newest_version=max((i.version for i in self._peers.values()), default=NO_VERSION),
            stalest_age_s=max((now - info.last_heard for info in live), default=None),
            replays=self._replays,
            evictions=self._evictions,
            expirations=self._expirations,
        )

    def _is_live(self, info: PeerInfo, now: float) -> bool:
        return now - info.last_heard <= self._config.peer_timeout_s

    def _is_replay(self, peer_id: str, known: PeerInfo | None, version: int, fresh: bool) -> bool:
        """Whether `version` is not above the highest seen from `peer_id`, in the view or not.

        A fresh message may repeat the version a departed peer had: it re-announces itself.
        """
        current = known.version if known is not None else NO_VERSION
        departed = self._departed.get(peer_id, NO_VERSION)
        if fresh and version == departed and version > current:
            return False
        return version <= max(current, departed)

    def _admit(self, peer_id: str, now: float, addrs: tuple[str, ...], version: int | None,
               samples: int) -> Observation:
        """Add a new peer if there is room for it; NEW, or REFUSED.

        Admission under a flood of free identities (Brahms and SecureCyclon make the same
        choices): when the view is full, a silent member goes first (the one heard longest ago);
        otherwise the newest untrusted member makes room, so newcomers compete only with each
        other and senior and trusted members stay. A full view of trusted members refuses the
        newcomer. So does one more untrusted member from a public /24 (IPv6: /48) that already
        holds `per_prefix_cap` of them: one machine's identities cannot fill the view.
        """
        prefix = public_prefix(addrs)
        if prefix is not None and self._prefix_count(prefix) >= per_prefix_cap(self._config):
            return self._refuse(peer_id, f"its address prefix {prefix} holds enough peers")
        if len(self._peers) >= self._config.view_size:
            victim = eviction_candidate(self._peers.values(), lambda info: self._is_live(info, now))
            if victim is None:
                return self._refuse(peer_id, "every member is trusted")
            del self._peers[victim.peer_id]
            self._remember_departure(victim)
            self._evictions += 1
            logger.debug("view full: evicted %s for %s", victim.peer_id, peer_id)
        if version is not None:
            self._departed.pop(peer_id, None)
        self._peers[peer_id] = PeerInfo(
            peer_id=peer_id,
            addrs=addrs,
            last_heard=now,
            version=NO_VERSION if version is None else version,
            samples=0 if version is None else samples,
            admitted=now,
        )
        return Observation.NEW

    def _refuse(self, peer_id: str, why: str) -> Observation:
        self._refused += 1
        logger.debug("view refused %s: %s", peer_id, why)
        return Observation.REFUSED

    def _prefix_count(self, prefix: str) -> int:
        return sum(1 for info in self._peers.values()
                   if not info.trusted and public_prefix(info.addrs) == prefix)

    def _remember_departure(self, info: PeerInfo) -> None:
        floor = max(info.version, self._departed.pop(info.peer_id, NO_VERSION))
        if floor < 0:
            return
        self._departed[info.peer_id] = floor
        # Bounded memory: beyond it, the oldest departures are forgotten (and could be replayed).
        while len(self._departed) > self._config.view_size:
            self._departed.popitem(last=False)


def _check_time(now: float) -> None:
    if not math.isfinite(now):
        raise InvalidArgument(f"now must be a finite time in seconds, got {now}")
