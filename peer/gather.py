"""One round's gathering: draw live neighbours, fetch their adapters, keep those that validate.

A neighbour that fails (unreachable, busy, timed out, rejected, untrained) is replaced by
another one drawn at random, in up to `WAVES` waves, so that a round merges `fanout` adapters
(`settle_fanout` in a settling round, which trains nothing and can afford more) whenever enough
neighbours answer. Neighbours that had not trained yet, and in a settling round those that
refused us for now (busy with other uploads, or asked too soon after our last fetch), are then
fetched again, backing off, for as long as our own training took (at least the fetch timeout),
while the round still has room.
gossip/ checks each adapter's format and counts what it refuses; this module validates
structure and norms and counts those refusals.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import trio

from gossip.errors import TransferError, WireError
from gossip.node import Received
from gossip.wire import NOT_PRIVATE, Announcement
from merge.config import MergeConfig
from merge.errors import RejectedUpdate
from merge.reference import NormReference
from merge.types import Contribution
from merge.validate import validate_update
from peer.stats import PeerStatistics

logger = logging.getLogger(__name__)

# Waves of fetches per round: the first draws `fanout` neighbours, later ones replace failures.
WAVES = 3
# Neighbours that had not trained yet are fetched again after 1, 2, 4... s.
PATIENCE_FIRST_S = 1.0
# Fetch failures that say nothing about a neighbour's honesty: it was busy, or the network
# failed it (see `Gatherer._judge`).
_BUSY = frozenset({"refused"})
_NETWORK = frozenset({"timeout", "unreachable", "truncated", "stalled", "too_slow"})

State = Mapping[str, torch.Tensor]
T = TypeVar("T")
# Runs a blocking function off the event loop; tests may run it inline instead.
Offload = Callable[[Callable[[], T]], Awaitable[T]]


class Source(Protocol):
    """What gathering needs of the network node (`gossip.node.GossipNode`)."""

    async def receive(self, announcement: Announcement) -> Received: ...


class Neighbours(Protocol):
    """What gathering needs of the membership service (`gossip.membership.Membership`)."""

    def sample(self, k: int, *, exclude: Any = ()) -> list[Announcement]: ...
    def answered(self, peer: str) -> None: ...
    def trust(self, peer: str) -> None: ...
    def failed(self, peer: str) -> None: ...
    def distrust(self, peer: str) -> None: ...


@dataclass
class Gathered:
    """What one round gathered: the adapters to merge, and who was asked."""

    accepted: list[Contribution] = field(default_factory=list)
    unanswered: list[Announcement] = field(default_factory=list)  # untrained or busy to the end
    tried: list[str] = field(default_factory=list)


async def _in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


class Gatherer:
    """Fetches and validates neighbours' adapters for a peer, round after round.

    Args:
        source: fetches and format-checks an announced adapter.
        neighbours: draws live neighbours and takes our verdict on each.
        merge: supplies the norm bound.
        fanout: adapters wanted per training round.
        settle_fanout: adapters wanted per settling round (None: `fanout`).
        fetch_timeout_s: the least time to wait for untrained neighbours.
        rank_free: accept LoRA factors of another rank (rules that can merge them).
        stats: where adapters received and validation refusals are counted.
        offload: runs validation off the event loop.
        require_dp: merge only neighbours that announce a DP guarantee of ε at most this.
    """

    def __init__(self, source: Source, neighbours: Neighbours, merge: MergeConfig, *,
                 fanout: int, fetch_timeout_s: float, settle_fanout: int | None = None,
                 rank_free: bool = False,
                 stats: PeerStatistics | None = None, offload: Offload[Any] = _in_thread,
                 require_dp: float | None = None) -> None:
        self.source = source
        self.require_dp = require_dp
        self.neighbours = neighbours
        self.merge = merge
        self.fanout = fanout
        self.settle_fanout = fanout if settle_fanout is None else settle_fanout
        self.fetch_timeout_s = fetch_timeout_s
        self.rank_free = rank_free
        self.offload = offload
        # The scale that bounds a neighbour's norm and distance: the median norm of recently
        # accepted neighbours, which one liar cannot inflate as it could our own norm.
        self.reference = NormReference()
        self.stats = stats if stats is not None else PeerStatistics()

    async def gather(self, own: State, *, version: int, trained: bool,
                     patience_s: float = 0.0, settling: bool = False) -> Gathered:
        """Fetch up to `fanout` valid adapters for the round that produced `version`.

        Args:
            own: our adapter state this round.
            version: our adapter version (ages the neighbours' adapters).
            trained: whether we have trained; if so, untrained neighbours are not merged.
            patience_s: how long our own training took; untrained neighbours are waited for
                that long, or `fetch_timeout_s` if longer.
            settling: a round that did not train: fetch up to `settle_fanout` instead.
        """
        scale = await self.offload(lambda: self.reference.scale(own))
        wanted = self.settle_fanout if settling else self.fanout
        round_ = _Round(own=own, version=version, trained=trained, scale=scale, wanted=wanted,
                        settling=settling)
        tried: set[str] = set()
        for wave in range(WAVES):
            missing = wanted - len(round_.found.accepted)
            if missing <= 0:
                break
            # Each wave draws twice as many as are missing: when most of the view is identities
            # that never serve (a sybil flood), later waves still reach an honest neighbour.
            chosen = self.neighbours.sample(missing << wave, exclude=tried)
            if not chosen:
                break
            tried.update(announcement.peer for announcement in chosen)
            await self._fetch_all(chosen, round_)
        round_.found.tried = sorted(tried)
        if round_.waiting and len(round_.found.accepted) < wanted:
            await self._await_again(round_, max(self.fetch_timeout_s, patience_s))
        round_.found.unanswered = round_.waiting
        self.reference.update(round_.norms)
        return round_.found

    async def _await_again(self, round_: _Round, patience_s: float) -> None:
        """Fetch untrained and busy neighbours again, backing off, for `patience_s`.

        Peers that start together finish their first round at different times, on a shared CPU
        up to a whole training round apart: the first to finish finds only untrained ones. And
        peers whose rounds start together (settling behind a gate) all fetch at once: a
        neighbour serves `max_uploads` of them and refuses the rest for that moment.
        """
        deadline = trio.current_time() + patience_s
        delay, started = PATIENCE_FIRST_S, trio.current_time()
        while (round_.waiting and len(round_.found.accepted) < round_.wanted
               and trio.current_time() + delay < deadline):
            await trio.sleep(delay)
            delay *= 2
            missing = round_.wanted - len(round_.found.accepted)
            chosen, round_.waiting = round_.waiting[:missing], round_.waiting[missing:]
            await self._fetch_all(chosen, round_)
        logger.info("waited %.1f s for neighbours to train or be free; %d of %d merged",
                    trio.current_time() - started, len(round_.found.accepted), round_.wanted)

    async def _fetch_all(self, chosen: list[Announcement], round_: _Round) -> None:
        async with trio.open_nursery() as nursery:
            for announcement in chosen:
                nursery.start_soon(self._fetch_one, announcement, round_)

    async def _fetch_one(self, announcement: Announcement, round_: _Round) -> None:
        peer = announcement.peer
        if self._refused_as_private(peer, announcement.privacy, "announced"):
            return  # before a byte is fetched
        try:
            received = await self.source.receive(announcement)
        except (TransferError, WireError) as exc:  # the node counted and logged it
            logger.debug("no adapter from %s this round: %s", peer, exc)
            self._judge(peer, exc.reason)
            if exc.reason in _BUSY and round_.settling:
                # Settling peers behind a gate all fetch at once: busy now, free in a second.
                # (A training round goes on with other neighbours: waits there cost training.)
                round_.waiting.append(announcement)
            return
        self.stats.adapters_received += 1
        self.neighbours.answered(peer)
        if self._refused_as_private(peer, received.privacy, "the version fetched signed"):
            return  # it spent more ε since the announcement we judged
        if received.samples == 0 and round_.trained:
            # A neighbour that has not finished its first round serves the seeded adapter,
            # which would merge with weight 0: try another one, or it again later.
            logger.debug("%s has not trained yet; not merged", peer)
            round_.waiting.append(announcement)
            return
        try:
            norm = await self.offload(lambda: validate_update(
                round_.own, received.state, self.merge, allow_rank_change=self.rank_free,
                reference=round_.scale))
        except RejectedUpdate as exc:
            self.stats.rejected[exc.reason] += 1
            logger.warning("rejected adapter from %s: %s", peer, exc)
            self._judge(peer, exc.reason)
            return
        self.neighbours.trust(peer)
        round_.norms.append(norm)
        round_.found.accepted.append(Contribution(
            state=received.state, samples=received.samples, peer=peer,
            age=max(0, round_.version - received.version)))

    def _refused_as_private(self, peer: str, epsilon: float, signed: str) -> bool:
        """Whether `--require-dp` refuses a neighbour that signed `epsilon`; a refusal is
        counted by reason (one of PRIVACY_REASONS) and logged.

        Judged on its latest signed announcement before fetching, then on the signed header
        of the version fetched; it says nothing of honesty, so the neighbour is neither
        distrusted nor dropped.
        """
        if self.require_dp is None:
            return False
        if epsilon == NOT_PRIVATE:
            reason = "not_private"
        elif epsilon > self.require_dp:
            reason = "epsilon_over"
        else:
            return False
        self.stats.rejected[reason] += 1
        logger.info("not merging %s: %s (%s ε %g, --require-dp %g)", peer, reason, signed,
                    epsilon, self.require_dp)
        return True

    def _judge(self, peer: str, reason: str) -> None:
        """Drop a neighbour that served invalid bytes; draw one the network failed after others.

        A busy answer costs nothing. Identities are free: one that never serves must sink to
        the end of the draw, but an honest peer on a loaded machine times out too, so a
        network failure keeps its place in the view.
        """
        if reason in _BUSY:
            return
        if reason in _NETWORK:
            self.neighbours.failed(peer)
            return
        logger.info("%s dropped from the view (%s)", peer, reason)
        self.neighbours.distrust(peer)


@dataclass
class _Round:
    """The state of one `Gatherer.gather` call, shared by its concurrent fetches."""

    own: State
    version: int
    trained: bool
    scale: float
    wanted: int  # adapters this round merges at most: the fanout of a training or settling round
    settling: bool = False  # a round that trained nothing: busy neighbours are asked again
    found: Gathered = field(default_factory=Gathered)
    waiting: list[Announcement] = field(default_factory=list)  # untrained or busy: ask again
    norms: list[float] = field(default_factory=list)  # of accepted adapters, for the reference
