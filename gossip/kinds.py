"""The codec kinds of `gossip.compress`: per 2-D tensor, its body size, packing and unpacking.

Per tensor x of shape (rows, cols), n = rows * cols, with y the decoded tensor and every array
little-endian:

- ``fp32``: y = x. Body: n float32.
- ``bf16``: y = bf16(x), rounded to nearest even, so |y - x| <= 2^-8 |x|. Body: n bf16 (the upper
  halves of the float32 bits).
- ``int8``: per row r, s_r = max_j |x_rj| / 127 (float32) and y_rj = round(x_rj / s_r) s_r, so
  |y - x| <= s_r / 2 (a zero row has s_r = 0 and decodes to zeros). Body: rows float32 s_r, then
  n int8, row-major.
- ``topk:F``: the k = max(1, floor(F n)) entries of largest |x|, at flat indices
  I_0 < ... < I_(k-1) < n; one s = max |x_I| / 127 for the tensor, y_I = round(x_I / s) s, and
  y = 0 elsewhere. Body: k uint32 gaps g (I_0 = g_0, I_i = I_(i-1) + g_i with g_i >= 1), then one
  float32 s, then k int8.
- ``ternary:F``: the same k entries and gaps as ``topk:F``, sent as signs at one scale
  s = mean |x_I| (ComPEFT's sparse ternary step): y_I = s where x_I >= 0, -s elsewhere, 0 off I.
  Body: k uint32 gaps, one float32 s, then the k sign bits packed as for ``sign`` below.
- ``sign``: per line l along the longer side (each row when rows <= cols, else each column),
  s_l = mean |x_l| (float32; the s that minimises |x_l - s sign(x_l)|) and y = s_l where x >= 0,
  -s_l elsewhere. Body: min(rows, cols) float32 s_l, then the n sign bits (1 = non-negative),
  row-major, packed 8 to a byte from the least significant bit, the last byte padded with 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gossip.errors import WireError

__all__ = ["KINDS", "SPARSE", "Kind", "topk_count"]


def topk_count(n: int, fraction: float) -> int:
    return max(1, min(n, math.floor(fraction * n)))


def _pack_fp32(x: torch.Tensor, _: float) -> bytes:
    return x.numpy().astype("<f4").tobytes()


def _unpack_fp32(buf: memoryview, rows: int, cols: int, _: float) -> np.ndarray:
    return np.frombuffer(buf, "<f4").astype(np.float32).reshape(rows, cols)


def _pack_bf16(x: torch.Tensor, _: float) -> bytes:
    return x.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()


def _unpack_bf16(buf: memoryview, rows: int, cols: int, _: float) -> np.ndarray:
    # A bf16 value is the upper half of the float32 with the same bits: shifting is exact.
    wide = np.frombuffer(buf, "<u2").astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32).reshape(rows, cols)


def _int8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(values / safe).clamp(-127, 127).to(torch.int8)


def _pack_int8(x: torch.Tensor, _: float) -> bytes:
    scale = x.abs().amax(dim=1) / 127
    q = _int8(x, scale[:, None])
    return scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()


def _scales(buf: memoryview, count: int) -> np.ndarray:
    scale = np.frombuffer(buf, "<f4", count=count).astype(np.float32)
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise WireError("bad_codec", "a scale is negative, NaN or Inf")
    return scale


def _unpack_int8(buf: memoryview, rows: int, cols: int, _: float) -> np.ndarray:
    scale = _scales(buf, rows)
    q = np.frombuffer(buf, np.int8, offset=4 * rows).reshape(rows, cols)
    with np.errstate(over="ignore"):  # a scale near the float32 maximum: refused as non_finite
        return q.astype(np.float32) * scale[:, None]


def _largest(x: torch.Tensor, fraction: float) -> tuple[torch.Tensor, bytes]:
    """The flat entries of largest |x| (at increasing indices) and their index gaps, packed."""
    flat = x.flatten()
    index = torch.topk(flat.abs(), topk_count(flat.numel(), fraction),
                       sorted=False).indices.sort().values
    # Gaps rather than indices: mostly small numbers, which zstd packs ~40 % tighter.
    return flat[index], np.diff(index.numpy(), prepend=0).astype("<u4").tobytes()


def _pack_topk(x: torch.Tensor, fraction: float) -> bytes:
    kept, gaps = _largest(x, fraction)
    scale = kept.abs().max() / 127
    q = _int8(kept, scale)
    return gaps + scale.reshape(1).numpy().astype("<f4").tobytes() + q.numpy().tobytes()


def _pack_ternary(x: torch.Tensor, fraction: float) -> bytes:
    kept, gaps = _largest(x, fraction)
    scale = kept.abs().mean()  # the s minimising ||x_I - s sign(x_I)||
    bits = np.packbits((kept >= 0).numpy(), bitorder="little")
    return gaps + scale.reshape(1).numpy().astype("<f4").tobytes() + bits.tobytes()


def _unpack_indices(buf: memoryview, n: int, k: int) -> np.ndarray:
    gaps = np.frombuffer(buf, "<u4", count=k).astype(np.int64)
    index = np.cumsum(gaps)  # k < 2^31 gaps below 2^32: no int64 overflow
    if index[-1] >= n or not (gaps[1:] > 0).all():
        raise WireError("bad_codec", "topk indices out of range or not strictly increasing")
    return index


def _unpack_topk(buf: memoryview, rows: int, cols: int, fraction: float) -> np.ndarray:
    n = rows * cols
    k = topk_count(n, fraction)
    index = _unpack_indices(buf, n, k)
    scale = _scales(buf[4 * k :], 1)
    q = np.frombuffer(buf, np.int8, offset=4 * k + 4)
    out = np.zeros(n, np.float32)
    with np.errstate(over="ignore"):
        out[index] = q.astype(np.float32) * scale[0]
    return out.reshape(rows, cols)


def _unpack_ternary(buf: memoryview, rows: int, cols: int, fraction: float) -> np.ndarray:
    n = rows * cols
    k = topk_count(n, fraction)
    index = _unpack_indices(buf, n, k)
    scale = _scales(buf[4 * k :], 1)
    bits = np.unpackbits(np.frombuffer(buf, np.uint8, offset=4 * k + 4), count=k,
                         bitorder="little")
    out = np.zeros(n, np.float32)
    out[index] = (bits.astype(np.float32) * 2 - 1) * scale[0]
    return out.reshape(rows, cols)


def _sign_size(rows: int, cols: int, _: float) -> int:
    return 4 * min(rows, cols) + (rows * cols + 7) // 8


def _pack_sign(x: torch.Tensor, _: float) -> bytes:
    # One scale per line along the long side (a LoRA B is tall, an A wide): the s minimising
    # ||x_line - s sign(x_line)||, its mean magnitude.
    scale = x.abs().mean(dim=1 if x.shape[0] <= x.shape[1] else 0)
    bits = np.packbits((x >= 0).numpy().reshape(-1), bitorder="little")
    return scale.numpy().astype("<f4").tobytes() + bits.tobytes()


def _unpack_sign(buf: memoryview, rows: int, cols: int, _: float) -> np.ndarray:
    lines = min(rows, cols)
    scale = _scales(buf, lines)
    bits = np.unpackbits(np.frombuffer(buf, np.uint8, offset=4 * lines), count=rows * cols,
                         bitorder="little").reshape(rows, cols)
    signs = bits.astype(np.float32) * 2 - 1
    with np.errstate(over="ignore"):
        return signs * (scale[:, None] if rows <= cols else scale[None, :])


@dataclass(frozen=True)
class Kind:
    """One codec kind: `size(rows, cols, fraction)` body bytes, `pack` and `unpack`."""

    size: Callable[[int, int, float], int]
    pack: Callable[[torch.Tensor, float], bytes]
    unpack: Callable[[memoryview, int, int, float], np.ndarray]
    exact: bool = False


KINDS: dict[str, Kind] = {
    "fp32": Kind(lambda r, c, f: 4 * r * c, _pack_fp32, _unpack_fp32, exact=True),
    "bf16": Kind(lambda r, c, f: 2 * r * c, _pack_bf16, _unpack_bf16),
    "int8": Kind(lambda r, c, f: 4 * r + r * c, _pack_int8, _unpack_int8),
    "topk": Kind(lambda r, c, f: 5 * topk_count(r * c, f) + 4, _pack_topk, _unpack_topk),
    "sign": Kind(_sign_size, _pack_sign, _unpack_sign),
    "ternary": Kind(lambda r, c, f: 4 * topk_count(r * c, f) + 4
                     + (topk_count(r * c, f) + 7) // 8, _pack_ternary, _unpack_ternary),
}
SPARSE = ("topk", "ternary")  # the kinds that take a fraction
