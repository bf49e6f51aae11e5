"""Pure-PyTorch reference implementations of the lsef ops: the executable specification.

Readable, float64-capable and differentiable by ordinary autograd; this package never imports
the extension. Tests compare every compiled kernel with these functions, and ``lsef bench`` uses
them as the baseline. Signatures match ``lsef_ext.ops``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


def soft_threshold(X: Tensor, L: Optional[Tensor], lam: Scalar, hard: bool = False) -> Tensor:
    """Sparse part of ``X`` given a low-rank part ``L``.

    ``R = X - L`` (or ``X`` when ``L`` is None); soft: ``sign(R) * max(|R| - lam, 0)``;
    hard: ``R * 1[|R| > lam]``. ``lam >= 0`` broadcasts against ``X``.
    """
    R = X if L is None else X - L
    if hard:
        return R * (R.abs() > lam)
    return torch.sign(R) * torch.clamp(R.abs() - lam, min=0)


def _per_matrix(c: Scalar, G: Tensor) -> Scalar:
    """A scalar, or per-matrix values of shape G.shape[:-2], made to broadcast against G."""
    if isinstance(c, Tensor) and c.numel() != 1:
        return c[..., None, None]
    return c


def rank_scale(G: Tensor, U: Tensor, alpha: Scalar, beta: Scalar) -> Tensor:
    """``beta * G + (alpha - beta) * U (U^T G)`` for ``G (*, m, n)``, ``U (*, m, r)``.

    With orthonormal columns in ``U``, the part of ``G`` inside span(U) is scaled by ``alpha``
    and the rest by ``beta``.
    """
    alpha, beta = _per_matrix(alpha, G), _per_matrix(beta, G)
    return beta * G + (alpha - beta) * (U @ (U.mT @ G))


def rank_aware_grad_scale(x: Tensor, U: Tensor, alpha: Scalar, beta: Scalar) -> Tensor:
    """Identity in the forward; ``rank_scale`` applied to the incoming gradient in the backward.

    Written with plain autograd: ``d`` is zero in value, so the output equals ``x``, while the
    gradient reaching ``x`` is the adjoint of ``rank_scale`` (itself: it is self-adjoint).
    """
    d = x - x.detach()
    return x.detach() + rank_scale(d, U, alpha, beta)


from .rsvd import lowrank, rsvd, truncated_svd  # noqa: E402  (they use soft_threshold above)
from .rpca import lowrank_sparse  # noqa: E402

__all__ = [
    "soft_threshold",
    "rank_scale",
    "rank_aware_grad_scale",
    "rsvd",
    "lowrank",
    "truncated_svd",
    "lowrank_sparse",
]
