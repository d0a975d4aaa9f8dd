"""The adapter transfer protocol: a peer pulls a neighbour's adapter over a direct libp2p stream.

Gossipsub frames cap near 1 MiB and py-libp2p's request_response breaks above ~6.5 MiB, so
adapters travel over a raw stream of our own protocol (`TRANSFER_PROTOCOL`):

1. client -> server: `frame(FetchRequest)`;
2. server -> client: `frame(FetchHeader)`; when its status is "ok", exactly `nbytes` bytes of
   an estimate update follow (`gossip.estimate.encode_update`: the steps since the version the
   request says the client holds, or a keyframe), written in 1 MiB chunks;
3. the client checks the header (its signature, a size within its bound) before reading a
   byte of the body, then the byte count and the body's sha256, then closes; applying the
   update and checking the estimate digest it rebuilds is `gossip.node`'s.

Every read is bounded (frame size, byte count) and every exchange runs under cancel scopes. The
server bounds concurrent uploads, gives each remote peer at most one of them at a time and serves
it at most once per `min_interval_s`, and drops a reader slower than `min_rate` bytes/s: a client
that requests and never reads would otherwise hold an upload slot for the whole `timeout_s`.

The client side, with time limits that follow the link, is `gossip.fetcher`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from gossip.errors import TransferError, WireError
from gossip.estimate import EstimateSnapshot, encode_update
from gossip.wire import (
    NOT_PRIVATE,
    FetchHeader,
    FetchRequest,
    digest,
    frame,
    frame_length,
    signed_offer,
)

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# However small a chunk, a reader gets this long for it: with 8 peers of one process under a
# flood of announcements, honest readers took over 3.8 s for a 248 KB adapter and were dropped.
# py-libp2p's yamux gives up on a window that stays shut for 5 s anyway (a "stream_error").
SLOW_READER_GRACE_S = 5.0
MAX_CONTROL_FRAME = 4096
# Bodies (and their signatures) kept per offer, one per distinct `held` asked for: a round's
# clients hold a handful of versions, so a round signs a few times, not once per fetch.
MAX_CACHED_BODIES = 16


@dataclass(frozen=True)
class Offer:
    """The estimate a peer currently serves: a frozen snapshot, swapped whole at round
    boundaries, with the sample count its version embodies."""

    version: int
    samples: int
    estimate: EstimateSnapshot
    privacy: float = NOT_PRIVATE  # ε the DP ledger had spent on this version

    @property
    def digest(self) -> bytes:
        """The estimate digest that names this version."""
        return self.estimate.digest

    @property
    def keyframe_bytes(self) -> int:
        """The size of this version's keyframe: what an announcement's `nbytes` says, the
        most a neighbour's first fetch of it takes (less the update's framing)."""
        return len(self.estimate.keyframe.payload)


@dataclass(frozen=True)
class Body:
    """The update bytes served for one `held`, their sha256, the header's signature, and what
    kind of update they are: "keyframe", "delta" (a chain of steps) or "current" (none)."""

    data: bytes
    digest: bytes
    signature: bytes
    kind: str = "keyframe"


@dataclass(frozen=True)
class Fetched:
    """An update received from a neighbour, its bytes already checked against `body_digest`;
    `digest` is the (signed) estimate digest it must rebuild."""

    peer: str
    version: int
    samples: int
    data: bytes
    digest: bytes
    privacy: float = NOT_PRIVATE  # the signed ε of this version
    rtt_s: float = 0.0  # request sent to header received
    body_s: float = 0.0  # header received to last body byte


async def read_exactly(stream: Any, n: int) -> bytes:
    """Read exactly `n` bytes or raise TransferError("truncated")."""
    parts: list[bytes] = []
    remaining = n
    while remaining:
        try:
            chunk = await stream.read(min(remaining, CHUNK_BYTES))
        except EOFError:
            chunk = b""
        if not chunk:
            raise TransferError("truncated", f"stream ended {remaining} bytes short of {n}")
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


async def read_frame(stream: Any, *, max_len: int) -> bytes:
    """Read one length-prefixed frame, refusing lengths above `max_len` before reading them."""
    length = frame_length(await read_exactly(stream, 4), max_len=max_len)
    return await read_exactly(stream, length)


async def write_all(stream: Any, data: bytes, *, min_rate: float | None = None) -> None:
    """Write `data` in chunks; with `min_rate`, each chunk must leave within its share of time.

    Raises:
        TransferError("slow_reader"): a chunk took longer than len(chunk) / min_rate, and
            longer than `SLOW_READER_GRACE_S`.
    """
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_BYTES):
        chunk = bytes(view[start : start + CHUNK_BYTES])
        limit = max(SLOW_READER_GRACE_S, len(chunk) / min_rate) if min_rate else float("inf")
        with trio.move_on_after(limit) as scope:
            await stream.write(chunk)
        if scope.cancelled_caught:
            raise TransferError("slow_reader", f"a chunk of {len(chunk)} bytes took over "
                                f"{limit:.1f} s to leave")


class AdapterServer:
    """Serves this peer's current `Offer` to neighbours that ask for it.

    Args:
        swarm: the swarm id; requests of another swarm are refused.
        sign: signs `wire.signed_offer(...)` bytes with this peer's libp2p key.
        peer: this peer's id (inside what is signed).
        max_concurrent: uploads in flight at once; more get a "busy" header.
        min_interval_s: per remote peer, the least time between two served uploads.
        timeout_s: the most time one exchange may take (a slow link's whole upload).
        request_timeout_s: the most time the request may take to arrive (default `timeout_s`):
            a stream that asks for nothing is closed then, however long uploads may take.
        min_rate: bytes/s below which a reader is dropped and its slot freed.
        clock: monotonic clock (trio.current_time in the daemon; injectable for tests).
    """

    def __init__(
        self,
        swarm: bytes,
        sign: Callable[[bytes], bytes],
        peer: str,
        *,
        max_concurrent: int = 4,
        min_interval_s: float = 0.5,
        timeout_s: float = 30.0,
        request_timeout_s: float | None = None,
        min_rate: float = 64 * 1024,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._swarm = swarm
        self._sign = sign
        self._peer = peer
        self._slots = trio.Semaphore(max_concurrent)
        self._min_interval_s = min_interval_s
        self._timeout_s = timeout_s
        self._request_timeout_s = timeout_s if request_timeout_s is None else request_timeout_s
        self._min_rate = min_rate
        self._clock = clock
        self._last_served: dict[str, float] = {}
        self._serving: set[str] = set()  # remote peers with an upload in flight
        self._bodies: dict[tuple[int, bytes] | None, Body] = {}  # held -> body of the offer
        self._offer: Offer | None = None
        self.served = 0
        self.bytes_out = 0
        self.refused: dict[str, int] = {}
        self.served_kinds: dict[str, int] = {}  # uploads by `Body.kind`

    def publish(self, offer: Offer) -> None:
        """Make `offer` the estimate handed to every later request."""
        self._bodies = {}
        self._offer = offer

    async def body_for(self, offer: Offer, held: tuple[int, bytes] | None) -> Body:
        """The update for a client holding `held`, signed; cached per offer and `held`."""
        body = self._bodies.get(held)
        if body is None:
            # Encoding and hashing megabytes would stall the event loop: a worker thread does it.
            steps = await trio.to_thread.run_sync(offer.estimate.update_for, held)
            data = await trio.to_thread.run_sync(encode_update, steps)
            body_digest = await trio.to_thread.run_sync(digest, data)
            signature = self._sign(signed_offer(self._swarm, self._peer, offer.version,
                                                offer.samples, len(data), offer.digest,
                                                body_digest, offer.privacy))
            kind = "current" if not steps else "keyframe" if steps[0].is_keyframe else "delta"
            body = Body(data, body_digest, signature, kind)
            if self._offer is offer:  # not cached for an offer replaced meanwhile
                if len(self._bodies) >= MAX_CACHED_BODIES:
                    self._bodies.pop(next(iter(self._bodies)))
                self._bodies[held] = body
        return body

    @property
    def current(self) -> Offer | None:
        """The adapter served now, or None before the first `publish`."""
        return self._offer

    async def handle(self, stream: Any) -> None:
        """Stream handler for `TRANSFER_PROTOCOL`; never raises into libp2p."""
        remote = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(self._timeout_s):
                await self._serve(stream, remote)
        except (WireError, TransferError) as exc:
            self._count(exc.reason)
            logger.info("refused adapter request from %s: %s", remote, exc)
        except trio.TooSlowError:
            self._count("timeout")
            logger.info("adapter upload to %s timed out after %.0f s", remote, self._timeout_s)
        except (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._count("stream_error")
            logger.info("adapter upload to %s broke: %s", remote, exc)
        except Exception as exc:  # libp2p stream errors have no common base we can import cheaply
            self._count("stream_error")
            logger.info("adapter upload to %s failed: %s: %s", remote, type(exc).__name__, exc)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await close_quietly(stream)

    async def _serve(self, stream: Any, remote: str) -> None:
        with trio.fail_after(self._request_timeout_s):
            request = FetchRequest.from_wire(
                await read_frame(stream, max_len=MAX_CONTROL_FRAME), swarm=self._swarm
            )
        status = self._admit(remote)
        offer = self._offer
        if status == "ok" and offer is None:
            status = "none"
        if status != "ok" or offer is None:
            await stream.write(frame(self._header(status, None)))
            self._count(status)
            return
        # The newest estimate is always served; `version` is advisory for now.
        if remote in self._serving:  # one upload at a time per peer: one id cannot hold them all
            await stream.write(frame(self._header("busy", None)))
            self._count("busy")
            return
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await stream.write(frame(self._header("busy", None)))
            self._count("busy")
            return
        self._serving.add(remote)
        try:
            body = await self.body_for(offer, request.held)
            await stream.write(frame(self._header("ok", offer, body)))
            await write_all(stream, body.data, min_rate=self._min_rate)
            self.served += 1
            self.bytes_out += len(body.data)
            self.served_kinds[body.kind] = self.served_kinds.get(body.kind, 0) + 1
        finally:
            self._serving.discard(remote)
            self._slots.release()

    def _admit(self, remote: str) -> str:
        now = self._clock()
        last = self._last_served.get(remote)
        if last is not None and now - last < self._min_interval_s:
            return "rate_limited"
        self._last_served[remote] = now
        if len(self._last_served) > 4096:  # bounded memory: forget the oldest requesters
            for key in sorted(self._last_served, key=self._last_served.__getitem__)[:1024]:
                del self._last_served[key]
        return "ok"

    def _header(self, status: str, offer: Offer | None, body: Body | None = None) -> bytes:
        if offer is None or body is None:
            return FetchHeader(swarm=self._swarm, status=status, version=-1, samples=0, nbytes=0,
                               digest=b"\0" * 32).to_wire()
        return FetchHeader(
            swarm=self._swarm, status=status, version=offer.version, samples=offer.samples,
            nbytes=len(body.data), digest=offer.digest, body_digest=body.digest,
            signature=body.signature, privacy=offer.privacy,
        ).to_wire()

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


async def close_quietly(stream: Any) -> None:
    """Close a transfer stream, ignoring whatever a broken one raises."""
    try:
        await stream.close()
    except Exception as exc:  # closing a broken stream may raise anything; nothing to do about it
        logger.debug("closing a transfer stream: %s", exc)


async def serve_request(stream: Any, served: Counter[str], what: str,
                        reply: Callable[[Any, str], Awaitable[str]], *, timeout_s: float) -> None:
    """A control protocol's stream handler: `reply(stream, remote)` answers within `timeout_s`
    and names its outcome, counted in `served` (a refused request by its WireError reason, a
    broken stream as "stream_error"); the stream is closed after. Never raises into libp2p."""
    remote = str(stream.muxed_conn.peer_id)
    try:
        with trio.fail_after(timeout_s):
            served[await reply(stream, remote)] += 1
    except WireError as exc:
        served[exc.reason] += 1
        logger.info("refused %s request from %s: %s", what, remote, exc)
    except Exception as exc:  # libp2p stream errors have no common base
        served["stream_error"] += 1
        logger.info("%s for %s failed: %s: %s", what, remote, type(exc).__name__, exc)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await close_quietly(stream)
