"""Circuit relay v2 for peers behind NAT: reachable peers relay, private peers reserve a slot.

Two private peers cannot dial each other. py-libp2p 0.8.1 has the relay protocol but wires none
of it (PY-LIBP2P-NAT.md), so this module does:

1. `GuardedRelay`, the library's relay (hop and stop handlers) with what it lacks. It serves
   reservations only while `serving()` (`--relay-service`: by default while the swarm finds us
   public); it binds a reservation to the connection's own peer id (the library took the id
   written in the request, so a stranger could reserve in another's name); it caps
   reservations per IP address, since identities are free; and its limits fit adapters
   (`LIMITS`: the stock go-libp2p relay's 128 KiB per 2 minutes is less than one adapter).
   The limits count a relayed connection as a whole, both ways, and cut it when exceeded.
2. `RelayClient`, run by a private peer: it reserves on up to `WANTED` connected peers that
   accept, renews each reservation at half its lifetime (the library's refresher spins when
   one lasts 30 s or less), drops one whose relay went away, and lists the `/p2p-circuit`
   addresses its announcements carry.
3. `dial_circuit`: py-libp2p's `Swarm.dial_peer` drops `/p2p-circuit` addresses, so relayed
   dials go through the circuit transport. A circuit is dialled only through a relay at an
   address the relay itself announced (`gossip.dialer`): an announced circuit address cannot
   point the swarm's dials at a third party.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol, _is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from gossip.addresses import Scope, address_scope

__all__ = ["GuardedRelay", "LIMITS", "Pacer", "RelayClient", "Reservation", "circuit_transport",
           "dial_circuit", "is_relayed", "remote_addr", "stream_ip"]

logger = logging.getLogger(__name__)

# One relayed connection may carry 1 GiB for 30 minutes (adapters are MBs to a few 100 MB; a
# fetch opens its own connection and hangs up after it); 8 circuits per reserving peer at once.
LIMITS = RelayLimits(duration=1800, data=1 << 30, max_circuit_conns=8, max_reservations=64,
                     reservation_ttl=600)
MAX_PER_IP = 4  # reservations held by peers connected from one IP address
WANTED = 2  # relays a private peer reserves on
TICK_S = 5.0
REFUSED_BACKOFF_S = 30.0  # before asking a peer that refused us again (it may turn public)
REQUEST_TIMEOUT_S = 10.0


def is_relayed(conn: Any) -> bool:
    """Whether a swarm connection runs through a relay."""
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:  # a connection closing under us
        return False


def remote_addr(conn: Any) -> str | None:
    """The TCP multiaddr a direct connection's other end is at (None when relayed or
    unknown): where we dialled it, for a connection we opened."""
    if is_relayed(conn):
        return None
    try:
        ip, port = conn.muxed_conn.secured_conn.get_remote_address()
    except Exception:  # not a TCP connection, or closing
        return None
    return f"/{'ip6' if ':' in str(ip) else 'ip4'}/{ip}/tcp/{port}"


def stream_ip(stream: Any) -> str | None:
    """The IP address a stream's connection comes from (None when relayed or unknown)."""
    if _is_relayed_stream(stream):
        return None
    try:
        address = stream.get_remote_address()
    except Exception:  # a closing connection
        return None
    return str(address[0]) if address else None


class Pacer:
    """A token bucket for every byte a relay forwards, all circuits and both ways together:
    they share its uplink. Callers that overdraw it sleep off their debt, in turn."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, 0.0
        self.waited_s = 0.0

    async def take(self, n: int) -> None:
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            delay = -self._tokens / self.rate
            self.waited_s += delay
            await trio.sleep(delay)


class GuardedRelay(CircuitV2Protocol):
    """The library's relay service with our admission rules (module docstring, point 1).

    Args:
        host: our libp2p host.
        serving: whether we relay now (reservations are refused otherwise).
        rate: bytes/s forwarded at most, all circuits together (0: no cap). py-libp2p's relay
            defines a bandwidth limit and never applies it.
    """

    def __init__(self, host: Any, serving: Callable[[], bool], rate: float = 0.0) -> None:
        super().__init__(host, limits=LIMITS, allow_hop=True)
        self._serving = serving
        self.pacer = Pacer(rate, burst=max(rate, 64 * 1024)) if rate > 0 else None
        self.forwarded = 0  # bytes relayed, both ways
        self._holder_ips: dict[ID, str] = {}
        self.refused: Counter[str] = Counter()  # reservations refused, by reason
        self.reserved = 0  # reservations granted or renewed

    async def _read_stream_with_retry(self, stream: Any, *args: Any, **kwargs: Any) -> bytes | None:
        """Each chunk the relay reads to forward (and the few bytes of its own messages)."""
        data: bytes | None = await super()._read_stream_with_retry(stream, *args, **kwargs)
        if data:
            self.forwarded += len(data)
            if self.pacer is not None:
                await self.pacer.take(len(data))
        return data

    @property
    def reservations(self) -> int:
        """Reservations held on us now."""
        return sum(self.resource_manager.has_reservation(p) for p in list(self._holder_ips))

    async def _handle_reserve(self, stream: Any, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        ip = stream_ip(stream)
        reason = self._refusal(peer, ip)
        if reason is not None:
            self.refused[reason] += 1
            logger.info("refused a relay reservation from %s: %s", peer, reason)
            await write_delimited_msg(stream, HopMessage(
                type=HopMessage.STATUS, status=to_proto_status(StatusCode.RESERVATION_REFUSED)))
            return
        msg.ClearField("peer")  # the library would take this claim; it must be the sender
        self._holder_ips[peer] = str(ip)
        self.reserved += 1
        await super()._handle_reserve(stream, msg)

    def _refusal(self, peer: ID, ip: str | None) -> str | None:
        if not self._serving():
            return "not_serving"
        if ip is None:
            return "no_address"  # over a relay, or a connection closing
        for holder in [p for p in self._holder_ips if not self.resource_manager.has_reservation(p)]:
            del self._holder_ips[holder]
        same_ip = [p for p, held in self._holder_ips.items() if held == ip and p != peer]
        if len(same_ip) >= MAX_PER_IP:
            return "too_many_from_ip"
        return None


@dataclass(frozen=True)
class Reservation:
    """A slot held on a relay: until when, and the circuit addresses it gives us."""

    relay: str
    expires: float  # wall-clock seconds
    granted: float  # wall-clock seconds
    told: tuple[str, ...]  # the relay's addresses, as its answer listed them


def circuit_transport(host: Any, protocol: CircuitV2Protocol) -> CircuitV2Transport:
    """A circuit transport for dialling and being dialled; it never reserves on its own (the
    CLIENT role would make each dial reserve a slot for the dialler too)."""
    return CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP))


async def dial_circuit(transport: CircuitV2Transport, relay_addr: str, relay: str,
                       peer: str) -> Any:
    """Dial `peer` through `relay` (connected or reachable at `relay_addr`, without /p2p/)."""
    address = multiaddr.Multiaddr(f"{relay_addr}/p2p/{relay}/p2p-circuit/p2p/{peer}")
    return await transport.dial(address)


async def reserve(host: Any, relay: str) -> tuple[float, list[str]]:
    """Ask `relay` (connected) for a slot; returns its expiry (wall clock) and its addresses.

    Raises:
        ConnectionError: refused, or an answer that is not a reservation.
    """
    with trio.fail_after(REQUEST_TIMEOUT_S):
        stream = await host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL])
        try:
            await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
            answer = await read_delimited_msg(stream, HopMessage)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()
    if answer.status != StatusCode.OK or not answer.HasField("reservation"):
        raise ConnectionError(f"relay answered status {answer.status}")
    addrs: list[str] = []
    for raw in list(answer.reservation.addrs)[:16]:
        try:
            addrs.append(str(multiaddr.Multiaddr(raw)))
        except Exception:  # one bad address from the relay: keep the others
            continue
    return float(answer.reservation.expire), addrs


def _dialled_addr(conn: Any) -> str | None:
    """The address an outbound direct connection was dialled at (inbound: None)."""
    try:
        outbound = bool(conn.muxed_conn.is_initiator)
    except Exception:  # closing
        return None
    return remote_addr(conn) if outbound else None


class RelayClient:
    """Holds reservations on relays while we are private (module docstring, point 2).

    Args:
        host: our libp2p host.
        private: whether we need relays now.
        candidates: peers we may ask, best first: directly connected ones, then others
            with addresses we may dial.
        dial: connects to a peer at its own announced addresses (`gossip.dialer`).
    """

    def __init__(self, host: Any, private: Callable[[], bool],
                 candidates: Callable[[], list[str]],
                 dial: Callable[[str], Awaitable[None]]) -> None:
        self.host = host
        self._private = private
        self._candidates = candidates
        self._dial = dial
        self.reservations: dict[str, Reservation] = {}
        self._refused_until: dict[str, float] = {}
        self.events: Counter[str] = Counter()  # reserved, renewed, refused, lost
        self.changed = trio.Event()  # set each time our circuit addresses change
        self._woken = trio.Event()

    def circuit_addrs(self) -> list[str]:
        """Our `/p2p-circuit` addresses: at most two through each relay that holds our slot."""
        return [a for r in self.reservations.values()
                for a in self._circuits_through(r.relay, r.told)]

    def wake(self) -> None:
        """Tick now (the reachability verdict changed), not at the next `TICK_S`."""
        self._woken.set()

    async def run(self) -> None:
        """Keep `WANTED` reservations while private; forever (cancel to stop)."""
        while True:
            await self.tick()
            with trio.move_on_after(TICK_S):
                await self._woken.wait()
            self._woken = trio.Event()

    async def tick(self) -> None:
        """Drop lost relays, renew those past half their lifetime, reserve more if needed."""
        now = time.time()
        for relay, held in list(self.reservations.items()):
            if not self._connected(relay) or held.expires <= now:
                self._drop(relay, "lost")
            elif now >= held.granted + (held.expires - held.granted) / 2:
                await self._reserve(relay, renewing=True)
        if not self._private():
            return
        tries = 0
        for relay in self._candidates():
            if len(self.reservations) >= WANTED or tries >= WANTED + 2:
                break  # bounded work per tick, however many candidates
            if relay in self.reservations or self._refused_until.get(relay, 0.0) > now:
                continue
            tries += 1
            await self._reserve(relay, renewing=False)

    async def _reserve(self, relay: str, *, renewing: bool) -> None:
        try:
            if not self._connected(relay):
                await self._dial(relay)
            expires, relay_addrs = await reserve(self.host, relay)
        except Exception as exc:  # refused, no hop protocol, stream errors: all the same here
            self._refused_until[relay] = time.time() + REFUSED_BACKOFF_S
            while len(self._refused_until) > 256:
                self._refused_until.pop(next(iter(self._refused_until)))
            if renewing:
                self._drop(relay, "lost")
            else:
                self.events["refused"] += 1
            logger.info("no relay slot on %s: %s: %s", relay, type(exc).__name__, exc)
            return
        changed = relay not in self.reservations
        self.reservations[relay] = Reservation(relay, expires, time.time(), tuple(relay_addrs))
        self.events["renewed" if renewing else "reserved"] += 1
        if not renewing:
            logger.info("reserved a relay slot on %s until %s", relay,
                        time.strftime("%H:%M:%S", time.localtime(expires)))
        if changed:
            self._changed()

    def _circuits_through(self, relay: str, told: Sequence[str]) -> tuple[str, ...]:
        """Our circuit addresses through `relay`: at the addresses we know it by (its own
        announcements, the bootstrap address), those its reservation listed, and where we
        dialled it; loopback only when it has nothing else (a relay on our own machine)."""
        pid = ID.from_base58(relay)
        known: list[str] = []
        with contextlib.suppress(Exception):
            known = [str(a) for a in self.host.get_peerstore().addrs(pid)]
        dialled = [a for c in self.host.get_network().get_connections(pid)
                   if (a := _dialled_addr(c)) is not None]
        bases = list(dict.fromkeys(a.partition("/p2p/")[0] for a in [*known, *told, *dialled]))
        bases = [b for b in bases if address_scope(b) != Scope.NEVER and "p2p-circuit" not in b]
        wide = [b for b in bases if address_scope(b) != Scope.LOOPBACK]
        me = str(self.host.get_id())
        return tuple(f"{b}/p2p/{relay}/p2p-circuit/p2p/{me}" for b in (wide or bases)[:2])

    def _drop(self, relay: str, why: str) -> None:
        if self.reservations.pop(relay, None) is not None:
            self.events[why] += 1
            logger.info("relay %s: reservation %s", relay, why)
            self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _connected(self, relay: str) -> bool:
        conns = self.host.get_network().get_connections(ID.from_base58(relay))
        return any(not getattr(c, "is_closed", False) and not is_relayed(c) for c in conns)

    def to_status(self) -> dict[str, Any]:
        """As status.json shows it."""
        now = time.time()
        return {"reservations": {r: round(held.expires - now)
                                 for r, held in self.reservations.items()},
                "circuit_addrs": self.circuit_addrs(), **dict(self.events)}
