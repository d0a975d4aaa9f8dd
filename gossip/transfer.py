"""The adapter transfer protocol: a peer pulls a neighbour's adapter over a direct libp2p stream.

Gossipsub frames cap near 1 MiB and py-libp2p's request_response breaks above ~6.5 MiB, so
adapters travel over a raw stream of our own protocol (`TRANSFER_PROTOCOL`):

1. client -> server: `frame(FetchRequest)`;
2. server -> client: `frame(FetchHeader)`; when its status is "ok", exactly `nbytes` bytes of
   safetensors follow, written in 1 MiB chunks;
3. the client checks the header (its signature, the exact size it expects) before reading a
   byte of the body, then the byte count and the sha256 digest, then closes.

Every read is bounded (frame size, byte count) and every exchange runs under cancel scopes. The
server bounds concurrent uploads, gives each remote peer at most one of them at a time and serves
it at most once per `min_interval_s`, and drops a reader slower than `min_rate` bytes/s: a client
that requests and never reads would otherwise hold an upload slot for the whole `timeout_s`.

The client's time limits follow the link, not a fixed number (`Patience`; all times counted from
the fetch's start, a download slot's wait included):

- setup: the stream must open and the header arrive within `timeout_s` ("timeout");
- body: a read that brings no byte for `stall_s` fails the fetch ("stalled"); until
  `budget(nbytes)` (the link estimate's time for the size the signed header gives, see
  `gossip.linkstats`) any progress will do; past it, the fetch goes on only while its average
  rate since the header stays at least `min_rate` ("too_slow"), so a slow link that keeps
  delivering finishes and a trickle does not; and never past `cap_s` ("timeout").

So a transfer that averages `min_rate` or more ends by max(budget, setup + nbytes / min_rate),
and every fetch by `cap_s`: a peer that trickles below `min_rate` holds a download slot for
its budget at most, any peer for `cap_s` at most.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from gossip.errors import TransferError, WireError
from gossip.wire import FetchHeader, FetchRequest, digest, frame, frame_length, signed_offer

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# However small a chunk, a reader gets this long for it: with 8 peers of one process under a
# flood of announcements, honest readers took over 3.8 s for a 248 KB adapter and were dropped.
# py-libp2p's yamux gives up on a window that stays shut for 5 s anyway (a "stream_error").
SLOW_READER_GRACE_S = 5.0
MAX_CONTROL_FRAME = 4096


@dataclass(frozen=True)
class Offer:
    """The adapter a peer currently serves: immutable bytes, swapped whole at round boundaries."""

    version: int
    samples: int
    data: bytes
    digest: bytes


@dataclass(frozen=True)
class Fetched:
    """An adapter received from a neighbour, its bytes already checked against the digest."""

    peer: str
    version: int
    samples: int
    data: bytes
    rtt_s: float = 0.0  # request sent to header received
    body_s: float = 0.0  # header received to last body byte


@dataclass(frozen=True)
class Patience:
    """How long a fetch may take once the header said its size (see the module docstring).

    Args:
        budget: body bytes -> seconds from the fetch's start during which any progress will do.
        cap_s: seconds from the fetch's start after which it fails, progressing or not.
        stall_s: the longest wait for the next byte of the body.
        min_rate: bytes/s the body must average, once past its budget, to go on.
    """

    budget: Callable[[int], float]
    cap_s: float
    stall_s: float = math.inf
    min_rate: float = math.inf

    @classmethod
    def fixed(cls, timeout_s: float) -> Patience:
        """The whole exchange within `timeout_s`, whatever its size and pace."""
        return cls(budget=lambda nbytes: timeout_s, cap_s=timeout_s)


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
        self._signatures: dict[bytes, bytes] = {}  # digest -> signature of the current offer
        self._offer: Offer | None = None
        self.served = 0
        self.bytes_out = 0
        self.refused: dict[str, int] = {}

    def publish(self, offer: Offer) -> None:
        """Make `offer` the adapter handed to every later request (signed once, here)."""
        self._signatures = {offer.digest: self._sign(signed_offer(
            self._swarm, self._peer, offer.version, offer.samples, len(offer.data),
            offer.digest))}
        self._offer = offer

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
                await _close_quietly(stream)

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
        del request  # the newest adapter is always served; `version` is advisory for now
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
            await stream.write(frame(self._header("ok", offer)))
            await write_all(stream, offer.data, min_rate=self._min_rate)
            self.served += 1
            self.bytes_out += len(offer.data)
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

    def _header(self, status: str, offer: Offer | None) -> bytes:
        return FetchHeader(
            swarm=self._swarm,
            status=status,
            version=offer.version if offer else -1,
            samples=offer.samples if offer else 0,
            nbytes=len(offer.data) if offer else 0,
            digest=offer.digest if offer else b"\0" * 32,
            signature=self._signatures[offer.digest] if offer else b"",
        ).to_wire()

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


async def _close_quietly(stream: Any) -> None:
    try:
        await stream.close()
    except Exception as exc:  # closing a broken stream may raise anything; nothing to do about it
        logger.debug("closing a transfer stream: %s", exc)


async def fetch_adapter(
    open_stream: Callable[[], Any],
    peer: str,
    swarm: bytes,
    *,
    max_bytes: int,
    timeout_s: float,
    check: Callable[[FetchHeader], None] | None = None,
    patience: Patience | None = None,
    started: float | None = None,
) -> Fetched:
    """Pull a neighbour's adapter bytes.

    Args:
        open_stream: coroutine function that opens a stream to the neighbour on
            `TRANSFER_PROTOCOL` (dialling it if needed).
        peer: the neighbour's peer id, for the result and for messages.
        max_bytes: refuse adapters larger than this before reading them.
        timeout_s: the dial, the request and the header must be done within this.
        check: called with an "ok" header before a byte of the body is read; raises
            TransferError to refuse it (signature, exact size, what was announced).
        patience: the body's limits; None: the whole exchange within `timeout_s`.
        started: trio time the fetch started (a slot's wait counts); None: now.

    Raises:
        TransferError: with reason "timeout", "stalled", "too_slow", "unreachable", "refused",
            "oversized", "truncated", "digest_mismatch" or whatever `check` raises.
        WireError: the neighbour's header was malformed.
    """
    start = trio.current_time() if started is None else started
    rules = patience if patience is not None else Patience.fixed(timeout_s)
    try:
        return await _fetch(open_stream, peer, swarm, max_bytes, check, rules, start,
                            start + timeout_s)
    except trio.TooSlowError as exc:
        raise TransferError("timeout", f"{peer} sent no header within {timeout_s:.0f} s") from exc


async def _open(open_stream: Callable[[], Any], peer: str) -> Any:
    try:
        return await open_stream()
    except (OSError, trio.BrokenResourceError) as exc:
        raise TransferError("unreachable", f"cannot open a stream to {peer}: {exc}") from exc
    except Exception as exc:  # libp2p raises StreamFailure, SwarmException and others
        # py-libp2p's message is generic ("failed to open a stream"); the cause says why.
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        raise TransferError("unreachable",
                            f"cannot open a stream to {peer}: {exc}{cause}") from exc


async def _fetch(
    open_stream: Callable[[], Any],
    peer: str,
    swarm: bytes,
    max_bytes: int,
    check: Callable[[FetchHeader], None] | None,
    rules: Patience,
    start: float,
    setup_at: float,
) -> Fetched:
    with trio.fail_at(setup_at):
        stream = await _open(open_stream, peer)
    try:
        with trio.fail_at(setup_at):
            sent = trio.current_time()
            await stream.write(frame(FetchRequest(swarm=swarm, version=-1).to_wire()))
            header = FetchHeader.from_wire(await read_frame(stream, max_len=MAX_CONTROL_FRAME),
                                           swarm=swarm, max_nbytes=max_bytes)
        body_start = trio.current_time()
        if header.status != "ok":
            raise TransferError("refused", f"{peer} answered {header.status}")
        if check is not None:
            check(header)
        data = await read_body(stream, header.nbytes, peer=peer,
                               budget_at=start + rules.budget(header.nbytes),
                               cap_at=start + rules.cap_s, stall_s=rules.stall_s,
                               min_rate=rules.min_rate)
        body_s = trio.current_time() - body_start
    except (TransferError, WireError, trio.TooSlowError):
        raise
    except Exception as exc:  # a reset or closed libp2p stream
        raise TransferError("truncated", f"stream from {peer} broke: {exc}") from exc
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await _close_quietly(stream)
    # Hashing megabytes would stall every other task of the event loop: a worker thread does it.
    actual = await trio.to_thread.run_sync(digest, data)
    if actual != header.digest:  # the header's digest is the signed one
        raise TransferError("digest_mismatch", f"adapter bytes from {peer} do not match its digest")
    return Fetched(peer=peer, version=header.version, samples=header.samples, data=data,
                   rtt_s=body_start - sent, body_s=body_s)


async def read_body(stream: Any, n: int, *, peer: str, budget_at: float, cap_at: float,
                    stall_s: float, min_rate: float) -> bytes:
    """Read exactly `n` bytes while they keep coming (the rule of the module docstring).

    Each read waits until the earliest of: `stall_s` from now; the moment the average rate
    since this call would drop below `min_rate`, but not before `budget_at`; `cap_at`.

    Raises:
        TransferError: "stalled", "too_slow" or "timeout" (whichever limit ended the wait),
            or "truncated" when the stream ends short.
    """
    parts: list[bytes] = []
    got, began = 0, trio.current_time()
    while got < n:
        now = trio.current_time()
        # Averaging min_rate since `began` <=> now <= began + got / min_rate.
        limits = {"timeout": cap_at, "too_slow": max(budget_at, began + got / min_rate),
                  "stalled": now + stall_s}
        reason = min(limits, key=limits.__getitem__)  # on a tie, the first: timeout
        chunk = None
        with trio.move_on_at(limits[reason]):
            try:
                chunk = await stream.read(min(n - got, CHUNK_BYTES))
            except EOFError:
                chunk = b""
        if chunk is None:
            raise TransferError(reason, f"{peer}: {got} of {n} bytes in "
                                f"{trio.current_time() - began:.1f} s ({_WHY[reason]})")
        if not chunk:
            raise TransferError("truncated", f"stream ended {n - got} bytes short of {n}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


_WHY = {"timeout": "the most a fetch may take", "stalled": "no byte came for too long",
        "too_slow": "below the minimum average rate past its expected time"}
