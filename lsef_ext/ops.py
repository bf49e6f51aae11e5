"""The public functional API of lsef_ext, and the Python half of every op's registration.

Each op has: a documented function calling ``torch.ops.lsef.<op>.default``; a fake kernel
(``register_fake``: shapes, dtypes and devices only) so ``torch.compile`` can trace it; and an
autograd formula (``register_autograd``) whose backward calls compiled ops too.
"""

from __future__ import annotations

import numbers
import sys
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import rpca as _rpca

Scalar = Union[float, Tensor]

__all__ = [
    "soft_threshold",
    "rank_scale",
    "rank_aware_grad_scale",
    "rsvd",
    "lowrank",
    "lowrank_sparse",
    "get_ops",
]


# --------------------------------------------------------------------------------------------
# argument checks shared by the Python layers (nn, optim and data use them too)
# --------------------------------------------------------------------------------------------


def _check_tensor(where: str, name: str, value) -> None:
    """A TypeError naming ``name`` unless ``value`` is a tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a tensor, got {type(value).__name__}")


def _check_int(where: str, name: str, value, minimum: Optional[int] = None) -> None:
    """A TypeError unless ``value`` is an integer (``bool`` is not one here), then a ValueError
    if it is below ``minimum``. A symbolic integer (``torch.SymInt``, under tracing) passes: the
    kernels' own checks see its value."""
    if type(value) is not int:  # the common case first: these checks run on every call
        if isinstance(value, torch.SymInt):
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"{where}: {name} must be an integer, got {type(value).__name__} {value!r}"
            )
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")


def _check_number(where: str, name: str, value) -> None:
    """A TypeError unless ``value`` is a real number (``bool`` is not one here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}")


def _as_tensor(value: Scalar, like: Tensor, op: str, name: str) -> Tensor:
    """Python numbers become 0-d tensors of ``like``'s dtype and device; tensors pass through
    unchanged (the op checks their dtype and device); anything else is a TypeError naming the
    argument."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {type(value).__name__}")
    # Rounded to the dtype on the host (an overflow becomes inf, as torch.tensor does), then
    # copied without a stream synchronisation: a blocking copy to a GPU would first wait for
    # every kernel queued before it, once per call and per number.
    t = torch.tensor(value, dtype=like.dtype)
    return t if like.device.type == "cpu" else t.to(like.device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# soft_threshold
# --------------------------------------------------------------------------------------------


def soft_threshold(X: Tensor, L: Optional[Tensor], lam: Scalar, hard: bool = False) -> Tensor:
    """The sparse part of ``X`` given a low-rank part ``L``, in one fused pass.

    ``R = X - L`` (``X`` itself when ``L`` is None; ``R`` is never materialised), then
    soft: ``sign(R) * max(|R| - lam, 0)``, or hard: ``R * 1[|R| > lam]``.

    Args:
        X: ``(*)`` floating tensor (float32/float64 on the CPU).
        L: ``None`` or a tensor of ``X``'s shape, dtype and device.
        lam: non-negative threshold: a number, a 0-d tensor, one value per channel (shape
            ``(D,)`` for ``X (..., D)``) or ``X``'s shape; any other shape broadcastable to
            ``X`` works too (it is expanded first). A tensor ``lam`` gets a gradient.
        hard: hard instead of soft thresholding (``lam`` then gets a zero gradient).

    Returns:
        ``S``, contiguous, of ``X``'s shape and dtype. NaN in ``X`` or ``L`` gives NaN in the
        matching outputs, and so does NaN in ``lam`` when soft; when hard, an entry whose
        ``lam`` is NaN is 0 (the test ``|R| > lam`` is false). Nothing else is affected.
    """
    op = "soft_threshold"
    _check_tensor(op, "X", X)
    if L is not None and not isinstance(L, Tensor):
        raise TypeError(f"{op}: L must be a tensor or None, got {type(L).__name__}")
    if not isinstance(hard, bool):
        raise TypeError(f"{op}: hard must be a bool, got {type(hard).__name__} {hard!r}")
    return torch.ops.lsef.soft_threshold.default(X, L, _as_tensor(lam, X, op, "lam"), hard)


def _broadcastable(shape: Sequence[int], target: Sequence[int]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _check_soft_threshold(op: str, X: Tensor, L: Optional[Tensor], lam: Tensor) -> None:
    """The kernels' checks, messages and exception types (shapes: ValueError; dtypes and
    devices: RuntimeError), for the fake kernels."""
    torch._check(
        X.dtype.is_floating_point, lambda: f"{op}: X must be a floating-point tensor, got {X.dtype}"
    )
    if L is not None:
        torch._check_value(
            L.shape == X.shape,
            lambda: f"{op}: L must have the shape of X {list(X.shape)}, got {list(L.shape)}",
        )
        torch._check(
            L.dtype == X.dtype,
            lambda: f"{op}: L must have the dtype of X ({X.dtype}), got {L.dtype}",
        )
        torch._check(
            L.device == X.device,
            lambda: f"{op}: L must be on the device of X ({X.device}), got {L.device}",
        )
    torch._check(
        lam.dtype == X.dtype,
        lambda: f"{op}: lam must have the dtype of X ({X.dtype}), got {lam.dtype}",
    )
    torch._check(
        lam.device == X.device,
        lambda: f"{op}: lam must be on the device of X ({X.device}), got {lam.device}",
    )
    torch._check_value(
        _broadcastable(lam.shape, X.shape),
        lambda: (
            f"{op}: lam of shape {list(lam.shape)} is not broadcastable to X of shape "
            f"{list(X.shape)}"
        ),
    )


@torch.library.register_fake("lsef::soft_threshold")
def _soft_threshold_fake(X, L, lam, hard=False):
    _check_soft_threshold("soft_threshold", X, L, lam)
    return X.new_empty(X.shape)


@torch.library.register_fake("lsef::soft_threshold_backward")
def _soft_threshold_backward_fake(grad, X, L, lam, hard, output_mask):
    _check_soft_threshold("soft_threshold_backward", X, L, lam)
    dX = X.new_empty(X.shape) if output_mask[0] else None
    dL = X.new_empty(X.shape) if output_mask[1] and L is not None else None
    dlam = lam.new_empty(lam.shape) if output_mask[2] else None
    return dX, dL, dlam


def _soft_threshold_setup_context(ctx, inputs, output):
    X, L, lam, hard = inputs
    ctx.hard = hard
    ctx.save_for_backward(X, L, lam)


def _soft_threshold_backward(ctx, grad):
    X, L, lam = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    dX, dL, dlam = torch.ops.lsef.soft_threshold_backward.default(grad, X, L, lam, ctx.hard, mask)
    return dX, dL, dlam, None


torch.library.register_autograd(
    "lsef::soft_threshold", _soft_threshold_backward, setup_context=_soft_threshold_setup_context
)


# --------------------------------------------------------------------------------------------
# rank_scale and rank_aware_grad_scale
# --------------------------------------------------------------------------------------------


def rank_scale(G: Tensor, U: Tensor, alpha: Scalar, beta: Scalar) -> Tensor:
    """``beta * G + (alpha - beta) * U (U^T G)``, one fused pass per matrix.

    With orthonormal columns in ``U``, the component of ``G`` inside span(U) is scaled by
    ``alpha`` and the rest by ``beta``. The map is linear and self-adjoint in ``G``.

    Args:
        G: ``(*, m, n)`` floating tensor.
        U: ``(*, m, r)`` with ``r <= m`` (orthonormal columns are assumed, not checked), or
            ``(m, r)`` shared by every matrix.
        alpha, beta: numbers, 0-d tensors, or tensors of shape ``*`` (one value per matrix).

    Returns:
        ``G'`` of ``G``'s shape, contiguous. Gradients flow to ``G``, ``U``, ``alpha`` and
        ``beta``.
    """
    op = "rank_scale"
    _check_tensor(op, "G", G)
    _check_tensor(op, "U", U)
    return torch.ops.lsef.rank_scale.default(
        G, U, _as_tensor(alpha, G, op, "alpha"), _as_tensor(beta, G, op, "beta")
    )


def _check_rank_scale(
    G: Tensor, U: Tensor, alpha: Tensor, beta: Tensor, op: str = "rank_scale", g: str = "G"
) -> None:
    """The kernels' argument checks, with their messages and exception types (shapes:
    ValueError; dtypes and devices: RuntimeError), for the fake kernel and for
    rank_aware_grad_scale (``op``, with ``g`` naming its first argument). Plain Python, so that
    torch.compile traces them."""
    batch = list(G.shape[:-2])
    if not G.dtype.is_floating_point:
        raise RuntimeError(f"{op}: {g} must be a floating-point tensor, got {G.dtype}")
    if G.dim() < 2:
        raise ValueError(
            f"{op}: {g} must have at least 2 dimensions (*, m, n), got shape {list(G.shape)}"
        )
    if U.dim() < 2:
        raise ValueError(
            f"{op}: U must have at least 2 dimensions (*, m, r), got shape {list(U.shape)}"
        )
    if U.dtype != G.dtype:
        raise RuntimeError(f"{op}: U must have the dtype of {g} ({G.dtype}), got {U.dtype}")
    if U.device != G.device:
        raise RuntimeError(f"{op}: U must be on the device of {g} ({G.device}), got {U.device}")
    if U.shape[-2] != G.shape[-2]:
        raise ValueError(
            f"{op}: U must have {g}.size(-2) = {G.shape[-2]} rows (U is (*, m, r)), "
            f"got shape {list(U.shape)}"
        )
    if U.shape[-1] > U.shape[-2]:
        raise ValueError(
            f"{op}: U has {U.shape[-1]} columns but only {U.shape[-2]} rows; "
            "orthonormal columns need r <= m"
        )
    if U.dim() != 2 and list(U.shape[:-2]) != batch:
        raise ValueError(
            f"{op}: U must have {g}'s batch shape {batch} or be 2-D (one U for all), "
            f"got shape {list(U.shape)}"
        )
    for name, c in (("alpha", alpha), ("beta", beta)):
        if c.dtype != G.dtype:
            raise RuntimeError(
                f"{op}: {name} must have the dtype of {g} ({G.dtype}), got {c.dtype}"
            )
        if c.device != G.device:
            raise RuntimeError(
                f"{op}: {name} must be on the device of {g} ({G.device}), got {c.device}"
            )
        if c.numel() != 1 and list(c.shape) != batch:
            raise ValueError(
                f"{op}: {name} must be a scalar or have {g}'s batch shape {batch}, "
                f"got shape {list(c.shape)}"
            )


@torch.library.register_fake("lsef::rank_scale")
def _rank_scale_fake(G, U, alpha, beta):
    _check_rank_scale(G, U, alpha, beta)
    return G.new_empty(G.shape)


def _rank_scale_setup_context(ctx, inputs, output):
    G, U, alpha, beta = inputs
    # G itself is only needed for the gradients of U, alpha and beta.
    needs_G = any(ctx.needs_input_grad[1:])
    ctx.save_for_backward(G if needs_G else None, U, alpha, beta)


def _reduce_to(t: Tensor, like: Tensor) -> Tensor:
    """Per-matrix values reduced to a coefficient's shape (a scalar sums over the batch)."""
    return t.reshape(like.shape) if like.numel() != 1 else t.sum().reshape(like.shape)


def _rank_scale_backward(ctx, grad):
    G, U, alpha, beta = ctx.saved_tensors
    need_G, need_U, need_alpha, need_beta = ctx.needs_input_grad
    dG = rank_scale(grad, U, alpha, beta) if need_G else None
    dU = dalpha = dbeta = None
    if need_U or need_alpha or need_beta:
        # With C = U^T G and D = U^T grad:  <grad, U C> = <D, C>,  and
        # dU = (alpha - beta) (grad C^T + G D^T).
        C = U.mT @ G
        D = U.mT @ grad
        inside = (D * C).sum(dim=(-2, -1))
        if need_alpha:
            dalpha = _reduce_to(inside, alpha)
        if need_beta:
            dbeta = _reduce_to((grad * G).sum(dim=(-2, -1)) - inside, beta)
        if need_U:
            # alpha and beta are each one value or one per matrix (in any mix): their difference
            # is one value, or one per matrix broadcast over each matrix's (m, r) gradient.
            delta = alpha - beta
            delta = delta.reshape(()) if delta.numel() == 1 else delta.reshape(*G.shape[:-2], 1, 1)
            dU = delta * (grad @ C.mT + G @ D.mT)
            if U.dim() == 2 and dU.dim() > 2:
                dU = dU.sum(dim=tuple(range(dU.dim() - 2)))
    return dG, dU, dalpha, dbeta


torch.library.register_autograd(
    "lsef::rank_scale", _rank_scale_backward, setup_context=_rank_scale_setup_context
)


class _RankAwareGradScale(torch.autograd.Function):
    @staticmethod
    def forward(x, U, alpha, beta):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, U, alpha, beta = inputs
        ctx.save_for_backward(U, alpha, beta)

    @staticmethod
    def backward(ctx, grad):
        U, alpha, beta = ctx.saved_tensors
        return rank_scale(grad, U, alpha, beta), None, None, None


def rank_aware_grad_scale(x: Tensor, U: Tensor, alpha: Scalar, beta: Scalar) -> Tensor:
    """Identity in the forward; in the backward the incoming gradient ``g`` becomes
    ``rank_scale(g, U, alpha, beta)``: its part in span(U) scaled by ``alpha``, the rest by
    ``beta``. ``U``, ``alpha`` and ``beta`` get no gradient.

    Shapes as in :func:`rank_scale`, with ``x`` in place of ``G``; they are checked here, in
    the forward, rather than when the gradient arrives.
    """
    op = "rank_aware_grad_scale"
    _check_tensor(op, "x", x)
    _check_tensor(op, "U", U)
    alpha, beta = _as_tensor(alpha, x, op, "alpha"), _as_tensor(beta, x, op, "beta")
    _check_rank_scale(x, U, alpha, beta, op, "x")
    # The backward runs rank_scale on a gradient of x's dtype: a dtype its CPU kernel lacks is
    # reported now, under this op's name, rather than from rank_scale during the backward.
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: x must be float32 or float64 on the CPU, got {x.dtype}")
    return _RankAwareGradScale.apply(x, U, alpha, beta)


# --------------------------------------------------------------------------------------------
# rsvd and lowrank
# --------------------------------------------------------------------------------------------


def rsvd(A: Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0):
    """Truncated SVD of every matrix of ``A (*, m, n)``: ``A ~ U diag(S) V^T``.

    A randomized range finder (Halko, Martinsson & Tropp 2011) with
    ``l = min(k + oversample, min(m, n))`` columns and ``n_iter`` power iterations, each
    re-orthonormalised, then an exact SVD of the small projected matrix. When
    ``l == min(m, n)`` the result is the exact truncated SVD (no randomness). The Gaussian test
    matrix comes from a counter-based generator keyed by ``seed`` alone and is shared by the
    batch: the same call gives the same bits, and ``rsvd(A)[i] == rsvd(A[i])``.

    Returns:
        ``U (*, m, k)``, ``S (*, k)`` (descending, non-negative), ``V (*, n, k)``; each pair
        ``(u_i, v_i)`` is signed so the largest-magnitude entry of ``u_i`` is positive. A matrix
        containing NaN or Inf gives NaN factors (for that matrix only).

    Gradients follow Townsend (2016) for the rank-k truncated SVD with the discarded singular
    values taken as zero: exact where ``rank(A) <= k`` or ``k == min(m, n)``, an approximation
    elsewhere; close, repeated and zero singular values are regularised (docs/DESIGN.md §6).
    """
    _check_rsvd_types("rsvd", A, k, oversample, n_iter, seed)
    return torch.ops.lsef.rsvd.default(A, k, oversample, n_iter, seed)


def lowrank(A: Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0) -> Tensor:
    """The rank-k approximation ``L = U diag(S) V^T`` of every matrix of ``A (*, m, n)``, with
    ``U, S, V = rsvd(A, k, oversample, n_iter, seed)``.

    Its gradient is the projection onto the tangent space of the rank-k matrices at ``L``,
    ``P_U G + G P_V - P_U G P_V`` (exact where ``rank(A) <= k``): no division by singular-value
    gaps, so it is stable where ``rsvd``'s is not.
    """
    _check_rsvd_types("lowrank", A, k, oversample, n_iter, seed)
    return torch.ops.lsef.lowrank.default(A, k, oversample, n_iter, seed)[0]


def _check_rsvd_types(op: str, A, k, oversample, n_iter, seed) -> None:
    """TypeErrors naming the argument (the kernels check the values)."""
    if isinstance(A, Tensor) and int is type(k) is type(oversample) is type(n_iter) is type(seed):
        return  # every call of rsvd and lowrank: the common case costs one test
    _check_tensor(op, "A", A)
    for name, value in (("k", k), ("oversample", oversample), ("n_iter", n_iter), ("seed", seed)):
        _check_int(op, name, value)


def _check_rsvd(A: Tensor, k: int, oversample: int, n_iter: int, op: str = "rsvd") -> None:
    """The kernels' checks, messages and exception types, for the fake kernels."""
    torch._check(
        A.dtype.is_floating_point, lambda: f"{op}: A must be a floating-point tensor, got {A.dtype}"
    )
    torch._check_value(
        A.dim() >= 2,
        lambda: f"{op}: A must have at least 2 dimensions (*, m, n), got shape {list(A.shape)}",
    )
    mn = min(A.shape[-2], A.shape[-1])
    torch._check_value(
        mn >= 1,
        lambda: (
            f"{op}: A must have matrices of m, n >= 1 (A is (*, m, n)), got shape {list(A.shape)}"
        ),
    )
    torch._check_value(
        1 <= k <= mn,
        lambda: (
            f"{op}: k must be in [1, min(m, n)] = [1, {mn}] for A of shape {list(A.shape)}, got {k}"
        ),
    )
    torch._check_value(oversample >= 0, lambda: f"{op}: oversample must be >= 0, got {oversample}")
    torch._check_value(n_iter >= 0, lambda: f"{op}: n_iter must be >= 0, got {n_iter}")


def _rsvd_shapes(A: Tensor, k: int):
    batch, (m, n) = A.shape[:-2], A.shape[-2:]
    return A.new_empty((*batch, m, k)), A.new_empty((*batch, k)), A.new_empty((*batch, n, k))


@torch.library.register_fake("lsef::rsvd")
def _rsvd_fake(A, k, oversample=8, n_iter=2, seed=0):
    _check_rsvd(A, k, oversample, n_iter)
    return _rsvd_shapes(A, k)


@torch.library.register_fake("lsef::lowrank")
def _lowrank_fake(A, k, oversample=8, n_iter=2, seed=0):
    _check_rsvd(A, k, oversample, n_iter, "lowrank")
    U, _, V = _rsvd_shapes(A, k)
    return A.new_empty(A.shape), U, V


@torch.library.register_fake("lsef::rsvd_backward")
def _rsvd_backward_fake(grad_U, grad_S, grad_V, U, S, V):
    return U.new_empty((*U.shape[:-1], V.shape[-2]))


@torch.library.register_fake("lsef::lowrank_backward")
def _lowrank_backward_fake(grad, U, V):
    return grad.new_empty(grad.shape)


def _rsvd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output)


def _rsvd_backward(ctx, grad_U, grad_S, grad_V):
    U, S, V = ctx.saved_tensors
    dA = torch.ops.lsef.rsvd_backward.default(grad_U, grad_S, grad_V, U, S, V)
    return dA, None, None, None, None


def _lowrank_setup_context(ctx, inputs, output):
    _, U, V = output
    ctx.mark_non_differentiable(U, V)
    ctx.save_for_backward(U, V)


def _lowrank_backward(ctx, grad_L, grad_U, grad_V):
    U, V = ctx.saved_tensors
    return torch.ops.lsef.lowrank_backward.default(grad_L, U, V), None, None, None, None


torch.library.register_autograd("lsef::rsvd", _rsvd_backward, setup_context=_rsvd_setup_context)
torch.library.register_autograd(
    "lsef::lowrank", _lowrank_backward, setup_context=_lowrank_setup_context
)


# --------------------------------------------------------------------------------------------
# lowrank_sparse: a composition of the ops above (lsef_ext.rpca)
# --------------------------------------------------------------------------------------------


def lowrank_sparse(
    X: Tensor,
    k: int,
    lam=None,
    n_steps: Optional[int] = None,
    method: str = "rpca",
    noise: Union[None, float, str] = None,
):
    """Split every ``X (*, m, n)`` into a rank-k part ``L`` and a sparse part ``S``.

    ``method="rpca"`` (default), ``noise=None``: principal component pursuit,
    ``min ||L||_* + lam ||S||_1`` subject to ``X = L + S`` exactly, by the inexact augmented
    Lagrange multiplier method (Lin, Chen & Ma 2010) with the rank capped at ``k``; ``lam``
    defaults to ``1 / sqrt(max(m, n))`` (Candes et al. 2011; scale-free). Each matrix stops
    when ``||X - L - S||_F < 1e-7 ||X||_F`` or after ``n_steps`` (default 100) iterations.
    Exact: every bit of noise in ``X`` that is not low-rank ends up in ``S``, which is then
    dense on real data.

    ``noise`` (a number ``sigma``, the standard deviation of dense Gaussian noise in ``X``, or
    ``"auto"`` to estimate it per matrix): stable principal component pursuit (Zhou et al. 2010)
    in penalised form, ``min tau_L ||L||_* + tau_S ||S||_1 + ||X - L - S||_F^2 / 2`` with
    ``tau_L = sigma (sqrt(m) + sqrt(n))`` and ``tau_S = lam tau_L``; ``lam`` defaults to
    ``sqrt(2 log(m n)) / (sqrt(m) + sqrt(n))``, so entries enter ``S`` only above the universal
    threshold ``sigma sqrt(2 log(m n))`` and ``S`` stays sparse. ``noise=0`` is the exact form.

    Either way each matrix of a batch stops on its own test (its result does not depend on its
    neighbours; a zero or non-finite matrix stops at once), and the loop asks the device whether
    all have stopped only every few iterations. Not differentiable: call it under
    ``torch.no_grad()`` or use ``method="unrolled"``.

    ``method="unrolled"``: ``n_steps`` (default 3) alternations ``L = lowrank(X - S, k)``,
    ``S = soft_threshold(X, L, lam)`` from ``S = 0``, differentiable through every step;
    ``lam`` (a number, per-channel or per-matrix tensor) defaults to the universal threshold
    ``sigma sqrt(2 log(m n))`` with ``sigma = 1.4826 median |X - lowrank(X, k)|`` (no gradient).

    The algorithms are in :mod:`lsef_ext.rpca`, written over this module's ops.

    Raises:
        TypeError: ``X`` not a tensor; ``k`` or ``n_steps`` not an integer; ``lam`` neither
            None, a number nor a tensor.
        ValueError: ``X`` with fewer than 2 dimensions or an empty matrix; ``k`` outside
            ``[1, min(m, n)]``; a number ``lam`` below 0 or NaN; ``n_steps < 1``; an unknown
            ``method`` or ``noise``.
        RuntimeError: ``X`` not floating-point; ``method="rpca"`` on an ``X`` that requires
            a gradient with grad mode on.
    """
    _check_lowrank_sparse(X, k, lam, n_steps)
    if method == "rpca" and torch.is_grad_enabled() and X.requires_grad:
        raise RuntimeError(
            "lowrank_sparse(method='rpca') is not differentiable; call it under torch.no_grad() "
            "or use method='unrolled'"
        )
    return _rpca.lowrank_sparse(sys.modules[__name__], X, k, lam, n_steps, method, noise)


def _check_lowrank_sparse(X, k, lam, n_steps) -> None:
    """The argument checks of lowrank_sparse (``method`` and ``noise`` are checked in
    :mod:`lsef_ext.rpca`); on arguments and shapes only, never on tensor values."""
    op = "lowrank_sparse"
    _check_tensor(op, "X", X)
    if X.dim() < 2:
        raise ValueError(
            f"{op}: X must have at least 2 dimensions (*, m, n), got shape {list(X.shape)}"
        )
    if not X.dtype.is_floating_point:
        raise RuntimeError(f"{op}: X must be a floating-point tensor, got {X.dtype}")
    m, n = X.shape[-2:]
    if m == 0 or n == 0:
        raise ValueError(f"{op}: X must have matrices of m, n >= 1, got shape {list(X.shape)}")
    _check_int(op, "k", k)
    if not isinstance(k, torch.SymInt) and not 1 <= k <= min(m, n):
        raise ValueError(
            f"{op}: k must be in [1, min(m, n)] = [1, {min(m, n)}] for X of shape "
            f"{list(X.shape)}, got {k}"
        )
    if lam is not None and not isinstance(lam, Tensor):
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
            raise TypeError(
                f"{op}: lam must be None, a number >= 0 or a tensor, got {type(lam).__name__} "
                f"{lam!r}"
            )
        if not lam >= 0:
            raise ValueError(f"{op}: lam must be a number >= 0, got {lam}")
    if n_steps is not None:
        _check_int(op, "n_steps", n_steps, 1)


# --------------------------------------------------------------------------------------------
# op sets
# --------------------------------------------------------------------------------------------


def get_ops(name: str) -> SimpleNamespace:
    """The op set a module computes with: ``"ext"`` (this module's compiled kernels) or
    ``"ref"`` (the ``lsef_ref`` references, for comparison runs such as ``--ops ref``)."""
    if name == "ext":
        impl = sys.modules[__name__]
    elif name == "ref":
        import lsef_ref as impl
    else:
        raise ValueError(f"ops must be 'ext' or 'ref', got {name!r}")
    return SimpleNamespace(
        name=name,
        lowrank=impl.lowrank,
        soft_threshold=impl.soft_threshold,
        rsvd=impl.rsvd,
        rank_scale=impl.rank_scale,
        lowrank_sparse=impl.lowrank_sparse,
    )
