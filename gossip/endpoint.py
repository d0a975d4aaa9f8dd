"""What a node does the same on every network: serve our estimate, receive neighbours'.

`Endpoint` serves our public estimate (`AdapterServer`, signing with our key), keeps the
announcement the next re-announcement publishes, queues the validated announcements heard
(`announcements`), and holds what we keep of our neighbours: the download slots, what each one
signed (`SignedOffers`), its estimate as we rebuilt it (`Replicas`), its link as our fetches
measured it, and the refusals by reason. `fetch` pulls an update within the limits the link
earned; `receive` fetches and applies it.

Only moving bytes differs between networks: `gossip.node.GossipNode` publishes through
gossipsub and opens transfer streams over libp2p, `gossip.memory.MemoryNode` does both in
memory. The request, the signed header, the body's limits, the decoding and every check are
this same code for both.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import trio

from gossip.addresses import Scope
from gossip.binding import SignedOffers
from gossip.compress import Codec, Shapes
from gossip.config import NodeConfig
from gossip.errors import TransferError, WireError
from gossip.estimate import PublicEstimate
from gossip.fetcher import cap_s, fetch_adapter, link_stats, patience
from gossip.replicas import Replicas
from gossip.transfer import AdapterServer, Fetched, Offer
from gossip.wire import NOT_PRIVATE, Announcement, FetchHeader

__all__ = ["Endpoint", "Heard", "Received"]

logger = logging.getLogger(__name__)

ANNOUNCEMENT_QUEUE = 256


@dataclass(frozen=True)
class Heard:
    """A validated announcement and the sequence number it was signed with.

    py-libp2p numbers a publisher's messages from the wall clock at its start, one up per
    publish, and strict signing covers the number: a higher one than any seen before from that
    peer proves the message is fresh, not a replay of an old one.
    """

    announcement: Announcement
    seqno: int
    via: str = Scope.PUBLIC  # scope of the connection it arrived on (`gossip.addresses`)


@dataclass(frozen=True)
class Received:
    """A neighbour's public estimate, rebuilt from the update fetched and checked against the
    signed digest; its format is sound. `nbytes` counts the update's bytes on the wire."""

    peer: str
    version: int
    samples: int
    state: dict[str, torch.Tensor]
    nbytes: int
    privacy: float = NOT_PRIVATE  # the ε its server signed for this version


class Endpoint:
    """A node's serving and receiving (see the module docstring).

    Args:
        config: network settings (upload and download slots, fetch limits, the size cap).
        swarm: the 16-byte swarm id, checked in every message.
        peer_id: our id; `sign` signs with its key.
        host: what `SignedOffers` looks up keys in when a peer id does not embed one
            (libp2p's host; None where every id is an Ed25519 one).
    """

    def __init__(self, config: NodeConfig, swarm: bytes, peer_id: str,
                 sign: Callable[[bytes], bytes], host: Any = None) -> None:
        self.config = config
        self.swarm = swarm
        self.peer_id = peer_id
        self.server = AdapterServer(
            swarm, sign, peer_id,
            max_concurrent=config.max_uploads,
            min_interval_s=config.min_upload_interval_s,
            timeout_s=cap_s(config),  # a slow link's upload may take as long as its fetch
            request_timeout_s=config.fetch_timeout_s,
            min_rate=config.min_upload_rate,
        )
        self.current: Announcement | None = None  # what a re-announcement publishes
        self.published_at = -float("inf")  # trio time of the last publish
        self._send, self.announcements = trio.open_memory_channel[Heard](ANNOUNCEMENT_QUEUE)
        # Each neighbour's estimate as we rebuilt it; our shapes bound what we take.
        self.replicas = Replicas(cap_bytes=config.max_adapter_bytes)
        self._signed = SignedOffers(host)  # what each peer signed: `forget` drops it
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.downloads_in_flight = 0
        self.downloads_peak = 0
        self._downloads = trio.Semaphore(config.max_downloads)
        self.links = link_stats(config)  # each neighbour's throughput and latency, measured
        # Catch-ups (`gossip.catchup`): asked for, entries heard, failed; replies we served.
        self.catchups: Counter[str] = Counter()
        self.catchups_served: Counter[str] = Counter()

    def catchup_status(self) -> dict[str, Any]:
        """What catch-ups brought us and what we served, for status.json."""
        return {key: self.catchups[key] for key in ("asked", "heard", "failed")} | {
            "served": dict(self.catchups_served)}

    async def _caught_up(self, announcement: Announcement, seqno: int, via: str) -> None:
        """Hear a checked catch-up entry as a delivery (our own message is skipped)."""
        if announcement.peer != self.peer_id:
            await self._send.send(Heard(announcement, seqno, via))
            self.catchups["heard"] += 1

    def update(self, announcement: Announcement) -> None:
        """Make `announcement` the one the next re-announcement publishes; send nothing now."""
        self.current = announcement

    def serve(self, offer: Offer) -> Offer:
        """Serve `offer` (a snapshot of our public estimate) to neighbours from now on."""
        self.server.publish(offer)
        return offer

    def offer(self, version: int, samples: int, state: Mapping[str, torch.Tensor]) -> Offer:
        """Serve `state` itself as a keyframe-only float32 estimate (x̂ = x exactly).

        Encodes on the event loop: for tests and small adapters; the daemon steps a
        `PublicEstimate` in a worker thread and calls `serve`.
        """
        snapshot = PublicEstimate(state, Codec("fp32"), version=version, keep=0).snapshot()
        return self.serve(Offer(version=version, samples=samples, estimate=snapshot))

    def expect_shapes(self, shapes: Shapes, *, rank_factor: int = 1,
                      origin: Mapping[str, torch.Tensor] | None = None) -> None:
        """Our adapter's shapes: what bounds a neighbour's update, and the swarm-seeded
        estimate every neighbour's starts from, if any (`Replicas.expect`)."""
        self.replicas.expect(shapes, rank_factor=rank_factor, origin=origin)

    def _forget_received(self, peer: str) -> None:
        """Drop what we received from `peer`, which left the membership view."""
        self._signed.forget(peer)
        self.replicas.forget(peer)

    async def fetch(self, announcement: Announcement, *,
                    held: tuple[int, bytes] | None = None) -> Fetched:
        """Pull a neighbour's estimate update, checked against the signed announcement.

        `held` is the (version, digest) of its estimate we hold (None: ask for a keyframe).

        At most `max_downloads` fetches run at once. Waiting for a slot counts against the
        same `fetch_timeout_s` as the dial and the header; the body then gets what the
        neighbour's link earned (`gossip.fetcher`), and a completed fetch updates that
        estimate (`links`).

        Raises:
            TransferError / WireError: with a reason; also counted in `rejected`.
        """
        started = trio.current_time()
        try:
            with trio.fail_at(started + self.config.fetch_timeout_s):
                await self._downloads.acquire()
        except trio.TooSlowError as exc:
            error = TransferError("timeout", "no free download slot within the fetch timeout")
            self.rejected[error.reason] += 1
            raise error from exc
        self.downloads_in_flight += 1
        self.downloads_peak = max(self.downloads_peak, self.downloads_in_flight)
        try:
            fetched = await self._fetch(announcement, started, held)
        except (TransferError, WireError) as exc:
            self.rejected[exc.reason] += 1
            raise
        finally:
            self.downloads_in_flight -= 1
            self._downloads.release()
        self.bytes_in += len(fetched.data)
        self.links.record(fetched.peer, len(fetched.data), fetched.body_s, fetched.rtt_s)
        return fetched

    async def _fetch(self, announcement: Announcement, started: float,
                     held: tuple[int, bytes] | None) -> Fetched:
        """Run the transfer protocol over a stream `_open_stream` opens (libp2p overrides
        this: it dials first and hangs up a connection opened only for the fetch)."""
        peer = announcement.peer
        return await fetch_adapter(
            lambda: self._open_stream(peer), peer, self.swarm,
            max_bytes=self.config.max_adapter_bytes, timeout_s=self.config.fetch_timeout_s,
            check=self._checker(announcement), patience=patience(self.config, self.links, peer),
            started=started, held=held)

    def _open_stream(self, peer: str) -> Awaitable[Any]:
        raise NotImplementedError("a network opens its own transfer streams")

    def _checker(self, announcement: Announcement) -> Callable[[FetchHeader], None]:
        """Binds a transfer header to what the peer signed, before its body is read."""
        bound = self.replicas.bound
        return lambda header: self._signed.check(announcement, header, bound)

    async def receive(self, announcement: Announcement) -> Received:
        """Fetch a neighbour's estimate update and apply it to our replica of its estimate.

        1. Ask for the steps since the version our replica holds (a keyframe when none).
        2. In a worker thread: decode the update, check it leads to the signed (version,
           digest) of the header, and apply it all or nothing (`EstimateReplica.apply`
           decodes every payload against the expected shapes and checks the digest rebuilt).
        3. A rejection drops the replica, so that the next fetch asks for a keyframe.

        Only the format is checked here: whether it fits our adapter is `merge.validate`'s to
        say. Every rejection is logged once with its reason and counted once, in `rejected`.

        Raises:
            TransferError / WireError: with the reason.
        """
        peer = announcement.peer
        async with self.replicas.receiving(peer):  # one update of a peer's at a time
            replica = self.replicas.get(peer)
            try:
                fetched = await self.fetch(announcement, held=self.replicas.held(peer))
            except (TransferError, WireError) as exc:  # counted by `fetch`
                logger.info("no adapter from %s: %s", peer, exc)
                raise
            try:
                applied, state = await trio.to_thread.run_sync(self.replicas.apply, replica,
                                                               fetched)
            except WireError as exc:
                self.replicas.refuse(peer)
                self._reject(exc.reason, "update from %s: %s", peer, exc)
                raise
            self.replicas.keep(peer, applied)
        return Received(peer=fetched.peer, version=fetched.version, samples=fetched.samples,
                        state=state, nbytes=len(fetched.data), privacy=fetched.privacy)

    def _reject(self, reason: str, fmt: str, *args: object) -> None:
        self.rejected[reason] += 1
        logger.warning("rejected " + fmt, *args)
