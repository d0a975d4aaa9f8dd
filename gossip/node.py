"""A swarm member on the network: libp2p host, gossipsub announcements, adapter transfers.

`GossipNode.run` owns every network task in one nursery. The daemon talks to it through a few
calls: `publish` an announcement, receive validated ones (`Heard`) from `announcements`, `serve`
the public estimate it offers (`gossip.estimate`), and `fetch` (or `receive`: fetch and apply)
a neighbour's estimate update, kept per neighbour in an `EstimateReplica`.
Who is in the swarm and whom to dial is `gossip.membership.Membership`'s business; how others
reach us (addresses, reachability, relays, hole punches) is read through `gossip.presence`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from gossip.addresses import Scope, address_scope
from gossip.catchup import CATCHUP_PROTOCOL, CatchupServer, Recent, ask_catchup, check_entry
from gossip.config import NodeConfig, connection_config
from gossip.dialback import DIALBACK_PROTOCOL, DialbackReply, DialbackServer, ask_dialback
from gossip.dialer import Dialer
from gossip.endpoint import ANNOUNCEMENT_QUEUE, Endpoint, Heard, Received
from gossip.errors import GossipError, TransferError, WireError
from gossip.fetcher import fetch_from
from gossip.hardening import (
    ConnectionLedger,
    close_host,
    guard_peerstore,
    host_key_pair,
    install_ping_fix,
    noise_only,
)
from gossip.holepunch import Puncher
from gossip.presence import Presence
from gossip.reachability import PRIVATE, ReachabilityProbe
from gossip.relay import GuardedRelay, RelayClient, circuit_transport, remote_addr
from gossip.router import FloodPublishGossipSub
from gossip.seqno import install_seqno_counter
from gossip.swarm import TRANSFER_PROTOCOL, topic_name
from gossip.transfer import Fetched
from gossip.upnp import PortMapper
from gossip.wire import Announcement

__all__ = ["GossipNode", "Heard", "NodeConfig", "Received"]

logger = logging.getLogger(__name__)

_TRANSFER = TProtocol(TRANSFER_PROTOCOL)
_DIALBACK = TProtocol(DIALBACK_PROTOCOL)
_CATCHUP = TProtocol(CATCHUP_PROTOCOL)


class GossipNode(Presence, Endpoint):
    """One peer's presence in a swarm.

    Args:
        config: network settings.
        swarm: the 16-byte swarm id; it names the pubsub topic and is checked in every message.
        identity_dir: folder holding the persistent libp2p key (`node.key`, mode 0600);
            None for an ephemeral identity (tests).
    """

    def __init__(self, config: NodeConfig, swarm: bytes, identity_dir: Path | None) -> None:
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
        super().__init__(config, swarm, str(self.host.get_id()), key_pair.private_key.sign,
                         self.host)
        guard_peerstore(self.host.get_peerstore(), self.host.get_id(),
                        self.host.get_connected_peers)
        self._ledger = ConnectionLedger()
        self.host.get_network().register_notifee(self._ledger)
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
        self._last_addrs: list[str] = []
        self._via: OrderedDict[tuple[bytes, bytes], str] = OrderedDict()  # validated, undrained
        self.relay = GuardedRelay(self.host, self._relaying, config.relay_rate)
        self.puncher = Puncher(self.host)
        self.dialer = Dialer(self.host, config, self.rejected,
                             circuit_transport(self.host, self.relay), self.puncher)
        self.relay_client = RelayClient(self.host, lambda: self.reachability.status == PRIVATE,
                                        self._relay_candidates, self.dialer.dial_direct)
        self.probe = ReachabilityProbe(self._ask_dialback, self.connected_peers,
                                       lambda: self.announce_addrs,
                                       interval_s=config.reachability_interval_s,
                                       on_verdict=self.relay_client.wake)
        self.upnp = PortMapper(self._mappable_ports, on_change=self.probe.wake)
        self.dialback = DialbackServer(swarm, config.psk)
        self.recent: Recent[rpc_pb2.Message] = Recent()  # each signer's newest (catch-ups)
        self.catchup_server = CatchupServer(self.recent)
        self.catchups_served = self.catchup_server.served

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the host, pubsub and transfer handler; signal readiness; serve until cancelled.

        On cancellation the host is closed first, while libp2p's own tasks still run, and only
        then are those tasks cancelled. The other order leaks sockets: a connection whose task
        is cancelled mid-close counts as closed but its socket stays open, and the peer at the
        other end keeps a zombie connection (PY-LIBP2P.md pitfall 6). `close()` itself left some
        open (one set up while it closed, others its table no longer held), and a neighbour's
        next fetch from us waited out its whole timeout: every connection still open after it
        is closed too (`gossip.hardening.close_host`).
        """
        libp2p_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._serve, libp2p_scope)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                await close_host(self.host, self._ledger)
                libp2p_scope.cancel()

    async def _serve(self, scope: trio.CancelScope, *, task_status: Any) -> None:
        """Everything libp2p runs, inside `scope` (shielded: only `run` may cancel it)."""
        self.host.set_stream_handler(_TRANSFER, self.server.handle)
        self.host.set_stream_handler(_DIALBACK, self.dialback.handle)
        self.host.set_stream_handler(_CATCHUP, self.catchup_server.handle)
        self.pubsub.set_topic_validator(self.topic, self._validate, False)
        with scope:
            async with self.host.run(
                listen_addrs=[multiaddr.Multiaddr(a) for a in self.config.listen]
            ):
                try:
                    await self._stop_auto_connector()
                    async with background_trio_service(self.pubsub), \
                            background_trio_service(self.router), \
                            background_trio_service(self.relay), \
                            background_trio_service(self.puncher):
                        await self.pubsub.wait_until_ready()
                        subscription = await self.pubsub.subscribe(self.topic)
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._drain, subscription)
                            if self.config.reachability_interval_s > 0:
                                nursery.start_soon(self.probe.run)
                            nursery.start_soon(self.relay_client.run)
                            if self.config.upnp:
                                nursery.start_soon(self.upnp.run)
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
        while len(self._via) > ANNOUNCEMENT_QUEUE:
            self._via.popitem(last=False)
        return True

    def _scope_of(self, peer: ID) -> str:
        """The scope of the address `peer` is connected from (public when unknown or relayed)."""
        if peer == self.host.get_id():
            return Scope.LOOPBACK
        for conn in self.host.get_network().get_connections(peer):
            addr = remote_addr(conn)
            if addr is not None:
                return address_scope(addr)
        return Scope.PUBLIC

    async def _drain(self, subscription: Any) -> None:
        """Move delivered messages to our own queue at once: libp2p's buffer drops at 32."""
        while True:
            msg = await subscription.get()
            signer, seqno = str(ID(msg.from_id)), int.from_bytes(msg.seqno, "big")
            if signer == self.peer_id:
                self.recent.keep(signer, seqno, msg)
                continue
            try:
                announcement = Announcement.from_wire(
                    msg.data, swarm=self.swarm, max_nbytes=self.config.max_adapter_bytes
                )
                self.recent.keep(signer, seqno, msg)
                via = self._via.pop((msg.from_id, msg.seqno), Scope.PUBLIC)
                self._send.send_nowait(Heard(announcement, seqno, via))
            except WireError as exc:  # validated already; kept for safety, never expected
                self._reject(exc.reason, "announcement: %s", exc)
            except trio.WouldBlock:
                self._reject("queue_full", "announcement from %s: queue_full: the daemon is "
                             "behind", ID(msg.from_id))

    async def _ask_dialback(self, peer: str, ports: tuple[int, ...]) -> DialbackReply:
        async def open_stream() -> Any:
            return await self.host.new_stream(ID.from_base58(peer), [_DIALBACK])

        return await ask_dialback(open_stream, self.swarm, ports)

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
        self._forget_received(peer)
        self.recent.forget(peer)
        self.dialer.forget(peer)

    async def catch_up(self, peer: str) -> int:
        """Ask `peer`, just connected, for the newest announcements it holds (see
        `gossip.catchup`); they are heard as deliveries. Returns how many came.

        A reply that fails a check is counted once in `rejected`, by reason.

        Raises:
            GossipError: no complete reply (the entries checked before it are kept).
        """
        via = self._scope_of(ID.from_base58(peer))

        async def take(raw: bytes) -> None:
            announcement, seqno = check_entry(raw, topic=self.topic, swarm=self.swarm,
                                              max_nbytes=self.config.max_adapter_bytes)
            await self._caught_up(announcement, seqno, via)

        self.catchups["asked"] += 1
        try:
            return await ask_catchup(
                lambda: self.host.new_stream(ID.from_base58(peer), [_CATCHUP]), take)
        except (WireError, TransferError) as exc:
            self._reject(exc.reason, "catch-up from %s: %s", peer, exc)
            self.catchups["failed"] += 1
            raise GossipError(f"catch-up from {peer} refused: {exc}") from exc
        except Exception as exc:  # timeouts, stream resets: libp2p's errors have no common base
            self.catchups["failed"] += 1
            raise GossipError(f"catch-up from {peer} failed: {type(exc).__name__}: {exc}") \
                from exc

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

    async def _fetch(self, announcement: Announcement, started: float,
                     held: tuple[int, bytes] | None) -> Fetched:
        """Over libp2p: dial if needed, and hang up a connection opened only for the fetch."""
        return await fetch_from(
            self.host, self.dial, announcement, swarm=self.swarm, config=self.config,
            links=self.links, started=started, held=held, check=self._checker(announcement),
            keep_direct=self._punched,
        )
