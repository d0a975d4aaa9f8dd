"""Dialling peers, and the addresses we may dial them at.

A peer may only tell us where it itself lives (`gossip.addresses`), each address backs off on
its own after a failed dial, and the peerstore holds only what the membership view admits.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from gossip.addresses import AddressBackoff, Scope, circuit_relay, usable_addrs
from gossip.config import NodeConfig
from gossip.errors import GossipError
from gossip.relay import dial_circuit, is_relayed, remote_addr

logger = logging.getLogger(__name__)

_PEERSTORE_TTL_S = 3600
_RELAYS_PER_PEER = 4


class Dialer:
    """Connects a host to peers by id or address, with per-address backoff.

    Args:
        host: the libp2p host.
        config: dial timeout, swarm key (for error hints), private-address policy.
        rejected: the node's refusal counter (addresses refused count as "bad_addr").
        circuits: the circuit transport for relayed dials (`gossip.relay`), or None.
        puncher: tries for a direct connection after a relayed dial (`gossip.holepunch`).
    """

    def __init__(self, host: Any, config: NodeConfig, rejected: Counter[str],
                 circuits: Any = None, puncher: Any = None) -> None:
        self.host = host
        self.config = config
        self.rejected = rejected
        self.circuits = circuits
        self.puncher = puncher
        self._backoff = AddressBackoff()
        self._relays: dict[str, list[str]] = {}  # peer -> relays it announced a circuit through
        # peer -> the direct addresses it announced that we may dial. The peerstore holds more
        # (identify adds every listen address a peer reports, loopback and LAN ones too).
        self._announced: dict[str, list[str]] = {}
        self.relayed_dials: Counter[str] = Counter()  # "ok" or "failed"
        self.reached_by_relay: set[str] = set()  # peers whose last dial went through a relay

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (with /p2p/<id>); returns the peer id.

        Raises:
            GossipError: the address is malformed or the dial failed or timed out.
        """
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:  # multiaddr parsing raises several unrelated types
            raise GossipError(f"bad address {addr!r}: {exc}") from exc
        await self._dial(info)
        return str(info.peer_id)

    async def dial(self, peer: str) -> None:
        """Connect to `peer` at the addresses remembered for it (see `remember`).

        Raises:
            GossipError: no address is known, or the dial failed or timed out.
        """
        pid = ID.from_base58(peer)
        self.sweep(pid)
        relays = self._relays.get(peer, [])
        try:
            await self._dial_direct(pid, required=not relays)
            self.reached_by_relay.discard(peer)
            return
        except GossipError as exc:
            error = exc
        for relay in relays:  # direct first: a relay is slower and shared
            try:
                await self._dial_relayed(relay, peer)
            except GossipError as exc:
                error = exc
                continue
            return
        raise error

    async def _dial_direct(self, pid: ID, *, required: bool = True) -> None:
        """Dial `pid` at the addresses it announced (else the peerstore's), one by one, each
        with its backoff."""
        addrs = self._announced.get(str(pid), [])
        if not addrs:
            try:
                addrs = [str(a) for a in self.host.get_peerstore().addrs(pid)]
            except Exception:  # PeerStoreError when the peer is unknown
                addrs = []
        if not addrs:
            raise GossipError(f"no {'' if required else 'direct '}address known for {pid}")
        ready = self._backoff.ready(addrs, trio.current_time())
        if not ready:
            raise GossipError(f"every address of {pid} is backing off after failed dials")
        error: GossipError | None = None
        for addr in ready:  # one by one: each failure backs off that address alone
            try:
                await self._dial(PeerInfo(pid, [multiaddr.Multiaddr(addr)]))
            except GossipError as exc:
                self._backoff.failed(addr, trio.current_time())
                error = exc
                continue
            self._backoff.succeeded(addr)
            return
        assert error is not None
        raise error

    async def dial_direct(self, peer: str) -> None:
        """Connect to `peer` at its own announced addresses, never through a relay."""
        await self._dial_direct(ID.from_base58(peer))

    async def _dial_relayed(self, relay: str, peer: str) -> None:
        """Dial `peer` through `relay`, dialling the relay first (directly) if need be."""
        if self.circuits is None or relay == str(self.host.get_id()):
            raise GossipError(f"no relayed dial to {peer} through {relay}")
        relay_id = ID.from_base58(relay)
        self.sweep(relay_id)
        if not self._direct(relay_id):
            # At the addresses it announced itself, never through another relay: a circuit
            # address names a relay, and the relay's own announcements say where it lives.
            await self._dial_direct(relay_id)
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                await dial_circuit(self.circuits, self._relay_addr(relay_id), relay, peer)
        except Exception as exc:  # ConnectionError, timeouts, stream errors
            self.relayed_dials["failed"] += 1
            raise GossipError(f"relayed dial through {relay} failed: {type(exc).__name__}: "
                              f"{exc}") from exc
        self.relayed_dials["ok"] += 1
        self.reached_by_relay.add(peer)
        if self.puncher is not None:
            await self.puncher.punch(peer)

    def _relay_addr(self, relay: ID) -> str:
        """An address of a connected relay: one it announced, else where we reached it."""
        with contextlib.suppress(Exception):
            for addr in self.host.get_peerstore().addrs(relay):
                return str(addr)
        for conn in self._conns(relay):
            if (addr := remote_addr(conn)) is not None:
                return addr
        raise GossipError(f"no address of relay {relay}")

    def _conns(self, peer: ID) -> list[Any]:
        return list(self.host.get_network().get_connections(peer))

    def _direct(self, peer: ID) -> bool:
        return any(not getattr(c, "is_closed", False) and not is_relayed(c)
                   for c in self._conns(peer))

    def sweep(self, peer: ID) -> None:
        """Remove closed connections to `peer` that the swarm still lists.

        After a relay died, py-libp2p kept the dead relayed connection listed for over a minute
        (closed, yet `new_stream` picked it and failed): nothing reached that peer meanwhile.
        """
        network = self.host.get_network()
        for conn in self._conns(peer):
            if getattr(conn, "is_closed", False):
                with contextlib.suppress(Exception):
                    network.remove_conn(conn)

    async def _dial(self, info: PeerInfo) -> None:
        # Retrying is our caller's decision, made with its own backoff; libp2p's 60 s negative
        # cache would otherwise fail every retry at once, even after the peer came back.
        unblock = getattr(self.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(info.peer_id)
        try:
            with trio.fail_after(self.config.dial_timeout_s):
                await self._connect(info)
        except trio.TooSlowError as exc:
            raise GossipError(
                f"dial timed out after {self.config.dial_timeout_s:g} s{self._key_hint()}"
            ) from exc
        except Exception as exc:  # libp2p dial failures share no importable base
            raise GossipError(
                f"dial failed: {type(exc).__name__}: {exc}{_first_cause(exc)}{self._key_hint()}"
            ) from exc

    async def _connect(self, info: PeerInfo) -> None:
        """Connect at exactly `info`'s addresses (unless connected already).

        `host.connect` dials every address the peerstore holds for the peer, and identify
        puts there every listen address the peer reports: a peer listening on 0.0.0.0 reports
        127.0.0.1, which dialled from another machine (or network namespace) reaches the
        dialler's own listener, and the handshake fails on the wrong key. Measured in the NAT
        lab: every dial to a public peer we had been connected to before failed so.
        """
        network = self.host.get_network()
        if network.get_connections(info.peer_id):
            await self.host.connect(info)  # waits until the connection is ready
            return
        error: Exception | None = None
        for addr in info.addrs:
            try:
                conn = await network.dial_addr(addr, info.peer_id)
            except Exception as exc:  # libp2p dial failures share no importable base
                error = exc
                continue
            started = getattr(conn, "event_started", None)
            if started is not None:
                await started.wait()
            return
        raise error or GossipError(f"no address to dial {info.peer_id} at")

    def _key_hint(self) -> str:
        # A mismatched swarm key mostly makes a dial hang (PY-LIBP2P.md section 4), but under
        # load the remote may close the socket first and the dial fails outright: both cases.
        if self.config.psk:
            return "; a wrong --swarm-key looks like this"
        return "; a private swarm (one run with --swarm-key) looks like this without its key"

    def remember(self, peer: str, addrs: Sequence[str], *, via: str = Scope.PUBLIC) -> list[str]:
        """Record the announced addresses of `peer` that we may dial (see `gossip.addresses`).

        An address that does not name `peer` itself (`/p2p/<peer>`), a loopback or private one
        that did not arrive over a connection of the same scope (unless `allow_private_addrs`),
        or one no peer can live at, is dropped and counted as "bad_addr": a peer may only tell
        us where it itself lives, or it could point the whole swarm's dials at a victim.

        Returns:
            The addresses kept, in the order given.
        """
        kept, refused = usable_addrs(peer, addrs, via=via,
                                     allow_private=self.config.allow_private_addrs)
        if refused:
            self.rejected["bad_addr"] += refused
            logger.info("dropped %d address(es) announced by %s (not its own, or a private "
                        "scope it did not reach us from)", refused, peer)
        parsed = []
        relays = [r for r in (circuit_relay(a, peer) for a in kept) if r is not None]
        if relays:
            self._relays[peer] = list(dict.fromkeys(relays))[:_RELAYS_PER_PEER]
        for addr in kept:
            if circuit_relay(addr, peer) is not None:
                continue  # kept by relay id alone, never in the peerstore (see `_dial_relayed`)
            try:
                parsed.append(multiaddr.Multiaddr(addr.partition("/p2p/")[0]))
            except Exception:  # an unusable address from a peer: skip it, keep the others
                self.rejected["bad_addr"] += 1
        if parsed:
            self.host.get_peerstore().add_addrs(ID.from_base58(peer), parsed, _PEERSTORE_TTL_S)
            self._announced[peer] = [str(a) for a in parsed][:16]
        return kept

    def dialable(self) -> list[str]:
        """Peers that announced a direct address we may dial."""
        return list(self._announced)

    def forget(self, peer: str) -> None:
        """Drop what the peerstore holds for `peer`, which left the membership view.

        The peerstore then holds only what the view admits (plus connected peers, whose keys
        the connection still needs), so a flood of identities cannot fill it.
        """
        self._relays.pop(peer, None)
        self._announced.pop(peer, None)
        self.reached_by_relay.discard(peer)
        pid = ID.from_base58(peer)
        store = self.host.get_peerstore()
        if pid in self.host.get_connected_peers():
            store.clear_addrs(pid)
        elif store.has_peer(pid):
            store.clear_peerdata(pid)



def _first_cause(exc: BaseException) -> str:
    """What lies under a libp2p dial error ("no addresses established a successful
    connection" says nothing of why), as " (because Type: message)"."""
    cause, seen = exc.__cause__ or exc.__context__, 0
    while cause is not None and (cause.__cause__ or cause.__context__) and seen < 4:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return "" if cause is None else f" (because {type(cause).__name__}: {cause})"
