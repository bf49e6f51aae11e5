"""References for lowrank_sparse (SPEC §3.5): robust PCA and the unrolled alternation."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import soft_threshold
from .rsvd import lowrank as _lowrank
from .rsvd import rsvd as _rsvd

RPCA_MAX_ITER = 100
RPCA_TOL = 1e-7
UNROLLED_STEPS = 3


def pcp_lambda(X: Tensor) -> float:
    """Principal component pursuit's weight 1 / sqrt(max(m, n)) (Candes, Li, Ma & Wright 2011)."""
    return 1.0 / math.sqrt(max(X.shape[-2:]))


def universal_threshold(R: Tensor) -> Tensor:
    """sigma sqrt(2 log(m n)) per matrix (Donoho & Johnstone 1994): the unrolled method's
    default threshold, R being the first residual X - lowrank(X, k). sigma is estimated
    robustly, 1.4826 median|R| (the median absolute deviation), so the sparse entries being
    looked for do not inflate it."""
    sigma = 1.4826 * R.abs().flatten(-2).median(dim=-1).values[..., None, None]
    return sigma * math.sqrt(2.0 * math.log(max(2, R.shape[-2] * R.shape[-1])))


def rank_k_svt(M: Tensor, k: int, tau: Tensor, svd=_rsvd) -> Tensor:
    """Singular value thresholding restricted to the top k: U diag(max(s - tau, 0)) V^T."""
    U, s, V = svd(M, k)
    return (U * torch.clamp(s - tau, min=0).unsqueeze(-2)) @ V.mT


def rpca_ialm(X: Tensor, k: Optional[int], lam: Optional[float] = None,
              max_iter: int = RPCA_MAX_ITER, tol: float = RPCA_TOL, svd=_rsvd,
              shrink=soft_threshold):
    """Principal component pursuit by the inexact augmented Lagrange multiplier method
    (Lin, Chen & Ma 2010, Alg. 5): min ||L||_* + lam ||S||_1 s.t. X = L + S, for every matrix
    of the batch. With ``k`` the singular value thresholding keeps at most k values (the
    solution's rank is capped at k); with ``k=None`` it is the plain full-SVD solver.
    Returns (L, S, iterations)."""
    lam = pcp_lambda(X) if lam is None else lam
    # The spectral norm from the solver's own SVD (its top singular value): a full SVD only to
    # scale the start would cost more than a few iterations.
    # An all-zero matrix (a dropped clip) has L = S = 0; its zero norms are replaced by 1 so
    # that no 0/0 enters (Y stays 0, and it stops after one iteration).
    norm_two = svd(X, 1)[1][..., :1, None]
    norm_two = torch.where(norm_two > 0, norm_two, torch.ones_like(norm_two))
    norm_inf = X.abs().amax(dim=(-2, -1), keepdim=True) / lam
    Y = X / torch.maximum(norm_two, norm_inf)
    mu = 1.25 / norm_two
    mu_max = mu * 1e7
    rho = 1.5
    x_norm = torch.linalg.matrix_norm(X, keepdim=True)
    x_norm = torch.where(x_norm > 0, x_norm, torch.ones_like(x_norm))
    S = torch.zeros_like(X)
    L = torch.zeros_like(X)
    full_k = min(X.shape[-2:])
    for it in range(1, max_iter + 1):
        L = rank_k_svt(X - S + Y / mu, k or full_k, (1 / mu).squeeze(-1), svd)
        S = shrink(X - L + Y / mu, None, lam / mu)
        Z = X - L - S
        Y = Y + mu * Z
        mu = torch.minimum(mu * rho, mu_max)
        if (torch.linalg.matrix_norm(Z, keepdim=True) / x_norm).max() < tol:
            break
    return L, S, it


def solve(X: Tensor, k: int, lam, n_steps: Optional[int], method: str, svd, lowrank, shrink):
    """The algorithm behind lowrank_sparse, written once over the three ops it uses, so the
    extension runs exactly this with its kernels (lsef_ext.ops.lowrank_sparse)."""
    if method == "rpca":
        if n_steps is not None and n_steps < 1:
            raise ValueError(f"lowrank_sparse: n_steps must be >= 1, got {n_steps}")
        L, S, _ = rpca_ialm(X, k, lam, max_iter=n_steps or RPCA_MAX_ITER, svd=svd, shrink=shrink)
        return L, S
    if method == "unrolled":
        steps = UNROLLED_STEPS if n_steps is None else n_steps
        if steps < 1:
            raise ValueError(f"lowrank_sparse: n_steps must be >= 1, got {n_steps}")
        if lam is None:
            with torch.no_grad():
                lam = universal_threshold(X - lowrank(X, k))
        S = torch.zeros_like(X)
        for _ in range(steps):
            L = lowrank(X - S, k)
            S = shrink(X, L, lam)
        return L, S
    raise ValueError(f"lowrank_sparse: method must be 'rpca' or 'unrolled', got {method!r}")


def lowrank_sparse(X: Tensor, k: int, lam=None, n_steps: Optional[int] = None,
                   method: str = "rpca"):
    """Split every ``X (*, m, n)`` into a rank-k part and a sparse part (SPEC §3.5).

    ``method="rpca"``: :func:`rpca_ialm` with the rank capped at k, ``lam`` defaulting to
    :func:`pcp_lambda`, at most ``n_steps`` (default 100) iterations. ``method="unrolled"``:
    ``n_steps`` (default 3) alternations ``L = lowrank(X - S, k)``, ``S = soft_threshold(X, L,
    lam)`` from ``S = 0``, differentiable; ``lam`` defaults to :func:`universal_threshold` of
    the first residual.
    """
    return solve(X, k, lam, n_steps, method, _rsvd, _lowrank, soft_threshold)
