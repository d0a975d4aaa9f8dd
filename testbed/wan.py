"""A wide-area link in front of a peer's listener: delay, jitter and a rate, on loopback.

This machine's kernel has no `netem` (PY-LIBP2P-NAT.md), so a `LinkProxy` stands in for the
network between a peer and the rest of the swarm: it listens on 127.0.0.1, forwards each
accepted connection to the peer's real listener, and shapes each direction as a link of the
given `Link` would. libp2p runs through it unchanged (Noise still authenticates the real
peer), as long as the peer announces the proxy's address (`NodeConfig.announce`).

The model of one direction of one link, per chunk of bytes read from the sender:

1. Serialization: the chunk occupies the link for `bytes * 8 / rate` seconds, after whatever
   was queued before it, *from any connection through this proxy*: the peer has one uplink and
   one downlink, however many neighbours share them. So each proxy has one pacer per direction.
   The reader waits until the chunk is through, which holds the sender back as TCP would.
2. Propagation: the chunk is released to the receiver `delay + jitter` later, jitter drawn
   uniformly from [-jitter, +jitter]; release times never go backwards within a connection,
   so bytes are never reordered (TCP's in-order delivery).

The TCP handshake costs its round trip too: the kernel accepts the dialler's connection at once,
so the proxy dials the peer one delay later (the SYN's way there), lets the peer's bytes flow
from then on, and the dialler's from a round trip after the accept (the SYN-ACK's way back).

Only the listener side is shaped: a connection is shaped by the link of the peer it was dialled
to, both ways, and a peer's own outbound dials do not pass its proxy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

logger = logging.getLogger(__name__)

__all__ = ["Link", "LinkProxy", "ProxyStatistics"]

CHUNK = 16 * 1024  # bytes read at once: 6.5 ms at 20 Mbit/s, fine-grained enough for pacing
QUEUED_CHUNKS = 1024  # per direction of a connection: 16 MiB in flight at most
CONNECT_TIMEOUT_S = 10.0
CATCH_UP_S = 0.05  # a busy link's sender may be this late without losing link time

Target = tuple[str, int] | Callable[[], Awaitable[tuple[str, int]]]

_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_FIELDS = {"delay": ("delay_s", _TIME), "jitter": ("jitter_s", _TIME), "rate": ("rate_bps", _RATE)}
_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Link:
    """One peer's link to the rest of the swarm, the same both ways."""

    delay_s: float = 0.0  # one-way propagation delay
    rate_bps: float = 0.0  # bits per second each way; 0: unlimited
    jitter_s: float = 0.0  # each chunk's delay varies uniformly by up to this much, either way

    def __post_init__(self) -> None:
        for name in ("delay_s", "rate_bps", "jitter_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"link {name} must be a finite number >= 0, got {value}")
        if self.jitter_s > self.delay_s:
            raise ValueError(f"link jitter ({self.jitter_s} s) cannot exceed its delay "
                             f"({self.delay_s} s)")

    @classmethod
    def parse(cls, text: str) -> Link:
        """A link from "delay=50ms,rate=20mbit,jitter=10ms" (any subset, any order).

        Units: us, ms, s for times; bit, kbit, mbit, gbit (per second) for the rate.

        Raises:
            ValueError: one line naming what is wrong.
        """
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _FIELDS:
                raise ValueError(f"bad link item {item!r} in {text!r}: expected delay=, rate= "
                                 "or jitter=")
            name, units = _FIELDS[key]
            match = _VALUE.match(raw.lower())
            if match is None or match.group(2) not in units:
                raise ValueError(f"bad {key} {raw!r} in {text!r}: expected a number and one "
                                 f"of {', '.join(units)}")
            if name in values:
                raise ValueError(f"{key} given twice in {text!r}")
            values[name] = float(match.group(1)) * units[match.group(2)]
        if not values:
            raise ValueError(f"empty link {text!r}: expected e.g. delay=50ms,rate=20mbit")
        return cls(**values)

    def __str__(self) -> str:
        return (f"delay={self.delay_s * 1e3:g}ms,rate={self.rate_bps / 1e6:g}mbit,"
                f"jitter={self.jitter_s * 1e3:g}ms")


@dataclass
class ProxyStatistics:
    """What a proxy has carried; one record per proxy."""

    connections: int = 0  # accepted so far
    open: int = 0  # forwarding now
    failed_dials: int = 0  # the target could not be reached
    cut: int = 0  # dropped by `cut`
    bytes_down: int = 0  # towards the peer (its downlink)
    bytes_up: int = 0  # from the peer (its uplink)


class _Pacer:
    """One direction of the link: when the link is free again, shared by every connection.

    A token bucket in virtual time: each chunk is done `bytes * 8 / rate` after the previous
    one (or after now, if the link was idle), and its sender waits until then. Unlike a bucket
    that fills while idle, it never lets a burst through faster than the rate.
    """

    def __init__(self, rate_bps: float) -> None:
        self._rate = rate_bps
        self._free_at = -math.inf

    async def send(self, nbytes: int) -> float:
        """Wait until `nbytes` have gone over the link after everything queued before them."""
        now = trio.current_time()
        if not self._rate:
            return now
        # A sender that is late by a little (its task woke late, or read a short chunk) was
        # still sending: its lateness is not lost link time, or every wake-up's millisecond
        # adds up (16 % slow at 20 Mbit/s here). A link idle for longer starts afresh, never
        # with a head start. No checkpoint before `_free_at` moves: chunks queue in call order.
        start = self._free_at if now - self._free_at <= CATCH_UP_S else now
        self._free_at = start + nbytes * 8 / self._rate
        done = self._free_at
        await trio.sleep_until(done)
        return done


class LinkProxy:
    """A TCP proxy on 127.0.0.1 that forwards to `target` through a `Link`.

    Args:
        link: how to shape the traffic.
        target: (host, port) of the real listener, or an async function returning it, called
            for each connection (a restarted peer may listen elsewhere).
        seed: for the jitter draws.

    Run it in the caller's nursery: `proxy = await nursery.start(LinkProxy(...).run)`.
    """

    def __init__(self, link: Link, target: Target, *, seed: int = 0) -> None:
        self.link = link
        self._target = target
        self._rng = random.Random(seed)
        self._down = _Pacer(link.rate_bps)
        self._up = _Pacer(link.rate_bps)
        self._connections: set[trio.CancelScope] = set()
        self._port: int | None = None
        self._stats = ProxyStatistics()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not listening yet: start `run` first")
        return self._port

    @property
    def multiaddr(self) -> str:
        """The address to announce, without /p2p/<id>."""
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    def statistics(self) -> ProxyStatistics:
        """A copy of the counters as they are now."""
        return dataclasses.replace(self._stats)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, signal readiness (with self), forward until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self._port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    def cut(self) -> int:
        """Drop every connection open now, as a broken link does; returns how many."""
        scopes = list(self._connections)
        for scope in scopes:
            scope.cancel()
        self._stats.cut += len(scopes)
        return len(scopes)

    async def _handle(self, client: trio.SocketStream) -> None:
        self._stats.connections += 1
        accepted = trio.current_time()
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with client:
                    await trio.sleep_until(accepted + self.link.delay_s)  # the SYN's way
                    server = await self._dial()
                    if server is None:
                        return
                    self._stats.open += 1
                    try:
                        async with server, trio.open_nursery() as nursery:
                            nursery.start_soon(self._pipe, client, server, self._down, scope,
                                               accepted + 2 * self.link.delay_s)
                            nursery.start_soon(self._pipe, server, client, self._up, scope,
                                               accepted)
                    finally:
                        self._stats.open -= 1
            finally:
                self._connections.discard(scope)

    async def _dial(self) -> trio.SocketStream | None:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                host, port = (self._target if isinstance(self._target, tuple)
                              else await self._target())
                return await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            self._stats.failed_dials += 1
            logger.info("proxy :%s: target unreachable: %s", self._port, exc)
            return None

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, pacer: _Pacer,
                    connection: trio.CancelScope, opens_at: float) -> None:
        """One direction: read, pace, stamp, and a writer that releases each chunk on time;
        nothing is read before `opens_at` (the sender's end of the handshake)."""
        await trio.sleep_until(opens_at)
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUED_CHUNKS)
        up = pacer is self._up
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._release, receive, sink, up)
                async with send:
                    released = -math.inf
                    while data := await source.receive_some(CHUNK):
                        done = await pacer.send(len(data))
                        released = max(released, done + self._delay())
                        await send.send((released, data))
                    await send.send((max(released, trio.current_time() + self.link.delay_s),
                                     b""))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            connection.cancel()  # one side is gone: drop both, as a reset does

    async def _release(self, receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
                       sink: trio.SocketStream, up: bool) -> None:
        async with receive:
            async for release_at, data in receive:
                await trio.sleep_until(release_at)
                if not data:  # the sender finished: pass its FIN on, in order
                    await sink.send_eof()
                    return
                await sink.send_all(data)
                if up:
                    self._stats.bytes_up += len(data)
                else:
                    self._stats.bytes_down += len(data)

    def _delay(self) -> float:
        jitter = self.link.jitter_s
        return self.link.delay_s + (self._rng.uniform(-jitter, jitter) if jitter else 0.0)
