"""Best rank-r factors of B A for a batch of thin factor pairs, from small Gram matrices.

`product` needs, per LoRA module, the best rank-r approximation of dW = B A, where B (d_out x K)
and A (K x d_in) stack every neighbour's factors (K = sum of their ranks, about 144 for 9 rank-16
adapters). Householder QR of the d x K stacks was 90 % of the rule's time; here everything of
size d runs as batched matrix products (BLAS-3) over all modules of one shape, and the only
factorisations are of K x K and r x d matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge.errors import MergeError

# Singular values below this fraction of the largest are rounding noise of a rank-deficient sum.
NULL_RTOL = 1e-6

# Diagonal load of the A Gram before its Cholesky factor, relative to its mean eigenvalue: the
# Gram of float32 factors is semi-definite only to about K float32 roundings, and a rank-deficient
# stack (identical neighbours, zero factors) is singular. The load only tilts the subspace search
# of step 2; the factors of step 3 are an exact projection of B A, whatever subspace it found.
GRAM_LOAD = {torch.float32: 1e-5, torch.float64: 1e-12}


@dataclass(frozen=True)
class Truncation:
    """Balanced best rank-r factors of a batch of products (all float64).

    Attributes:
        b: (n, d_out, r); columns that carry no singular value are zero.
        a: (n, r, d_in); rows that carry no singular value are zero.
        live: (n, r) bool, the directions whose singular value is above `NULL_RTOL` s_1.
        kept_sq: (n,) squared Frobenius norm of each b @ a.
        total_sq: (n,) squared Frobenius norm of each product.
    """

    b: torch.Tensor
    a: torch.Tensor
    live: torch.Tensor
    kept_sq: torch.Tensor
    total_sq: torch.Tensor


def truncate(b_cat: torch.Tensor, a_cat: torch.Tensor, weights: torch.Tensor,
             rank: int) -> Truncation:
    """Best rank-`rank` approximation b @ a of each dW = b_cat[j] diag(c) a_cat[j], balanced.

    Math, per batch entry, with D = diag(sqrt(c)), B = b_cat D and A = D a_cat (none of B, A
    and dW = B A is formed: D is folded into the small matrices):
      1. Grams G_B = B^T B and G_A = A A^T (K x K, batched BLAS-3);
      2. a basis U (d_out x r, orthonormal) of the top left singular subspace of dW, from the
         smaller of two symmetric eigenproblems: dW dW^T = B G_A B^T itself when d_out <= K;
         else, with G_A + eps I = L L^T, B L W where W holds the top r eigenvectors of the
         K x K matrix L^T G_B L (dW dW^T = (B L)(B L)^T up to the load eps);
      3. project: dW ~ U C with C = U^T dW (r x d_in), and the eigendecomposition of the small
         C C^T = U2 S^2 U2^T gives b = U U2 S^1/2 and a = S^-1/2 U2^T C (so b^T b = a a^T = S),
         dropping singular values below `NULL_RTOL` s_1.
    Step 3 is exact in float64 for whatever subspace step 2 found, so the working precision of
    the Grams, their squared condition number and the load eps cost only a second-order loss of
    captured energy, never a wrong delta; a rank-deficient dW (identical neighbours, zero B) is
    captured whole.

    Args:
        b_cat: (n, d_out, K) stacked B factors (a strided view will do), in a float working
            precision.
        a_cat: (n, K, d_in) stacked A factors, same dtype.
        weights: (K,) non-negative weights c of the stacked rank directions.
        rank: r, at least 1.

    Returns:
        The balanced factors (float64) and their energies.
    """
    work = b_cat.dtype
    root_c = weights.to(work).sqrt()
    outer = root_c[:, None] * root_c[None, :]
    g_a = (a_cat @ a_cat.mT) * outer
    g_b = (b_cat.mT @ b_cat) * outer
    basis = _top_left_subspace(b_cat, g_a, g_b, root_c, rank)
    # 3. C = ((U^T b_cat) c) a_cat: the products of size d in the working precision.
    left = (basis.to(work).mT @ b_cat) * weights.to(work)
    coeffs = (left @ a_cat).double()
    squares, u2 = torch.linalg.eigh(coeffs @ coeffs.mT)
    s = squares.flip(-1).clamp(min=0.0).sqrt()
    u2 = u2.flip(-1)
    live = s > NULL_RTOL * s[:, :1]
    root = torch.where(live, s, 0.0).sqrt()
    inverse_root = torch.where(live, 1.0 / torch.where(live, root, 1.0), 0.0)
    return Truncation(b=_pad((basis @ u2) * root[:, None, :], rank, dim=2),
                      a=_pad(inverse_root[:, :, None] * (u2.mT @ coeffs), rank, dim=1),
                      live=_pad(live, rank, dim=1),
                      kept_sq=torch.where(live, s, 0.0).square().sum(dim=1),
                      total_sq=(g_a * g_b).sum(dim=(1, 2), dtype=torch.float64))


def _top_left_subspace(b_cat: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor,
                       root_c: torch.Tensor, rank: int) -> torch.Tensor:
    """(n, d_out, min(rank, d_out, K)) orthonormal float64 bases of each dW's top left singular
    vectors (weighted Grams as in `truncate`)."""
    d_out, size = b_cat.shape[1], g_a.shape[-1]
    if d_out <= size:
        inner = root_c[:, None] * g_a * root_c[None, :]
        target = b_cat @ inner @ b_cat.mT  # dW dW^T, d_out x d_out
    else:
        chol = _loaded_cholesky(g_a, GRAM_LOAD.get(b_cat.dtype, GRAM_LOAD[torch.float32]))
        target = chol.mT @ g_b @ chol
    # eigh reads one triangle; ascending eigenvalues, so the top ones are the last columns.
    vectors = torch.linalg.eigh(target).eigenvectors[:, :, -rank:].flip(-1)
    if d_out > size:
        vectors = b_cat @ (root_c[:, None] * (chol @ vectors))
    q, _ = torch.linalg.qr(vectors.double())
    return q


def _pad(tensor: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`tensor` zero-padded along `dim` to `size` (itself when it is that long already)."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


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
