"""References for lowrank_sparse: robust PCA (exact and with noise), one matrix at a time,
and the unrolled alternation. Plain loops; lsef_ext.rpca is the batched production code."""

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


def _masked_universal(R: Tensor, W: Tensor) -> Tensor:
    """universal_threshold over the observed entries of each matrix (W its mask)."""
    flat, masks = R.reshape(-1, *R.shape[-2:]), W.reshape(-1, *R.shape[-2:])
    out = []
    for r, w in zip(flat, masks):
        count = max(2, int(w.sum()))
        out.append(1.4826 * r.abs()[w].median() * math.sqrt(2.0 * math.log(count)))
    return torch.stack(out).reshape(*R.shape[:-2], 1, 1)


def rank_k_svt(M: Tensor, k: int, tau: Tensor, svd=_rsvd) -> Tensor:
    """Singular value thresholding restricted to the top k: U diag(max(s - tau, 0)) V^T."""
    U, s, V = svd(M, k)
    return (U * torch.clamp(s - tau, min=0).unsqueeze(-2)) @ V.mT


def rpca_ialm(
    X: Tensor,
    k: Optional[int],
    lam: Optional[float] = None,
    max_iter: int = RPCA_MAX_ITER,
    tol: float = RPCA_TOL,
    svd=_rsvd,
    shrink=soft_threshold,
    mask: Optional[Tensor] = None,
):
    """Principal component pursuit by the inexact augmented Lagrange multiplier method
    (Lin, Chen & Ma 2010, Alg. 5): min ||L||_* + lam ||S||_1 s.t. X = L + S, for every matrix
    of the batch. With ``k`` the singular value thresholding keeps at most k values (the
    solution's rank is capped at k); with ``k=None`` it is the plain full-SVD solver.

    ``mask`` (bool, broadcastable to X, one matrix; False = unobserved): the constraint holds
    on the observed entries only, X = L + S + E with E free and nonzero only where
    unobserved; S is 0 there, and lam defaults to 1 / sqrt(p max(m, n)), p the observed
    fraction (Candes et al. 2011, Thm. 1.2). Returns (L, S, iterations)."""
    W = torch.ones_like(X, dtype=torch.bool) if mask is None else mask.expand(X.shape)
    X = torch.where(W, X, torch.zeros_like(X))
    p = W.double().mean().item()
    if lam is None:
        lam = pcp_lambda(X) if mask is None else pcp_lambda(X) / math.sqrt(p)
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
    E = torch.zeros_like(X)
    full_k = min(X.shape[-2:])
    for it in range(1, max_iter + 1):
        L = rank_k_svt(X - S - E + Y / mu, k or full_k, (1 / mu).squeeze(-1), svd)
        S = torch.where(W, shrink(X - L - E + Y / mu, None, lam / mu), torch.zeros_like(X))
        E = torch.where(W, torch.zeros_like(X), X - L - S + Y / mu)
        Z = X - L - S - E
        Y = Y + mu * Z
        mu = torch.minimum(mu * rho, mu_max)
        if (torch.linalg.matrix_norm(Z, keepdim=True) / x_norm).max() < tol:
            break
    return L, S, it


def stable_pcp(
    X: Tensor,
    k: int,
    sigma: float,
    lam: Optional[float] = None,
    max_iter: int = RPCA_MAX_ITER,
    tol: float = RPCA_TOL,
    mask: Optional[Tensor] = None,
):
    """Stable PCP (Zhou et al. 2010), penalised: min tau_L ||L||_* + tau_S ||S||_1 +
    ||X - L - S||_F^2 / 2, rank(L) <= k, for one matrix, by alternating exact minimisation.
    tau_L = sigma (sqrt(m) + sqrt(n)); tau_S = lam tau_L, lam by default making tau_S the
    universal threshold sigma sqrt(2 log(m n)). With ``mask`` the data term covers the
    observed entries (a fraction p) only: tau_L = sigma sqrt(p) (sqrt(m) + sqrt(n)), the
    universal threshold over p m n entries, and the L step fits X completed by the previous
    L. Returns (L, S, iterations)."""
    m, n = X.shape[-2:]
    W = torch.ones_like(X, dtype=torch.bool) if mask is None else mask.expand(X.shape)
    X = torch.where(W, X, torch.zeros_like(X))
    p = W.double().mean().item()
    tau_L = sigma * math.sqrt(p) * (math.sqrt(m) + math.sqrt(n))
    if lam is None:
        count = max(2.0, p * m * n)
        lam = math.sqrt(2.0 * math.log(count)) / (math.sqrt(p) * (math.sqrt(m) + math.sqrt(n)))
    tau_S = lam * tau_L
    x_norm = torch.linalg.matrix_norm(X).item() or 1.0
    S = torch.zeros_like(X)
    L = torch.zeros_like(X)
    for it in range(1, max_iter + 1):
        filled = torch.where(W, X - S, L)
        L_new = rank_k_svt(filled, k, torch.tensor([tau_L], dtype=X.dtype))
        S_new = torch.where(W, soft_threshold(X, L_new, tau_S), torch.zeros_like(X))
        step = torch.cat([(L_new - L).flatten(), (S_new - S).flatten()]).norm().item()
        L, S = L_new, S_new
        if not step / x_norm >= tol:  # converged, or not finite
            break
    return L, S, it


def mad_sigma(R: Tensor, mask: Optional[Tensor] = None) -> float:
    """1.4826 median |R|: a standard deviation estimate that a minority of outliers cannot move
    (over the observed entries only with ``mask``; the lower median, as torch.median)."""
    A = R.abs() if mask is None else R.abs()[mask.expand(R.shape)]
    return 1.4826 * A.median().item()


def _pow2(X: Tensor) -> float:
    """The power of two that brings max |X| into [1, 2) (1 for a zero or non-finite X)."""
    amax = X.abs().max().item()
    if not (amax > 0 and math.isfinite(amax)):
        return 1.0
    limit = math.frexp(torch.finfo(X.dtype).max)[1] - 2
    return math.ldexp(1.0, max(-limit, min(limit, 1 - math.frexp(amax)[1])))


def _one(X: Tensor, k: int, lam, n_steps: Optional[int], noise, W: Optional[Tensor] = None):
    """lowrank_sparse(method="rpca") of one matrix, solved for X scaled by a power of two (exact;
    the solvers are scale-equivariant) so that no norm under- or overflows; ``W`` its mask."""
    max_iter = n_steps or RPCA_MAX_ITER
    if W is not None:
        X = torch.where(W, X, torch.zeros_like(X))
    c = _pow2(X)
    X = X * c
    if noise is None or (not isinstance(noise, str) and noise == 0):
        L, S, _ = rpca_ialm(X, k, lam, max_iter=max_iter, mask=W)
    elif noise == "auto":  # the noise level from the exact solution's residual
        m, n = X.shape
        L, _, _ = rpca_ialm(X, k, max_iter=max_iter, mask=W)
        sigma = mad_sigma(X - L, W) * math.sqrt(m * n / max(1, (m - k) * (n - k)))
        L, S, _ = stable_pcp(X, k, sigma, lam, max_iter, mask=W)
    else:
        L, S, _ = stable_pcp(X, k, float(noise) * c, lam, max_iter, mask=W)
    return L / c, S / c


def lowrank_sparse(
    X: Tensor,
    k: int,
    lam=None,
    n_steps: Optional[int] = None,
    method: str = "rpca",
    noise=None,
    *,
    mask: Optional[Tensor] = None,
):
    """Split every ``X (*, m, n)`` into a rank-k part and a sparse part.

    ``method="rpca"``: each matrix on its own, :func:`rpca_ialm` with the rank capped at k
    (``noise=None`` or 0; ``lam`` defaulting to :func:`pcp_lambda`) or :func:`stable_pcp`
    (``noise`` a number or ``"auto"``: estimated from a first solution's residual), at most
    ``n_steps`` (default 100) iterations. ``lam`` is a number here. ``method="unrolled"``:
    ``n_steps`` (default 3) alternations ``L = lowrank(X - S, k)``, ``S = soft_threshold(X, L,
    lam)`` from ``S = 0`` over the whole batch, differentiable; ``lam`` defaults to
    :func:`universal_threshold` of the first residual.

    ``mask`` (bool, broadcastable to X; False = unobserved): X is read on the observed entries
    only, L completes the rest and S is 0 there (see :func:`rpca_ialm`, :func:`stable_pcp`;
    the unrolled steps fit X completed by the previous L).
    """
    if method not in ("rpca", "unrolled"):
        raise ValueError(f"lowrank_sparse: method must be 'rpca' or 'unrolled', got {method!r}")
    if n_steps is not None and n_steps < 1:
        raise ValueError(f"lowrank_sparse: n_steps must be >= 1, got {n_steps}")
    mn = min(X.shape[-2:])
    if not 1 <= k <= mn:
        raise ValueError(f"lowrank_sparse: k must be in [1, min(m, n)] = [1, {mn}], got {k}")
    W = None if mask is None else mask.expand(X.shape)
    if method == "unrolled":
        if W is not None:
            X = torch.where(W, X, torch.zeros_like(X))
        if lam is None:
            # no derivative in either mode (no_grad stops reverse mode only; detach both)
            R = X.detach() - _lowrank(X.detach(), k)
            lam = universal_threshold(R) if W is None else _masked_universal(R, W)
        S = torch.zeros_like(X)
        L = torch.zeros_like(X)
        for _ in range(UNROLLED_STEPS if n_steps is None else n_steps):
            L = _lowrank(X - S if W is None else torch.where(W, X - S, L), k)
            S = soft_threshold(X, L, lam)
            if W is not None:
                S = torch.where(W, S, torch.zeros_like(S))
        return L, S
    flat = X.reshape(-1, *X.shape[-2:])
    masks = [None] * len(flat) if W is None else list(W.reshape(-1, *X.shape[-2:]))
    parts = [_one(x, k, lam, n_steps, noise, w) for x, w in zip(flat, masks)]
    if not parts:
        return torch.zeros_like(X), torch.zeros_like(X)
    L = torch.stack([p[0] for p in parts]).reshape(X.shape)
    S = torch.stack([p[1] for p in parts]).reshape(X.shape)
    return L, S
