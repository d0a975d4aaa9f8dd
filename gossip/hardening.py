"""Where py-libp2p 0.8.1's defaults are unsafe for an open swarm, and what we use instead.

Each function fixes one measured problem; `GossipNode` applies them to its host:

1. `host_key_pair` + `noise_only`: `new_host`'s default security list also offers
   `/plaintext/2.0.0` (and TLS and SECIO). A node that offered only plaintext joined a swarm,
   heard every announcement and fetched adapters unencrypted, and our host dialled such a node in
   plaintext too. We offer Noise alone, so both directions refuse a plaintext-only peer.
2. `guard_peerstore`: the peerstore holds at most 1000 peers and evicts entries without
   addresses first, which includes our own entry with our key pair; the next publish then fails
   with `PeerStoreError`. A flood of ~1000 fresh signed identities crashed every daemon that way.
   The guard never evicts our own entry nor a connected peer's; `GossipNode.forget` keeps the
   rest to what the membership view admits.
3. `install_ping_fix`: the health monitor counts "protocol not supported" as a failed ping (the
   library's `select_one_of` wraps `ProtocolNotSupportedError` into its base class, which the
   probe does not recognise) and aborts the connection. A js-libp2p node, which leaves ping out by
   default, was cut off 6-17 s after joining. A peer without ping is one we cannot ping, not a
   dead one.
4. `ConnectionLedger` + `close_stragglers`: a stopped host left connections open that its
   swarm no longer closed: one that finished its setup between `Swarm.close`'s sweep of
   connections and its listeners' close (registered afterwards), and others that the swarm's
   table no longer held while their sockets stayed open. Nothing read them any more, so the peer
   at the other end kept a live-looking connection to a stopped peer, and its next fetch from
   it waited out the whole fetch timeout (20 s) instead of failing at once. In
   `tests/test_membership.py`'s abrupt stop: 2 runs of 21 failed so before; closing what the
   swarm still lists after `close()`, 2 of 51; closing also every connection the ledger saw
   registered and still open, 0 of 60.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.keystore import FileSystemKeyStore
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.network.health import monitor as health_monitor
from libp2p.network.health.ping_probe import ConnectionPingResult
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import ProtocolNotSupportedError
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

__all__ = ["guard_peerstore", "host_key_pair", "install_ping_fix", "noise_only"]

logger = logging.getLogger(__name__)

IDENTITY_NAME = "node"


def host_key_pair(identity_dir: Path | None) -> KeyPair:
    """The persistent Ed25519 identity in `identity_dir/node.key`, created on first use.

    None gives an ephemeral identity (tests). Same file layout as `new_host(keystore=...)`, so
    data folders of earlier versions keep their peer id.
    """
    if identity_dir is None:
        return generate_new_ed25519_identity()
    keystore = FileSystemKeyStore(identity_dir)
    if keystore.has(IDENTITY_NAME):
        return keystore.get(IDENTITY_NAME)
    key_pair = generate_new_ed25519_identity()
    keystore.put(IDENTITY_NAME, key_pair)
    return key_pair


def noise_only(key_pair: KeyPair) -> dict[TProtocol, Any]:
    """Security options that offer Noise alone (no plaintext, SECIO or TLS).

    TLS is left out until measured to interoperate: py-libp2p's own notes say Python's ssl module
    cannot do libp2p's mutual authentication reliably.
    """
    return {NOISE_PROTOCOL_ID: NoiseTransport(key_pair,
                                              noise_privkey=new_x25519_key_pair().private_key)}


def guard_peerstore(store: Any, own: ID, keep: Callable[[], Collection[ID]]) -> None:
    """Make `store` evict only entries that are neither ours nor in `keep()` when over its cap.

    Entries without addresses go first, then expired ones, then the oldest, as py-libp2p does;
    only the protected set differs.
    """
    def enforce_limit() -> None:
        excess = len(store.peer_data_map) - store.max_peers
        if excess <= 0:
            return
        protected = {own, *keep()}

        def priority(item: tuple[ID, Any]) -> tuple[bool, bool]:
            data = item[1]
            return (not data.get_addrs(), data.is_expired())

        candidates = [item for item in store.peer_data_map.items() if item[0] not in protected]
        candidates.sort(key=priority, reverse=True)
        for peer_id, _ in candidates[:excess]:
            store.peer_record_map.pop(peer_id, None)
            del store.peer_data_map[peer_id]
        logger.warning("peerstore over its cap of %d: evicted %d entries", store.max_peers,
                       min(excess, len(candidates)))

    store._enforce_peer_limit = enforce_limit


async def _probe(conn: Any, *, ping_timeout: float, negotiate_timeout: int | None = None,
                 skip_when_streams_open: bool = False) -> ConnectionPingResult:
    """py-libp2p's `ping_connection`, with "protocol not supported" counted as alive."""
    if skip_when_streams_open and conn.get_streams():
        return ConnectionPingResult(success=True, skipped=True)
    with trio.move_on_after(ping_timeout):
        stream = None
        try:
            stream = await conn.new_stream()
            started = trio.current_time()
            communicator = MultiselectCommunicator(stream)
            client = MultiselectClient()
            await client.handshake(communicator)
            try:
                await client.try_select(communicator, PING_PROTOCOL)
            except ProtocolNotSupportedError:
                # It answered the negotiation: the connection is alive, it just has no ping.
                return ConnectionPingResult(success=True, protocol_supported=False,
                                            rtt_ms=(trio.current_time() - started) * 1000)
            rtt_ms = float(await perform_ping_roundtrip(stream))
            return ConnectionPingResult(success=True, rtt_ms=rtt_ms, protocol_supported=True)
        except Exception as exc:  # a reset, closed or broken connection: a failed ping
            logger.debug("health ping failed: %s: %s", type(exc).__name__, exc)
            return ConnectionPingResult(success=False)
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await _close_stream(stream)
    return ConnectionPingResult(success=False)


async def _close_stream(stream: Any) -> None:
    try:
        await stream.close()
    except Exception:  # a broken stream may refuse to close; reset it instead
        try:
            await stream.reset()
        except Exception as exc:  # nothing more to do with it
            logger.debug("resetting a ping stream: %s", exc)


def install_ping_fix() -> None:
    """Make py-libp2p's health monitor use `_probe` (process-wide; idempotent)."""
    health_monitor.ping_connection = _probe


class ConnectionLedger(INotifee):
    """A notifee that holds (weakly) every connection its host registered, so that a stopping
    host can close each one, whether or not the swarm still lists it (see 4. above)."""

    def __init__(self) -> None:
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connected(self, network: Any, conn: Any) -> None:
        self._seen.add(conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._seen.discard(conn)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None

    def still_open(self) -> list[Any]:
        return [conn for conn in list(self._seen) if not getattr(conn, "is_closed", False)]


async def close_host(host: Any, ledger: ConnectionLedger) -> None:
    """Close `host` (at most 5 s), then whatever it left open (at most 2 s more, its own time:
    after a close that ran out of its own, the more to close); shielded from cancellation."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(5):
            await host.close()
        with trio.move_on_after(2):
            await close_stragglers(host, ledger)


async def close_stragglers(host: Any, ledger: ConnectionLedger) -> int:
    """Close the connections a closed host still lists, and those `ledger` saw registered
    that are still open (see 4. above); how many there were.

    Once the host has closed, its swarm's task manager has stopped and no new connection can
    register, so one pass finds them all.
    """
    network = host.get_network()
    listed = [conn for conns in list(network.connections.values()) for conn in conns]
    stragglers = list({id(conn): conn for conn in [*listed, *ledger.still_open()]}.values())
    for conn in stragglers:
        try:
            await conn.close()
        except Exception as exc:  # closing a broken connection may raise anything
            logger.debug("closing a connection left after close: %s", exc)
    network.connections.clear()
    if stragglers:
        logger.debug("closed %d connection(s) the host left open", len(stragglers))
    return len(stragglers)
