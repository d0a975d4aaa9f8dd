"""A swarm member on the network: libp2p host, gossipsub announcements, adapter transfers.

`GossipNode.run` owns every network task in one nursery. The daemon talks to it through a few
calls: `publish` an announcement, receive validated ones (`Heard`) from `announcements`, `serve`
the public estimate it offers (`gossip.estimate`), and `fetch` (or `receive`: fetch and apply)
a neighbour's estimate update, kept per neighbour in an `EstimateReplica`.
Who is in the swarm and whom to dial is `gossip.membership.Membership`'s business.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiaddr
import torch
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from gossip.addresses import Scope, address_scope
from gossip.binding import SignedOffers
from gossip.compress import Codec, Shapes
from gossip.config import NodeConfig, connection_config
from gossip.dialer import Dialer
from gossip.errors import GossipError, TransferError, WireError
from gossip.estimate import PublicEstimate
from gossip.fetcher import cap_s, fetch_from, link_stats
from gossip.hardening import guard_peerstore, host_key_pair, install_ping_fix, noise_only
from gossip.replicas import Replicas
from gossip.router import FloodPublishGossipSub
from gossip.seqno import install_seqno_counter
from gossip.swarm import TRANSFER_PROTOCOL, topic_name
from gossip.transfer import AdapterServer, Fetched, Offer
from gossip.wire import Announcement

__all__ = ["GossipNode", "Heard", "NodeConfig", "Received"]

logger = logging.getLogger(__name__)

_ANNOUNCEMENT_QUEUE = 256
_TRANSFER = TProtocol(TRANSFER_PROTOCOL)


@dataclass(frozen=True)
class Heard:
    """A validated announcement and the gossipsub sequence number it was signed with.

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


class GossipNode:
    """One peer's presence in a swarm.

    Args:
        config: network settings.
        swarm: the 16-byte swarm id; it names the pubsub topic and is checked in every message.
        identity_dir: folder holding the persistent libp2p key (`node.key`, mode 0600);
            None for an ephemeral identity (tests).
    """

    def __init__(self, config: NodeConfig, swarm: bytes, identity_dir: Path | None) -> None:
        self.config = config
        self.swarm = swarm
        self.topic = topic_name(swarm)
        key_pair = host_key_pair(identity_dir)
        install_ping_fix()
        self.host = new_host(
            key_pair=key_pair,
            sec_opt=noise_only(key_pair),
            listen_addrs=[multiaddr.Multiaddr(a) for a in config.listen],
            psk=config.psk,
            connection_config=connection_config(config),
        )
        self.peer_id = str(self.host.get_id())
        guard_peerstore(self.host.get_peerstore(), self.host.get_id(),
                        self.host.get_connected_peers)
        self.router = FloodPublishGossipSub(
            # Not v1.2: py-libp2p 0.8.1 answers every delivery with IDONTWANT to each mesh peer,
            # whatever the size (go-libp2p only past 1 KiB). For our ~300-byte announcements that
            # was 92 % of all RPCs, and it saturated a core with 32 peers in one process.
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=config.heartbeat_s,
            spam_protection_enabled=False,  # it silently drops our own paced publishes
        )
        self.pubsub = Pubsub(
            self.host, self.router, strict_signing=True, allowed_topics={self.topic}
        )
        # py-libp2p numbers messages from the wall clock at start: after the clock stepped
        # back, a restarted peer's messages looked like replays. A persisted counter never does.
        install_seqno_counter(self.pubsub, identity_dir / "seqno" if identity_dir else None)
        self.server = AdapterServer(
            swarm,
            key_pair.private_key.sign,
            self.peer_id,
            max_concurrent=config.max_uploads,
            min_interval_s=config.min_upload_interval_s,
            timeout_s=cap_s(config),  # a slow link's upload may take as long as its fetch
            request_timeout_s=config.fetch_timeout_s,
            min_rate=config.min_upload_rate,
        )
        # Each neighbour's estimate as we rebuilt it; our shapes bound what we take.
        self.replicas = Replicas(cap_bytes=config.max_adapter_bytes)
        self._signed = SignedOffers(self.host)  # what each peer signed: `forget` drops it
        self.rejected: Counter[str] = Counter()
        self.bytes_in = 0
        self.downloads_in_flight = 0
        self.downloads_peak = 0
        self._downloads = trio.Semaphore(config.max_downloads)
        self.links = link_stats(config)  # each neighbour's throughput and latency, measured
        self.current: Announcement | None = None  # what a re-announcement publishes
        self.published_at = -float("inf")  # trio time of the last publish
        self._send, self.announcements = trio.open_memory_channel[Heard](_ANNOUNCEMENT_QUEUE)
        self._last_addrs: list[str] = []
        self._via: OrderedDict[tuple[bytes, bytes], str] = OrderedDict()  # validated, undrained
        self.dialer = Dialer(self.host, config, self.rejected)

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) that other peers can bootstrap from.

        The last known addresses are kept after the host closes, for the final status.
        """
        try:
            addrs = self.host.get_addrs()
        except OSError:  # the host is closing and its listener socket is gone (EBADF)
            addrs = []
        current = [str(addr) if "/p2p/" in str(addr) else f"{addr}/p2p/{self.peer_id}"
                   for addr in addrs]
        if current:
            self._last_addrs = current
        return current or self._last_addrs

    @property
    def announce_addrs(self) -> list[str]:
        """Full multiaddrs our announcements carry: `config.announce` if set, else where we
        listen. A peer behind a proxy or a NAT is dialled at an address it does not listen on.
        """
        if not self.config.announce:
            return self.listen_addrs
        return [f"{addr}/p2p/{self.peer_id}" for addr in self.config.announce]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the host, pubsub and transfer handler; signal readiness; serve until cancelled.

        On cancellation the host is closed first, while libp2p's own tasks still run, and only
        then are those tasks cancelled. The other order leaks sockets: a connection whose task
        is cancelled mid-close counts as closed but its socket stays open, and the peer at the
        other end keeps a zombie connection (PY-LIBP2P.md pitfall 6).
        """
        libp2p_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._serve, libp2p_scope)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.host.close()
                libp2p_scope.cancel()

    async def _serve(self, scope: trio.CancelScope, *, task_status: Any) -> None:
        """Everything libp2p runs, inside `scope` (shielded: only `run` may cancel it)."""
        self.host.set_stream_handler(_TRANSFER, self.server.handle)
        self.pubsub.set_topic_validator(self.topic, self._validate, False)
        with scope:
            async with self.host.run(
                listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen]
            ):
                try:
                    await self._stop_auto_connector()
                    async with background_trio_service(self.pubsub), \
                            background_trio_service(self.router):
                        await self.pubsub.wait_until_ready()
                        subscription = await self.pubsub.subscribe(self.topic)
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._drain, subscription)
                            task_status.started()
                            await trio.sleep_forever()
                finally:
                    # Reached on a crash inside libp2p too: close, shielded and bounded.
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await self.host.close()

    async def _stop_auto_connector(self) -> None:
        """Leave every dial decision to `Membership`.

        py-libp2p's AutoConnector aims at the midpoint of the connection watermarks (150 by
        default) and dials every peer in the peerstore to get there: with the announced
        addresses we remember, each peer would connect to every other. It is started inside
        the swarm's run, right after this event, with no checkpoint in between.
        """
        network = self.host.get_network()
        started = getattr(network, "event_background_nursery_created", None)
        connector = getattr(network, "auto_connector", None)
        if started is None or connector is None:
            return
        await started.wait()
        await connector.stop()

    def _validate(self, forwarder: ID, msg: Any) -> bool:
        """Pubsub validator: runs before a message is delivered or forwarded (own ones too)."""
        try:
            announcement = Announcement.from_wire(
                msg.data, swarm=self.swarm, max_nbytes=self.config.max_adapter_bytes
            )
        except WireError as exc:
            self._reject(exc.reason, "announcement via %s: %s", forwarder, exc)
            return False
        signer = str(ID(msg.from_id))
        if announcement.peer != signer:
            self._reject("signer_mismatch", "announcement via %s: signer_mismatch: it claims %s "
                         "but is signed by %s", forwarder, announcement.peer, signer)
            return False
        # Which addresses of it we may dial depends on where it came from (see `remember`).
        self._via[(msg.from_id, msg.seqno)] = self._scope_of(forwarder)
        while len(self._via) > _ANNOUNCEMENT_QUEUE:
            self._via.popitem(last=False)
        return True

    def _scope_of(self, peer: ID) -> str:
        """The scope of the address `peer` is connected from (public when unknown)."""
        if peer == self.host.get_id():
            return Scope.LOOPBACK
        for conn in self.host.get_network().get_connections(peer):
            secured: Any = getattr(conn.muxed_conn, "secured_conn", None)
            try:
                host, _ = secured.get_remote_address()
                return address_scope(f"/{'ip6' if ':' in host else 'ip4'}/{host}")
            except Exception:  # not a TCP connection, or already closing: keep looking
                continue
        return Scope.PUBLIC

    def _reject(self, reason: str, fmt: str, *args: object) -> None:
        self.rejected[reason] += 1
        logger.warning("rejected " + fmt, *args)

    async def _drain(self, subscription: Any) -> None:
        """Move delivered messages to our own queue at once: libp2p's buffer drops at 32."""
        while True:
            msg = await subscription.get()
            if str(ID(msg.from_id)) == self.peer_id:
                continue
            try:
                announcement = Announcement.from_wire(
                    msg.data, swarm=self.swarm, max_nbytes=self.config.max_adapter_bytes
                )
                seqno = int.from_bytes(msg.seqno, "big")
                via = self._via.pop((msg.from_id, msg.seqno), Scope.PUBLIC)
                self._send.send_nowait(Heard(announcement, seqno, via))
            except WireError as exc:  # validated already; kept for safety, never expected
                self._reject(exc.reason, "announcement: %s", exc)
            except trio.WouldBlock:
                self._reject("queue_full", "announcement from %s: queue_full: the daemon is "
                             "behind", ID(msg.from_id))

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (with /p2p/<id>); returns the peer id (see `Dialer`)."""
        return await self.dialer.connect(addr)

    async def dial(self, peer: str) -> None:
        """Connect to `peer` at the addresses remembered for it (see `Dialer`)."""
        await self.dialer.dial(peer)

    def remember(self, peer: str, addrs: Sequence[str], *, via: str = Scope.PUBLIC) -> list[str]:
        """Record the announced addresses of `peer` that we may dial (see `Dialer`)."""
        return self.dialer.remember(peer, addrs, via=via)

    def forget(self, peer: str) -> None:
        """Drop what we hold for `peer`, which left the membership view."""
        self._signed.forget(peer)
        self.replicas.forget(peer)
        self.dialer.forget(peer)

    def connected_peers(self) -> list[str]:
        """Ids of every peer this host holds a connection to."""
        return [str(p) for p in self.host.get_connected_peers()]

    def topic_peers(self) -> list[str]:
        """Connected peers subscribed to the swarm topic: members we hear from directly."""
        connected = set(self.host.get_connected_peers())
        return sorted(str(p) for p in self.pubsub.peer_topics.get(self.topic, ()) if p in connected)

    async def publish(self, announcement: Announcement) -> None:
        """Sign and publish an announcement on the swarm topic; it becomes `current`.

        It becomes `current` even when publishing fails, so that the next re-announcement
        retries it.

        Raises:
            GossipError: libp2p could not sign or send it (logged by the caller, never fatal).
        """
        self.current = announcement
        try:
            await self.pubsub.publish(self.topic, announcement.to_wire())
        except Exception as exc:  # PeerStoreError, PeerDataError, stream errors: no common base
            raise GossipError(f"publishing failed: {type(exc).__name__}: {exc}") from exc
        self.published_at = trio.current_time()

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
        bound = self.replicas.bound
        return await fetch_from(
            self.host, self.dial, announcement, swarm=self.swarm, config=self.config,
            links=self.links, started=started, held=held,
            check=lambda header: self._signed.check(announcement, header, bound),
        )

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
                        state=state, nbytes=len(fetched.data))
