"""Dial-back: "can a peer outside reach me at the ports I announce?", answered by a neighbour.

A peer behind a NAT cannot tell from the inside that nobody can dial it: its own outbound
connections work. So it asks a few connected peers to dial it back (`DIALBACK_PROTOCOL`):

1. client -> server: `frame(DialbackRequest)`, the TCP ports it announces (at most
   `MAX_PORTS`);
2. the server dials each port at the IP the request's connection comes from, never at an
   address the client names (that would make every peer a dial reflector against third
   parties), on a fresh TCP socket of its own: py-libp2p's AutoNAT v1 answers over the existing
   connection, and reported a closed port as public (PY-LIBP2P-NAT.md). A libp2p listener
   speaks first, so the server needs to send nothing: it reads the multistream-select header
   (under a private swarm key, the nonce and the header encrypted with the key we share);
3. server -> client: `frame(DialbackReply)`, one outcome per port (`OUTCOMES`).

This proves that a libp2p listener of this swarm's network answers at that port of the
client's address, not that it is the client's (that would take a full handshake as another
identity); a client lying about its own ports only misleads itself.

The server's limits, since identities are free: one request per peer and one per IP address
within `min_interval_s`, `MAX_CONCURRENT` dial-backs at a time; over a limit, the reply says
"rate_limited" without dialling. Relayed connections are refused: their remote address is
the relay's.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import trio
from Crypto.Cipher import Salsa20

from gossip.relay import stream_ip
from gossip.spacing import Spacing
from gossip.swarm import PROTOCOL_VERSION, SWARM_ID_BYTES
from gossip.transfer import MAX_CONTROL_FRAME, close_quietly, read_frame, serve_request
from gossip.wire import (
    Envelope,
    bad_field,
    check_bytes,
    check_int,
    check_protocol,
    frame,
    open_envelope,
    swarm_arg,
)

__all__ = ["DIALBACK_PROTOCOL", "DialbackReply", "DialbackRequest", "DialbackServer",
           "OUTCOMES", "ask_dialback", "probe_port"]

logger = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/loraswarm/dialback/1"
MAX_PORTS = 4
MAX_CONCURRENT = 2
DIAL_TIMEOUT_S = 5.0
MIN_INTERVAL_S = 10.0  # between two requests served to one peer, or to one IP address
ANSWER_TIMEOUT_S = 2.0  # after the connect: a libp2p listener speaks at once
REQUEST_TIMEOUT_S = 5.0

# Per port: a libp2p listener answered; the dial was refused (nothing listens, or a NAT with no
# forward sent a reset); nothing answered in time (a NAT or firewall dropped it); something
# answered that is not a libp2p listener of our network.
OUTCOMES = frozenset({"ok", "refused", "timeout", "not_libp2p"})
STATUSES = frozenset({"ok", "rate_limited", "refused"})

_MULTISTREAM = b"\x13/multistream/1.0.0\n"
_PSK_NONCE = 8
_PER_PORT_S = DIAL_TIMEOUT_S + ANSWER_TIMEOUT_S


@dataclass(frozen=True)
class DialbackRequest(Envelope):
    """Client to server: "dial me back at these TCP ports of my address"."""

    swarm: bytes
    ports: tuple[int, ...]
    protocol: int = PROTOCOL_VERSION

    KIND: ClassVar[str] = "dialback_request"
    FIELDS: ClassVar[frozenset[str]] = frozenset({"protocol", "ports"})

    def __post_init__(self) -> None:
        check_bytes("swarm", self.swarm, SWARM_ID_BYTES)
        check_protocol(self.protocol)
        if type(self.ports) is not tuple or not 1 <= len(self.ports) <= MAX_PORTS:
            raise bad_field("ports", f"expected 1..{MAX_PORTS} ports")
        for port in self.ports:
            check_int("port", port, 1, 65535)
        if len(set(self.ports)) != len(self.ports):
            raise bad_field("ports", "a port is repeated")

    @classmethod
    def from_wire(cls, data: bytes, *, swarm: bytes) -> DialbackRequest:
        """Decode and validate a request. Raises WireError with the reason."""
        return cls(swarm=swarm, **open_envelope(data, swarm=swarm_arg(swarm), kind=cls.KIND,
                                        keys=cls.FIELDS))


@dataclass(frozen=True)
class DialbackReply(Envelope):
    """Server to client: the address it dialled and one outcome per requested port."""

    swarm: bytes
    status: str
    observed: str  # the IP the server saw the request come from ("" when it did not dial)
    outcomes: tuple[str, ...]
    protocol: int = PROTOCOL_VERSION

    KIND: ClassVar[str] = "dialback_reply"
    FIELDS: ClassVar[frozenset[str]] = frozenset({"protocol", "status", "observed", "outcomes"})

    def __post_init__(self) -> None:
        check_bytes("swarm", self.swarm, SWARM_ID_BYTES)
        check_protocol(self.protocol)
        if type(self.status) is not str or self.status not in STATUSES:
            raise bad_field("status", f"{self.status!r} not one of {sorted(STATUSES)}")
        if type(self.observed) is not str or len(self.observed) > 64:
            raise bad_field("observed", "expected an IP address")
        if type(self.outcomes) is not tuple or len(self.outcomes) > MAX_PORTS:
            raise bad_field("outcomes", f"expected at most {MAX_PORTS}")
        if any(type(o) is not str or o not in OUTCOMES for o in self.outcomes):
            raise bad_field("outcomes", f"each one of {sorted(OUTCOMES)}")
        if (self.status == "ok") != bool(self.outcomes):
            raise bad_field("outcomes", "an ok reply has outcomes, a refusal none")

    @classmethod
    def from_wire(cls, data: bytes, *, swarm: bytes, ports: int) -> DialbackReply:
        """Decode and validate a reply to a request of `ports` ports. Raises WireError."""
        reply = cls(swarm=swarm, **open_envelope(data, swarm=swarm_arg(swarm), kind=cls.KIND,
                                         keys=cls.FIELDS))
        if reply.status == "ok" and len(reply.outcomes) != ports:
            raise bad_field("outcomes", f"{len(reply.outcomes)} outcomes for {ports} ports")
        return reply


async def probe_port(ip: str, port: int, *, psk: str | None,
                     timeout_s: float = DIAL_TIMEOUT_S) -> str:
    """Dial `ip`:`port` on a fresh TCP socket and say whether a libp2p listener answers."""
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(ip, port)
    except trio.TooSlowError:
        return "timeout"
    except OSError:
        return "refused"
    expected = (_PSK_NONCE if psk else 0) + len(_MULTISTREAM)
    first = b""
    try:
        # A listener of another kind may say less, or nothing: judge what came in time.
        with trio.move_on_after(ANSWER_TIMEOUT_S):
            while len(first) < expected:
                chunk = await stream.receive_some(expected - len(first))
                if not chunk:
                    break
                first += chunk
    except (OSError, trio.BrokenResourceError):
        pass
    finally:
        await stream.aclose()
    return "ok" if _is_libp2p(first, psk) else "not_libp2p"


def _is_libp2p(first: bytes, psk: str | None) -> bool:
    if psk is None:
        return first[: len(_MULTISTREAM)] == _MULTISTREAM
    nonce, body = first[:_PSK_NONCE], first[_PSK_NONCE:]
    if len(nonce) != _PSK_NONCE:
        return False
    return Salsa20.new(key=bytes.fromhex(psk), nonce=nonce).decrypt(body) == _MULTISTREAM


class DialbackServer:
    """Stream handler for `DIALBACK_PROTOCOL`, with the limits in the module docstring.

    Args:
        swarm: our swarm id, checked in every request.
        psk: the private swarm key, if any (the listener we dial speaks under it).
        min_interval_s: least time between two requests served to one peer or one address.
    """

    def __init__(self, swarm: bytes, psk: str | None, *,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self._swarm = swarm
        self._psk = psk
        self._spacing = Spacing(min_interval_s)
        self._slots = trio.Semaphore(MAX_CONCURRENT)
        self.served: Counter[str] = Counter()  # requests by what became of them

    async def handle(self, stream: Any) -> None:
        """Serve one request; never raises into libp2p."""
        await serve_request(stream, self.served, "dial-back", self._serve,
                            timeout_s=REQUEST_TIMEOUT_S + MAX_PORTS * _PER_PORT_S)

    async def _serve(self, stream: Any, remote: str) -> str:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            request = DialbackRequest.from_wire(
                await read_frame(stream, max_len=MAX_CONTROL_FRAME), swarm=self._swarm)
        ip = stream_ip(stream)
        status = "refused" if ip is None else self._admit(remote, ip)
        outcomes: tuple[str, ...] = ()
        if status == "ok" and ip is not None:
            async with self._slots:
                outcomes = tuple([await probe_port(ip, port, psk=self._psk)
                                  for port in request.ports])
        reply = DialbackReply(self._swarm, status, ip if ip and outcomes else "", outcomes)
        await stream.write(frame(reply.to_wire()))
        return status

    def _admit(self, remote: str, ip: str) -> str:
        if self._slots.value == 0 or not self._spacing.admit((remote, ip)):
            return "rate_limited"
        return "ok"


async def ask_dialback(open_stream: Any, swarm: bytes, ports: tuple[int, ...]) -> DialbackReply:
    """Ask one peer to dial us back at `ports`; `open_stream()` opens a dial-back stream to it.

    Raises:
        WireError: the reply was malformed.
        trio.TooSlowError, OSError and libp2p's stream errors: no reply.
    """
    with trio.fail_after(REQUEST_TIMEOUT_S + len(ports) * _PER_PORT_S + 5):
        stream = await open_stream()
        try:
            await stream.write(frame(DialbackRequest(swarm, ports).to_wire()))
            data = await read_frame(stream, max_len=MAX_CONTROL_FRAME)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await close_quietly(stream)
    return DialbackReply.from_wire(data, swarm=swarm, ports=len(ports))
