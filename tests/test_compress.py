"""Wire codecs (gossip.compress): spec strings, error bounds, and decoders under hostile bytes."""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gossip.compress import MAGIC, Codec, decode_payload, parse_codec, shapes_of
from gossip.errors import WIRE_REASONS, WireError

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECS = ["fp32", "bf16", "int8", "topk:0.05", "fp32+zstd", "bf16+zstd", "int8+zstd",
         "topk:0.05+zstd", "topk:1.0", "topk:0.001+zstd", "sign", "sign+zstd",
         "ternary:0.1", "ternary:0.013+zstd", "ternary:1.0"]
CAP = 1 << 22


def adapter(seed: int = 0, scale: float = 1.0, rows: int = 24, cols: int = 40) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": scale * torch.randn(8, cols, generator=gen),
            "m.lora_B.weight": scale * torch.randn(rows, 8, generator=gen)}


def header_and_body(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[4:8], "little")
    return msgpack.unpackb(data[8 : 8 + length]), data[8 + length :]


def rebuild(header: dict, body: bytes) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + len(packed).to_bytes(4, "little") + packed + body


def reason(data: bytes, shapes: dict) -> str:
    with pytest.raises(WireError) as caught:
        decode_payload(data, shapes=shapes, max_bytes=CAP)
    return caught.value.reason


# ---------------------------------------------------------------------------------------------
# Spec strings.


@pytest.mark.parametrize("spec", SPECS + ["topk:5e-2", "topk:1"])
def test_specs_parse_to_a_canonical_spelling(spec: str) -> None:
    codec = parse_codec(spec)
    assert parse_codec(codec.spec) == codec
    assert codec.zstd == spec.endswith("+zstd")


@pytest.mark.parametrize("spec", ["", "fp16", "int8+gzip", "int8+zstd+zstd", "topk", "topk:",
                                  "topk:0", "topk:1.5", "topk:nan", "topk:-0.1", "topk:abc",
                                  "int8:0.5", "x" * 40])
def test_bad_specs_raise_a_one_line_value_error(spec: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_codec(spec)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Round trips within each codec's error bound.


def round_trip(spec: str, state: dict) -> dict:
    codec = parse_codec(spec)
    data = codec.encode(state)
    decoded = codec.decode(data, shapes=shapes_of(state), max_bytes=len(data))
    assert decoded.keys() == state.keys()
    assert all(d.dtype == torch.float32 and d.shape == state[k].shape
               for k, d in decoded.items())
    # Deterministic: the same bytes decode to the same bits every time.
    again = codec.decode(data, shapes=shapes_of(state), max_bytes=len(data))
    assert all(torch.equal(decoded[k], again[k]) for k in state)
    return decoded


@pytest.mark.parametrize("zstd", ["", "+zstd"])
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-4, 1e-2, 1.0, 300.0]))
@FAST
def test_exact_and_bf16_bounds(zstd: str, seed: int, scale: float) -> None:
    state = adapter(seed, scale)
    assert all(torch.equal(v, state[k]) for k, v in round_trip("fp32" + zstd, state).items())
    for k, v in round_trip("bf16" + zstd, state).items():
        assert bool(((v - state[k]).abs() <= 2**-8 * state[k].abs()).all())


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-4, 1.0, 300.0]))
@FAST
def test_int8_error_is_within_a_row_absmax_over_127(seed: int, scale: float) -> None:
    state = adapter(seed, scale)
    state["m.lora_B.weight"][3] = 0.0  # a zero row has scale 0 and decodes to zeros
    for k, v in round_trip("int8+zstd", state).items():
        bound = state[k].abs().amax(dim=1, keepdim=True) / 127
        assert bool(((v - state[k]).abs() <= bound).all())
    assert not round_trip("int8", state)["m.lora_B.weight"][3].any()


@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.5, 1.0])
@given(seed=st.integers(0, 2**16))
@example(seed=22647)  # at fraction 1.0: 1.000014 half-steps, float32 rounding of the decode
@FAST
def test_topk_keeps_the_largest_entries_and_zeroes_the_rest(fraction: float, seed: int) -> None:
    state = adapter(seed)
    decoded = round_trip(f"topk:{fraction}", state)
    for k, x in state.items():
        flat, got = x.flatten(), decoded[k].flatten()
        count = max(1, int(fraction * flat.numel()))
        kept = torch.topk(flat.abs(), count).indices
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[kept] = True
        assert not got[~mask].any()
        # int8 values with one scale per tensor: within half a step of the kept largest |x|,
        # up to float32 rounding of values as large as that |x|.
        largest = flat[kept].abs().max()
        slack = 4 * torch.finfo(torch.float32).eps * largest
        assert bool(((got[mask] - flat[mask]).abs() <= largest / 127 / 2 + slack).all())


@given(seed=st.integers(0, 2**16), cols=st.integers(1, 13))
@FAST
def test_sign_sends_signs_at_each_long_lines_mean_magnitude(seed: int, cols: int) -> None:
    state = adapter(seed, cols=cols)  # rows * cols often not a multiple of 8: padded bits
    state["m.lora_B.weight"][:, 2] = 0.0  # a zero line has scale 0 and decodes to zeros
    for k, y in round_trip("sign", state).items():
        x = state[k]  # A (8 x cols): a scale per row when cols >= 8; B (24 x 8): per column
        scale = x.abs().mean(dim=1 if x.shape[0] <= x.shape[1] else 0, keepdim=True)
        assert torch.allclose(y, torch.where(x >= 0, scale, -scale))
    assert not round_trip("sign+zstd", state)["m.lora_B.weight"][:, 2].any()
    # 1 bit an entry and a float32 per line: about a 32nd of fp32 for long thin factors.
    x = adapter(seed, rows=256)["m.lora_B.weight"]  # 256 x 8
    body = len(parse_codec("sign").encode({"x": x})) - len(parse_codec("fp32").encode({"x": x}))
    assert body == (4 * 8 + 256 * 8 // 8) - 4 * 256 * 8


@pytest.mark.parametrize("fraction", [0.001, 0.1, 1.0])
@given(seed=st.integers(0, 2**16))
@FAST
def test_ternary_sends_the_largest_entries_signs_at_their_mean_magnitude(
        fraction: float, seed: int) -> None:
    state = adapter(seed)
    decoded = round_trip(f"ternary:{fraction}+zstd", state)
    for k, x in state.items():
        flat, got = x.flatten(), decoded[k].flatten()
        kept = torch.topk(flat.abs(), max(1, int(fraction * flat.numel()))).indices
        scale = flat[kept].abs().mean()
        expected = torch.zeros_like(flat)
        expected[kept] = torch.where(flat[kept] >= 0, scale, -scale)
        assert torch.allclose(got, expected)


def test_encode_refuses_what_no_decoder_could_accept() -> None:
    codec = parse_codec("int8")
    for bad in ({}, {"a": torch.zeros(3)}, {"a": torch.zeros(2, 2, dtype=torch.float64)},
                {"a": torch.full((2, 2), float("nan"))}, {"": torch.zeros(2, 2)}):
        with pytest.raises(ValueError):
            codec.encode(bad)


# ---------------------------------------------------------------------------------------------
# Hostile payloads.


@pytest.mark.parametrize("spec", ["int8", "topk:0.05+zstd"])
def test_a_payload_of_other_tensors_or_another_codec_is_refused(spec: str) -> None:
    state = adapter()
    data = parse_codec(spec).encode(state)
    shapes = shapes_of(state)
    assert reason(data, {**shapes, "m.lora_B.weight": (25, 8)}) == "bad_codec"
    assert reason(data, {"other": (8, 40), "m.lora_B.weight": (24, 8)}) == "bad_codec"
    assert reason(data, {"m.lora_A.weight": (8, 40)}) == "bad_codec"
    with pytest.raises(WireError, match="bad_codec"):
        parse_codec("bf16").decode(data, shapes=shapes, max_bytes=CAP)
    header, body = header_and_body(data)
    for spec_field in ("topk:0.050", "lz4", 7):
        assert reason(rebuild({**header, "codec": spec_field}, body), shapes) == "bad_codec"
    assert reason(rebuild({**header, "extra": 1}, body), shapes) == "malformed"
    with pytest.raises(WireError, match="oversized"):
        decode_payload(data, shapes=shapes, max_bytes=len(data) - 1)


def test_bad_scales_and_indices_are_refused() -> None:
    state = {"t": torch.randn(4, 50, generator=torch.Generator().manual_seed(1))}
    shapes = shapes_of(state)
    header, body = header_and_body(parse_codec("int8").encode(state))
    for scale in (float("nan"), float("inf"), -1.0):
        spoiled = struct.pack("<f", scale) + body[4:]
        assert reason(rebuild(header, spoiled), shapes) == "bad_codec"
    header, body = header_and_body(parse_codec("topk:0.1").encode(state))  # 20 of 200
    gaps = np.frombuffer(body[:80], "<u4").copy()
    assert np.cumsum(gaps)[-1] < 200 and (gaps[1:] >= 1).all()
    for spoil in ({3: 0}, {19: 200}, {0: 2**32 - 1}, {5: 0, 6: 0}):
        bad = gaps.copy()
        for at, value in spoil.items():
            bad[at] = value
        assert reason(rebuild(header, bad.astype("<u4").tobytes() + body[80:]), shapes) == \
            "bad_codec"
    huge = body[:80] + struct.pack("<f", 3e38) + body[84:]  # int8 x 3e38 overflows float32
    assert reason(rebuild(header, huge), shapes) == "non_finite"
    header, body = header_and_body(parse_codec("ternary:0.1").encode(state))  # 20 of 200
    bad = np.frombuffer(body[:80], "<u4").copy()
    bad[7] = 0
    assert reason(rebuild(header, bad.astype("<u4").tobytes() + body[80:]), shapes) == "bad_codec"
    assert reason(rebuild(header, body[:80] + struct.pack("<f", -2.0) + body[84:]), shapes) == \
        "bad_codec"
    header, body = header_and_body(parse_codec("sign").encode(state))  # 4 scales, 25 bytes
    for scale in (float("nan"), float("inf"), -1.0):
        spoiled = body[:4] + struct.pack("<f", scale) + body[8:]
        assert reason(rebuild(header, spoiled), shapes) == "bad_codec"
    assert reason(rebuild(header, body[:-1]), shapes) == "truncated"


def test_a_zstd_bomb_is_refused_before_decompression() -> None:
    state = adapter()
    shapes = shapes_of(state)
    header, _ = header_and_body(parse_codec("int8+zstd").encode(state))
    raw = parse_codec("int8").encode(state)
    _, raw_body = header_and_body(raw)
    stream = zstandard.ZstdCompressor(level=1).compressobj(size=64 << 20)
    bomb = b"".join(stream.compress(b"\0" * (1 << 20)) for _ in range(64)) + stream.flush()
    assert len(bomb) < 4096
    tracemalloc.start()
    try:
        assert reason(rebuild(header, bomb), shapes) == "oversized"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # refused on the frame header: 64 MiB were never allocated
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(raw_body)
    assert reason(rebuild(header, unsized), shapes) == "bad_codec"
    short = zstandard.ZstdCompressor().compress(raw_body[:-1])
    assert reason(rebuild(header, short), shapes) == "bad_codec"
    framed = zstandard.ZstdCompressor().compress(raw_body)
    assert reason(rebuild(header, framed + b"\0"), shapes) == "malformed"
    assert reason(rebuild(header, framed[:-3]), shapes) == "malformed"
    decode_payload(rebuild(header, framed), shapes=shapes, max_bytes=CAP)  # the honest frame


def expect_only_wire_errors(data: bytes, shapes: dict) -> None:
    try:
        codec, state = decode_payload(data, shapes=shapes, max_bytes=CAP)
    except WireError as exc:
        assert exc.reason in WIRE_REASONS
        return
    # A mutation the format cannot see (a value byte) still decodes to our shapes, finite.
    assert isinstance(codec, Codec)
    assert shapes_of(state) == shapes
    assert all(bool(torch.isfinite(t).all()) for t in state.values())


@given(st.binary(max_size=400))
@FAST
def test_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    shapes = shapes_of(adapter())
    expect_only_wire_errors(data, shapes)
    expect_only_wire_errors(MAGIC + data, shapes)


@pytest.mark.parametrize("spec", SPECS)
@given(st.data())
@FAST
def test_mutated_payloads_raise_only_wire_errors(spec: str, data: st.DataObject) -> None:
    state = adapter(seed=3, rows=16, cols=24)
    good = bytearray(parse_codec(spec).encode(state))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(good) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        if action == "flip":
            good[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del good[at : at + data.draw(st.integers(1, 64))]
        elif action == "insert":
            good[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            good[at] = data.draw(st.integers(0, 255))
        if not good:
            break
    expect_only_wire_errors(bytes(good), shapes_of(state))


def test_our_own_shapes_must_be_sane() -> None:
    data = parse_codec("int8").encode(adapter())
    for shapes in ({}, {"m.lora_A.weight": (0, 40)}):
        with pytest.raises(ValueError):
            decode_payload(data, shapes=shapes, max_bytes=CAP)
