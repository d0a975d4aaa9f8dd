"""Best rank-r factors of B A for a batch of thin factor pairs, from small Gram matrices.

`product` needs, per LoRA module, the best rank-r approximation of dW = B A, where B (d_out x K)
and A (K x d_in) stack every neighbour's factors (K = sum of their ranks, 144 for 9 rank-16
adapters). Householder QR of the d x K stacks took most of the rule's time (68x a bare weighted
sum in `scripts/bench_merge.py`); here every product of size d is a batched BLAS-3 product over
all modules of one shape, and the only factorisations are of K x K, r x r and thin d x r
matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge.errors import MergeError

# Singular values below this fraction of the largest are rounding noise of a rank-deficient sum.
NULL_RTOL = 1e-6

# Diagonal load of the A Gram before its Cholesky factor, relative to its mean eigenvalue: the
# Gram of float32 factors is semi-definite only to about K float32 roundings, and a rank-deficient
# stack (identical neighbours, zero factors) is singular. The load only tilts the subspace search;
# `project` is exact for whatever subspace that finds.
GRAM_LOAD = {torch.float32: 1e-5, torch.float64: 1e-12}


@dataclass(frozen=True)
class Projection:
    """dW projected onto an r-dimensional subspace of its columns: U C = U U^T dW.

    Attributes:
        basis: U, (n, d_out, m) orthonormal columns, m = min(r, d_out, K).
        coeffs: C = U^T dW, (n, m, d_in).
        total_sq: (n,) ||dW||_F^2, float64.
    U and C are in the working precision of the stacks.
    """

    basis: torch.Tensor
    coeffs: torch.Tensor
    total_sq: torch.Tensor


def project(b_cat: torch.Tensor, a_cat: torch.Tensor, weights: torch.Tensor,
            rank: int) -> Projection:
    """Project each dW = b_cat[j] diag(c) a_cat[j] onto its top `rank` left singular vectors.

    Math, per batch entry, with D = diag(sqrt(c)), B = b_cat D and A = D a_cat (none of B, A
    and dW = B A is formed: D is folded into the small matrices):
      1. the Gram G_A = A A^T (K x K, batched BLAS-3, working precision);
      2. a basis of the top left singular subspace of dW, from the smaller of two symmetric
         eigenproblems: dW dW^T = B G_A B^T itself when d_out <= K; else, with
         G_A + eps I = L L^T and G_B = B^T B, the span of B L W, W the top r eigenvectors of the
         K x K matrix L^T G_B L (so that dW dW^T = (B L)(B L)^T up to the load eps);
      3. U = qr(basis) and C = U^T dW = ((U^T b_cat) c) a_cat.
    Step 3 projects exactly (to the working precision, as Householder QR of the stacks did),
    whatever subspace step 2 found: the Grams' squared condition number and the load cost only a
    second-order loss of captured energy, never a wrong delta, and a rank-deficient dW
    (identical neighbours, zero B) is kept whole.

    Args:
        b_cat: (n, d_out, K) stacked B factors (a strided view will do), in a float working
            precision.
        a_cat: (n, K, d_in) stacked A factors, same dtype.
        weights: (K,) non-negative weights c of the stacked rank directions.
        rank: r, at least 1.

    Returns:
        The projection; `balanced_factors` turns it into LoRA factors.
    """
    work = b_cat.dtype
    root_c = weights.to(work).sqrt()
    g_a = (a_cat @ a_cat.mT) * (root_c[:, None] * root_c[None, :])
    vectors, total_sq = _top_left_vectors(b_cat, g_a, root_c, rank)
    basis, _ = torch.linalg.qr(vectors)
    left = (basis.mT @ b_cat) * weights.to(work)
    return Projection(basis=basis, coeffs=left @ a_cat, total_sq=total_sq)


def _top_left_vectors(b_cat: torch.Tensor, g_a: torch.Tensor, root_c: torch.Tensor,
                      rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d_out, min(rank, d_out, K)) columns spanning each dW's top left singular vectors,
    and ||dW||_F^2 (float64), from the weighted G_A of `project`."""
    d_out, size = b_cat.shape[1], g_a.shape[-1]
    if d_out <= size:
        inner = root_c[:, None] * g_a * root_c[None, :]
        gram = b_cat @ inner @ b_cat.mT  # dW dW^T, d_out x d_out; G_B is not needed
        total_sq = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1, dtype=torch.float64)
        return _top_eigenvectors(gram, rank), total_sq
    g_b = (b_cat.mT @ b_cat) * (root_c[:, None] * root_c[None, :])
    chol = _loaded_cholesky(g_a, GRAM_LOAD.get(b_cat.dtype, GRAM_LOAD[torch.float32]))
    top = _top_eigenvectors(chol.mT @ g_b @ chol, rank)
    total_sq = (g_a * g_b).sum(dim=(1, 2), dtype=torch.float64)  # tr(G_A G_B) = ||dW||^2
    return b_cat @ (root_c[:, None] * (chol @ top)), total_sq


def _top_eigenvectors(symmetric: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of the `rank` largest eigenvalues, largest first (eigh reads one triangle)."""
    return torch.linalg.eigh(symmetric).eigenvectors[:, :, -rank:].flip(-1)


def _loaded_cholesky(gram: torch.Tensor, load: float) -> torch.Tensor:
    """Lower Cholesky factors of gram + eps I, eps = `load` x its mean eigenvalue (1 if zero)."""
    mean = gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    eps = torch.where(mean > 0.0, load * mean, torch.ones_like(mean))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + eps[:, None, None] * eye)
        failed = info > 0
        if not bool(failed.any()):
            return chol
        # Rounding left a Gram indefinite beyond the load: load that one ten times more.
        eps = torch.where(failed, 10.0 * eps, eps)
    raise MergeError("a Gram matrix of LoRA factors is not positive semi-definite (NaN input?)")


@dataclass(frozen=True)
class Factors:
    """Balanced rank-r LoRA factors b @ a of a projection, in our own factors' gauge.

    Attributes:
        b: (n, d_out, r), in the projection's working precision.
        a: (n, r, d_in), likewise.
        kept_sq: (n,) ||b @ a||_F^2, the sum of the kept squared singular values (float64).
    """

    b: torch.Tensor
    a: torch.Tensor
    kept_sq: torch.Tensor


def balanced_factors(proj: Projection, own_b: torch.Tensor, own_a: torch.Tensor) -> Factors:
    """b @ a = U C as balanced factors (b^T b = a a^T = S), rotated to be nearest ours.

    Math, per batch entry (every step on r x r matrices in float64, but the five thin products
    marked *, in the working precision save the first):
      1. C C^T* = U2 S^2 U2^T in float64, so U C = (U U2) S (S^-1 U2^T C) is an SVD; singular
         values below `NULL_RTOL` s_1 are dropped (their directions are rounding noise, which a
         float32 C C^T could not tell from a value 1e-4 s_1);
      2. balanced factors b = U U2 S^1/2 and a = S^-1/2 U2^T C;
      3. b a = (b R)(R^T a) for every orthogonal R: take the R that maximises
         tr(R^T (b^T own_b + a own_a^T)) (orthogonal Procrustes), the polar factor of that r x r
         matrix, which needs only U^T own_b* and C own_a^T*; then b R = U Z_b*, R^T a = Z_a C*;
      4. rows of R^T a outside the live directions leave b a unchanged: they get our own A's
         component there, so a direction whose B column is zero stays trainable.

    Args:
        proj: from `project`.
        own_b: (n, d_out, r) our B factors, in the projection's working precision.
        own_a: (n, r, d_in) our A factors, likewise.

    Returns:
        The factors, shaped like ours.
    """
    rank, work = own_a.shape[1], proj.coeffs.dtype
    coeffs = proj.coeffs.double()
    squares, u2 = torch.linalg.eigh(coeffs @ coeffs.mT)
    s = squares.flip(-1).clamp(min=0.0).sqrt()
    u2 = u2.flip(-1)
    live = s > NULL_RTOL * s[:, :1]
    root = torch.where(live, s, 0.0).sqrt()
    inverse_root = torch.where(live, 1.0 / torch.where(live, root, 1.0), 0.0)
    # The balanced pair (b, a) is (U P_b, P_a C), padded to r directions when m < r.
    p_b = _pad(u2 * root[:, None, :], rank)  # m x r
    p_a = _pad(u2 * inverse_root[:, None, :], rank).mT  # r x m
    cross = (p_b.mT @ (proj.basis.mT @ own_b).double()
             + p_a @ (proj.coeffs @ own_a.mT).double())
    u, _, vh = torch.linalg.svd(cross)
    rot = u @ vh
    b = proj.basis @ (p_b @ rot).to(work)
    a = (rot.mT @ p_a).to(work) @ proj.coeffs
    live_rows = _pad(live, rank)
    deficient = (~live_rows.all(dim=1)).nonzero().flatten()
    if len(deficient) > 0:
        kept = rot[deficient] * live_rows[deficient, :, None]
        null = torch.eye(rank, dtype=rot.dtype) - kept.mT @ kept
        a[deficient] += null.to(work) @ own_a[deficient]
    return Factors(b=b, a=a, kept_sq=torch.where(live, s, 0.0).square().sum(dim=1))


def _pad(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` zero-padded in its last dimension to `size` (itself when that long already)."""
    missing = size - tensor.shape[-1]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(*tensor.shape[:-1], missing)], dim=-1)
