"""The client side of an adapter transfer, with time limits that follow the link.

`GossipNode.fetch` keeps the download slots and the counters; `fetch_from` opens the stream
(dialling if needed), runs `fetch_adapter` within the limits that `gossip.linkstats` gives the
neighbour, and closes a connection that was opened only for this fetch. The protocol and the
server are `gossip.transfer`'s.

The limits (`Patience`; all times counted from the fetch's start, a download slot's wait
included):

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from gossip.config import NodeConfig
from gossip.errors import TransferError, WireError
from gossip.linkstats import LinkStats
from gossip.relay import is_relayed
from gossip.swarm import TRANSFER_PROTOCOL
from gossip.transfer import CHUNK_BYTES, MAX_CONTROL_FRAME, Fetched, close_quietly, read_frame
from gossip.wire import Announcement, FetchHeader, FetchRequest, digest, frame

__all__ = ["Patience", "fetch_adapter", "fetch_from", "link_stats", "patience", "read_body"]

logger = logging.getLogger(__name__)

_TRANSFER = TProtocol(TRANSFER_PROTOCOL)


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


def cap_s(config: NodeConfig) -> float:
    """The most one fetch may take: `max_fetch_s`, never below `fetch_timeout_s`."""
    return max(config.max_fetch_s, config.fetch_timeout_s)


def link_stats(config: NodeConfig) -> LinkStats:
    """The node's link estimates: budgets between `fetch_timeout_s` and the cap."""
    return LinkStats(floor_s=config.fetch_timeout_s, cap_s=cap_s(config))


def patience(config: NodeConfig, links: LinkStats, peer: str) -> Patience:
    """The body limits of a fetch from `peer` (the rule of the module docstring)."""
    return Patience(budget=partial(links.deadline_for, peer), cap_s=cap_s(config),
                    stall_s=config.stall_s, min_rate=config.min_fetch_rate)


async def fetch_from(host: Any, dial: Callable[[str], Awaitable[None]],
                     announcement: Announcement, *, swarm: bytes, config: NodeConfig,
                     links: LinkStats, started: float,
                     check: Callable[[FetchHeader], None],
                     held: tuple[int, bytes] | None = None,
                     keep_direct: Callable[[str], bool] = lambda peer: False) -> Fetched:
    """Pull `announcement`'s peer's estimate update, within the limits its link earned.

    Args:
        dial: connects to a peer at its remembered addresses (with per-address backoff).
        started: trio time the fetch started, its wait for a download slot included.
        check: binds the header to the signed announcement before the body is read.
        held: (version, digest) of the peer's estimate we hold, or None (send a keyframe).
        keep_direct: whether to keep, after a fetch that opened it, a direct connection to
            the peer (one a hole punch made: reaching it again would take the relay and
            another punch); its relayed connections are closed all the same.
    """
    peer = ID.from_base58(announcement.peer)
    # A connection opened only for this fetch is closed after it: kept, every peer ends up
    # connected to most of the swarm, whose upkeep then costs a core (see the README).
    transient = peer not in host.get_connected_peers()

    async def open_stream() -> Any:
        if peer not in host.get_connected_peers():
            await dial(announcement.peer)
        return await host.new_stream(peer, [_TRANSFER])

    try:
        return await fetch_adapter(
            open_stream, announcement.peer, swarm, max_bytes=config.max_adapter_bytes,
            timeout_s=config.fetch_timeout_s, check=check,
            patience=patience(config, links, announcement.peer), started=started, held=held,
        )
    finally:
        if transient and keep_direct(announcement.peer):
            await hang_up_relayed(host, peer)
        elif transient:
            await hang_up(host, peer)


async def hang_up_relayed(host: Any, peer: ID) -> None:
    """Close our relayed connections to `peer` (a direct one stays), shielded and bounded."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        for conn in list(host.get_network().get_connections(peer)):
            if is_relayed(conn):
                try:
                    await conn.close()
                except Exception as exc:  # closing a broken connection may raise anything
                    logger.debug("closing a relayed connection to %s: %s", peer, exc)


async def hang_up(host: Any, peer: ID) -> None:
    """Close our connection to `peer`, shielded and bounded."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await host.disconnect(peer)
        except Exception as exc:  # closing a broken connection may raise anything
            logger.debug("closing the connection to %s: %s", peer, exc)


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
    held: tuple[int, bytes] | None = None,
) -> Fetched:
    """Pull a neighbour's estimate update bytes (`gossip.estimate.encode_update`).

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
        held: (version, digest) of the neighbour's estimate we hold; None: send a keyframe.

    Raises:
        TransferError: with reason "timeout", "stalled", "too_slow", "unreachable", "refused",
            "oversized", "truncated", "digest_mismatch" or whatever `check` raises.
        WireError: the neighbour's header was malformed.
    """
    start = trio.current_time() if started is None else started
    rules = patience if patience is not None else Patience.fixed(timeout_s)
    try:
        request = FetchRequest(swarm=swarm, version=-1,
                               held_version=held[0] if held else -1,
                               held_digest=held[1] if held else b"")
        return await _fetch(open_stream, peer, request, max_bytes, check, rules, start,
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
    request: FetchRequest,
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
            await stream.write(frame(request.to_wire()))
            header = FetchHeader.from_wire(await read_frame(stream, max_len=MAX_CONTROL_FRAME),
                                           swarm=request.swarm, max_nbytes=max_bytes)
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
            await close_quietly(stream)
    # Hashing megabytes would stall every other task of the event loop: a worker thread does it.
    actual = await trio.to_thread.run_sync(digest, data)
    if actual != header.body_digest:  # the header's body digest is the signed one
        raise TransferError("digest_mismatch", f"update bytes from {peer} do not match its digest")
    return Fetched(peer=peer, version=header.version, samples=header.samples, data=data,
                   digest=header.digest, privacy=header.privacy, rtt_s=body_start - sent,
                   body_s=body_s)


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
