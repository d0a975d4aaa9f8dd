"""`product`: the exact merge of the weight deltas, re-factorised to rank r by a cheap SVD."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from merge.tensors import as_work, finish, lora_pairs, weighted_sum
from merge.types import AdapterState, Contribution
from merge.weights import merge_weights

if TYPE_CHECKING:
    from merge.config import MergeConfig

logger = logging.getLogger(__name__)

# Singular values below this fraction of the largest are rounding noise of a rank-deficient sum.
NULL_RTOL = 1e-6


def product(own: Contribution, others: Sequence[Contribution],
            config: MergeConfig) -> AdapterState:
    """Merge in weight space: the best rank-r factors of sum_i w_i B_i A_i, per LoRA pair.

    Math: with the weights w_i of `merge_weights`, each pair's merged delta is

        dW = sum_i w_i B_i A_i = B_cat A_cat,
        B_cat = [sqrt(w_1) B_1, ..., sqrt(w_k) B_k]     (d_out x K, K = sum_i r_i),
        A_cat = [sqrt(w_1) A_1; ...; sqrt(w_k) A_k]     (K x d_in),

    factorised without ever forming the d_out x d_in matrix (see `merge_pair`):
      1. thin QR: B_cat = Q_B R_B and A_cat^T = Q_A R_A, so dW = Q_B (R_B R_A^T) Q_A^T;
      2. SVD of the small core R_B R_A^T = U S V^T (at most K x K, in float64), so
         dW = (Q_B U) S (Q_A V)^T is an SVD of dW;
      3. keep the r largest (r = our rank) and split them evenly: B = Q_B U_r S_r^1/2,
         A = S_r^1/2 V_r^T Q_A^T, so B^T B = A A^T = S_r (balanced factors);
      4. BA = (BR)(R^T A) for every orthogonal R: pick the R closest to our own factors
         (orthogonal Procrustes), so identical balanced inputs come back unchanged and the
         optimizer moments the trainer keeps still refer to nearly the same coordinates;
      5. directions with a null singular value (e.g. every B still zero) get a zero column in B
         and keep our A's component in A, as LoRA's own init does, so they stay trainable.
    Cost per pair: O((d_out + d_in) K^2 + K^3), against O(d_out d_in K) for the dense product.

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
    merged: dict[str, torch.Tensor] = {}
    residual_sq = total_sq = 0.0
    for a_key, b_key in lora_pairs(own.state).values():
        terms = [
            (c.state[b_key], c.state[a_key], w)
            for c, w in zip(contributions, weights, strict=True) if w > 0.0
        ]
        pair = merge_pair(terms, own.state[b_key], own.state[a_key])
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


@dataclass(frozen=True)
class PairMerge:
    """One merged LoRA pair and the energy of its delta that the rank-r truncation dropped.

    Attributes:
        b: merged B, shaped like our B (float64).
        a: merged A, shaped like our A (float64).
        residual_sq: ||dW - BA||_F^2, the squared singular values beyond rank r.
        total_sq: ||dW||_F^2.
    """

    b: torch.Tensor
    a: torch.Tensor
    residual_sq: float
    total_sq: float


def merge_pair(terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
               own_b: torch.Tensor, own_a: torch.Tensor) -> PairMerge:
    """Best rank-r factors of sum_i w_i B_i A_i (r = own's rank), closest to own's factors.

    Args:
        terms: (B_i, A_i, w_i) with w_i > 0; ranks may differ, outer dimensions may not.
        own_b: our B (d_out x r, or d_out x r x 1 x 1), the gauge reference and output shape.
        own_a: our A (r x d_in, or r x in x kh x kw).

    Returns:
        The merged pair; steps as in `product`'s docstring.
    """
    rank = own_a.shape[0]
    # 1. sqrt(w)-scaled stacks and their thin QR factorisations.
    b_cat = torch.cat([math.sqrt(w) * as_work(b, own_b).reshape(b.shape[0], -1)
                       for b, _, w in terms], dim=1)
    a_cat = torch.cat([math.sqrt(w) * as_work(a, own_a).reshape(a.shape[0], -1)
                       for _, a, w in terms], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    # 2. SVD of the small core.
    u, s, vh = torch.linalg.svd(r_b.double() @ r_a.double().T, full_matrices=False)
    # 3. truncate to rank r, leaving numerically null directions at zero, and split S evenly.
    live = int((s > s[0] * NULL_RTOL).sum()) if float(s[0]) > 0.0 else 0
    keep = min(rank, live)
    root = s[:keep].sqrt()
    x = torch.zeros(b_cat.shape[0], rank, dtype=torch.float64)
    y = torch.zeros(rank, a_cat.shape[1], dtype=torch.float64)
    x[:, :keep] = (q_b.double() @ u[:, :keep]) * root
    y[:keep] = root[:, None] * (vh[:keep] @ q_a.double().T)
    # 4-5. gauge towards our own factors, and refill null directions of A from ours.
    b_new, a_new = _align(x, y, keep, own_b.reshape(own_b.shape[0], -1).double(),
                          own_a.reshape(rank, -1).double())
    squares = s.square()
    return PairMerge(b=b_new.reshape(own_b.shape), a=a_new.reshape(own_a.shape),
                     residual_sq=float(squares[keep:].sum()), total_sq=float(squares.sum()))


def _align(x: torch.Tensor, y: torch.Tensor, keep: int, own_b: torch.Tensor,
           own_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the balanced factors (x, y) towards (own_b, own_a) without changing x @ y."""
    # Procrustes: argmax over orthogonal R of tr(R^T C) is the polar factor of C.
    u, _, vh = torch.linalg.svd(x.T @ own_b + y @ own_a.T)
    rot = u @ vh
    b_new, a_new = x @ rot, rot.T @ y
    if keep < rot.shape[0]:
        # B's columns live in the row space of rot[:keep]; any A component outside it leaves
        # B @ A unchanged, so give those rows our own A's component there.
        live = rot[:keep]
        null = torch.eye(rot.shape[0], dtype=rot.dtype) - live.T @ live
        a_new = a_new + null @ own_a
    return b_new, a_new


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
