"""The algorithms behind :func:`lsef_ext.ops.lowrank_sparse`, written over an op set.

An op set is any object with ``rsvd``, ``lowrank`` and ``soft_threshold`` of the signatures of
:mod:`lsef_ext.ops` (that module itself, or ``lsef_ext.ops.get_ops(...)``). Three solvers:

* :func:`rpca_ialm`: principal component pursuit, ``min ||L||_* + lam ||S||_1`` subject to
  ``X = L + S`` (exact constraint), by the inexact augmented Lagrange multiplier method.
* :func:`stable_pcp`: the same with a noise term, ``min ||L||_* + lam ||S||_1 +
  ||X - L - S||_F^2 / (2 mu)``, by exact block minimisation over ``L`` and ``S`` in turn.
* :func:`unrolled`: a fixed number of alternations ``L = lowrank(X - S)``,
  ``S = soft_threshold(X, L, lam)``, differentiable.

Every matrix of a batch stops on its own test, decided on the device: once it has converged
(or become non-finite) its ``L`` and ``S`` (and the solver's state) are frozen by
``torch.where``, so its result is the one it gets alone, whatever its neighbours do, and no
later iteration changes a bit of it. The loop runs at most ``max_iter`` iterations and reads
nothing on the host, so it traces whole under ``torch.compile(fullgraph=True)`` and
``torch.export``, runs under ``vmap`` and can be captured in a CUDA graph. In plain eager mode
(:func:`may_sync`) it ends early once every matrix has stopped, a host read every
``check_every`` iterations; that decides only when the loop ends, never a result:
``early_stop=False`` (the full bound) gives the same bits.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

RPCA_MAX_ITER = 100
RPCA_TOL = 1e-7
# IALM's growth factor of the penalty mu per iteration (Lin, Chen & Ma 2010 use 1.5).
RPCA_RHO = 1.5
UNROLLED_STEPS = 3
# A warm start resumes this many growth steps below the penalty its previous solve ended at
# (DESIGN §8, "Warm starts").
WARM_BACKOFF = 2
# Iterations of the robust fit that seeds a warm start's fresh rows (a few suffice: tested).
FRESH_FIT_STEPS = 20
MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): the median absolute deviation of N(0, s^2) is s / 1.4826

Noise = Union[None, float, str]


def pcp_lambda(X: Tensor) -> float:
    """Principal component pursuit's weight 1 / sqrt(max(m, n)) (Candes, Li, Ma & Wright 2011)."""
    return 1.0 / math.sqrt(max(X.shape[-2:]))


def mad_sigma(R: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """A robust per-matrix estimate of the standard deviation of R's entries, ``1.4826
    median |R|``, shape ``(*, 1, 1)``: a minority of large (sparse) entries does not move it.
    With ``mask``, the median of the observed entries only (the lower median, as
    ``torch.median``)."""
    A = R.abs()
    if mask is None:
        return MAD_TO_SIGMA * A.flatten(-2).median(dim=-1).values[..., None, None]
    A = torch.where(mask, A, torch.full_like(A, math.nan))
    return MAD_TO_SIGMA * A.flatten(-2).nanmedian(dim=-1).values[..., None, None]


def universal_threshold(R: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``sigma sqrt(2 log(m n))`` per matrix (Donoho & Johnstone 1994) with ``sigma`` =
    :func:`mad_sigma` of ``R``: the largest of m n independent N(0, sigma^2) entries stays below
    it with probability tending to 1, so entries above it are taken as outliers. With ``mask``,
    over the observed entries: ``m n`` becomes their number."""
    m, n = R.shape[-2:]
    if mask is None:
        return mad_sigma(R) * math.sqrt(2.0 * math.log(max(2, m * n)))
    count = torch.clamp(observed_fraction(R, mask) * (m * n), min=2.0)
    return mad_sigma(R, mask) * torch.sqrt(2.0 * torch.log(count))


def noise_level(X: Tensor, L: Tensor, k: int, mask: Optional[Tensor] = None) -> Tensor:
    """The noise level of ``X`` given its exact robust-PCA low-rank part ``L`` (rank k), per
    matrix: :func:`mad_sigma` of ``X - L`` (noise plus the outliers, a minority the median
    ignores; observed entries only with ``mask``), scaled by ``sqrt(m n / ((m - k) (n - k)))``,
    the share of the noise's variance that the rank-k part also absorbed."""
    m, n = X.shape[-2:]
    return mad_sigma(X - L, mask) * math.sqrt(m * n / max(1, (m - k) * (n - k)))


def rank_k_svt(ops, M: Tensor, k: int, tau: Tensor) -> Tensor:
    """Singular value thresholding restricted to the top k: ``U diag(max(s - tau, 0)) V^T``;
    ``tau`` is ``(*, 1)``, one threshold per matrix."""
    U, s, V = ops.rsvd(M, k)
    return (U * torch.clamp(s - tau, min=0).unsqueeze(-2)) @ V.mT


def spectral_norm(ops, X: Tensor) -> Tensor:
    """The largest singular value of each matrix, ``(*, 1, 1)``, 1 for a zero matrix: from the
    solver's own SVD (a full SVD to scale the start would cost more than a few iterations)."""
    return _safe(ops.rsvd(X, 1)[1][..., :1, None])


def _safe(norm: Tensor) -> Tensor:
    """Zero norms (an all-zero matrix) replaced by 1, so that no 0/0 enters."""
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def observed_fraction(X: Tensor, mask: Tensor) -> Tensor:
    """The fraction ``p`` of observed entries of each matrix, shape ``(*, 1, 1)`` in X's dtype
    (``mask`` a bool tensor broadcastable to ``X``)."""
    m, n = X.shape[-2:]
    count = mask.expand(X.shape).sum(dim=(-2, -1), keepdim=True)
    return count.to(X.dtype) / (m * n)


def masked_lambda(X: Tensor, mask: Tensor) -> Tensor:
    """Principal component pursuit's weight with missing entries, ``1 / sqrt(p max(m, n))``
    per matrix, ``p`` its observed fraction (Candes, Li, Ma & Wright 2011, Thm. 1.2): the
    weight of :func:`pcp_lambda` for the observed entries alone."""
    return pcp_lambda(X) / torch.sqrt(observed_fraction(X, mask))


def _fill(mask: Optional[Tensor], S: Tensor, L: Tensor) -> Tensor:
    """The solvers' working sparse part: ``S`` where observed, ``-L`` where not. ``X - S_work``
    (X being 0 there) is then the matrix completed by the current low-rank part, so every step
    below stays the unmasked one, and the residual ``X - L - S_work`` is 0 off the mask."""
    return S if mask is None else torch.where(mask, S, -L)


def _check_every(X: Tensor, check_every: Optional[int]) -> int:
    # On the CPU the test costs nothing; on a GPU it waits for the queued work.
    return check_every or (1 if X.device.type == "cpu" else 8)


def may_sync(X: Tensor) -> bool:
    """Whether a solver on ``X`` may read its stopping state on the host to end its loop early:
    not while it is being traced (``torch.compile``, ``torch.export``, ``make_fx``, fake or meta
    tensors), not under a functorch transform (``vmap``, ``grad``, ...: a wrapped tensor has no
    storage to read) and not during CUDA graph capture. Elsewhere (plain eager mode) it may."""
    if torch.compiler.is_compiling():  # first: the checks below do not trace
        return False
    if X.device.type == "meta" or isinstance(X, torch._subclasses.FakeTensor):
        return False
    functorch = torch._C._functorch
    if functorch.maybe_current_level() is not None or functorch.is_functorch_wrapped_tensor(X):
        return False
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        return False
    return not (X.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class _Stopping:
    """Each matrix's stopping state in a solver loop, kept on the device.

    A matrix stops once its test value ``err`` is below ``tol`` or not finite (:attr:`done`,
    bool ``(*, 1, 1)``); from then on the solver holds its state (:meth:`hold`, ``torch.where``
    on :attr:`done`), so later iterations never change it, and :attr:`iters` (int64 ``*``)
    stops counting. The loop runs at most ``max_iter`` iterations; reading nothing on the host,
    it traces whole under ``torch.compile`` and ``torch.export`` and runs under ``vmap``.

    Where :func:`may_sync` allows it (plain eager mode) and ``early_stop`` is on, the loop ends
    once every matrix has stopped, asked on the host every ``every`` iterations; since stopped
    matrices are frozen, the iterations it skips would not have changed a bit. With
    ``every == 1`` (the CPU) the state is read every iteration, and nothing is selected while
    no matrix has stopped (``torch.where`` would pick the new values anyway)."""

    def __init__(self, X: Tensor, every: int, early_stop: bool = True):
        shape, device = X.shape[:-2], X.device
        self.every = every
        self.sync = early_stop and may_sync(X)
        # whether the solver must hold stopped matrices: always, except on the host-read path
        # while no matrix has stopped
        self.frozen = not (self.sync and every == 1)
        self.done = torch.zeros(shape + (1, 1), dtype=torch.bool, device=device)
        self.iters = torch.zeros(shape, dtype=torch.int64, device=device)
        self.count = 0  # iterations run while no matrix had stopped (the unfrozen phase)
        self.tol_host: Optional[float] = None

    def hold(self, old: Tuple[Tensor, ...], new: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        """The solver's next state: ``new``, but ``old`` for the matrices that have stopped."""
        if not self.frozen:
            return new
        return tuple(torch.where(self.done, a, b) for a, b in zip(old, new))

    def update(self, err: Tensor, tol: float, it: int) -> bool:
        """Records iteration ``it``'s test values ``err`` ``(*, 1, 1)``; True: every matrix
        has stopped and the loop may end (only where :attr:`sync`)."""
        if not self.frozen:
            # The host-read path: the device test below, evaluated exactly on the host (the
            # device compares in err's dtype, so tol is rounded to it).
            self.count += 1
            if self.tol_host is None:
                self.tol_host = torch.tensor(tol, dtype=err.dtype).item()
            stopped = [
                (0.0 if v != v or v == math.inf else v) < self.tol_host
                for v in err.flatten().tolist()
            ]
            if all(stopped):
                return True
            if any(stopped):
                self.frozen = True
                self.done = torch.tensor(stopped, device=self.done.device).view(self.done.shape)
                self.iters = self.iters + self.count
            return False
        self.iters = self.iters + ~self.done[..., 0, 0]
        # NaN and +Inf count as stopped: nan_to_num makes them 0, below any tol > 0
        self.done = self.done | (torch.nan_to_num(err, nan=0.0, posinf=0.0) < tol)
        return self.sync and it % self.every == 0 and bool(self.done.all())

    def iterations(self) -> Tensor:
        """Iterations run per matrix (int64, shape ``*``)."""
        return self.iters if self.frozen else self.iters + self.count


def rpca_ialm(
    ops,
    X: Tensor,
    k: int,
    lam=None,
    max_iter: int = RPCA_MAX_ITER,
    tol: float = RPCA_TOL,
    check_every: Optional[int] = None,
    early_stop: bool = True,
    mask: Optional[Tensor] = None,
    init: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    full: bool = False,
    norm_two: Optional[Tensor] = None,
):
    """Principal component pursuit by the inexact augmented Lagrange multiplier method (Lin,
    Chen & Ma 2010, Alg. 5) with the singular value thresholding capped at rank k. A matrix
    stops when ``||X - L - S||_F < tol ||X||_F`` or its residual is not finite; the loop runs
    at most ``max_iter`` iterations, and ends sooner once all have stopped where ``early_stop``
    and :func:`may_sync` allow (the same bits; see :class:`_Stopping`).

    With ``mask`` (bool, broadcastable to X, False = unobserved; X already 0 there) it solves
    ``min ||L||_* + lam ||S||_1`` subject to ``P(X) = P(L + S)`` on the observed entries only:
    the constraint carries a free term ``E`` on the unobserved ones, whose exact update is
    ``E = -L`` there (see :func:`_fill`), and ``S`` is returned 0 there. ``lam`` then defaults
    to :func:`masked_lambda`.

    Returns ``(L, S, iterations)``, ``iterations`` of shape ``*`` (int64), per matrix; with
    ``full``, ``(L, S, iterations, Y, mu)``, the final multiplier and penalty as well.

    ``init = (S, Y, mu)`` (unmasked only) starts the loop there instead of at ``S = 0``, ``Y``
    the scaled ``X`` of Lin et al. and ``mu = 1.25 / ||X||_2``; ``mu`` is first clamped into
    ``[1.25 / ||X||_2, 1e7 * 1.25 / ||X||_2]``, the cold run's range (a warm start:
    :func:`warm_start`). ``norm_two``: :func:`spectral_norm` of ``X``, where the caller has it.

    The loop carries the scaled multiplier ``W = Y / mu`` rather than ``Y`` (the same
    iterates, in fewer passes over the data): with ``R = X + W`` and ``B = R - L``, the
    sparse step is ``S = B - clamp(B, -t, t)`` (``t = lam / mu``: that is the soft threshold),
    ``W + Z = B - S`` (``Z = X - L - S``, the residual), and the next ``W`` is
    ``(W + Z) mu / mu'``; unmasked, ``B - S`` is the ``clamp`` itself.
    """
    if lam is None:
        lam = pcp_lambda(X) if mask is None else masked_lambda(X, mask)
    every = _check_every(X, check_every)
    if norm_two is None:
        norm_two = spectral_norm(ops, X)
    mu = 1.25 / norm_two
    mu_max = mu * 1e7
    if init is None:
        norm_inf = X.abs().amax(dim=(-2, -1), keepdim=True) / lam
        W = X / (torch.maximum(norm_two, norm_inf) * mu)  # Y / mu, Y the multiplier
        S = torch.zeros_like(X)
    else:
        S, Y, mu_start = init
        S = S.clone(memory_format=torch.contiguous_format)  # the fused loop writes into it
        mu = torch.minimum(torch.maximum(mu_start, mu), mu_max)
        W = Y / mu
    rho = RPCA_RHO
    x_norm = _safe(torch.linalg.matrix_norm(X, keepdim=True))
    state = _Stopping(X, every, early_stop)
    if _fused_step(ops, X, lam, mask):
        out = _rpca_ialm_fused(ops, X, k, lam, max_iter, tol, state, W, S, mu, mu_max, rho, x_norm)
        return out if full else out[:3]
    L = torch.zeros_like(X)
    for it in range(1, max_iter + 1):
        R = X + W
        L_new = rank_k_svt(ops, R - S, k, (1 / mu).squeeze(-1))
        B = R - L_new
        t = lam / mu
        C = torch.clamp(B, -t, t)
        S_new = B - C
        if mask is not None:
            S_new = _fill(mask, S_new, L_new)
            C = B - S_new  # W + Z: the residual is 0 off the mask
        mu_new = torch.minimum(mu * rho, mu_max)
        err = torch.linalg.vector_norm(C - W, dim=(-2, -1), keepdim=True) / x_norm
        L, S, W, mu = state.hold((L, S, W, mu), (L_new, S_new, C * (mu / mu_new), mu_new))
        if state.update(err, tol, it):
            break
    out = (L, _observed(mask, S), state.iterations())
    return out + (W * mu, mu) if full else out


def _rpca_ialm_fused(ops, X, k, lam, max_iter, tol, state, W, S, mu, mu_max, rho, x_norm):
    """:func:`rpca_ialm`'s loop, unmasked, with its elementwise half in one in-place pass
    (``ops._ialm_step_``): the same bits. ``W`` and ``S`` (this function's own tensors) and the
    SVT input ``A`` are updated in place, a stopped matrix's left alone by the op (its hold), so
    only ``L`` and ``mu`` go through :meth:`_Stopping.hold`. Returns ``(L, S, iterations, Y,
    mu)``."""
    A = X + W - S
    L = torch.zeros_like(X)
    flat = X.shape[:-2].numel()
    for it in range(1, max_iter + 1):
        L_new = rank_k_svt(ops, A, k, (1 / mu).squeeze(-1))
        mu_new = torch.minimum(mu * rho, mu_max)
        done = state.done.reshape(flat) if state.frozen else torch.zeros(flat, dtype=torch.bool)
        err2 = ops._ialm_step_(X, L_new, W, S, A, lam / mu, mu / mu_new, done)
        err = torch.sqrt(err2).to(X.dtype)[..., None, None] / x_norm
        L, mu = state.hold((L, mu), (L_new, mu_new))
        if state.update(err, tol, it):
            break
    return L, S, state.iterations(), W * mu, mu


class RPCAState(NamedTuple):
    """Where a robust-PCA solve ended, to start another from (``lowrank_sparse(...,
    return_state=True)`` returns it, ``init=`` takes it). Tensors in ``X``'s units and shape:

    * ``L``, ``S`` ``(*, m, n)``: the split;
    * ``Y`` ``(*, m, n)``: the Lagrange multiplier of the constraint ``X = L + S`` (free of
      ``X``'s units; ``|Y| <= lam`` entrywise);
    * ``mu`` ``(*, 1, 1)``: the penalty the solve ended at (units of ``1 / X``);
    * ``iterations`` ``(*,)`` int64: the iterations the solve ran;
    * ``fresh``: how many of the last rows hold no solution yet (0 after a solve; see
      :meth:`slide`).

    A state resumes on the same matrices (``fresh = 0``: a changed ``X``, e.g. the next training
    step's batch, or more iterations) or, after :meth:`slide`, on the next window of a sliding
    window over frames (rows)."""

    L: Tensor
    S: Tensor
    Y: Tensor
    mu: Tensor
    iterations: Tensor
    fresh: int = 0

    def slide(self, stride: int) -> "RPCAState":
        """The state for the window ``stride`` rows (frames) further on: the first ``stride``
        rows dropped, the rest moved up, and ``stride`` fresh rows at the end (zeros, counted in
        :attr:`fresh`), which the warm start fits first (:func:`warm_start`)."""
        m = self.S.shape[-2]
        if isinstance(stride, bool) or not isinstance(stride, int):
            raise TypeError(f"RPCAState.slide: stride must be an int, got {type(stride).__name__}")
        if not 0 <= stride <= m:
            raise ValueError(f"RPCAState.slide: stride must be in [0, m] = [0, {m}], got {stride}")

        def move(T: Tensor) -> Tensor:
            return torch.cat([T[..., stride:, :], torch.zeros_like(T[..., :stride, :])], dim=-2)

        return self._replace(
            L=move(self.L), S=move(self.S), Y=move(self.Y), fresh=min(m, self.fresh + stride)
        )


def fit_fresh_rows(X: Tensor, V: Tensor, lam, mu: Tensor, steps: int) -> Tuple[Tensor, Tensor]:
    """A robust fit of each row of ``X (*, f, n)`` on the row space ``V (*, n, k)`` (orthonormal
    columns): ``min ||S||_1`` subject to ``X = C V^T + S``, by ``steps`` iterations of the
    alternating direction method at the fixed penalty ``mu`` ``(*, 1, 1)``, with the weight
    ``lam`` of the robust-PCA problem. Returns ``(S, Y)``, the sparse part and the multiplier
    (``|Y| <= lam``), which seed a warm start's fresh rows."""
    t = lam / mu
    S = torch.zeros_like(X)
    W = torch.zeros_like(X)  # Y / mu
    for _ in range(steps):
        B = X + W
        B = B - ((B - S) @ V) @ V.mT
        W = torch.clamp(B, -t, t)
        S = B - W
    return S, W * mu


def warm_start(ops, X: Tensor, k: int, lam, init: RPCAState, scale: Tensor, norm_two: Tensor):
    """:func:`rpca_ialm`'s ``init`` ``(S, Y, mu)`` for ``X`` (already multiplied by ``scale``)
    from a previous solve's state ``init`` (in X's units). The fresh rows get the robust fit of
    their frames on the row space of the kept rows' ``L`` (:func:`fit_fresh_rows` at this
    ``X``'s cold penalty); the penalty resumes ``WARM_BACKOFF`` growth steps below where the
    previous solve ended (``norm_two``: :func:`spectral_norm` of ``X``). None when fewer than
    ``k`` rows are kept (a cold start)."""
    m = X.shape[-2]
    keep = m - init.fresh
    if keep < k:
        return None
    dtype = X.dtype
    S = init.S.to(dtype) * scale
    Y = init.Y.to(dtype)
    mu = init.mu.to(dtype) / scale / RPCA_RHO**WARM_BACKOFF
    if init.fresh:
        V = ops.rsvd(init.L[..., :keep, :].to(dtype) * scale, k)[2]
        mu0 = 1.25 / norm_two
        if lam is None:
            lam = pcp_lambda(X)
        S_f, Y_f = fit_fresh_rows(X[..., keep:, :], V, lam, mu0, FRESH_FIT_STEPS)
        S = torch.cat([S[..., :keep, :], S_f], dim=-2)
        Y = torch.cat([Y[..., :keep, :], Y_f], dim=-2)
    return S, Y, mu


def sliding_windows(
    ops, X: Tensor, k: int, window: int, stride: int, warm: bool = True, **kwargs
) -> list:
    """Robust PCA (``ops.lowrank_sparse``, exact, unmasked) of every window of ``window`` rows
    (frames) of ``X (*, T, n)``, ``stride`` rows apart, each started from the previous window's
    state (``init=state.slide(stride)``) when ``warm``, else cold. ``kwargs`` go to every call
    (``lam``, ``n_steps``). Returns a list of ``(start, state)``, one per window, the window's
    split in ``state.L`` and ``state.S``."""
    out, state = [], None
    for s in range(0, X.shape[-2] - window + 1, stride):
        init = state.slide(stride) if warm and state is not None else None
        Xw = X[..., s : s + window, :]
        state = ops.lowrank_sparse(Xw, k, init=init, return_state=True, **kwargs)[2]
        out.append((s, state))
    return out


def _fused_step(ops, X: Tensor, lam, mask: Optional[Tensor]) -> bool:
    """Whether :func:`rpca_ialm` takes the fused CPU step (``ops._ialm_step_``): the compiled op
    set, no mask, a contiguous float32 or float64 CPU tensor outside autograd, in plain eager mode
    (:func:`may_sync`; traced code and functorch transforms take the ATen expressions), and a
    weight that keeps X's dtype."""
    if mask is not None or not hasattr(ops, "_ialm_step_") or X.device.type != "cpu":
        return False
    if X.dtype not in (torch.float32, torch.float64) or X.requires_grad or not X.is_contiguous():
        return False
    if isinstance(lam, Tensor) and lam.dtype != X.dtype:
        return False
    return may_sync(X)


def _observed(mask: Optional[Tensor], S: Tensor) -> Tensor:
    """``S`` with its unobserved entries set to 0."""
    return S if mask is None else torch.where(mask, S, torch.zeros_like(S))


def noise_thresholds(
    X: Tensor, sigma: Tensor, lam=None, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """The stable solver's thresholds for per-matrix noise level ``sigma`` ``(*, 1, 1)``:
    ``tau_L = sigma (sqrt(m) + sqrt(n))`` for singular values (about the largest singular value
    of an m x n matrix of N(0, sigma^2) noise), and ``tau_S = lam tau_L`` for entries, ``lam``
    defaulting to ``sqrt(2 log(m n)) / (sqrt(m) + sqrt(n))`` so that ``tau_S`` is the universal
    threshold ``sigma sqrt(2 log(m n))``: noise entries stay out of S.

    With ``mask`` (observed fraction ``p``), the noise lives on the ``p m n`` observed entries
    only: ``tau_L = sigma sqrt(p) (sqrt(m) + sqrt(n))`` (the spectral norm of a matrix whose
    entries are N(0, sigma^2) with probability p and 0 otherwise) and the universal threshold
    over ``p m n`` entries, ``tau_S = sigma sqrt(2 log(p m n))``."""
    m, n = X.shape[-2:]
    spread = math.sqrt(m) + math.sqrt(n)
    if mask is None:
        tau_L = sigma * spread
        if lam is None:
            lam = math.sqrt(2.0 * math.log(max(2, m * n))) / spread
        return tau_L, lam * tau_L
    p = observed_fraction(X, mask)
    tau_L = sigma * torch.sqrt(p) * spread
    if lam is None:
        count = torch.clamp(p * (m * n), min=2.0)
        lam = torch.sqrt(2.0 * torch.log(count)) / (torch.sqrt(p) * spread)
    return tau_L, lam * tau_L


def stable_pcp(
    ops,
    X: Tensor,
    k: int,
    sigma: Tensor,
    lam=None,
    max_iter: int = RPCA_MAX_ITER,
    tol: float = RPCA_TOL,
    check_every: Optional[int] = None,
    early_stop: bool = True,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Stable principal component pursuit (Zhou, Li, Wright, Candes & Ma 2010) in its penalised
    form, ``min tau_L ||L||_* + tau_S ||S||_1 + ||X - L - S||_F^2 / 2`` with rank(L) <= k
    (thresholds from :func:`noise_thresholds`), by exact minimisation over each block in turn:
    ``L = SVT_tau_L(X - S)`` (top k), ``S = soft(X - L, tau_S)``. A matrix stops when an
    iteration moves ``(L, S)`` by less than ``tol ||X||_F`` or it is not finite; the loop as in
    :func:`rpca_ialm`. With ``mask`` the data term covers the observed entries only, and the
    exact minimisation over the unobserved ones fills them with the current ``L`` (as in
    soft-impute, Mazumder, Hastie & Tibshirani 2010; see :func:`_fill`).

    Returns ``(L, S, iterations)`` as :func:`rpca_ialm`.
    """
    every = _check_every(X, check_every)
    tau_L, tau_S = noise_thresholds(X, sigma, lam, mask)
    x_norm = _safe(torch.linalg.matrix_norm(X, keepdim=True))
    S = torch.zeros_like(X)
    L = torch.zeros_like(X)
    state = _Stopping(X, every, early_stop)
    for it in range(1, max_iter + 1):
        L_new = rank_k_svt(ops, X - S, k, tau_L.squeeze(-1))
        S_new = _fill(mask, ops.soft_threshold(X, L_new, tau_S), L_new)
        step = torch.sqrt(
            torch.linalg.matrix_norm(L_new - L, keepdim=True) ** 2
            + torch.linalg.matrix_norm(_observed(mask, S_new - S), keepdim=True) ** 2
        )
        L, S = state.hold((L, S), (L_new, S_new))
        if state.update(step / x_norm, tol, it):
            break
    return L, _observed(mask, S), state.iterations()


def unrolled(
    ops,
    X: Tensor,
    k: int,
    lam=None,
    steps: int = UNROLLED_STEPS,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """``steps`` alternations ``L = lowrank(X - S, k)``, ``S = soft_threshold(X, L, lam)`` from
    ``S = 0``, differentiable through every step; ``lam`` defaults to
    :func:`universal_threshold` of the first residual ``X - lowrank(X, k)`` (no gradient).
    With ``mask`` (X already 0 where unobserved) each step fits the matrix completed by the
    previous ``L`` (:func:`_fill`), the threshold comes from the observed residual, and ``S``
    is 0 where unobserved."""
    if lam is None:
        # no derivative in either mode (no_grad stops reverse mode only; detach both)
        lam = universal_threshold(X.detach() - ops.lowrank(X.detach(), k), mask)
    S = torch.zeros_like(X)
    for _ in range(steps):
        L = ops.lowrank(X - S, k)
        S = _fill(mask, ops.soft_threshold(X, L, lam), L)
    return L, _observed(mask, S)


def _noise_sigma(X: Tensor, noise: Noise) -> Optional[Tensor]:
    """None for the exact solver, else the per-matrix noise level (*, 1, 1)."""
    if noise is None:
        return None
    if isinstance(noise, str):
        if noise != "auto":
            raise ValueError(
                f"lowrank_sparse: noise must be None, a number >= 0 or 'auto', got {noise!r}"
            )
        return None  # estimated by the caller, which needs a first solution
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real):
        raise TypeError(
            f"lowrank_sparse: noise must be None, a number >= 0 or 'auto', got "
            f"{type(noise).__name__}"
        )
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"lowrank_sparse: noise must be a finite number >= 0, got {noise}")
    return torch.full(X.shape[:-2] + (1, 1), float(noise), dtype=X.dtype, device=X.device)


def pow2_normaliser(X: Tensor) -> Tensor:
    """The power of two ``2^s`` per matrix, shape ``(*, 1, 1)``, that brings the largest
    magnitude of each matrix of ``X`` into ``[1, 2)`` (1 for a zero or non-finite matrix; ``s``
    clamped so that ``2^s`` and ``2^-s`` are normal numbers). Multiplying by it is exact, so the
    solvers, which are scale-equivariant, give ``c`` times their result on ``X`` for ``c X``
    without squares or norms under- or overflowing anywhere in the dtype's range."""
    amax = X.detach().abs().amax(dim=(-2, -1), keepdim=True)
    work = torch.float64 if X.dtype == torch.float64 else torch.float32
    amax = amax.to(work)
    limit = math.frexp(torch.finfo(X.dtype).max)[1] - 2
    e = torch.frexp(amax).exponent.to(torch.int64)
    ok = (amax > 0) & torch.isfinite(amax)
    shift = torch.where(ok, 1 - e, torch.zeros_like(e)).clamp(-limit, limit)
    # 2^shift from its bits: exact on every backend.
    if work == torch.float64:
        scale = ((shift + 1023) << 52).view(torch.float64)
    else:
        scale = ((shift + 127) << 23).to(torch.int32).view(torch.float32)
    return scale.to(X.dtype)


def lowrank_sparse(
    ops,
    X: Tensor,
    k: int,
    lam=None,
    n_steps: Optional[int] = None,
    method: str = "rpca",
    noise: Noise = None,
    check_every: Optional[int] = None,
    early_stop: bool = True,
    mask: Optional[Tensor] = None,
    init: Optional[RPCAState] = None,
    return_state: bool = False,
):
    """The algorithm of :func:`lsef_ext.ops.lowrank_sparse` over the op set ``ops``.

    ``early_stop=False`` runs the robust-PCA loops to their bound (``n_steps``, default 100)
    even in eager mode, as traced code does; the result is the same bits (tested). ``mask``
    (bool, broadcastable to X, checked by the caller): X is zeroed where it is False before
    anything reads it, so nothing there reaches any output. ``init`` (checked by the caller) and
    ``return_state``: the exact solver's warm start (:class:`RPCAState`)."""
    if method not in ("rpca", "unrolled"):
        raise ValueError(f"lowrank_sparse: method must be 'rpca' or 'unrolled', got {method!r}")
    if n_steps is not None and n_steps < 1:
        raise ValueError(f"lowrank_sparse: n_steps must be >= 1, got {n_steps}")
    if mask is not None:
        X = torch.where(mask, X, torch.zeros_like(X))
    if method == "unrolled":
        if noise is not None:
            raise ValueError(
                "lowrank_sparse: noise applies to method='rpca' only; the unrolled "
                "method sets its threshold with lam"
            )
        steps = UNROLLED_STEPS if n_steps is None else n_steps
        return unrolled(ops, X, k, lam, steps, mask)
    max_iter = n_steps or RPCA_MAX_ITER
    sigma = _noise_sigma(X, noise)
    # The solvers run on X scaled by a power of two (exact), their results scaled back.
    scale = pow2_normaliser(X)
    X = X * scale
    loop = dict(check_every=check_every, early_stop=early_stop, mask=mask)
    if noise is None or (sigma is not None and noise == 0):  # no noise: the exact constraint
        if init is not None:
            # computed once, for the fresh rows' fit and the solver's start
            loop["norm_two"] = spectral_norm(ops, X)
            loop["init"] = warm_start(ops, X, k, lam, init, scale, loop["norm_two"])
        L, S, iters, Y, mu = rpca_ialm(ops, X, k, lam, max_iter, full=True, **loop)
        L, S = L / scale, S / scale
        if not return_state:
            return L, S
        return L, S, RPCAState(L, S, Y, mu * scale, iters)
    if noise == "auto":
        # The level from the exact solution: its L is close to the low-rank part (the exact
        # constraint sends the noise to S); a plain rank-k fit would be pulled by the outliers.
        L, _, _ = rpca_ialm(ops, X, k, None, max_iter, **loop)
        sigma = noise_level(X, L, k, mask)
    else:
        sigma = sigma * scale
    L, S, _ = stable_pcp(ops, X, k, sigma, lam, max_iter, **loop)
    return L / scale, S / scale
