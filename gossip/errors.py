"""Exceptions of the network layer.

Rejections of untrusted input carry a short machine-readable `reason` (the daemon counts them per
reason in status.json) and a one-line human `detail`; `str(error)` is ``"reason: detail"``.
"""

from __future__ import annotations

WIRE_REASONS = frozenset({
    "bad_magic",  # not a loraswarm envelope at all
    "wrong_swarm",  # an envelope of another swarm; dropped before its payload is decoded
    "malformed",  # undecodable msgpack / JSON, or not the expected kind of message
    "bad_protocol",  # a protocol version this peer does not speak
    "bad_field",  # a missing, unknown, mistyped or out-of-bounds field
    "oversized",  # larger than a cap
    "truncated",  # shorter than its own framing says
    "bad_tensor",  # a safetensors entry that is inconsistent or unsupported
    "non_finite",  # NaN or Inf in a tensor
    "bad_codec",  # a compressed payload of an unknown codec, or whose layout contradicts its header
    "wrong_base",  # a delta against an estimate version the receiver does not hold
    "estimate_mismatch",  # the estimate a delta or keyframe rebuilds is not the digest claimed
    "bad_telemetry",  # an announcement's self-reported figures are missing, mistyped or absurd
    # A catch-up entry (`gossip.catchup`) that gossipsub would not have delivered:
    "bad_signature",  # not signed by its publisher's key
    "wrong_topic",  # published on another topic
    "signer_mismatch",  # the announcement names another peer than the one who signed it
})

TRANSFER_REASONS = frozenset({
    "timeout", "digest_mismatch", "oversized", "refused", "unreachable", "truncated",
    "header_mismatch",  # the transfer header contradicts the signed announcement
    "bad_signature",  # the transfer header is not signed by the serving peer's key
    "size_mismatch",  # the adapter is not the exact size our own shapes give
    "equivocation",  # two different adapters signed for one version
    "slow_reader",  # (server side) a client read slower than the minimum rate
    "stalled",  # no byte of the body came for `stall_s`
    "too_slow",  # past its expected time, the body averaged less than `min_fetch_rate`
})


class GossipError(Exception):
    """Base of every error raised by the `gossip` package."""


class _ReasonedError(GossipError):
    """An error with a fixed vocabulary of reasons, so that callers can count them."""

    reasons: frozenset[str] = frozenset()

    def __init__(self, reason: str, detail: str) -> None:
        # An unknown reason is a bug in our own code, not in the remote input: fail loudly.
        if reason not in self.reasons:
            raise ValueError(f"{type(self).__name__}: unknown reason {reason!r}")
        # Details end up in one log line and in status.json, so keep them on one short line.
        detail = " ".join(str(detail).split())[:300]
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[_ReasonedError], tuple[str, str]]:
        # Keep the two-argument constructor working through copy and pickling of the exception.
        return (type(self), (self.reason, self.detail))


class WireError(_ReasonedError):
    """Inbound bytes failed validation (see `WIRE_REASONS` for the reasons)."""

    reasons = WIRE_REASONS


class TransferError(_ReasonedError):
    """An adapter transfer failed (see `TRANSFER_REASONS` for the reasons)."""

    reasons = TRANSFER_REASONS
