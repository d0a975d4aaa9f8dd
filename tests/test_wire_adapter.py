"""Adapters as safetensors bytes: round trips, determinism, and every way a peer can lie."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.codec import MAX_TENSORS, decode_adapter, encode_adapter
from gossip.errors import WIRE_REASONS, WireError
from gossip.wire import digest
from merge.config import MergeConfig
from merge.errors import REJECT_REASONS, RejectedUpdate
from merge.validate import validate_update
from peer.privacy import PRIVACY_REASONS

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CAP = 1 << 20
A = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"


def state(rank: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, 16, generator=gen).to(dtype),
            B: torch.randn(24, rank, generator=gen).to(dtype)}


def raw_safetensors(header: dict[str, Any], body: bytes, *, length: int | None = None) -> bytes:
    """Hand-made safetensors bytes, so that a test can write what `safetensors` never would."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def reason_of(data: bytes, **kwargs: Any) -> str:
    kwargs.setdefault("max_bytes", CAP)
    with pytest.raises(WireError) as info:
        decode_adapter(data, **kwargs)
    return info.value.reason


@pytest.fixture
def unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the bytes reach `safetensors`: our own checks must refuse them first."""

    def refuse(data: bytes) -> dict[str, torch.Tensor]:
        raise AssertionError("safetensors was handed bytes that should have been refused")

    monkeypatch.setattr(safetensors.torch, "load", refuse)


# -- round trips and determinism -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip(dtype: torch.dtype) -> None:
    original = state(dtype=dtype)
    decoded = decode_adapter(encode_adapter(original), max_bytes=CAP)
    assert decoded.keys() == original.keys()
    for name, tensor in original.items():
        assert decoded[name].dtype == dtype and torch.equal(decoded[name], tensor)


def test_encoding_is_deterministic() -> None:
    original = state()
    shuffled = dict(reversed(list(original.items())))
    # A transposed-then-transposed-back tensor is non-contiguous with the same values.
    strided = {A: original[A].t().contiguous().t(), B: original[B].clone()}
    assert not strided[A].is_contiguous()
    encodings = {encode_adapter(s) for s in (original, shuffled, strided, state())}
    assert len(encodings) == 1
    assert digest(encode_adapter(original)) != digest(encode_adapter(state(seed=1)))


def test_tensors_sharing_storage_encode() -> None:
    base = torch.randn(8, 16)
    tied = {A: base[:4], B: base[4:].t()}
    decoded = decode_adapter(encode_adapter(tied), max_bytes=CAP)
    assert torch.equal(decoded[A], base[:4]) and torch.equal(decoded[B], base[4:].t())


def test_encode_refuses_what_decode_would_refuse() -> None:
    for bad in ({}, {A: torch.zeros(2, dtype=torch.int64)}, {"": torch.zeros(2)},
                {A: [1.0, 2.0]}):
        with pytest.raises(ValueError):
            encode_adapter(bad)  # type: ignore[arg-type]


@FAST
@given(
    shape=st.lists(st.integers(0, 5), max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_generated(shape: list[int], dtype: torch.dtype, seed: int) -> None:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    data = encode_adapter({"t": tensor, "u": tensor * 2})
    assert encode_adapter({"u": tensor * 2, "t": tensor}) == data
    decoded = decode_adapter(data, max_bytes=CAP)
    assert torch.equal(decoded["t"], tensor) and decoded["t"].shape == tensor.shape


# -- size and structure --------------------------------------------------------------------------


@pytest.mark.usefixtures("unparsed")
def test_oversized_is_rejected_before_parsing() -> None:
    data = encode_adapter(state())
    assert reason_of(data, max_bytes=len(data) - 1) == "oversized"
    # Garbage above the cap is refused as oversized, not as malformed: nothing was parsed.
    assert reason_of(b"\xff" * 200, max_bytes=100) == "oversized"


@pytest.mark.usefixtures("unparsed")
def test_truncated() -> None:
    data = encode_adapter(state())
    assert reason_of(data[:5]) == "truncated"
    assert reason_of(struct.pack("<Q", 2**63) + b"{}") == "truncated"
    header_len = struct.unpack("<Q", data[:8])[0]
    assert reason_of(data[: 8 + header_len - 1]) == "truncated"
    assert reason_of(data[:-1]) == "bad_tensor"  # the last tensor's bytes are missing


@pytest.mark.usefixtures("unparsed")
def test_header_not_json_or_not_an_object() -> None:
    assert reason_of(struct.pack("<Q", 4) + b"\xff\xfe{}") == "malformed"
    assert reason_of(struct.pack("<Q", 3) + b"[1]") == "malformed"
    assert reason_of(struct.pack("<Q", 6000) + b"[" * 6000) == "malformed"
    duplicate = b'{"t":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"t":{"dtype":"F32",' \
                b'"shape":[],"data_offsets":[0,4]}}'
    assert reason_of(struct.pack("<Q", len(duplicate)) + duplicate + b"\0" * 4) == "malformed"


def entry(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header,body_len", [
    ({"t": entry(dtype="I64", offsets=(0, 16))}, 16),  # integers are not adapter weights
    ({"t": entry(dtype="F8_E4M3", offsets=(0, 2))}, 2),
    ({"t": entry(dtype="PICKLE")}, 8),
    ({"t": entry(offsets=(0, 9))}, 8),  # offsets beyond the body
    ({"t": entry(offsets=(4, 12))}, 12),  # a gap at the start
    ({"t": entry(), "u": entry()}, 16),  # overlapping tensors
    ({"t": entry()}, 12),  # trailing bytes
    ({"t": entry(shape=(3,))}, 8),  # shape does not fill its bytes
    ({"t": entry(shape=(2**40, 0), offsets=(0, 0))}, 0),  # absurd dim
    ({"t": entry(shape=(1,) * 9, offsets=(0, 4))}, 4),  # too many dims
    ({"t": entry(shape=(-2,))}, 8),
    ({"t": entry(shape=(2.0,))}, 8),
    ({"t": entry(shape=(True, 2))}, 8),
    ({"t": entry(offsets=(0, 8, 16))}, 8),
    ({"t": entry(offsets=(8, 0))}, 8),
    ({"t": {**entry(), "extra": 1}}, 8),
    ({"t": [1, 2]}, 8),
    ({"": entry()}, 8),
    ({}, 0),  # no tensors at all
    ({"__metadata__": {"a": 1}, "t": entry()}, 8),
])
@pytest.mark.usefixtures("unparsed")
def test_bad_tensor_headers(header: dict[str, Any], body_len: int) -> None:
    assert reason_of(raw_safetensors(header, b"\0" * body_len)) == "bad_tensor"


def test_metadata_and_empty_tensors_are_fine() -> None:
    header = {"__metadata__": {"format": "pt"}, "t": entry(shape=(0, 3), offsets=(0, 0)),
              "u": entry()}
    decoded = decode_adapter(raw_safetensors(header, b"\0" * 8), max_bytes=CAP)
    assert decoded["t"].shape == (0, 3) and decoded["u"].tolist() == [0.0, 0.0]


@pytest.mark.usefixtures("unparsed")
def test_too_many_tensors() -> None:
    header = {f"t{i}": entry(shape=(0,), offsets=(0, 0)) for i in range(MAX_TENSORS + 1)}
    assert reason_of(raw_safetensors(header, b""), max_bytes=10 * CAP) == "oversized"


# -- the format only: structure is validate_update's ---------------------------------------------


def refused_by_validation(theirs: dict[str, torch.Tensor], *, allow_rank_change: bool = False,
                          ours: dict[str, torch.Tensor] | None = None) -> str:
    """Decode `theirs` (the format is fine), then return why `validate_update` refuses it."""
    decoded = decode_adapter(encode_adapter(theirs), max_bytes=CAP)
    assert decoded.keys() == theirs.keys()
    with pytest.raises(RejectedUpdate) as info:
        validate_update(state() if ours is None else ours, decoded, MergeConfig(),
                        allow_rank_change=allow_rank_change)
    return info.value.reason


def test_keys_mismatch() -> None:
    ours = state()
    assert refused_by_validation({A: ours[A]}) == "keys_mismatch"
    assert refused_by_validation({**ours, "extra.weight": torch.zeros(1)}) == "keys_mismatch"


def test_dtype_mismatch() -> None:
    assert refused_by_validation(state(dtype=torch.float16)) == "dtype_mismatch"


def test_shape_mismatch_and_rank_change() -> None:
    # Another rank is refused unless the rule takes it (its cases: test_merge_validate).
    assert refused_by_validation(state(rank=8)) == "rank_mismatch"
    decoded = decode_adapter(encode_adapter(state(rank=8)), max_bytes=CAP)
    validate_update(state(rank=4), decoded, MergeConfig(), allow_rank_change=True)
    wide = {A: torch.zeros(8, 17), B: torch.zeros(24, 8)}
    assert refused_by_validation(wide, allow_rank_change=True) == "shape_mismatch"


def test_wire_and_validation_reasons_do_not_overlap() -> None:
    # A reason names the one layer that counts it.
    assert not WIRE_REASONS & REJECT_REASONS
    assert not (WIRE_REASONS | REJECT_REASONS) & PRIVACY_REASONS  # each counted under its own


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite(value: float, dtype: torch.dtype) -> None:
    spoiled = state(dtype=dtype)
    spoiled[B] = spoiled[B].clone()
    spoiled[B][3, 1] = value
    assert reason_of(encode_adapter(spoiled)) == "non_finite"


# -- hostile bytes never raise anything but WireError -------------------------------------------

VALID = encode_adapter(state(rank=2))


def decode_or_reason(data: bytes) -> str | None:
    try:
        decode_adapter(data, max_bytes=CAP)
    except WireError as exc:
        return exc.reason
    return None


@FAST
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    assert decode_or_reason(data) is not None
    assert decode_or_reason(VALID[:8] + data) is not None


@FAST
@given(st.data())
def test_truncations_and_bit_flips(data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(VALID) - 1))
    assert decode_or_reason(VALID[:cut]) is not None
    spoiled = bytearray(VALID)
    for bit in data.draw(st.lists(st.integers(0, len(VALID) * 8 - 1), min_size=1, max_size=4)):
        spoiled[bit // 8] ^= 1 << (bit % 8)
    decode_or_reason(bytes(spoiled))  # flips inside the values may decode; nothing may escape
