"""`product`: the exact merge of the weight deltas, re-factorised to rank r by a cheap SVD."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from merge.lowrank import balanced_factors, project
from merge.tensors import as_work, finish, lora_pairs, weighted_sum, work_dtype
from merge.types import AdapterState, Contribution
from merge.weights import merge_weights

if TYPE_CHECKING:
    from merge.config import MergeConfig

logger = logging.getLogger(__name__)

def product(own: Contribution, others: Sequence[Contribution],
            config: MergeConfig) -> AdapterState:
    """Merge in weight space: the best rank-r factors of sum_i w_i B_i A_i, per LoRA pair.

    Math: with the weights w_i of `merge_weights`, each pair's merged delta is

        dW = sum_i w_i B_i A_i = B_cat diag(w) A_cat,
        B_cat = [B_1, ..., B_k]     (d_out x K, K = sum_i r_i),
        A_cat = [A_1; ...; A_k]     (K x d_in),

    factorised without ever forming the d_out x d_in matrix (`merge.lowrank`):
      1. K x K Gram matrices of the stacks, and from them a d_out x r orthonormal basis U of the
         top left singular subspace of dW (a Cholesky factor and a K x K eigendecomposition);
      2. SVD of the thin U^T dW = U2 S V^T, so U U2 S V^T is the best rank-r approximation;
      3. split S evenly: B = U U2 S^1/2, A = S^1/2 V^T, so B^T B = A A^T = S (balanced factors);
      4. BA = (BR)(R^T A) for every orthogonal R: pick the R closest to our own factors
         (orthogonal Procrustes), so identical balanced inputs come back unchanged and the
         optimizer moments the trainer keeps still refer to nearly the same coordinates;
      5. directions with a null singular value (e.g. every B still zero) get a zero column in B
         and keep our A's component in A, as LoRA's own init does, so they stay trainable.
    Pairs of one shape run as one batch. Cost per pair: O((d_out + d_in) K^2 + K^3), against
    O(d_out d_in K) for the dense product.

    Error: the result is the Eckart-Young optimum, ||dW - BA||_F = sqrt(sum_{j>r} s_j^2). It is 0
    when rank(dW) <= r (all A equal, a single contribution, or everyone within one r-dim
    subspace) and never larger than the error of `average`, whose B_bar A_bar is itself of rank r;
    what remains is the part of the peers' disagreement that no rank-r adapter can hold.
    Keys that are in no LoRA pair are averaged with the same weights.

    Heterogeneous ranks: neighbours of any rank merge into our rank (validate them with
    `allow_rank_change=True`). B A is merged as stored: peft scales it by alpha / r, so if a
    neighbour's scale differs from ours, pass it through `rescale_lora` first.

    Robustness: none, as for `average`; it tolerates 0 bad neighbours per merge.
    """
    weights = merge_weights(own, others, config)
    contributions = [own, *others]
    used = [(c.state, w) for c, w in zip(contributions, weights, strict=True) if w > 0.0]
    merged: dict[str, torch.Tensor] = {}
    residual_sq = total_sq = 0.0
    for group in _same_shapes(own.state, [state for state, _ in used]):
        pairs = merge_pairs(
            [[(state[b_key], state[a_key], w) for state, w in used] for a_key, b_key in group],
            [own.state[b_key] for _, b_key in group], [own.state[a_key] for a_key, _ in group])
        for (a_key, b_key), pair in zip(group, pairs, strict=True):
            merged[b_key], merged[a_key] = pair.b, pair.a
            residual_sq += pair.residual_sq
            total_sq += pair.total_sq
    for key, ref in own.state.items():
        if key not in merged:
            merged[key] = weighted_sum([c.state[key] for c in contributions], weights, ref)
    if total_sq > 0.0:
        logger.debug("product merge of %d adapters: relative rank-truncation error %.3g",
                     len(contributions), math.sqrt(residual_sq / total_sq))
    return finish(merged, own.state)


def _same_shapes(own: Mapping[str, torch.Tensor],
                 states: Sequence[Mapping[str, torch.Tensor]]) -> list[list[tuple[str, str]]]:
    """Our LoRA pairs as (A key, B key), grouped so that one group's stacks have one shape."""
    groups: dict[tuple[object, ...], list[tuple[str, str]]] = {}
    for a_key, b_key in lora_pairs(own).values():
        shapes = (own[b_key].shape, own[a_key].shape, own[b_key].dtype, own[a_key].dtype,
                  *((state[b_key].shape, state[a_key].shape) for state in states))
        groups.setdefault(shapes, []).append((a_key, b_key))
    return list(groups.values())


@dataclass(frozen=True)
class PairMerge:
    """One merged LoRA pair and the energy of its delta that the rank-r truncation dropped.

    Attributes:
        b: merged B, shaped like our B, in its working precision (see `merge.tensors`).
        a: merged A, shaped like our A, likewise.
        residual_sq: ||dW - BA||_F^2, the squared singular values beyond rank r.
        total_sq: ||dW||_F^2.
    """

    b: torch.Tensor
    a: torch.Tensor
    residual_sq: float
    total_sq: float


Terms = Sequence[tuple[torch.Tensor, torch.Tensor, float]]


def merge_pair(terms: Terms, own_b: torch.Tensor, own_a: torch.Tensor) -> PairMerge:
    """Best rank-r factors of sum_i w_i B_i A_i (r = own's rank), closest to own's factors.

    Args:
        terms: (B_i, A_i, w_i) with w_i > 0; ranks may differ, outer dimensions may not.
        own_b: our B (d_out x r, or d_out x r x 1 x 1), the gauge reference and output shape.
        own_a: our A (r x d_in, or r x in x kh x kw).

    Returns:
        The merged pair; steps as in `product`'s docstring.
    """
    return merge_pairs([terms], [own_b], [own_a])[0]


def merge_pairs(terms: Sequence[Terms], own_b: Sequence[torch.Tensor],
                own_a: Sequence[torch.Tensor]) -> list[PairMerge]:
    """`merge_pair` for many pairs at once, as one batch: every pair's terms must have the same
    shapes and weights as the first's, and so must our factors."""
    first_b, first_a = own_b[0], own_a[0]
    rank, d_out, count = first_a.shape[0], first_b.shape[0], len(terms)
    # 1. the stacks, and the weight of each of the K stacked rank directions.
    b_cat, a_cat, weights = _stacks(terms, d_out, work_dtype(first_b))
    # 2-5. balanced best rank-r factors in our gauge, batched.
    proj = project(b_cat, a_cat, weights, rank)
    ours_b = torch.stack([as_work(b, first_b).reshape(d_out, rank) for b in own_b])
    ours_a = torch.stack([as_work(a, first_a).reshape(rank, -1) for a in own_a])
    factors = balanced_factors(proj, ours_b, ours_a)
    residual = (proj.total_sq - factors.kept_sq).clamp(min=0.0).tolist()
    total = proj.total_sq.tolist()
    # Clones: a state's tensors must not share storage (safetensors refuses to save them).
    return [
        PairMerge(b=factors.b[j].reshape(own_b[j].shape).clone(),
                  a=factors.a[j].reshape(own_a[j].shape).clone(),
                  residual_sq=residual[j], total_sq=total[j])
        for j in range(count)
    ]


def _stacks(terms: Sequence[Terms], d_out: int,
            work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B_cat (n, d_out, K) and A_cat (n, K, d_in) in `work` precision, and the K weights.

    Each pair's slab is written by one cat (a cache-sized copy; one cat over all pairs scatters
    rows across the whole stack), and cat casts to the working dtype as it copies.
    """
    weights = torch.cat([torch.full((a.shape[0],), w, dtype=torch.float64)
                         for _, a, w in terms[0]])
    b_cat = torch.empty(len(terms), d_out, len(weights), dtype=work)
    a_cat = torch.empty(len(terms), len(weights), terms[0][0][1][0].numel(), dtype=work)
    with torch.no_grad():  # out= refuses inputs that require grad; these are plain copies
        for j, pair in enumerate(terms):
            torch.cat([_matrix(b, d_out) for b, _, _ in pair], dim=1, out=b_cat[j])
            torch.cat([_matrix(a, a.shape[0]) for _, a, _ in pair], out=a_cat[j])
    return b_cat, a_cat, weights


def _matrix(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` as a CPU matrix of `rows` rows: itself when it is one (the common case, and
    per-tensor calls add up over 9 x 96 factors), else a flattened CPU view or copy."""
    if tensor.dim() == 2 and tensor.device.type == "cpu":
        return tensor
    return tensor.detach().to("cpu").reshape(rows, -1)


def rescale_lora(state: Mapping[str, torch.Tensor], factor: float) -> AdapterState:
    """A copy of `state` with every LoRA B multiplied by `factor`, so that B A scales by it.

    Use it before `product` on a neighbour whose peft scale s' (alpha' / r', or alpha' / sqrt(r')
    with rsLoRA) differs from ours s, with factor = s' / s: its delta s' B' A' then equals
    s (factor B') A' in our scale.
    """
    b_keys = {b_key for _, b_key in lora_pairs(state).values()}
    return {
        key: (tensor * factor if key in b_keys else tensor.clone()).contiguous()
        for key, tensor in state.items()
    }
