"""Validation of a neighbour's adapter against our own, before any rule may see it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from merge.errors import RejectedUpdate
from merge.tensors import floored_norm, is_factor_pair, lora_pairs, padded_distance, state_norm

if TYPE_CHECKING:
    from merge.config import MergeConfig

# `product` may merge a neighbour of a larger rank, but its QR and SVD cost grows with the sum
# of the ranks (cubically in the core): one neighbour of rank 100 x ours would make our merge
# 100x to 10^6x slower. 4 x covers the ranks a swarm mixes (8 with 32, say).
MAX_RANK_FACTOR = 4


def validate_update(own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                    config: MergeConfig, *, allow_rank_change: bool = False,
                    reference: float | None = None) -> float:
    """Check that `other` may be merged into `own`; a rejected update is never merged.

    Checks, in order: identical key sets; identical shapes (LoRA factors may differ in rank,
    up to `MAX_RANK_FACTOR` x ours, only when `allow_rank_change`); identical floating-point
    dtypes; the Frobenius norm of `other` and its distance from `own` both at most
    `max_norm_ratio` x scale. Finiteness is the wire format's check (`decode_adapter` refuses
    NaN and Inf); a non-finite value that reaches this function anyway fails the norm bound.

    The scale is `reference`, normally `NormReference.scale(own)`: the lower median of the norms
    accepted lately, which a liar cannot inflate. Without it, our own norm floored at an RMS of
    `NORM_RMS_FLOOR` per entry: that bound grows with every update it lets in, so a liar just
    under it each round compounds our norm. Why both checks: the norm keeps every adapter we
    merge inside one ball of radius `max_norm_ratio` x scale, and a weighted average of points
    in a ball stays in it, so no number of rounds at the edge carries us out; the distance
    bounds the step any one neighbour makes us take, even one whose norm is ordinary.

    Args:
        own: our adapter state.
        other: the neighbour's adapter state.
        config: supplies `max_norm_ratio`.
        allow_rank_change: accept LoRA pairs of another rank (only `product` can merge them).
        reference: the scale to bound by (> 0); None for our own floored norm.

    Returns:
        The Frobenius norm of `other`, for `NormReference.update` once it is accepted.

    Raises:
        RejectedUpdate: with reason "keys_mismatch", "shape_mismatch", "rank_mismatch",
            "dtype_mismatch" or "norm_bound".
        ValueError: `reference` is not a positive finite number (a bug of the caller's).
    """
    check_structure(own, other, allow_rank_change=allow_rank_change)
    scale = floored_norm(own) if reference is None else reference
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"reference must be a positive finite scale, got {reference}")
    bound = config.max_norm_ratio * scale
    label = f"{config.max_norm_ratio:g} x {'own norm' if reference is None else 'reference'}"
    norm = state_norm(other)
    _check_bound("norm", norm, bound, label)
    _check_bound("distance", padded_distance(other, own), bound, label)
    return norm


def _check_bound(name: str, value: float, bound: float, bound_name: str) -> None:
    # An overflowing norm is inf, and a NaN anywhere makes it NaN: both fail the bound.
    if not (math.isfinite(value) and value <= bound):
        raise RejectedUpdate("norm_bound",
                             f"{name} {value:.4g} exceeds {bound_name} = {bound:.4g}")


def check_structure(own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *,
                    allow_rank_change: bool = False) -> None:
    """The cheap half of `validate_update`: keys, shapes and dtypes, not values.

    With `allow_rank_change`, a LoRA pair may have any rank from 1 to `MAX_RANK_FACTOR` x ours.

    Raises:
        RejectedUpdate: with reason "keys_mismatch", "shape_mismatch", "rank_mismatch" or
            "dtype_mismatch".
    """
    if own.keys() != other.keys():
        missing, extra = sorted(own.keys() - other.keys()), sorted(other.keys() - own.keys())
        raise RejectedUpdate(
            "keys_mismatch", f"{len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(extra)} unexpected (e.g. {extra[:1]})"
        )
    paired: set[str] = set()
    for a_key, b_key in lora_pairs(own).values():
        _check_pair(own, other, a_key, b_key, allow_rank_change)
        paired.update((a_key, b_key))
    for key, ref in own.items():
        if key not in paired and other[key].shape != ref.shape:
            raise RejectedUpdate(
                "shape_mismatch", f"{key}: {tuple(other[key].shape)} != {tuple(ref.shape)}"
            )
        if other[key].dtype != ref.dtype:
            raise RejectedUpdate("dtype_mismatch", f"{key}: {other[key].dtype} != {ref.dtype}")
        if not other[key].is_floating_point():
            raise RejectedUpdate("dtype_mismatch", f"{key}: {ref.dtype} is not floating point")


def _check_pair(own: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                a_key: str, b_key: str, allow_rank_change: bool) -> None:
    own_a, own_b, a, b = own[a_key], own[b_key], other[a_key], other[b_key]
    if a.shape == own_a.shape and b.shape == own_b.shape:
        return
    # A rank change keeps every dimension but the rank: A's trailing ones and B's leading one.
    same_outer = (
        a.dim() == own_a.dim() and b.dim() == own_b.dim()
        and a.shape[1:] == own_a.shape[1:] and b.shape[0] == own_b.shape[0]
        and b.shape[2:] == own_b.shape[2:] and is_factor_pair(a, b)
    )
    if not same_outer:
        raise RejectedUpdate(
            "shape_mismatch", f"{a_key}/{b_key}: {tuple(a.shape)}/{tuple(b.shape)} "
            f"!= {tuple(own_a.shape)}/{tuple(own_b.shape)}"
        )
    if not allow_rank_change:
        raise RejectedUpdate(
            "rank_mismatch", f"{a_key}: rank {a.shape[0]} != {own_a.shape[0]} "
            "(only the product rule merges adapters of another rank)"
        )
    if a.shape[0] > MAX_RANK_FACTOR * own_a.shape[0]:
        raise RejectedUpdate(
            "rank_mismatch", f"{a_key}: rank {a.shape[0]} exceeds {MAX_RANK_FACTOR} x our "
            f"rank {own_a.shape[0]}"
        )
