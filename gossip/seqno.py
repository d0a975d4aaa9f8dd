"""Gossipsub sequence numbers that never go backwards, across restarts and clock steps.

Receivers take a signer's message whose seqno is below the last one they saw from it for a
replay (gossip/membership.py). py-libp2p 0.8.1 numbers a publisher's messages from the wall
clock at start (`Pubsub.counter = int(time.time())`, one up per `_next_seqno`), so an honest
peer restarted after its clock stepped back, or after publishing faster than once a second,
was rejected until the clock caught up with its old numbers: an hour-long step, an hour.

`SeqnoCounter` starts above both the clock and every number an earlier run may have used, which
it keeps in a small file of the peer's data folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gossip.errors import GossipError

if TYPE_CHECKING:
    from libp2p.pubsub.pubsub import Pubsub

BLOCK = 1024  # numbers reserved per disk write: a publish writes the disk once in BLOCK times
_LIMIT = 1 << 63  # seqnos are 8 bytes on the wire; stay far below their top


class SeqnoCounter:
    """Hands out increasing sequence numbers; with a file, above those of every earlier run.

    The file holds the highest number reserved so far. A block of numbers is reserved by
    writing its last one before the first is handed out, so a crash can skip the unused rest
    of a block but never reuse a number.
    """

    def __init__(self, path: Path | None, *, block: int = BLOCK,
                 clock: Callable[[], float] = time.time) -> None:
        """Start above the clock and above the file's reservation.

        Args:
            path: where the reservation is kept; None keeps it in memory only (ephemeral
                identities, tests), numbering from the clock like py-libp2p.
            block: how many numbers one disk write reserves.
            clock: the wall clock in seconds (tests step it back).

        Raises:
            GossipError: the file cannot be read, holds no number, or cannot be written.
        """
        if block < 1:
            raise ValueError("block must be at least 1")
        self.path = path
        self._block = block
        reserved = _read(path) if path is not None else 0
        self._next = max(reserved, int(clock())) + 1
        self._reserved = self._next - 1
        self._reserve()  # fail at start-up, not at the first publish

    def next(self) -> int:
        """The next sequence number, larger than every one handed out before.

        Raises:
            GossipError: a new block could not be reserved on disk (disk full).
        """
        if self._next > self._reserved:
            self._reserve()
        value = self._next
        self._next += 1
        return value

    def next_bytes(self) -> bytes:
        """`next()` as gossipsub's 8-byte big-endian seqno field."""
        return self.next().to_bytes(8, "big")

    def _reserve(self) -> None:
        reserved = self._next + self._block - 1
        if self.path is not None:
            _write(self.path, reserved)
        self._reserved = reserved


def install_seqno_counter(pubsub: Pubsub, path: Path | None) -> SeqnoCounter:
    """Make a py-libp2p `Pubsub` number its published messages from a `SeqnoCounter`.

    `Pubsub.publish` calls `self._next_seqno()` for each message; shadowing that method on this
    one instance changes nothing else in py-libp2p (its own `counter` is then unused).

    Raises:
        GossipError: as `SeqnoCounter`.
    """
    counter = SeqnoCounter(path)
    pubsub._next_seqno = counter.next_bytes  # type: ignore[method-assign]
    return counter


def _read(path: Path) -> int:
    """The reservation kept in `path`, or 0 when there is no file yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise GossipError(f"cannot read {path}: {exc.strerror}; check its permissions") from exc
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value < _LIMIT:
        raise GossipError(f"{path} holds no sequence number ({text.strip()[:20]!r}); delete it "
                          "to number messages from the clock again")
    return value


def _write(path: Path, value: int) -> None:
    """Replace `path` atomically (temp file, fsync, rename), so a crash keeps the old value.

    peer/store.py has the same logic, but gossip must not import peer.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(f"{value}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GossipError(f"cannot write {path}: {exc.strerror or exc}; free disk space or "
                          f"make {path.parent} writable") from exc
