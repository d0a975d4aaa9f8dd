"""Tensor plumbing shared by the rules: LoRA factor pairs, working precision, norms, output."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from merge.types import AdapterState

# peft names the factors of a module `<prefix>.lora_A.weight` / `<prefix>.lora_B.weight`
# (Linear and Conv) and `<prefix>.lora_embedding_A` / `<prefix>.lora_embedding_B` (Embedding).
# In both cases B (flattened to 2-D) times A (flattened to 2-D) is the module's weight delta.
_PAIR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_embedding_A", ".lora_embedding_B"),
)

# Norm bounds are relative to a norm (ours, or a reference of our neighbours'), floored at this
# RMS per entry: a state that is all zeros (or nearly) must still accept neighbours of a sensible
# size.
NORM_RMS_FLOOR = 1e-3


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Find the LoRA factor pairs of an adapter state.

    A pair is `<prefix>.lora_A.weight` (r x d_in, or r x in x kh x kw for a conv) with a
    `<prefix>.lora_B.weight` (d_out x r, or d_out x r x 1 x 1) whose inner dimensions agree
    (likewise `lora_embedding_A` / `lora_embedding_B`). Keys that are in no pair, such as a bias,
    a DoRA magnitude or `modules_to_save` weights, are merged coordinate-wise by every rule.

    Args:
        state: tensor name -> tensor.

    Returns:
        prefix -> (A key, B key), in the state's key order.
    """
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        for a_suffix, b_suffix in _PAIR_SUFFIXES:
            if not key.endswith(a_suffix):
                continue
            prefix = key[: -len(a_suffix)]
            b_key = prefix + b_suffix
            if b_key in state and is_factor_pair(state[key], state[b_key]):
                pairs[prefix] = (key, b_key)
    return pairs


def is_factor_pair(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `b @ a` (both flattened to 2-D) is defined: B's trailing size equals A's rank."""
    return a.dim() >= 2 and b.dim() >= 2 and a.shape[0] >= 1 and b[0].numel() == a.shape[0]


def work_dtype(like: torch.Tensor) -> torch.dtype:
    """The precision rules compute in: float64 for float64 states, float32 for everything else."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def as_work(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU in the working precision of `like` (a view when it already is)."""
    return tensor.detach().to(device="cpu", dtype=work_dtype(like))


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                 like: torch.Tensor) -> torch.Tensor:
    """A fresh tensor holding `sum_i weights[i] * tensors[i]`, in `like`'s working precision."""
    total = torch.zeros(like.shape, dtype=work_dtype(like))
    for tensor, weight in zip(tensors, weights, strict=True):
        if weight != 0.0:
            total.add_(as_work(tensor, like), alpha=weight)
    return total


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Frobenius norm of the whole state, as if all its tensors were one vector."""
    squares = sum(
        float(torch.linalg.vector_norm(t.detach().to(dtype=torch.float64))) ** 2
        for t in state.values()
    )
    return math.sqrt(squares)


def floored_norm(state: Mapping[str, torch.Tensor]) -> float:
    """`state_norm`, but at least `NORM_RMS_FLOOR` per entry (so never zero for a real state)."""
    return max(state_norm(state), norm_floor(state))


def norm_floor(state: Mapping[str, torch.Tensor]) -> float:
    """`NORM_RMS_FLOOR` per entry of `state`: the smallest scale a norm bound is relative to."""
    numel = sum(t.numel() for t in state.values())
    return NORM_RMS_FLOOR * math.sqrt(max(numel, 1))


def state_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Frobenius norm of `a - b` over all keys of `b` (shapes must agree)."""
    squares = 0.0
    for key, ref in b.items():
        diff = as_work(a[key], ref) - as_work(ref, ref)
        squares += float(torch.linalg.vector_norm(diff)) ** 2
    return math.sqrt(squares)


def padded_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Frobenius norm of `a - b` over all keys of `b`, where a LoRA factor of another rank counts
    as zero-padded to the larger rank.

    A rank-r adapter is a rank-r' adapter (r' > r) whose extra factor rows and columns are zero,
    so padding is the one reading under which `product`'s neighbours of another rank have a
    distance at all; tensors of equal shape are compared as `state_distance` does.
    """
    squares = 0.0
    for key, ref in b.items():
        first, second = as_work(a[key], ref), as_work(ref, ref)
        if first.shape != second.shape:
            first, second = _pad_to_match(first, second)
        squares += float(torch.linalg.vector_norm(first - second)) ** 2
    return math.sqrt(squares)


def _pad_to_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Callers checked that only the rank differs, so exactly one dimension does.
    dim = next(i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y)
    size = max(a.shape[dim], b.shape[dim])
    return _zero_pad(a, dim, size), _zero_pad(b, dim, size)


def _zero_pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def finish(values: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> AdapterState:
    """Cast freshly computed tensors back to own's dtypes and key order, contiguous, on the CPU.

    Callers pass tensors they allocated themselves, so the result never aliases an input.
    """
    return {
        key: values[key].to(device="cpu", dtype=ref.dtype).contiguous()
        for key, ref in own.items()
    }
