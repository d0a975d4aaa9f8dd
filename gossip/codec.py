"""Adapters as safetensors bytes, with the header checked by our own code before safetensors.

Nothing is ever unpickled. `decode_adapter` refuses oversized data first, then parses the
8-byte header length and the JSON header itself with strict bounds (entry keys, dtypes, shapes,
offsets covering the body exactly), and only then lets `safetensors` build tensors, which must
all be finite. This is the format only: whether the tensors fit our adapter is for
`merge.validate` to say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import safetensors
import safetensors.torch
import torch

from gossip.errors import WireError

MAX_TENSORS = 4096
MAX_HEADER_BYTES = 4 * 1024 * 1024  # ~1 KiB per tensor at MAX_TENSORS: far above any real header
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_NAME_LEN = 512
ADAPTER_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}

_DTYPE_NAMES = {dtype: name for name, dtype in ADAPTER_DTYPES.items()}


def check_cap(name: str, value: int, cap: int) -> None:
    """Refuse a size above its cap as "oversized" (a cap that is not a positive int is our bug)."""
    if type(cap) is not int or cap < 1:
        raise ValueError(f"the cap on {name} must be a positive int, got {cap!r}")
    if value > cap:
        raise WireError("oversized", f"{name} {value} exceeds the cap of {cap}")


def encode_adapter(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise an adapter state to safetensors bytes.

    Deterministic: the same names, dtypes and values always give the same bytes, whatever the
    insertion order or device, so that digests of equal adapters compare equal.

    Raises:
        ValueError: the state is empty, or holds a non-tensor, a bad name or a non-float dtype.
    """
    if not state:
        raise ValueError("an adapter state needs at least one tensor")
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LEN:
            raise ValueError(f"tensor names are str of 1..{MAX_NAME_LEN} characters: {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: expected a tensor of {sorted(ADAPTER_DTYPES)}")
        # A private contiguous CPU copy: safetensors refuses tensors that share storage.
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    return bytes(safetensors.torch.save(tensors))


@dataclass(frozen=True)
class _Entry:
    """One tensor as the safetensors header describes it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that resolve a duplicate key differently are a classic smuggling route.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in the safetensors header")
    return out


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """Return the parsed JSON header and the offset at which the tensor bytes start."""
    if len(data) < 8:
        raise WireError("truncated", f"{len(data)} bytes, shorter than the safetensors prefix")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise WireError("truncated", f"header of {length} bytes in {len(data)} bytes of data")
    if length > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header of {length} bytes, at most {MAX_HEADER_BYTES}")
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise WireError("malformed", f"unreadable header: {type(exc).__name__}") from exc
    if not isinstance(header, dict):
        raise WireError("malformed", "the safetensors header is not a JSON object")
    return header, 8 + length


def _parse_entry(name: str, raw: object, body_len: int) -> _Entry:
    """Check one header entry against the format and the bytes actually present."""
    if not 1 <= len(name) <= MAX_NAME_LEN:
        raise WireError("bad_tensor", f"tensor name of {len(name)} characters")
    if not isinstance(raw, dict) or raw.keys() != {"dtype", "shape", "data_offsets"}:
        raise WireError("bad_tensor", f"{name!r}: entry is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ADAPTER_DTYPES:
        raise WireError("bad_tensor", f"{name!r}: unsupported dtype {str(dtype)[:16]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError("bad_tensor", f"{name!r}: shape is not a list of at most {MAX_NDIM} dims")
    if not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise WireError("bad_tensor", f"{name!r}: absurd shape")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)):
        raise WireError("bad_tensor", f"{name!r}: data_offsets is not two ints")
    begin, end = offsets
    if not 0 <= begin <= end <= body_len:
        raise WireError("bad_tensor", f"{name!r}: offsets {begin}..{end} outside 0..{body_len}")
    itemsize = ADAPTER_DTYPES[dtype].itemsize
    if math.prod(shape) * itemsize != end - begin:
        raise WireError("bad_tensor", f"{name!r}: shape {shape} does not fill {end - begin} bytes")
    return _Entry(name, ADAPTER_DTYPES[dtype], tuple(shape), begin, end)


def _check_header(data: bytes) -> None:
    """Parse and bound-check the whole header; the tensors must tile the body exactly."""
    header, body_start = _read_header(data)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):
        raise WireError("bad_tensor", "__metadata__ is not a map of strings")
    if not header:
        raise WireError("bad_tensor", "no tensors")
    if len(header) > MAX_TENSORS:
        raise WireError("oversized", f"{len(header)} tensors, at most {MAX_TENSORS}")
    body_len = len(data) - body_start
    entries = [_parse_entry(name, raw, body_len) for name, raw in header.items()]
    # No gaps and no overlaps: bytes outside every tensor could hide anything.
    cursor = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != cursor:
            raise WireError("bad_tensor", f"{entry.name!r}: overlaps or leaves a gap at {cursor}")
        cursor = entry.end
    if cursor != body_len:
        raise WireError("bad_tensor", f"{body_len - cursor} trailing bytes after the tensors")


def decode_adapter(data: bytes, *, max_bytes: int) -> dict[str, torch.Tensor]:
    """Decode untrusted safetensors bytes into tensors, checking the format and nothing else.

    1. Refuse anything above `max_bytes` before looking inside.
    2. Parse the header here, strictly: length, JSON, dtypes, shapes, offsets tiling the body.
    3. Only then let `safetensors` build the tensors, and require every value to be finite.

    Whether the tensors fit our adapter (names, shapes, dtypes, LoRA ranks) is
    `merge.validate.validate_update`'s question, asked before anything is merged.

    Args:
        data: the bytes received.
        max_bytes: the size cap.

    Returns:
        {name: CPU tensor}.

    Raises:
        WireError: with the reason of the rejection.
    """
    if not isinstance(data, bytes | bytearray):
        raise WireError("malformed", f"expected bytes, got {type(data).__name__}")
    check_cap("adapter size", len(data), max_bytes)
    raw = bytes(data)  # one copy for both parsers (a bytearray would be copied twice)
    _check_header(raw)
    # The format does not know our names and shapes, so the tensors of an adapter that
    # validation will refuse are built too: that costs what an honest adapter of the same size
    # costs, one copy of a body that `max_bytes` caps (tensors tile it exactly, MAX_TENSORS at
    # most), the bound a valid adapter already had.
    try:
        state = safetensors.torch.load(raw)
    except (safetensors.SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise WireError("bad_tensor", f"safetensors refused the bytes: {exc}") from exc
    for name in sorted(state):
        if not bool(torch.isfinite(state[name]).all()):
            raise WireError("non_finite", f"{name}: NaN or Inf values")
    return state
