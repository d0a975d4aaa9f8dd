"""Control messages on the wire: round trips, every rejection reason, and hostile bytes."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.errors import TRANSFER_REASONS, WIRE_REASONS, GossipError, TransferError, WireError
from gossip.swarm import PROTOCOL_VERSION
from gossip.telemetry import MAX_RANK, MAX_ROUND, MAX_RULE_LEN, Telemetry
from gossip.wire import (
    MAGIC,
    MAX_ADDR_LEN,
    MAX_ADDRS,
    MAX_ENVELOPE_BYTES,
    MAX_SAMPLES,
    MAX_VERSION,
    Announcement,
    FetchHeader,
    FetchRequest,
    digest,
    frame,
    frame_length,
)

SWARM = bytes(range(16))
OTHER = bytes(range(1, 17))
PEER = "12D3KooWGzXKrLVBzgqQZ3uMCfNiVRxk3gAXZpETYPHbCpbyT3Sq"
CAP = 1 << 20
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TELEMETRY = Telemetry(round=3, eval_loss=2.5, device="cuda", rank=8, merge_rule="trimmed-mean")


def announcement(**overrides: Any) -> Announcement:
    fields: dict[str, Any] = dict(
        swarm=SWARM, peer=PEER, version=3, samples=1200, digest=digest(b"adapter"), nbytes=4096,
        train_loss=2.25, addrs=("/ip4/127.0.0.1/tcp/4001/p2p/" + PEER,), telemetry=TELEMETRY,
    )
    fields.update(overrides)
    return Announcement(**fields)


def ok_header(**overrides: Any) -> FetchHeader:
    fields: dict[str, Any] = dict(swarm=SWARM, status="ok", version=7, samples=99, nbytes=512,
                                  digest=digest(b"x"), signature=bytes(64))
    fields.update(overrides)
    return FetchHeader(**fields)


def envelope(fields: dict[str, Any], *, swarm: bytes = SWARM, magic: bytes = MAGIC) -> bytes:
    return magic + swarm + msgpack.packb(fields, use_bin_type=True)


def announce_fields(**overrides: Any) -> dict[str, Any]:
    """The map of a valid announcement, to be spoiled one field at a time."""
    fields = msgpack.unpackb(announcement().to_wire()[20:], raw=False)
    fields.update(overrides)
    return fields


def decode_any(data: bytes) -> object:
    """Try every message type on the same bytes, as a confused or hostile peer would make us."""
    for decode in (
        lambda: Announcement.from_wire(data, swarm=SWARM, max_nbytes=CAP),
        lambda: FetchRequest.from_wire(data, swarm=SWARM),
        lambda: FetchHeader.from_wire(data, swarm=SWARM, max_nbytes=CAP),
    ):
        try:
            return decode()
        except WireError as exc:
            assert exc.reason in WIRE_REASONS
            assert "\n" not in str(exc)
    return None


# -- round trips ---------------------------------------------------------------------------------


def test_announcement_round_trip() -> None:
    message = announcement(addrs=("/ip4/10.0.0.1/tcp/1", "/dns4/example.org/tcp/2"))
    data = message.to_wire()
    assert data[:4] == b"LSW1" and data[4:20] == SWARM
    assert Announcement.from_wire(data, swarm=SWARM, max_nbytes=CAP) == message
    assert message.protocol == PROTOCOL_VERSION


def test_telemetry_round_trips_and_may_be_nil() -> None:
    for telemetry in (None, TELEMETRY, Telemetry(round=0, eval_loss=None, device="cpu", rank=1,
                                                 merge_rule="average")):
        message = announcement(telemetry=telemetry)
        decoded = Announcement.from_wire(message.to_wire(), swarm=SWARM, max_nbytes=CAP)
        assert decoded == message and decoded.telemetry == telemetry


def test_fetch_request_with_a_held_estimate_round_trips() -> None:
    message = FetchRequest(swarm=SWARM, version=-1, held_version=4, held_digest=digest(b"e"))
    decoded = FetchRequest.from_wire(message.to_wire(), swarm=SWARM)
    assert decoded == message and decoded.held == (4, digest(b"e"))
    assert FetchRequest(swarm=SWARM, version=-1).held is None


def test_fetch_request_round_trip() -> None:
    for version in (-1, 0, MAX_VERSION):
        message = FetchRequest(swarm=SWARM, version=version)
        assert FetchRequest.from_wire(message.to_wire(), swarm=SWARM) == message


@pytest.mark.parametrize("status", ["busy", "none", "rate_limited"])
def test_fetch_header_refusals_round_trip(status: str) -> None:
    message = FetchHeader(swarm=SWARM, status=status, version=-1, samples=0, nbytes=0,
                          digest=b"\0" * 32)
    assert FetchHeader.from_wire(message.to_wire(), swarm=SWARM, max_nbytes=CAP) == message


def test_fetch_header_ok_round_trip() -> None:
    for privacy in (-1.0, 0.0, 7.99):
        message = ok_header(privacy=privacy)
        assert FetchHeader.from_wire(message.to_wire(), swarm=SWARM, max_nbytes=CAP) == message


def test_a_headers_signature_covers_its_privacy() -> None:
    header = ok_header(privacy=4.0)
    other = ok_header(privacy=9.0)
    assert header.signed_part(PEER) != other.signed_part(PEER), "ε is signed with the version"
    assert header.signed_part(PEER) == ok_header(privacy=4.0).signed_part(PEER)


@FAST
@given(
    version=st.integers(0, MAX_VERSION), samples=st.integers(0, MAX_SAMPLES),
    nbytes=st.integers(1, CAP), loss=st.floats(0, 1e30),
    addrs=st.lists(st.from_regex(r"/[a-z0-9/.]{1,60}", fullmatch=True), max_size=MAX_ADDRS),
)
def test_announcement_round_trip_generated(
    version: int, samples: int, nbytes: int, loss: float, addrs: list[str]
) -> None:
    message = announcement(version=version, samples=samples, nbytes=nbytes, train_loss=loss,
                           addrs=tuple(addrs))
    assert Announcement.from_wire(message.to_wire(), swarm=SWARM, max_nbytes=CAP) == message


@pytest.mark.parametrize("privacy", [-1.0, 0.0, 0.73, 8.0, 1e6])
def test_announcement_carries_the_privacy_flag(privacy: float) -> None:
    message = announcement(privacy=privacy)
    back = Announcement.from_wire(message.to_wire(), swarm=SWARM, max_nbytes=CAP)
    assert back.privacy == privacy


def test_largest_legal_announcement_fits_one_envelope() -> None:
    addr = "/" + "a" * (MAX_ADDR_LEN - 1)
    telemetry = Telemetry(round=MAX_ROUND, eval_loss=1e6, device="x" * 16, rank=MAX_RANK,
                          merge_rule="y" * MAX_RULE_LEN)
    message = announcement(addrs=(addr,) * MAX_ADDRS, version=MAX_VERSION, samples=MAX_SAMPLES,
                           peer="z" * 128, telemetry=telemetry)
    assert len(message.to_wire()) <= MAX_ENVELOPE_BYTES
    assert Announcement.from_wire(message.to_wire(), swarm=SWARM, max_nbytes=CAP) == message


# -- each rejection reason ----------------------------------------------------------------------


def reason_of(data: bytes, decode: str = "announce") -> str:
    with pytest.raises(WireError) as info:
        if decode == "announce":
            Announcement.from_wire(data, swarm=SWARM, max_nbytes=CAP)
        elif decode == "request":
            FetchRequest.from_wire(data, swarm=SWARM)
        else:
            FetchHeader.from_wire(data, swarm=SWARM, max_nbytes=CAP)
    assert str(info.value) == f"{info.value.reason}: {info.value.detail}"
    return info.value.reason


def test_prefix_rejections() -> None:
    assert reason_of(b"") == "bad_magic"
    assert reason_of(b"LSW2" + SWARM + b"\x80") == "bad_magic"
    assert reason_of(MAGIC + SWARM[:5]) == "truncated"
    assert reason_of(b"\0" * (MAX_ENVELOPE_BYTES + 1)) == "oversized"


def test_other_swarm_is_dropped_before_its_payload_is_decoded() -> None:
    # The payload is not even msgpack: only a prefix check can give "wrong_swarm" here.
    assert reason_of(MAGIC + OTHER + b"\xc1garbage") == "wrong_swarm"
    assert reason_of(announcement(swarm=OTHER).to_wire()) == "wrong_swarm"


def test_malformed_payloads() -> None:
    assert reason_of(MAGIC + SWARM + b"\xc1") == "malformed"  # a reserved msgpack byte
    assert reason_of(MAGIC + SWARM + b"\x93\x01") == "malformed"  # array cut short
    assert reason_of(MAGIC + SWARM + msgpack.packb([1, 2])) == "malformed"  # not a map
    assert reason_of(MAGIC + SWARM + msgpack.packb({1: 2})) == "malformed"  # int keys
    data = announcement().to_wire()
    assert reason_of(data + b"\x00") == "malformed"  # trailing bytes
    assert reason_of(data, "request") == "malformed"  # another kind of message
    assert reason_of(data, "header") == "malformed"


def test_unknown_protocol_versions() -> None:
    assert reason_of(envelope(announce_fields(protocol=PROTOCOL_VERSION + 1))) == "bad_protocol"
    assert reason_of(envelope(announce_fields(protocol=0))) == "bad_protocol"
    # A future version may change every field: the version is judged before the rest.
    assert reason_of(envelope({"kind": "v2", "protocol": 99})) == "bad_protocol"
    assert reason_of(envelope(announce_fields(protocol="1"))) == "bad_field"


@pytest.mark.parametrize("spoil", [
    {"version": -1}, {"version": MAX_VERSION + 1}, {"version": True}, {"version": 1.0},
    {"samples": MAX_SAMPLES + 1}, {"samples": -5}, {"samples": "12"},
    {"digest": b"short"}, {"digest": "a" * 32}, {"nbytes": 0},
    {"train_loss": float("nan")}, {"train_loss": float("inf")}, {"train_loss": -0.5},
    {"train_loss": 1}, {"peer": ""}, {"peer": "0OIl"}, {"peer": "Q" * 129}, {"peer": 5},
    {"addrs": "/ip4/1.2.3.4"}, {"addrs": ("/a",) * (MAX_ADDRS + 1)},
    {"addrs": ("/" + "a" * MAX_ADDR_LEN,)}, {"addrs": ("ip4/1.2.3.4",)},
    {"addrs": ("/ip4/1.2.3.4\n",)}, {"addrs": ("/ip4 x",)}, {"addrs": (7,)},
    {"privacy": float("nan")}, {"privacy": float("inf")}, {"privacy": -0.5},
    {"privacy": 1e7}, {"privacy": 3}, {"privacy": None}, {"privacy": True},
    {"extra": 1},
])
def test_bad_fields(spoil: dict[str, Any]) -> None:
    assert reason_of(envelope(announce_fields(**spoil))) == "bad_field"


GOOD_TELEMETRY = TELEMETRY.to_wire()


@pytest.mark.parametrize("spoil", [
    {"round": -1}, {"round": MAX_ROUND + 1}, {"round": True}, {"round": 2.0},
    {"eval_loss": float("nan")}, {"eval_loss": float("-inf")}, {"eval_loss": -0.1},
    {"eval_loss": 1e7}, {"eval_loss": 3}, {"eval_loss": "2.5"},
    {"device": ""}, {"device": "CUDA"}, {"device": "cuda:0"}, {"device": "d" * 17},
    {"device": "gpu\x1b[31m"}, {"device": b"cpu"}, {"device": None},
    {"rank": 0}, {"rank": MAX_RANK + 1}, {"rank": "8"},
    {"merge_rule": "r" * (MAX_RULE_LEN + 1)}, {"merge_rule": "trimmed mean"},
    {"merge_rule": "médian"}, {"extra": 1},
])
def test_bad_telemetry(spoil: dict[str, Any]) -> None:
    telemetry = {**GOOD_TELEMETRY, **spoil}
    assert reason_of(envelope(announce_fields(telemetry=telemetry))) == "bad_telemetry"


@pytest.mark.parametrize("telemetry", [
    {k: v for k, v in GOOD_TELEMETRY.items() if k != "rank"}, [3, None, "cpu", 8, "average"],
    "cpu", 7, b"\x80", {},
])
def test_telemetry_that_is_not_the_exact_map_is_refused(telemetry: Any) -> None:
    assert reason_of(envelope(announce_fields(telemetry=telemetry))) == "bad_telemetry"
    # Int keys are refused while decoding, before any field is looked at.
    assert reason_of(envelope(announce_fields(telemetry={1: 2}))) == "malformed"


def test_missing_field() -> None:
    fields = announce_fields()
    del fields["samples"]
    assert reason_of(envelope(fields)) == "bad_field"


def test_announced_size_above_our_cap_is_oversized() -> None:
    data = announcement(nbytes=CAP + 1).to_wire()
    assert reason_of(data) == "oversized"
    assert Announcement.from_wire(data, swarm=SWARM, max_nbytes=CAP + 1).nbytes == CAP + 1


def test_fetch_request_and_header_rejections() -> None:
    request = {"kind": "fetch_request", "protocol": PROTOCOL_VERSION, "version": -1,
               "held_version": -1, "held_digest": b""}
    assert FetchRequest.from_wire(envelope(request), swarm=SWARM).held is None
    for spoil in ({"version": -2}, {"held_version": -2}, {"held_digest": b"\0" * 32},
                  {"held_version": 3}, {"held_version": 3, "held_digest": b"\0" * 31},
                  {"held_version": 3, "held_digest": "a" * 32}, {"held_version": None}):
        assert reason_of(envelope({**request, **spoil}), "request") == "bad_field", spoil
    header = {"kind": "fetch_header", "protocol": PROTOCOL_VERSION, "status": "ok", "version": 1,
              "samples": 0, "nbytes": CAP + 1, "digest": b"\0" * 32, "body_digest": b"\1" * 32,
              "signature": bytes(64), "privacy": 8.0}
    assert reason_of(envelope(header), "header") == "oversized"
    for spoil in ({"status": "maybe"}, {"nbytes": 0}, {"version": -1},
                  {"status": "busy"},  # a refusal with a version and bytes promised
                  {"signature": b""}, {"signature": bytes(2000)}, {"signature": "sig"},
                  {"body_digest": b"\1" * 31}, {"body_digest": None},
                  {"privacy": 8}, {"privacy": -0.5}, {"privacy": float("nan")}):
        assert reason_of(envelope({**header, "nbytes": 10, **spoil}), "header") == "bad_field"


def test_local_construction_is_validated_too() -> None:
    # We must never emit what a peer would reject.
    with pytest.raises(WireError, match="bad_field"):
        announcement(addrs=["/ip4/1.2.3.4"])  # a list, not a tuple
    with pytest.raises(WireError, match="bad_field"):
        FetchRequest(swarm=SWARM[:15], version=0)
    with pytest.raises(WireError, match="bad_protocol"):
        FetchRequest(swarm=SWARM, version=0, protocol=PROTOCOL_VERSION + 1)
    with pytest.raises(ValueError):
        FetchRequest.from_wire(FetchRequest(swarm=SWARM, version=0).to_wire(), swarm=b"short")


# -- hostile bytes never raise anything but WireError -------------------------------------------

VALID = [announcement().to_wire(), FetchRequest(swarm=SWARM, version=-1).to_wire(),
         ok_header().to_wire()]


@FAST
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    decode_any(data)
    decode_any(MAGIC + SWARM + data)


@FAST
@given(st.sampled_from(VALID), st.data())
def test_truncations_and_bit_flips(valid: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(valid) - 1))
    assert decode_any(valid[:cut]) is None
    flips = data.draw(st.lists(st.integers(0, len(valid) * 8 - 1), min_size=1, max_size=4))
    spoiled = bytearray(valid)
    for bit in flips:
        spoiled[bit // 8] ^= 1 << (bit % 8)
    decode_any(bytes(spoiled))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


@FAST
@given(st.dictionaries(st.sampled_from(sorted(announce_fields())), msgpack_values))
def test_generated_field_values(spoil: dict[str, Any]) -> None:
    decode_any(envelope(announce_fields(**spoil)))


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    assert reason_of(MAGIC + SWARM + b"\x91" * 5000 + b"\x00") == "malformed"


# -- framing -------------------------------------------------------------------------------------


def test_frame_round_trip() -> None:
    payload = FetchRequest(swarm=SWARM, version=4).to_wire()
    framed = frame(payload)
    assert framed[:4] == len(payload).to_bytes(4, "big") and framed[4:] == payload
    assert frame_length(framed[:4], max_len=len(payload)) == len(payload)
    assert frame(b"") == b"\0\0\0\0"


def test_frame_length_rejections() -> None:
    with pytest.raises(WireError) as info:
        frame_length(b"\0\0\1\1", max_len=256)
    assert info.value.reason == "oversized"
    with pytest.raises(WireError) as info:
        frame_length(b"\0\0", max_len=256)
    assert info.value.reason == "truncated"
    assert frame_length(b"\xff\xff\xff\xff", max_len=2**32) == 2**32 - 1


# -- errors --------------------------------------------------------------------------------------


def test_error_shape() -> None:
    error = WireError("malformed", "two\nlines  of   detail")
    assert isinstance(error, GossipError)
    assert (error.reason, error.detail) == ("malformed", "two lines of detail")
    assert str(error) == "malformed: two lines of detail"
    again = copy.deepcopy(error)  # exceptions are copied through __reduce__
    assert isinstance(again, WireError) and str(again) == str(error)
    assert str(copy.copy(TransferError("timeout", "slow"))) == "timeout: slow"
    assert {"timeout", "digest_mismatch", "oversized", "refused", "unreachable", "truncated",
            "header_mismatch", "bad_signature", "size_mismatch", "equivocation",
            "slow_reader", "stalled", "too_slow"} == TRANSFER_REASONS
    with pytest.raises(ValueError):
        WireError("timeout", "a transfer reason is not a wire reason")
