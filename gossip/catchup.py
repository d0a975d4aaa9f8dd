"""Catch-up: a peer that just connected learns the swarm from its neighbour at once.

Announcements reach a peer only while it is in the swarm: one that joins late hears of the
earlier peers only when they re-announce (every third of `--peer-timeout`), so for that long its
view is thin (at 256 in-process peers the last joiners saw 4 and 5 of them all run, and merged
1-2 a round). So right after we dial a peer, we ask it (`CATCHUP_PROTOCOL`) for the newest
announcement it holds of each peer its view keeps, itself included, and hear them as if
gossipsub had delivered them.

Nothing is taken on the server's word: each entry is the signed pubsub message exactly as its
publisher signed it, checked as gossipsub checks one (the publisher's signature over the bytes,
our topic) and then as an announcement (the swarm, its fields, signer = the peer it names).
The membership's sequence-number rules then apply as to any delivery: a copy already heard is a
duplicate, an older one a replay. What a server can do is choose which signed messages to show
(old ones too: it could make a peer that left look alive for one `--peer-timeout`, as a
re-announcement by any relay of the mesh could).

On the stream, server to client: up to `MAX_ENTRIES` frames of at most `MAX_ENTRY_BYTES`, then
an empty frame. A reply over the limits, or with an entry that fails a check, is refused whole
and counted once; the entries before it were checked one by one and are kept.

The server's limits, since identities are free: one reply per peer within `MIN_INTERVAL_S`, and
`PER_IP` per IP address (spaced evenly: one per `MIN_INTERVAL_S / PER_IP`; loopback is exempt,
its peers are this machine's), `MAX_CONCURRENT` replies at a time (a request waits up to
`SLOT_WAIT_S` for one); over them, the reply is empty. A reply costs one write of at most
`MAX_ENTRIES` messages already held: no signing, no disk.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio
from google.protobuf.message import DecodeError
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import signature_validator

from gossip.errors import WireError
from gossip.relay import stream_ip
from gossip.spacing import Spacing
from gossip.transfer import close_quietly, read_frame, serve_request
from gossip.wire import MAX_ENVELOPE_BYTES, Announcement, frame

__all__ = ["CATCHUP_PROTOCOL", "CatchupServer", "Recent", "ask_catchup", "check_entry"]

logger = logging.getLogger(__name__)

CATCHUP_PROTOCOL = "/loraswarm/catchup/1"
MAX_ENTRIES = 64  # a full membership view (`--view-size` 64 by default)
MAX_ENTRY_BYTES = MAX_ENVELOPE_BYTES + 2048  # an announcement, its signature, key and seqno
MIN_INTERVAL_S = 30.0
PER_IP = 16  # peers behind one NAT share an address
MAX_CONCURRENT = 4
SLOT_WAIT_S = 2.0
TIMEOUT_S = 10.0
RECENT = 1024  # signers whose newest message a node keeps for catch-ups

T = TypeVar("T")


class Recent(Generic[T]):
    """The newest message of each signer, in the order they arrived (oldest first), bounded.

    `keep` ignores a message not newer than the one kept; `forget` drops a signer (the
    membership forgets peers that left its view, so what a node serves is what it believes).
    """

    def __init__(self, bound: int = RECENT) -> None:
        self._bound = bound
        self._kept: OrderedDict[str, tuple[int, T]] = OrderedDict()

    def keep(self, signer: str, seqno: int, message: T) -> None:
        held = self._kept.get(signer)
        if held is not None and held[0] >= seqno:
            return
        self._kept.pop(signer, None)
        self._kept[signer] = (seqno, message)
        while len(self._kept) > self._bound:
            self._kept.popitem(last=False)

    def forget(self, signer: str) -> None:
        self._kept.pop(signer, None)

    def seqno(self, signer: str) -> int | None:
        """The sequence number of the message kept of `signer`, if any."""
        held = self._kept.get(signer)
        return None if held is None else held[0]

    def newest(self, n: int) -> list[T]:
        """The messages of the `n` signers heard from last, newest first."""
        found: list[T] = []
        for _, message in reversed(self._kept.values()):
            if len(found) == n:
                break
            found.append(message)
        return found

    def __len__(self) -> int:
        return len(self._kept)


def check_entry(raw: bytes, *, topic: str, swarm: bytes, max_nbytes: int) -> tuple[Announcement,
                                                                                    int]:
    """A catch-up entry, checked as gossipsub and our validator check a delivery.

    Returns:
        The announcement and the sequence number its publisher signed.

    Raises:
        WireError: "malformed", "bad_signature", "wrong_topic", "signer_mismatch" or an
            announcement's own reason.
    """
    try:
        msg = rpc_pb2.Message.FromString(raw)
    except (DecodeError, ValueError) as exc:
        raise WireError("malformed", f"not a pubsub message: {exc}") from exc
    if list(msg.topicIDs) != [topic]:
        raise WireError("wrong_topic", "a catch-up entry of another topic")
    try:
        signed = signature_validator(msg)
    except Exception:  # a key that does not deserialize: libp2p raises whatever it hit
        signed = False
    if not signed or not msg.seqno or len(msg.seqno) > 8:
        raise WireError("bad_signature", "a catch-up entry its publisher did not sign")
    announcement = Announcement.from_wire(msg.data, swarm=swarm, max_nbytes=max_nbytes)
    signer = str(ID(msg.from_id))
    if announcement.peer != signer:
        raise WireError("signer_mismatch", f"it names {announcement.peer}, signed by {signer}")
    return announcement, int.from_bytes(msg.seqno, "big")


class CatchupServer:
    """Stream handler for `CATCHUP_PROTOCOL`: the newest messages of `recent` (gossipsub's
    `rpc_pb2.Message`s as delivered), within limits.

    `served` counts replies by what became of them ("ok", "rate_limited", "busy",
    "stream_error").
    """

    def __init__(self, recent: Recent[rpc_pb2.Message], *,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self._recent = recent
        self._by_peer = Spacing(min_interval_s)
        self._by_ip = Spacing(min_interval_s / PER_IP)
        self._slots = trio.Semaphore(MAX_CONCURRENT)
        self.served: Counter[str] = Counter()

    async def handle(self, stream: Any) -> None:
        """Reply to one request; never raises into libp2p."""
        await serve_request(stream, self.served, "catch-up", self._reply, timeout_s=TIMEOUT_S)

    async def _reply(self, stream: Any, remote: str) -> str:
        if not self._admit(remote, stream_ip(stream)):
            await stream.write(frame(b""))
            return "rate_limited"
        with trio.move_on_after(SLOT_WAIT_S) as waited:
            await self._slots.acquire()
        if waited.cancelled_caught:
            await stream.write(frame(b""))
            return "busy"
        try:
            entries = self._recent.newest(MAX_ENTRIES)
            # Serialized here, per reply, not per delivery on the event loop's hot path.
            await stream.write(b"".join(frame(e.SerializeToString()) for e in entries)
                               + frame(b""))
        finally:
            self._slots.release()
        return "ok"

    def _admit(self, remote: str, ip: str | None) -> bool:
        by_ip = [] if ip is None or _is_loopback(ip) else [ip]
        if not (self._by_peer.ready([remote]) and self._by_ip.ready(by_ip)):
            return False
        return self._by_peer.admit([remote]) and self._by_ip.admit(by_ip)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


async def ask_catchup(open_stream: Callable[[], Awaitable[Any]],
                      take: Callable[[bytes], Awaitable[None]]) -> int:
    """Read a catch-up reply from the stream `open_stream()` opens; `take` checks and keeps
    each entry as it arrives (raising WireError stops the reply there). Returns the entries.

    Raises:
        WireError / TransferError: with the reason ("oversized": more than `MAX_ENTRIES`).
        trio.TooSlowError, OSError and libp2p's stream errors: no complete reply.
    """
    with trio.fail_after(TIMEOUT_S):
        stream = await open_stream()
        try:
            count = 0
            while entry := await read_frame(stream, max_len=MAX_ENTRY_BYTES):
                if count == MAX_ENTRIES:
                    raise WireError("oversized", f"more than {MAX_ENTRIES} catch-up entries")
                await take(entry)
                count += 1
            return count
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await close_quietly(stream)
