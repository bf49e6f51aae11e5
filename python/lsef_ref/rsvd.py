"""References for rsvd and lowrank."""

from __future__ import annotations

import torch
from torch import Tensor

from .philox import test_matrix


def sign_convention(U: Tensor, S: Tensor, V: Tensor):
    """Flips each pair (u_i, v_i) so the largest-magnitude entry of u_i is positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(U, -2, idx) < 0, -1.0, 1.0).to(U.dtype)
    return U * sign, S, V * sign


def truncated_svd(A: Tensor, k: int):
    """The exact rank-k truncated SVD (LAPACK), in the sign convention."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return sign_convention(U[..., :k], S[..., :k], Vh.mT[..., :k])


def _orth(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y).Q  # Householder: orthonormal even when Y is rank-deficient


def rsvd(
    A: Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0, exact: bool = False
):
    """Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), the exact
    truncated SVD when ``k + oversample >= min(m, n)`` or ``exact`` (what the CPU kernel returns
    where its cost model finds the full SVD cheaper than the sketch: ``lsef_ext.ops.rsvd_path``
    gives ``jacobi`` or ``exact``). A tall ``A`` is factored as ``A^T``, so the sketch is always
    taken along the long side."""
    m, n = A.shape[-2:]
    l = min(k + oversample, min(m, n))
    if exact or l == min(m, n):
        return truncated_svd(A, k)
    if m > n:
        V, S, U = rsvd(A.mT, k, oversample, n_iter, seed)
        return sign_convention(U, S, V)
    Q = _orth(A @ test_matrix(n, l, seed, A.dtype).to(A.device))
    for _ in range(n_iter):
        Q = _orth(A @ _orth(A.mT @ Q))
    Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    return sign_convention((Q @ Ub)[..., :k], S[..., :k], Vh.mT[..., :k])


def lowrank(
    A: Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0, exact: bool = False
) -> Tensor:
    """The rank-k approximation ``U diag(S) V^T`` from :func:`rsvd`."""
    U, S, V = rsvd(A, k, oversample, n_iter, seed, exact)
    return (U * S.unsqueeze(-2)) @ V.mT
