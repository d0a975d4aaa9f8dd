"""Wire codecs for adapter steps and keyframes: fp32, bf16, int8, topk, ternary, sign; +zstd or not.

A codec turns a dict of 2-D float32 tensors (a full estimate, or a step added to one) into bytes
and back. Decoding is deterministic: every peer that decodes the same bytes gets bit-identical
tensors, which is what lets the public estimates of `gossip.estimate` agree everywhere.

Spec strings (`parse_codec`): ``fp32``, ``bf16``, ``int8``, ``topk:FRACTION`` (0 < FRACTION <= 1),
``ternary:FRACTION``, ``sign``, each optionally followed by ``+zstd``.

The kinds and their bodies are in `gossip.kinds`.

A payload is ``MAGIC | u32 LE header length | msgpack header | body``. The header is
``{"codec": canonical spec, "tensors": [[name, rows, cols], ...]}`` in sorted name order; the
body is every tensor's bytes in that order, zstd-compressed as one frame (content size written)
under ``+zstd``. Every size follows from the codec and the shapes, so the decoder, given the
shapes it expects, knows the exact body length before it reads or decompresses a byte: a header
that disagrees, a zstd frame of another content size (a bomb) or a byte too many is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack
import numpy as np
import torch
import zstandard

from gossip.codec import MAX_NAME_LEN, MAX_TENSORS, check_cap
from gossip.errors import WireError
from gossip.kinds import KINDS, SPARSE

MAGIC = b"LSQ1"
MAX_HEADER_BYTES = 1 << 20
MAX_SPEC_LEN = 32
ZSTD_LEVEL = 3
Shapes = Mapping[str, tuple[int, int]]

_PREFIX = len(MAGIC) + 4
_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


# ---------------------------------------------------------------------------------------------
# Codecs and their spec strings.


@dataclass(frozen=True)
class Codec:
    """A codec kind, its topk fraction (1.0 for the other kinds) and whether zstd wraps the body.

    Build one with `parse_codec`; `spec` is its canonical spec string.
    """

    kind: str
    fraction: float = 1.0
    zstd: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown codec kind {self.kind!r}; one of {sorted(KINDS)}")
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"a topk fraction is in (0, 1], got {self.fraction!r}")
        if self.kind not in SPARSE and self.fraction != 1.0:
            raise ValueError(f"only {' and '.join(SPARSE)} take a fraction, not {self.kind}")

    @property
    def spec(self) -> str:
        """The canonical spec string, e.g. ``topk:0.05+zstd``."""
        base = f"{self.kind}:{self.fraction!r}" if self.kind in SPARSE else self.kind
        return base + ("+zstd" if self.zstd else "")

    @property
    def exact(self) -> bool:
        """Whether decode(encode(x)) == x bit for bit."""
        return KINDS[self.kind].exact

    def body_size(self, shapes: Shapes) -> int:
        """The exact uncompressed body length for tensors of these shapes."""
        return sum(KINDS[self.kind].size(r, c, self.fraction) for r, c in shapes.values())

    def encode(self, state: Mapping[str, torch.Tensor]) -> bytes:
        """Encode a dict of finite 2-D float32 tensors (see the module docstring for the layout).

        Raises:
            ValueError: an empty state, a bad name, or a tensor that is not finite 2-D float32.
        """
        tensors = _checked_state(state)
        kind = KINDS[self.kind]
        header = {"codec": self.spec,
                  "tensors": [[name, *t.shape] for name, t in tensors.items()]}
        body = b"".join(kind.pack(t, self.fraction) for t in tensors.values())
        if self.zstd:
            body = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                            write_checksum=False).compress(body)
        packed = msgpack.packb(header, use_bin_type=True)
        return MAGIC + len(packed).to_bytes(4, "little") + packed + body

    def decode(self, data: bytes, *, shapes: Shapes, max_bytes: int) -> dict[str, torch.Tensor]:
        """Decode a payload that must be of this codec; see `decode_payload`."""
        return decode_payload(data, shapes=shapes, max_bytes=max_bytes, expect=self)[1]


def parse_codec(spec: str) -> Codec:
    """Parse ``fp32``, ``bf16``, ``int8``, ``topk:F``, ``sign`` or ``ternary:F``, maybe ``+zstd``.

    Raises:
        ValueError: a one-line reason.
    """
    if not isinstance(spec, str) or not 1 <= len(spec) <= MAX_SPEC_LEN:
        raise ValueError(f"a codec spec is a str of 1..{MAX_SPEC_LEN} characters: {spec!r}")
    base, plus, extra = spec.partition("+")
    if plus and extra != "zstd":
        raise ValueError(f"{spec!r}: the only codec suffix is +zstd")
    kind, colon, arg = base.partition(":")
    if kind not in KINDS:
        raise ValueError(f"{spec!r}: unknown codec {kind!r}; one of {sorted(KINDS)}")
    if (kind in SPARSE) != bool(colon):
        raise ValueError(f"{spec!r}: topk and ternary take a fraction (topk:0.05); others none")
    try:
        fraction = float(arg) if colon else 1.0
    except ValueError:
        raise ValueError(f"{spec!r}: {arg!r} is not a number") from None
    return Codec(kind, fraction, bool(plus))


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """The shape map of a state of 2-D tensors, as the decoders expect it."""
    return {name: (int(t.shape[0]), int(t.shape[1])) for name, t in state.items()}


def _checked_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not state or len(state) > MAX_TENSORS:
        raise ValueError(f"a state holds 1..{MAX_TENSORS} tensors, got {len(state)}")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        t = state[name]
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LEN:
            raise ValueError(f"tensor names are str of 1..{MAX_NAME_LEN} characters: {name!r}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D float32 tensor")
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: empty, or NaN or Inf values")
        out[name] = t.detach().to("cpu").contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Decoding untrusted payloads.


def decode_payload(data: bytes, *, shapes: Shapes, max_bytes: int,
                   expect: Codec | None = None) -> tuple[Codec, dict[str, torch.Tensor]]:
    """Decode an untrusted payload of a registered codec (`expect`, if given) into float32.

    1. Refuse more than `max_bytes` before looking inside; check the magic and header length.
    2. Parse the msgpack header: a known codec, and exactly the names and shapes of `shapes`.
    3. The body must be exactly `codec.body_size(shapes)` bytes; under zstd, the frame must
       declare exactly that content size before it is decompressed (and hold nothing else).
    4. Unpack each tensor (scales finite and >= 0, topk indices strictly increasing and in
       range) and require every decoded value to be finite.

    Args:
        data: the bytes received.
        shapes: the tensors expected, {name: (rows, cols)}: our own adapter's, never the sender's.
        max_bytes: the size cap on `data`.
        expect: the only codec accepted; None accepts any.

    Returns:
        The payload's codec and {name: float32 CPU tensor}.

    Raises:
        WireError: with the reason of the rejection.
        ValueError: `shapes` is empty or holds a dimension below 1 (our bug, not the sender's).
    """
    if not shapes or any(r < 1 or c < 1 for r, c in shapes.values()):
        raise ValueError("the expected shapes are 1..MAX_TENSORS (rows, cols), each >= 1")
    if not isinstance(data, bytes | bytearray):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    check_cap("payload size", len(data), max_bytes)
    view = memoryview(bytes(data))
    codec, body_start = _read_header(view, shapes)
    if expect is not None and codec != expect:
        raise WireError("bad_codec", f"a payload of {codec.spec}, expected {expect.spec}")
    body = _read_body(view[body_start:], codec, codec.body_size(shapes))
    kind = KINDS[codec.kind]
    state: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(shapes):
        rows, cols = shapes[name]
        size = kind.size(rows, cols, codec.fraction)
        values = kind.unpack(body[offset : offset + size], rows, cols, codec.fraction)
        if not np.isfinite(values).all():
            raise WireError("non_finite", f"{name}: NaN or Inf values")
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32, order="C"))
        offset += size
    return codec, state


def payload_shapes(data: bytes, *, max_elements: int) -> dict[str, tuple[int, int]]:
    """The tensor names and shapes an untrusted payload's header declares, for a receiver that
    does not know them in advance (a neighbour whose rank may differ from ours).

    Args:
        max_elements: the most elements the declared tensors may hold in all: what bounds the
            buffer a later `decode_payload` against these shapes decompresses into.

    Raises:
        WireError: a malformed header, a bad name or shape, or too many elements.
    """
    if not isinstance(data, bytes | bytearray):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    header = _parse_header(memoryview(bytes(data)))[0]
    tensors = header["tensors"]
    if type(tensors) is not list or not 1 <= len(tensors) <= MAX_TENSORS:
        raise WireError("bad_codec", f"a payload of 1..{MAX_TENSORS} tensors expected")
    shapes: dict[str, tuple[int, int]] = {}
    for entry in tensors:
        if (type(entry) is not list or len(entry) != 3 or type(entry[0]) is not str
                or not 1 <= len(entry[0]) <= MAX_NAME_LEN
                or not all(type(d) is int and 1 <= d <= 2**31 for d in entry[1:])):
            raise WireError("bad_codec", "a tensor entry is [name, rows, cols]")
        shapes[entry[0]] = (entry[1], entry[2])
    if len(shapes) != len(tensors) or sum(r * c for r, c in shapes.values()) > max_elements:
        raise WireError("bad_codec", "repeated tensor names, or more elements than the cap")
    return shapes


def _parse_header(view: memoryview) -> tuple[dict[str, object], int]:
    """Check the prefix and parse the header map; return it and the body offset."""
    if len(view) < _PREFIX:
        raise WireError("truncated", f"{len(view)} bytes, shorter than the payload prefix")
    if view[: len(MAGIC)] != MAGIC:
        raise WireError("bad_magic", f"starts with {bytes(view[:len(MAGIC)])!r}, not {MAGIC!r}")
    length = int.from_bytes(view[len(MAGIC) : _PREFIX], "little")
    if length > len(view) - _PREFIX:
        raise WireError("truncated", f"header of {length} bytes in {len(view)} bytes of data")
    check_cap("payload header", length, MAX_HEADER_BYTES)
    try:
        header = msgpack.unpackb(view[_PREFIX : _PREFIX + length], raw=False, use_list=True,
                                 strict_map_key=True)
    except _MSGPACK_ERRORS as exc:
        raise WireError("malformed", f"undecodable msgpack: {type(exc).__name__}") from exc
    if not isinstance(header, dict) or header.keys() != {"codec", "tensors"}:
        raise WireError("malformed", "the payload header is not a {codec, tensors} map")
    return header, _PREFIX + length


def _read_header(view: memoryview, shapes: Shapes) -> tuple[Codec, int]:
    """Check the prefix and the header against `shapes`; return the codec and the body offset."""
    header, body_start = _parse_header(view)
    spec = header["codec"]
    if not isinstance(spec, str):
        raise WireError("bad_codec", "the codec spec is not a str")
    try:
        codec = parse_codec(spec)
    except ValueError as exc:
        raise WireError("bad_codec", str(exc)[:120]) from exc
    if codec.spec != spec:
        raise WireError("bad_codec", f"{spec!r} is not spelt canonically ({codec.spec!r})")
    expected = [[name, *shapes[name]] for name in sorted(shapes)]
    # Only our own shapes size anything below; the header must merely name the same tensors.
    if header["tensors"] != expected:
        raise WireError("bad_codec", "the payload's tensor names or shapes are not ours")
    return codec, body_start


def _read_body(body: memoryview, codec: Codec, size: int) -> memoryview:
    """The raw body of exactly `size` bytes, decompressing a zstd frame of exactly that size."""
    if not codec.zstd:
        if len(body) != size:
            raise WireError("truncated" if len(body) < size else "bad_codec",
                            f"a body of {len(body)} bytes, {size} expected")
        return body
    try:
        content = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise WireError("malformed", f"not a zstd frame: {exc}") from exc
    if content != size:  # -1 (unknown) included: never decompress into a guessed buffer
        raise WireError("oversized" if content > size else "bad_codec",
                        f"a zstd frame of {content} bytes, {size} expected")
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=size,
                                                      allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise WireError("malformed", f"undecodable zstd: {exc}") from exc
    if len(raw) != size:
        raise WireError("truncated", f"zstd gave {len(raw)} bytes, {size} expected")
    return memoryview(raw)
