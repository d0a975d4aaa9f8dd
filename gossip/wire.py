"""Wire format: msgpack envelopes for control messages, safetensors bytes for adapters.

Every envelope is ``MAGIC + swarm id (16 raw bytes) + msgpack map``. The prefix is checked before
the payload is decoded, so that a message of another swarm costs a byte comparison, not a parse.
Every inbound field is type- and bound-checked; anything off raises `WireError` with a reason.
Adapters travel as safetensors bytes: see `gossip.codec`, re-exported here.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from gossip.codec import ADAPTER_DTYPES, check_cap, decode_adapter, encode_adapter
from gossip.errors import WireError
from gossip.swarm import PROTOCOL_VERSION, SWARM_ID_BYTES
from gossip.telemetry import Telemetry

MAGIC = b"LSW1"
MAX_ENVELOPE_BYTES = 16 * 1024
MAX_SAMPLES = 10**12
MAX_VERSION = 2**53
MAX_ADDRS = 16
MAX_ADDR_LEN = 256
MAX_PEER_ID_LEN = 128
MAX_FRAME_LEN = 2**32 - 1
DIGEST_BYTES = 32
MAX_SIGNATURE_BYTES = 1024  # Ed25519 signs in 64; RSA-4096 keys in 512
NOT_PRIVATE = -1.0  # an announcement's `privacy` without a DP guarantee
MAX_EPSILON = 1e6
FETCH_STATUSES = frozenset({"ok", "busy", "none", "rate_limited"})

_PREFIX_LEN = len(MAGIC) + SWARM_ID_BYTES
_SIGNING_TAG = b"loraswarm-offer:"
_BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
# Everything msgpack.unpackb raises on bad input: FormatError, StackError, ExtraData and
# UnicodeDecodeError are ValueErrors; OutOfData is an UnpackException; unhashable keys TypeError.
_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


def digest(data: bytes) -> bytes:
    """SHA-256 of `data` (32 bytes): how announced adapters are matched to fetched bytes."""
    return hashlib.sha256(data).digest()


# ---------------------------------------------------------------------------------------------
# Field checks. They raise WireError("bad_field") and serve both local construction (so that we
# never emit what a peer would reject) and inbound decoding; other control messages
# (`gossip.dialback`) build on them and on `Envelope` / `open_envelope`.


def bad_field(name: str, why: str) -> WireError:
    return WireError("bad_field", f"{name}: {why}")


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    # bool is an int subclass; msgpack keeps them apart and so do we.
    if type(value) is not int:
        raise bad_field(name, f"expected int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise bad_field(name, f"{value} not in {lo}..{hi}")


def check_bytes(name: str, value: object, length: int) -> None:
    if type(value) is not bytes:
        raise bad_field(name, f"expected bytes, got {type(value).__name__}")
    if len(value) != length:
        raise bad_field(name, f"expected {length} bytes, got {len(value)}")


def _check_peer(value: object) -> None:
    if type(value) is not str:
        raise bad_field("peer", f"expected str, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_PEER_ID_LEN or not _BASE58.issuperset(value):
        raise bad_field("peer", "not a base58 peer id")


def _check_addrs(value: object) -> None:
    if type(value) is not tuple:
        raise bad_field("addrs", f"expected a tuple, got {type(value).__name__}")
    if len(value) > MAX_ADDRS:
        raise bad_field("addrs", f"{len(value)} addresses, at most {MAX_ADDRS}")
    for addr in value:
        if type(addr) is not str or not 2 <= len(addr) <= MAX_ADDR_LEN:
            raise bad_field("addrs", f"each address is a str of 2..{MAX_ADDR_LEN} characters")
        # Multiaddrs are printable ASCII starting with "/"; anything else would only end up in logs.
        if not (addr.startswith("/") and addr.isascii() and addr.isprintable()) or " " in addr:
            raise bad_field("addrs", "not a multiaddr")


def _check_privacy(value: object) -> None:
    if type(value) is not float or not math.isfinite(value):
        raise bad_field("privacy", f"expected a finite float, got {value!r}")
    if value != NOT_PRIVATE and not 0 <= value <= MAX_EPSILON:
        raise bad_field("privacy", f"ε {value} not in 0..{MAX_EPSILON:g}, nor {NOT_PRIVATE}")


def check_protocol(value: object) -> None:
    if type(value) is not int:
        raise bad_field("protocol", f"expected int, got {type(value).__name__}")
    if value != PROTOCOL_VERSION:
        raise WireError("bad_protocol", f"protocol {value}, this peer speaks {PROTOCOL_VERSION}")


# ---------------------------------------------------------------------------------------------
# Envelopes.


def open_envelope(data: bytes, *, swarm: bytes, kind: str, keys: frozenset[str]) -> dict[str, Any]:
    """Check an envelope's prefix, then decode and shape-check its map. Returns the fields."""
    # 1. Size and prefix, before a single byte of payload is parsed.
    if not isinstance(data, bytes | bytearray):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise WireError("oversized", f"{len(data)} bytes, at most {MAX_ENVELOPE_BYTES}")
    if data[: len(MAGIC)] != MAGIC:
        raise WireError("bad_magic", f"starts with {data[:len(MAGIC)]!r}, not {MAGIC!r}")
    if len(data) < _PREFIX_LEN:
        raise WireError("truncated", f"{len(data)} bytes, shorter than the envelope prefix")
    if data[len(MAGIC) : _PREFIX_LEN] != swarm:
        raise WireError("wrong_swarm", f"swarm {data[len(MAGIC):_PREFIX_LEN].hex()}")
    # 2. The payload: one msgpack map, nothing after it.
    try:
        obj = msgpack.unpackb(data[_PREFIX_LEN:], raw=False, use_list=False, strict_map_key=True)
    except _MSGPACK_ERRORS as exc:
        raise WireError("malformed", f"undecodable msgpack: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise WireError("malformed", f"payload is a {type(obj).__name__}, not a map")
    # 3. The protocol first: a future version may change every other field.
    check_protocol(obj.get("protocol"))
    if obj.get("kind") != kind:
        raise WireError("malformed", f"not a {kind} message")
    if obj.keys() != keys | {"kind"}:
        missing = sorted(keys - obj.keys())
        unknown = sorted(repr(k)[:40] for k in obj.keys() - keys - {"kind"})
        raise bad_field("fields", f"missing {missing[:4]}, unknown {unknown[:4]}")
    del obj["kind"]
    return obj


class Envelope:
    """What every control message shares: its kind tag, its field names and its encoding."""

    swarm: bytes
    KIND: ClassVar[str]
    FIELDS: ClassVar[frozenset[str]]

    def to_wire(self) -> bytes:
        """Encode as an envelope of this message's swarm."""
        fields = {name: _plain(getattr(self, name)) for name in self.FIELDS}
        payload = msgpack.packb({"kind": self.KIND, **fields}, use_bin_type=True)
        return MAGIC + self.swarm + payload


def _plain(value: Any) -> Any:
    """A field as msgpack takes it: a nested record becomes its map."""
    return value.to_wire() if isinstance(value, Telemetry) else value


def swarm_arg(swarm: object) -> bytes:
    if type(swarm) is not bytes or len(swarm) != SWARM_ID_BYTES:
        raise ValueError(f"our own swarm id must be {SWARM_ID_BYTES} bytes, got {swarm!r}")
    return swarm


@dataclass(frozen=True)
class Announcement(Envelope):
    """Published on the swarm topic each round: "I have adapter `version`; fetch it from me".

    `telemetry` is what the peer says about itself for operators (`gossip.telemetry`): always
    on the wire, nil when a sender has nothing to report (a synthetic test peer).
    """

    swarm: bytes
    peer: str
    version: int
    samples: int
    digest: bytes
    nbytes: int
    train_loss: float
    addrs: tuple[str, ...]
    telemetry: Telemetry | None = None
    # ε its owner has spent on DP-SGD steps so far (the adapter is post-processing of them),
    # or NOT_PRIVATE: no guarantee. Self-reported, bound to the sender by the pubsub signature.
    privacy: float = -1.0
    protocol: int = PROTOCOL_VERSION

    KIND: ClassVar[str] = "announce"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"protocol", "peer", "version", "samples", "digest", "nbytes", "train_loss", "addrs",
         "telemetry", "privacy"}
    )

    def __post_init__(self) -> None:
        check_bytes("swarm", self.swarm, SWARM_ID_BYTES)
        check_protocol(self.protocol)
        _check_peer(self.peer)
        check_int("version", self.version, 0, MAX_VERSION)
        check_int("samples", self.samples, 0, MAX_SAMPLES)
        check_bytes("digest", self.digest, DIGEST_BYTES)
        check_int("nbytes", self.nbytes, 1, MAX_FRAME_LEN)
        if type(self.train_loss) is not float or not math.isfinite(self.train_loss):
            raise bad_field("train_loss", f"expected a finite float, got {self.train_loss!r}")
        if self.train_loss < 0:
            raise bad_field("train_loss", f"{self.train_loss} is negative")
        _check_addrs(self.addrs)
        if self.telemetry is not None and not isinstance(self.telemetry, Telemetry):
            raise WireError("bad_telemetry", f"expected a Telemetry, got "
                            f"{type(self.telemetry).__name__}")
        _check_privacy(self.privacy)

    @classmethod
    def from_wire(cls, data: bytes, *, swarm: bytes, max_nbytes: int) -> Announcement:
        """Decode and validate an announcement.

        Args:
            data: the raw pubsub message data.
            swarm: our swarm id; announcements of other swarms are refused unparsed.
            max_nbytes: the largest adapter we would fetch.

        Raises:
            WireError: with the reason of the rejection.
        """
        fields = open_envelope(data, swarm=swarm_arg(swarm), kind=cls.KIND, keys=cls.FIELDS)
        fields["telemetry"] = Telemetry.from_wire(fields["telemetry"])
        message = cls(swarm=swarm, **fields)
        check_cap("nbytes", message.nbytes, max_nbytes)
        return message


@dataclass(frozen=True)
class FetchRequest(Envelope):
    """Client to server on a transfer stream: "send me your estimate `version`" (-1: latest).

    `held_version` and `held_digest` name the server's estimate the client holds (-1 and b"":
    none), so that the server can send the steps since then instead of a keyframe.
    """

    swarm: bytes
    version: int
    held_version: int = -1
    held_digest: bytes = b""
    protocol: int = PROTOCOL_VERSION

    KIND: ClassVar[str] = "fetch_request"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"protocol", "version", "held_version", "held_digest"})

    def __post_init__(self) -> None:
        check_bytes("swarm", self.swarm, SWARM_ID_BYTES)
        check_protocol(self.protocol)
        check_int("version", self.version, -1, MAX_VERSION)
        check_int("held_version", self.held_version, -1, MAX_VERSION)
        check_bytes("held_digest", self.held_digest, 0 if self.held_version < 0 else DIGEST_BYTES)

    @property
    def held(self) -> tuple[int, bytes] | None:
        """(version, digest) of the estimate the client holds, or None."""
        return None if self.held_version < 0 else (self.held_version, self.held_digest)

    @classmethod
    def from_wire(cls, data: bytes, *, swarm: bytes) -> FetchRequest:
        """Decode and validate a fetch request.

        Raises:
            WireError: with the reason of the rejection.
        """
        fields = open_envelope(data, swarm=swarm_arg(swarm), kind=cls.KIND, keys=cls.FIELDS)
        return cls(swarm=swarm, **fields)


@dataclass(frozen=True)
class FetchHeader(Envelope):
    """Server to client, before the update bytes (which follow only when `status` is "ok").

    A refusal ("busy", "none", "rate_limited") carries version -1, nbytes 0 and no signature.
    An "ok" header carries the server's libp2p signature over `signed_offer(...)`: the version
    (and so the age a merge gives it), sample count and `digest` (the estimate digest that
    names the version, `gossip.estimate`) of what it serves, and the length and sha256
    (`body_digest`) of the update bytes that follow, and the ε its DP ledger had spent on
    that version (`privacy`, -1.0: no guarantee), are bound to its key, whether or not an
    announcement of that version was heard.
    """

    swarm: bytes
    status: str
    version: int
    samples: int
    nbytes: int
    digest: bytes
    body_digest: bytes = b"\0" * DIGEST_BYTES
    signature: bytes = b""
    privacy: float = NOT_PRIVATE
    protocol: int = PROTOCOL_VERSION

    KIND: ClassVar[str] = "fetch_header"
    FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"protocol", "status", "version", "samples", "nbytes", "digest", "body_digest",
         "signature", "privacy"}
    )

    def __post_init__(self) -> None:
        check_bytes("swarm", self.swarm, SWARM_ID_BYTES)
        check_protocol(self.protocol)
        if type(self.status) is not str or self.status not in FETCH_STATUSES:
            raise bad_field("status", f"{self.status!r} not one of {sorted(FETCH_STATUSES)}")
        ok = self.status == "ok"
        # An "ok" header promises real bytes; a refusal promises none.
        check_int("version", self.version, 0 if ok else -1, MAX_VERSION if ok else -1)
        check_int("nbytes", self.nbytes, 1 if ok else 0, MAX_FRAME_LEN if ok else 0)
        check_int("samples", self.samples, 0, MAX_SAMPLES)
        check_bytes("digest", self.digest, DIGEST_BYTES)
        check_bytes("body_digest", self.body_digest, DIGEST_BYTES)
        _check_privacy(self.privacy)
        if type(self.signature) is not bytes:
            raise bad_field("signature", f"expected bytes, got {type(self.signature).__name__}")
        low = 1 if ok else 0
        if not low <= len(self.signature) <= (MAX_SIGNATURE_BYTES if ok else 0):
            raise bad_field("signature", f"{len(self.signature)} bytes")

    def signed_part(self, peer: str) -> bytes:
        """What the signature covers; see `signed_offer`."""
        return signed_offer(self.swarm, peer, self.version, self.samples, self.nbytes,
                            self.digest, self.body_digest, self.privacy)

    @classmethod
    def from_wire(cls, data: bytes, *, swarm: bytes, max_nbytes: int) -> FetchHeader:
        """Decode and validate a fetch header.

        Raises:
            WireError: with the reason of the rejection ("oversized" when `nbytes` > max_nbytes).
        """
        fields = open_envelope(data, swarm=swarm_arg(swarm), kind=cls.KIND, keys=cls.FIELDS)
        message = cls(swarm=swarm, **fields)
        check_cap("nbytes", message.nbytes, max_nbytes)
        return message


def signed_offer(swarm: bytes, peer: str, version: int, samples: int, nbytes: int,
                 digest: bytes, body_digest: bytes, privacy: float) -> bytes:
    """The bytes a server signs for an offer: a domain tag, then every field a merge relies on.

    The peer id is inside, so a signature cannot be replayed by another peer; the swarm id is
    inside, so it cannot be replayed into another swarm. `digest` names the estimate version;
    `nbytes` and `body_digest` bind the update bytes sent for it (one signature per body);
    `privacy` is the ε spent on that version (`--require-dp` judges the adapter by it).
    """
    fields = [swarm, peer, version, samples, nbytes, digest, body_digest, privacy]
    return _SIGNING_TAG + msgpack.packb(fields, use_bin_type=True)


# ---------------------------------------------------------------------------------------------
# Framing on streams.


def frame(payload: bytes) -> bytes:
    """Prefix `payload` with its length as 4 big-endian bytes."""
    if len(payload) > MAX_FRAME_LEN:
        raise ValueError(f"a frame holds at most {MAX_FRAME_LEN} bytes, got {len(payload)}")
    return len(payload).to_bytes(4, "big") + bytes(payload)


def frame_length(prefix: bytes, *, max_len: int) -> int:
    """Parse a 4-byte length prefix, refusing lengths the reader is not prepared to buffer.

    Raises:
        WireError: "truncated" when the prefix is not 4 bytes, "oversized" above `max_len`.
    """
    if len(prefix) != 4:
        raise WireError("truncated", f"a frame prefix is 4 bytes, got {len(prefix)}")
    length = int.from_bytes(prefix, "big")
    check_cap("frame length", length, max_len)
    return length


__all__ = [
    "ADAPTER_DTYPES", "Announcement", "Envelope", "FetchHeader", "FetchRequest", "bad_field",
    "check_bytes", "check_int", "check_protocol", "decode_adapter", "digest", "encode_adapter",
    "frame", "frame_length", "open_envelope", "signed_offer", "swarm_arg",
]
