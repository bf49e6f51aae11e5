"""The LSEF modules (docs/DESIGN.md §11): SEM, DDM, CIM and the LSEF classifier/regressor, plus
baselines.

Every module works on frame-feature sequences ``X (B, T, D)`` from any backbone. The math of
each is written out in docs/DESIGN.md §10. Each LSEF module takes ``ops="ext"`` (the compiled
``torch.ops.lsef`` kernels, the default) or ``ops="ref"`` (the pure-PyTorch references in
``lsef_ref``): the same model on either, which is how the benchmark compares them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import _check_int, _check_number, _check_tensor, get_ops

__all__ = [
    "get_ops",
    "SEM",
    "DDM",
    "CIM",
    "LSEF",
    "LSEFOutput",
    "MeanPoolMLP",
    "TemporalTransformer",
    "build_model",
    "MODEL_NAMES",
]


def _check_input(module: str, X: Tensor, D: int, name: str = "X") -> None:
    """The input of a module's forward: a floating-point tensor (B, T, D) with T >= 2 (shape
    and dtype only, never values). B = 0 is allowed: the output is empty too."""
    _check_tensor(module, name, X)
    if not X.dtype.is_floating_point:
        raise TypeError(f"{module}: {name} must be a floating-point tensor, got {X.dtype}")
    if X.dim() != 3 or X.shape[-1] != D:
        raise ValueError(f"{module}: expected {name} of shape (B, T, {D}), got {tuple(X.shape)}")
    if X.shape[1] < 2:
        raise ValueError(f"{module}: needs at least 2 frames, got T = {X.shape[1]}")


def _check_lengths(module: str, lengths, X: Tensor) -> Optional[List[int]]:
    """The ``lengths`` of a model's forward (``X`` checked): ``None`` or a 1-D integer tensor
    ``(B,)`` of values in ``[1, T]``, the valid (leading) frames of each clip. Returns the
    lengths as a list, or ``None`` when there are none or every clip has all ``T`` frames (the
    unmasked path). Reads the values once (one device synchronisation on a GPU)."""
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor):
        raise TypeError(
            f"{module}: lengths must be an integer tensor of shape (B,), got "
            f"{type(lengths).__name__}"
        )
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{module}: lengths must be an integer tensor, got {lengths.dtype}")
    B, T = X.shape[:2]
    if lengths.shape != (B,):
        raise ValueError(
            f"{module}: lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}"
        )
    lens = lengths.tolist()
    for v in lens:
        if not 1 <= v <= T:
            raise ValueError(f"{module}: lengths must be in [1, T] = [1, {T}], got {v}")
    return None if all(v == T for v in lens) else lens


def _frame_mask(lens: List[int], X: Tensor) -> Tensor:
    """``(B, T, 1)`` bool, True at the valid frames of each clip."""
    lengths = torch.tensor(lens, device=X.device)
    return (torch.arange(X.shape[1], device=X.device) < lengths[:, None])[..., None]


def _check_mask(
    module: str, mask, X: Tensor, lens: Optional[List[int]]
) -> Optional[Tuple[Tensor, List[int]]]:
    """The ``mask`` of a model's forward (``X`` and ``lengths`` checked, ``lens`` what
    :func:`_check_lengths` returned): ``None`` or a bool tensor ``(B, T)`` or ``(B, T, 1)``,
    True at the valid frames, on ``X``'s device.

    Returns ``(valid, counts)``: ``valid (B, T)`` bool, the frames that are valid by both the
    mask and the lengths, and ``counts``, the number of them in each clip; or ``None`` where
    there is no mask or it marks no frame within the lengths as invalid (the paths without a
    mask). Reads the mask once (one device synchronisation on a GPU).

    Raises:
        TypeError: ``mask`` not a tensor, or not of dtype bool.
        ValueError: ``mask`` of another shape or on another device than ``X``; a clip left
            without a valid frame.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{module}: mask must be a bool tensor of shape (B, T) (True = valid frame), got "
            f"{type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{module}: mask must be a bool tensor (True = valid frame), got {mask.dtype}"
        )
    B, T = X.shape[:2]
    if tuple(mask.shape) == (B, T, 1):
        mask = mask[..., 0]
    elif tuple(mask.shape) != (B, T):
        raise ValueError(
            f"{module}: mask must have shape (B, T) = ({B}, {T}) or (B, T, 1), got "
            f"{tuple(mask.shape)}"
        )
    if mask.device != X.device:
        raise ValueError(f"{module}: mask is on {mask.device} but X is on {X.device}")
    valid = mask if lens is None else mask & _frame_mask(lens, X)[..., 0]
    counts = valid.sum(1).tolist()
    for i, c in enumerate(counts):
        if c == 0:
            within = "" if lens is None else f" within its lengths[{i}] = {lens[i]} frames"
            raise ValueError(
                f"{module}: mask leaves clip {i} no valid frame{within}; every clip needs one"
            )
    return None if counts == (lens or [T] * B) else (valid, counts)


def _valid_frames(module: str, X: Tensor, lengths, mask) -> Optional[Tensor]:
    """The baselines' frame mask: ``(B, T, 1)`` bool, True at the frames that both ``lengths``
    and ``mask`` call valid, or ``None`` where every frame is (both checked, as
    :func:`_check_lengths` and :func:`_check_mask` do)."""
    lens = _check_lengths(module, lengths, X)
    checked = _check_mask(module, mask, X, lens)
    if checked is not None:
        return checked[0][..., None]
    return None if lens is None else _frame_mask(lens, X)


def _mean_over(x: Tensor, m: Optional[Tensor], dim: int) -> Tensor:
    """``x.mean(dim)``, or with ``m`` (bool, broadcastable to ``x``, True somewhere along
    ``dim`` in every slice) the mean over the entries where ``m`` is True."""
    if m is None:
        return x.mean(dim)
    return torch.where(m, x, 0).sum(dim) / m.sum(dim).to(x.dtype)


def _max_over(x: Tensor, m: Optional[Tensor], dim: int) -> Tensor:
    """``x.amax(dim)``, or with ``m`` (as for :func:`_mean_over`) the maximum where it is True."""
    if m is None:
        return x.amax(dim)
    return torch.where(m, x, float("-inf")).amax(dim)


def _check_sizes(module: str, **sizes) -> None:
    """Each size an integer >= 1 (TypeError, ValueError naming it)."""
    for name, value in sizes.items():
        _check_int(module, name, value, 1)


def _check_task(module: str, task) -> None:
    if task not in ("classification", "regression"):
        raise ValueError(f"{module}: task must be 'classification' or 'regression', got {task!r}")


def _check_dropout(module: str, dropout) -> None:
    _check_number(module, "dropout", dropout)
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{module}: dropout must be in [0, 1], got {dropout}")


def _check_positive(module: str, name: str, value) -> None:
    """A finite number > 0."""
    _check_number(module, name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{module}: {name} must be a finite number > 0, got {value}")


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@torch.no_grad()
def robust_scale(R: Tensor, max_entries: int = 2048) -> Tensor:
    """Per-matrix noise scale of ``R (B, T, D)``: ``1.4826 · median |R − median R|`` (the MAD,
    consistent for Gaussian noise, unmoved by a minority of outliers), shape ``(B, 1, 1)``.
    Larger matrices are estimated from ``max_entries`` evenly strided entries (a sorting
    median costs more than the rest of DDM; the subsample's relative error is about
    ``1 / sqrt(max_entries)``)."""
    flat = R.flatten(1)
    if flat.shape[1] > max_entries:
        flat = flat[:, :: -(-flat.shape[1] // max_entries)]
    med = flat.median(1, keepdim=True).values
    return (1.4826 * (flat - med).abs().median(1).values).clamp_min(1e-6)[:, None, None]


@torch.no_grad()
def _robust_scale_leading(R: Tensor, m: Tensor, max_entries: int = 2048) -> Tensor:
    """:func:`robust_scale` of each clip's valid frames, where they lead: ``m (B, T, 1)`` is
    True on the first ``n_i`` frames of clip ``i``. Clip ``i`` gets what ``robust_scale`` gives
    on ``R[i:i+1, :n_i]`` alone: the same evenly strided entries, the same lower medians (found
    by sorting, the entries past each clip's count sorted last as +inf). Shape ``(B, 1, 1)``."""
    B, T, D = R.shape
    flat = R.flatten(1)
    N = m.sum((1, 2)) * D  # valid entries per clip, in the leading T·D of the flat row
    step = torch.where(N > max_entries, -(-N // max_entries), torch.ones_like(N))
    count = -(-N // step)
    j = torch.arange(min(T * D, max_entries), device=R.device)
    inside = j < count[:, None]
    v = flat.gather(1, (j * step[:, None]).clamp_max(T * D - 1))
    inf = torch.full((), float("inf"), dtype=R.dtype, device=R.device)
    mid = ((count - 1) // 2)[:, None]
    med = torch.where(inside, v, inf).sort(1).values.gather(1, mid)
    mad = torch.where(inside, (v - med).abs(), inf).sort(1).values.gather(1, mid)
    return (1.4826 * mad[:, 0]).clamp_min(1e-6)[:, None, None]


class SEM(nn.Module):
    """Stability Encoding Module.

    The low-rank part is found in the input feature space, where "sparse" still means a few
    entries (projecting first would smear an outlier over every channel):

    1. ``S0 = lowrank_sparse(X, rank, lam=rpca_lam, n_steps=rpca_steps)`` (robust PCA, a few
       inexact-ALM iterations, no gradient): where the outliers are. ``rpca_lam`` defaults to
       ``2 / sqrt(max(T, D))``, twice the noiseless PCP weight, so that dense noise and weak
       structure stay out of ``S0`` (docs/DESIGN.md §10);
    2. ``L = lowrank(X − S0, rank)``: the stable part, differentiable in ``X``;
    3. the learnable projection ``Z_L = L W_p`` (``d_in → d_model``; still rank ≤ ``rank``);
    4. the tone embedding ``e = GELU(W_e LN([mean_t Z_L, rms_t Z_L]))``: statistics of the
       stable part that do not depend on the sign or rotation ambiguity of its singular vectors.

    ``rpca_steps=0`` skips step 1 (``L = lowrank(X, rank)``). Returns ``(L, Z_L, tone)``.
    """

    def __init__(
        self,
        d_in: int,
        d_model: int = 64,
        rank: int = 4,
        rpca_steps: int = 3,
        rpca_lam: Optional[float] = None,
        ops: str = "ext",
    ):
        super().__init__()
        _check_sizes("SEM", d_in=d_in, d_model=d_model, rank=rank)
        _check_int("SEM", "rpca_steps", rpca_steps, 0)
        if rpca_lam is not None:
            _check_positive("SEM", "rpca_lam", rpca_lam)
        self.d_in, self.d_model, self.rank, self.rpca_steps = d_in, d_model, rank, rpca_steps
        self.rpca_lam = rpca_lam
        self.ops = get_ops(ops)
        self.proj = nn.Linear(d_in, d_model)
        self.tone = nn.Sequential(
            nn.LayerNorm(2 * d_model), nn.Linear(2 * d_model, d_model), nn.GELU()
        )

    def decompose(self, X: Tensor) -> Tensor:
        """The stable part ``L (B, T, d_in)`` of ``X``."""
        return self._decompose(X)

    def _decompose(self, X: Tensor, m: Optional[Tensor] = None, k: Optional[int] = None) -> Tensor:
        """:meth:`decompose`; with ``m (B, T, 1)``, True at the valid frames (``X`` 0 at the
        others), the robust PCA is told which frames (rows) are missing, ``rpca_lam`` defaults
        to ``2 / sqrt(max(n, D))`` with ``n`` each clip's valid frames (the weight of the clip of
        its valid frames alone), and ``L`` is 0 at the masked frames. ``k`` (default
        ``min(rank, T, D)``) must not exceed any clip's valid frames."""
        if k is None:
            k = min(self.rank, X.shape[1], X.shape[2])
        if self.rpca_steps:
            with torch.no_grad():
                S0 = self._outliers(X.detach(), m, k)
            L = self.ops.lowrank(X - S0, k)
        else:
            L = self.ops.lowrank(X, k)
        return L if m is None else torch.where(m, L, 0)

    def _outliers(self, X: Tensor, m: Optional[Tensor], k: int) -> Tensor:
        """``S0``, the sparse part of SEM's robust PCA of ``X`` (see :meth:`_decompose`). With
        a mask and the default weight, clips of different weights (more valid frames than
        ``D``, in different counts) are solved apart, one call per weight, so that the weight
        is a number, which both op sets take."""
        steps = self.rpca_steps
        if self.rpca_lam is not None or m is None:
            lam = self.rpca_lam if self.rpca_lam is not None else 2.0 / math.sqrt(max(X.shape[1:]))
            return self.ops.lowrank_sparse(X, k, lam=lam, n_steps=steps, mask=m)[1]
        size = m.sum((1, 2)).clamp_min(X.shape[2])  # max(n, D) of each clip
        values = sorted(set(size.tolist()))
        if len(values) == 1:
            return self.ops.lowrank_sparse(
                X, k, lam=2.0 / math.sqrt(values[0]), n_steps=steps, mask=m
            )[1]
        S0 = torch.zeros_like(X)
        for n in values:
            idx = torch.nonzero(size == n).flatten()
            lam = 2.0 / math.sqrt(n)
            S0[idx] = self.ops.lowrank_sparse(X[idx], k, lam=lam, n_steps=steps, mask=m[idx])[1]
        return S0

    def embed(self, L: Tensor, m: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(Z_L, tone)`` of a stable part ``L``; with ``m (B, T, 1)`` the tone's statistics
        are over the frames where ``m`` is True."""
        Z = self.proj(L)
        stats = torch.cat(
            [_mean_over(Z, m, 1), _mean_over(Z.pow(2), m, 1).add(1e-6).sqrt()], dim=-1
        )
        return Z, self.tone(stats)

    def forward(self, X: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        _check_input("SEM", X, self.d_in)
        return self._forward(X)

    def _forward(
        self, X: Tensor, m: Optional[Tensor] = None, k: Optional[int] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` without the checks (LSEF's own, which also runs one-frame clips);
        ``m``, ``k``: as for :meth:`_decompose` (LSEF's masked path)."""
        L = self._decompose(X, m, k)
        Z, tone = self.embed(L, m)
        return L, Z, tone


class DDM(nn.Module):
    """Dynamic Decoupling Module.

    ``S = soft_threshold(X, L, lam · σ)``: per-channel learnable thresholds
    ``lam = softplus(θ) > 0`` in units of ``σ``, the clip's robust noise scale (MAD of
    ``X − L``, no gradient), so the same ``θ`` serves clips and test conditions of any noise
    level. ``refine`` unrolled robust-PCA steps ``L ← lowrank(X − S)``,
    ``S ← soft_threshold(X, L, lam σ)`` follow. The transient encoder reads
    ``S̃ = c σ tanh(S / (c σ))`` (``c = softplus(φ)`` per channel: one entry can move the
    encoding only so far, so an isolated outlier cannot pass for an event spread over channels),
    projects it to ``d_model`` channels (``Z_S``), applies a temporal convolution (kernel 3) and
    GELU, and pools by max and mean over time.

    Returns ``(L, S, Z_S, transient)``.
    """

    def __init__(
        self,
        d_in: int,
        d_model: int = 64,
        rank: int = 4,
        refine: int = 1,
        lam_init: float = 1.0,
        sat_init: float = 1.5,
        ops: str = "ext",
    ):
        super().__init__()
        _check_sizes("DDM", d_in=d_in, d_model=d_model, rank=rank)
        _check_int("DDM", "refine", refine, 0)
        _check_number("DDM", "lam_init", lam_init)
        _check_number("DDM", "sat_init", sat_init)
        if not all(v > 0 and math.isfinite(v) for v in (lam_init, sat_init)):
            raise ValueError(
                f"DDM: lam_init and sat_init must be > 0 and finite, got {lam_init}, {sat_init}"
            )
        self.d_in, self.d_model, self.rank, self.refine = d_in, d_model, rank, refine
        self.ops = get_ops(ops)
        self.theta = nn.Parameter(torch.full((d_in,), _inverse_softplus(lam_init)))
        self.phi = nn.Parameter(torch.full((d_in,), _inverse_softplus(sat_init)))
        self.proj = nn.Linear(d_in, d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)
        self.out = nn.Linear(2 * d_model, d_model)

    @property
    def lam(self) -> Tensor:
        """Per-channel thresholds in units of the clip's noise scale, ``softplus(θ) > 0``."""
        return F.softplus(self.theta)

    def forward(self, X: Tensor, L: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_input("DDM", X, self.d_in)
        _check_tensor("DDM", "L", L)
        if L.shape != X.shape:
            raise ValueError(f"DDM: L must have X's shape {tuple(X.shape)}, got {tuple(L.shape)}")
        return self._forward(X, L)

    def _forward(
        self, X: Tensor, L: Tensor, m: Optional[Tensor] = None, k: Optional[int] = None
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`forward` without the checks (LSEF's own, which also runs one-frame clips).

        LSEF's masked path: ``m (B, T, 1)`` is True on the first ``n_i`` frames of clip ``i``
        (its valid ones; ``X`` and ``L`` are 0 after them) and ``k`` the rank (default
        ``min(rank, T, D)``). The noise scale is then each clip's over its valid entries,
        ``L``, ``S`` and ``Z_S`` are 0 at the masked frames (so the convolution sees them as
        its zero padding), and the pooling runs over the valid frames: each clip's transient
        embedding is what it would be on the clip of its valid frames alone."""
        if m is None:
            sigma = robust_scale(X - L).to(X.dtype)
        else:
            sigma = _robust_scale_leading(X - L, m).to(X.dtype)
        lam = self.lam.to(X.dtype) * sigma
        S = self.ops.soft_threshold(X, L, lam)
        if k is None:
            k = min(self.rank, X.shape[1], X.shape[2])
        for _ in range(self.refine):
            L = self.ops.lowrank(X - S, k)
            if m is not None:
                L = torch.where(m, L, 0)
            S = self.ops.soft_threshold(X, L, lam)
        c = F.softplus(self.phi).to(X.dtype) * sigma
        Z = self.proj(c * torch.tanh(S / c))
        if m is not None:
            Z = torch.where(m, Z, 0)
        h = F.gelu(self.conv(Z.transpose(1, 2)))  # (B, d, T)
        mt = None if m is None else m.transpose(1, 2)  # (B, 1, T)
        transient = self.out(torch.cat([_max_over(h, mt, -1), _mean_over(h, mt, -1)], dim=-1))
        return L, S, Z, transient


class CIM(nn.Module):
    """Consistency Integration Module.

    At each temporal scale ``s`` in ``scales``, pool the projected stable stream ``Z_L`` by
    averaging windows of ``s`` frames and the projected sparse stream ``Z_S`` by the
    signed entry of largest magnitude per window (so short events survive pooling), and fuse
    them with a learned gate: ``g = sigmoid(W_g [L_s, S_s])``,
    ``F_s = g ⊙ (L_s W_l) + (1 − g) ⊙ (S_s W_r)``; each scale is summarised as
    ``h_s = W_o [mean_t F_s, max_t F_s]``. The output is ``mean_s h_s``. The consistency terms
    (scalars) of :class:`LSEF`, which computes the first two itself:

    * ``recon``: ``mean (X − L − S)²`` per entry, what the decomposition leaves unexplained;
    * ``sparsity``: ``mean |S|``;
    * ``agreement``: ``mean_s mean (h_s − mean_s h_s)²``, agreement across scales:
      ``CIM.agreement(H)`` of the ``H`` that ``forward`` returns.

    Returns ``(fused, H)``: ``fused (B, d_model) = mean_s h_s`` and ``H (n_scales, B, d_model)``,
    the per-scale summaries ``h_s`` stacked in the order of ``scales``.
    """

    def __init__(self, d_model: int = 64, scales: Sequence[int] = (1, 2, 4)):
        super().__init__()
        _check_sizes("CIM", d_model=d_model)
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
            raise TypeError(
                f"CIM: scales must be a sequence of positive integers, got "
                f"{type(scales).__name__} {scales!r}"
            )
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in scales):
            raise TypeError(f"CIM: scales must be positive integers, got {tuple(scales)}")
        if not scales or any(s < 1 for s in scales):
            raise ValueError(f"CIM: scales must be positive integers, got {tuple(scales)}")
        self.d_model, self.scales = d_model, tuple(scales)
        self.gate = nn.Linear(2 * d_model, d_model)
        self.stable = nn.Linear(d_model, d_model)
        self.reactive = nn.Linear(d_model, d_model)
        self.out = nn.Linear(2 * d_model, d_model)

    @staticmethod
    def _pool(x: Tensor, s: int, signed_max: bool) -> Tensor:
        if s == 1:
            return x
        B, T, d = x.shape
        n = T // s
        if n == 0:
            return x.mean(1, keepdim=True)
        w = x[:, : n * s].reshape(B, n, s, d)
        if not signed_max:
            return w.mean(2)
        hi, lo = w.amax(2), w.amin(2)  # the signed entry of largest magnitude
        return torch.where(hi >= -lo, hi, lo)

    def forward(self, ZL: Tensor, ZS: Tensor) -> Tuple[Tensor, Tensor]:
        _check_input("CIM", ZL, self.d_model, "Z_L")
        _check_tensor("CIM", "Z_S", ZS)
        if ZS.shape != ZL.shape:
            raise ValueError(
                f"CIM: Z_S must have Z_L's shape {tuple(ZL.shape)}, got {tuple(ZS.shape)}"
            )
        return self._forward(ZL, ZS)

    @staticmethod
    def _pool_leading(x: Tensor, s: int, signed_max: bool, m: Tensor) -> Tuple[Tensor, Tensor]:
        """:meth:`_pool` of clips whose valid frames lead (``m (B, T, 1)`` True on the first
        ``n_i`` frames of clip ``i``), as it pools each clip of its valid frames alone: the
        windows that lie within the ``n_i`` frames, or for a clip with ``n_i < s`` one window,
        the mean of its frames. Returns the windows ``(B, W, d)`` and which of them count,
        ``(B, W, 1)`` bool."""
        if s == 1:
            return x, m
        n = m.sum(1, keepdim=True)  # (B, 1, 1)
        mean = _mean_over(x, m, 1)[:, None]  # (B, 1, d)
        W = x.shape[1] // s
        if W == 0:  # every clip is shorter than s
            return mean, torch.ones_like(m[:, :1])
        j = torch.arange(W, device=x.device)[None, :, None]
        short = (j == 0) & (n < s)  # the first window of a clip shorter than s
        windows = torch.where(short, mean, CIM._pool(x, s, signed_max))
        return windows, ((j + 1) * s <= n) | short

    def _forward(self, ZL: Tensor, ZS: Tensor, m: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """:meth:`forward` without the checks (LSEF's own, which also runs one-frame clips).
        LSEF's masked path: ``m (B, T, 1)`` True on each clip's leading valid frames; each clip
        is pooled as the clip of its valid frames alone (:meth:`_pool_leading`), and each
        scale's summary is over the windows that count."""
        hs = []
        for s in self.scales:
            if m is None:
                Ls, Ss, w = self._pool(ZL, s, False), self._pool(ZS, s, True), None
            else:
                Ls, w = self._pool_leading(ZL, s, False, m)
                Ss, _ = self._pool_leading(ZS, s, True, m)
            g = torch.sigmoid(self.gate(torch.cat([Ls, Ss], -1)))
            Fs = g * self.stable(Ls) + (1 - g) * self.reactive(Ss)
            hs.append(self.out(torch.cat([_mean_over(Fs, w, 1), _max_over(Fs, w, 1)], -1)))
        H = torch.stack(hs)  # (n_scales, B, d)
        return H.mean(0), H

    @staticmethod
    def agreement(H: Tensor) -> Tensor:
        """The cross-scale agreement term ``mean_s mean (h_s − mean_s h_s)²`` of the per-scale
        summaries ``H (n_scales, B, d_model)`` that :meth:`forward` returns (0 for one scale)."""
        return (H - H.mean(0)).pow(2).mean()


@dataclass
class LSEFOutput:
    """What :class:`LSEF` returns: the prediction, the decomposition and the consistency terms.

    A registered pytree node (docs/DESIGN.md §13): ``torch.export`` and ``torch.utils._pytree``
    flatten it into ``pred``, ``L``, ``S`` and the tensors of ``terms`` (a dict, keyed by name),
    so an LSEF model exports whole and its exported program returns an ``LSEFOutput`` again."""

    pred: Tensor  # (B, num_classes) logits or (B, num_targets) regression values in [-1, 1]
    L: Tensor  # (B, T, d_in) stable part (0 in padded and masked frames)
    S: Tensor  # (B, T, d_in) sparse part (0 in padded and masked frames)
    terms: Dict[str, Tensor] = field(default_factory=dict)


torch.export.register_dataclass(LSEFOutput, serialized_type_name="lsef_ext.nn.LSEFOutput")


class LSEF(nn.Module):
    """SEM + DDM + CIM + a head: the LSEF model on ``(B, T, d_in)`` feature sequences.

    ``task="classification"`` gives ``num_classes`` logits; ``"regression"`` gives
    ``num_targets`` values in ``[-1, 1]`` (tanh; the default 2 is valence and arousal). The head
    (LayerNorm, dropout, two layers) reads ``[tone, transient, fused]``.

    ``forward(X, lengths=None)``: ``lengths (B,)``, an integer tensor of values in ``[1, T]``,
    says that clip ``i`` has ``lengths[i]`` valid frames and is padded after them (None: every
    clip has all ``T``). Padded frames change no output: SEM's robust PCA, DDM's noise scale,
    the low-rank projections and CIM's pooling all depend on the clip's length and on every
    frame, so zeroing the padding would not be exact; instead the clips are grouped by length
    and each group runs on its valid frames only (one pass per distinct length in the batch),
    with the results put back in batch order (``mask`` below gives the same results, to
    rounding, in one masked pass). ``pred`` is then the prediction of each clip alone;
    ``L`` and ``S`` are 0 in padded frames; ``recon`` and ``sparsity`` are means over valid
    entries, and ``agreement`` is taken over the per-scale summaries of every clip. When every
    length is ``T`` the batch takes the single-pass path, exactly as without ``lengths``.

    ``forward(X, mask=...)``: a frame-validity mask, bool ``(B, T)`` (or ``(B, T, 1)``), True at
    the valid frames, e.g. False where face detection failed; ``lengths`` may come with it
    (a frame is then valid where both say so). Every clip needs one valid frame. Masked frames
    are cut out of their clip: each clip gives what the clip of its valid frames alone (in
    their order) gives, and what the masked frames hold (NaN included) changes no output and
    gets no gradient. This runs in one pass: the valid frames of each clip are moved to its
    front, the frames after them are marked missing (``mask=(B, T, 1)``) to SEM's robust PCA,
    whose ``lam`` default then counts the valid frames only, and DDM's noise scale,
    convolution and pooling and CIM's windows leave them out (clips with fewer valid frames
    than ``rank`` run apart, one pass per such count). ``L`` and ``S`` are 0 at masked frames,
    and the consistency terms are as with ``lengths``. A mask that marks no frame invalid
    (within the lengths) changes nothing: the output is exactly that without it.

    Ablations (``use_sem``, ``use_ddm``, ``use_cim``):

    * without SEM, no low-rank part: ``L = 0``, the tone embedding reads the projected ``X``;
    * without DDM, no sparse decoupling: ``S = X − L`` (no threshold, no refinement, no
      saturation), projected by a plain linear map, and the transient embedding is 0;
    * without CIM, ``fused = W [mean_t Z_L, mean_t Z_S]`` (one scale, no gate) and the
      agreement term is absent.

    ``loss_weights`` weigh (recon, sparsity, agreement) in :meth:`regulariser`.

    Sizes (``d_in``, ``num_classes``, ``num_targets``, ``d_model``, ``rank``) must be integers
    >= 1; a bad argument raises TypeError or ValueError naming it (and the part, SEM, DDM or CIM,
    that checks it), and so does a bad ``lengths`` or ``mask``. An empty batch (``B = 0``) is valid:
    ``pred`` is ``(0, num_classes)`` (or ``(0, num_targets)``), ``L`` and ``S`` are
    ``(0, T, d_in)``, and the consistency terms, sums over no clips, are 0 (means over nothing
    would be NaN and would poison a loss they are added to).
    """

    def __init__(
        self,
        d_in: int,
        num_classes: int = 7,
        d_model: int = 64,
        rank: int = 4,
        rpca_steps: int = 3,
        rpca_lam: Optional[float] = None,
        refine: int = 1,
        scales: Sequence[int] = (1, 2, 4),
        task: str = "classification",
        use_sem: bool = True,
        use_ddm: bool = True,
        use_cim: bool = True,
        loss_weights: Tuple[float, float, float] = (0.01, 0.01, 0.1),
        dropout: float = 0.1,
        ops: str = "ext",
        num_targets: int = 2,
    ):
        super().__init__()
        _check_task("LSEF", task)
        _check_sizes("LSEF", num_classes=num_classes, num_targets=num_targets)
        _check_dropout("LSEF", dropout)
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise TypeError(
                "LSEF: loss_weights must be a sequence of three numbers (recon, sparsity, "
                f"agreement), got {type(loss_weights).__name__}"
            )
        if len(loss_weights) != 3:
            raise ValueError(
                "LSEF: loss_weights must be three numbers (recon, sparsity, agreement), got "
                f"{len(loss_weights)}: {tuple(loss_weights)}"
            )
        for w in loss_weights:
            _check_number("LSEF", "each of loss_weights", w)
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(
                    f"LSEF: loss_weights must be finite numbers >= 0, got {tuple(loss_weights)}"
                )
        self.task, self.d_in, self.d_model = task, d_in, d_model
        self.num_targets = num_targets
        self.use_sem, self.use_ddm, self.use_cim = use_sem, use_ddm, use_cim
        self.loss_weights = tuple(loss_weights)
        self.sem = SEM(d_in, d_model, rank, rpca_steps, rpca_lam, ops)
        if use_ddm:
            # Without SEM there is no low-rank part, so DDM must not rebuild one by refinement.
            self.ddm = DDM(d_in, d_model, rank, refine if use_sem else 0, ops=ops)
        else:
            self.sparse_proj = nn.Linear(d_in, d_model)
        if use_cim:
            self.cim = CIM(d_model, scales)
        else:
            self.plain = nn.Linear(2 * d_model, d_model)
        out = num_classes if task == "classification" else num_targets
        self.head = nn.Sequential(
            nn.LayerNorm(3 * d_model),
            nn.Dropout(dropout),
            nn.Linear(3 * d_model, d_model),
            nn.GELU(),
            nn.Linear(d_model, out),
        )

    def forward(
        self, X: Tensor, lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> LSEFOutput:
        """``X (B, T, d_in)``; ``lengths (B,)``, the valid frames of each clip (clips are
        grouped by length, one pass per distinct length); ``mask (B, T)`` or ``(B, T, 1)``
        bool, True at the valid frames (one masked pass). See the class docstring.

        Raises:
            TypeError: ``X``, ``lengths`` or ``mask`` of the wrong type or dtype.
            ValueError: ``X`` not ``(B, T, d_in)`` with ``T >= 2``; ``lengths`` not ``(B,)``
                in ``[1, T]``; ``mask`` not ``(B, T)`` or ``(B, T, 1)``, on another device than
                ``X``, or leaving a clip without a valid frame (within its length).
        """
        _check_input("LSEF", X, self.d_in)
        lens = _check_lengths("LSEF", lengths, X)
        masked = _check_mask("LSEF", mask, X, lens)
        if masked is not None:
            return self._forward_masked(X, *masked)
        if lens is not None:
            return self._forward_grouped(X, lens)
        pred, L, S, H = self._forward_full(X)
        # An empty batch: sums over no clips (0) where the means would be NaN.
        reduce = torch.mean if X.shape[0] else torch.sum
        terms = {"recon": reduce((X - L - S).pow(2)), "sparsity": reduce(S.abs())}
        if H is not None:
            terms["agreement"] = CIM.agreement(H) if X.shape[0] else (H - H.mean(0)).pow(2).sum()
        return LSEFOutput(pred, L, S, terms)

    def _forward_full(
        self, X: Tensor, m: Optional[Tensor] = None, k: Optional[int] = None
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """``(pred, L, S, H)`` of clips that all have their ``T`` frames (``X`` checked, any
        ``T >= 1``: a group of one-frame clips comes here too); ``H (n_scales, B, d_model)`` is
        CIM's per-scale summaries, None without CIM. With ``m (B, T, 1)``, True on each clip's
        leading ``n_i`` frames (``X`` 0 after them), and the rank ``k <= min n_i``: each clip as
        the clip of its first ``n_i`` frames alone, ``L`` and ``S`` 0 after them."""
        if self.use_sem:
            L, ZL, tone = self.sem._forward(X, m, k)
        else:
            L = torch.zeros_like(X)
            ZL, tone = self.sem.embed(X, m)
        if self.use_ddm:
            L, S, ZS, transient = self.ddm._forward(X, L, m, k)
            if self.use_sem:  # the stable stream follows the refined L
                ZL = self.sem.proj(L)
        else:
            S = X - L
            ZS, transient = self.sparse_proj(S), torch.zeros_like(tone)
        if self.use_cim:
            fused, H = self.cim._forward(ZL, ZS, m)
        else:
            fused = self.plain(torch.cat([_mean_over(ZL, m, 1), _mean_over(ZS, m, 1)], -1))
            H = None
        pred = self.head(torch.cat([tone, transient, fused], -1))
        if self.task == "regression":
            pred = torch.tanh(pred)
        return pred, L, S, H

    def _forward_grouped(self, X: Tensor, lens: List[int]) -> LSEFOutput:
        """The forward of clips of lengths ``lens`` (``B >= 1``, not all ``T``): one
        :meth:`_forward_full` per distinct length, on that group's valid frames, the results
        put back in batch order (``L``, ``S`` padded with zeros)."""
        groups: Dict[int, List[int]] = {}
        for i, n in enumerate(lens):
            groups.setdefault(n, []).append(i)
        parts = (
            (members, X[torch.tensor(members, device=X.device), :n], None, None)
            for n, members in groups.items()
        )
        return self._forward_parts(X, parts, sum(lens) * X.shape[2])

    def _forward_masked(self, X: Tensor, valid: Tensor, counts: List[int]) -> LSEFOutput:
        """The forward of clips with frame mask ``valid (B, T)`` (``counts`` valid frames each,
        at least one; not all valid): each clip as the clip of its valid frames alone, in one
        masked pass.

        The valid frames of each clip are moved to its front, in order (a stable sort), and
        the frames after them masked: SEM's robust PCA is told they are missing, and every
        statistic, the convolution and the pooling leave them out, exactly as for a clip that
        ends there. What the masked frames held is never read (they are set to 0 first). Clips
        with fewer valid frames than the rank run apart (one pass per such count), since the
        rank of a batch cannot exceed any of its clips' valid frames."""
        B, T, D = X.shape
        perm = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        index = perm[..., None].expand(-1, -1, D)
        m = (torch.arange(T, device=X.device) < valid.sum(1, keepdim=True))[..., None]
        Xc = torch.where(m, X.gather(1, index), 0)  # (B, T, D), valid frames first
        full = min(self.sem.rank, T, D)
        groups: Dict[int, List[int]] = {}
        for i, n in enumerate(counts):
            groups.setdefault(min(full, n), []).append(i)
        if len(groups) == 1:
            parts = [(list(range(B)), Xc, m, next(iter(groups)))]
        else:
            idx = {k: torch.tensor(members, device=X.device) for k, members in groups.items()}
            parts = [(members, Xc[idx[k]], m[idx[k]], k) for k, members in groups.items()]
        out = self._forward_parts(X, parts, sum(counts) * D)
        # back to the frames' own places; L and S are 0 at the masked frames
        out.L = torch.zeros_like(out.L).scatter(1, index, out.L)
        out.S = torch.zeros_like(out.S).scatter(1, index, out.S)
        return out

    def _forward_parts(self, X: Tensor, parts, valid_entries: int) -> LSEFOutput:
        """The output of a batch ``X`` run in parts ``(members, Xg, m, k)`` (the batch
        positions of ``Xg``'s clips, their frames, and ``m``, ``k`` for :meth:`_forward_full`,
        None: unmasked), put back in batch order (``L``, ``S`` padded with zeros to ``T``);
        ``recon`` and ``sparsity`` are means over ``valid_entries`` entries."""
        T = X.shape[1]
        order, preds, Ls, Ss, Hs = [], [], [], [], []
        recon = sparsity = X.new_zeros(())
        for members, Xg, m, k in parts:
            pred, L, S, H = self._forward_full(Xg) if m is None else self._forward_full(Xg, m, k)
            recon = recon + (Xg - L - S).pow(2).sum()
            sparsity = sparsity + S.abs().sum()
            order += members
            preds.append(pred)
            Ls.append(F.pad(L, (0, 0, 0, T - Xg.shape[1])))
            Ss.append(F.pad(S, (0, 0, 0, T - Xg.shape[1])))
            Hs.append(H)
        inv = torch.tensor(order, device=X.device).argsort()  # batch position -> row of cat
        terms = {"recon": recon / valid_entries, "sparsity": sparsity / valid_entries}
        if self.use_cim:
            terms["agreement"] = CIM.agreement(torch.cat(Hs, 1)[:, inv])
        return LSEFOutput(torch.cat(preds)[inv], torch.cat(Ls)[inv], torch.cat(Ss)[inv], terms)

    def regulariser(self, out: LSEFOutput) -> Tensor:
        """``w_recon·recon + w_sparsity·sparsity + w_agreement·agreement`` of an output."""
        total = out.pred.new_zeros(())
        for name, w in zip(("recon", "sparsity", "agreement"), self.loss_weights):
            if name in out.terms and w:
                total = total + w * out.terms[name]
        return total


class MeanPoolMLP(nn.Module):
    """Baseline: LayerNorm, temporal mean-pool, two-layer MLP.

    ``task="classification"`` gives ``num_classes`` logits, ``"regression"`` ``num_targets``
    values in ``[-1, 1]`` (tanh). ``forward(X, lengths=None, mask=None)``: with ``lengths (B,)``
    (integers in ``[1, T]``, the valid frames of each clip) and/or a frame mask ``mask (B, T)``
    (bool, True = valid frame; ``(B, T, 1)`` too) the mean runs over the frames valid by both
    (the LayerNorm is per frame), so padded and masked frames change no output.
    """

    def __init__(
        self,
        d_in: int,
        num_classes: int = 7,
        hidden: int = 192,
        task: str = "classification",
        dropout: float = 0.1,
        num_targets: int = 2,
    ):
        super().__init__()
        _check_sizes(
            "MeanPoolMLP",
            d_in=d_in,
            num_classes=num_classes,
            hidden=hidden,
            num_targets=num_targets,
        )
        _check_task("MeanPoolMLP", task)
        _check_dropout("MeanPoolMLP", dropout)
        self.d_in, self.task, self.num_targets = d_in, task, num_targets
        out = num_classes if task == "classification" else num_targets
        self.net = nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, out),
        )

    def forward(
        self, X: Tensor, lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> Tensor:
        """``X (B, T, d_in)``; ``lengths``, ``mask``: the valid frames (see the class).

        Raises:
            TypeError, ValueError: a bad ``X``, ``lengths`` or ``mask``, as :class:`LSEF`."""
        _check_input("MeanPoolMLP", X, self.d_in)
        valid = _valid_frames("MeanPoolMLP", X, lengths, mask)
        if valid is None:
            pooled = self.net[0](X).mean(1)
        else:  # invalid frames zeroed first: whatever they hold reaches neither output nor grad
            h = self.net[0](torch.where(valid, X, 0.0))
            pooled = torch.where(valid, h, 0.0).sum(1) / valid.sum(1).to(X.dtype)
        y = self.net[1:](pooled)
        return torch.tanh(y) if self.task == "regression" else y


class TemporalTransformer(nn.Module):
    """Baseline: linear embedding + learned positions, a small pre-norm transformer encoder,
    mean-pool over time, linear head.

    ``task="classification"`` gives ``num_classes`` logits, ``"regression"`` ``num_targets``
    values in ``[-1, 1]`` (tanh). ``forward(X, lengths=None, mask=None)``: with ``lengths (B,)``
    (integers in ``[1, T]``, the valid frames of each clip) and/or a frame mask ``mask (B, T)``
    (bool, True = valid frame; ``(B, T, 1)`` too) the invalid frames are masked out of
    attention as keys (``src_key_padding_mask``) and out of the mean, so they change no output
    (in eval mode a padded clip gives what it gives alone, unpadded). Masked frames keep their
    place in time: the valid frames keep their own position embeddings.
    """

    def __init__(
        self,
        d_in: int,
        num_classes: int = 7,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_T: int = 256,
        task: str = "classification",
        dropout: float = 0.1,
        num_targets: int = 2,
    ):
        super().__init__()
        module = "TemporalTransformer"
        _check_sizes(
            module,
            d_in=d_in,
            num_classes=num_classes,
            d_model=d_model,
            layers=layers,
            heads=heads,
            max_T=max_T,
            num_targets=num_targets,
        )
        if d_model % heads:
            raise ValueError(
                f"{module}: d_model must be divisible by heads, got d_model = {d_model}, "
                f"heads = {heads}"
            )
        _check_task(module, task)
        _check_dropout(module, dropout)
        self.d_in, self.task, self.max_T, self.num_targets = d_in, task, max_T, num_targets
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.zeros(max_T, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            2 * d_model,
            dropout,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes if task == "classification" else num_targets)

    def forward(
        self, X: Tensor, lengths: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> Tensor:
        """``X (B, T, d_in)``, ``T <= max_T``; ``lengths``, ``mask``: the valid frames (see
        the class).

        Raises:
            TypeError, ValueError: a bad ``X``, ``lengths`` or ``mask``, as :class:`LSEF`;
                ``T > max_T``."""
        _check_input("TemporalTransformer", X, self.d_in)
        if X.shape[1] > self.max_T:
            raise ValueError(f"TemporalTransformer: T = {X.shape[1]} exceeds max_T = {self.max_T}")
        valid = _valid_frames("TemporalTransformer", X, lengths, mask)
        if valid is None:
            h = self.encoder(self.embed(X) + self.pos[: X.shape[1]])
            pooled = self.norm(h).mean(1)
        else:  # invalid frames zeroed first: whatever they hold reaches neither output nor grad
            h = self.embed(torch.where(valid, X, 0.0)) + self.pos[: X.shape[1]]
            h = self.norm(self.encoder(h, src_key_padding_mask=~valid[..., 0]))
            pooled = torch.where(valid, h, 0.0).sum(1) / valid.sum(1).to(X.dtype)
        y = self.head(pooled)
        return torch.tanh(y) if self.task == "regression" else y


MODEL_NAMES = ("lsef", "lsef-no-sem", "lsef-no-ddm", "lsef-no-cim", "meanpool-mlp", "transformer")


def build_model(
    name: str,
    d_in: int,
    num_classes: int,
    task: str = "classification",
    ops: str = "ext",
    num_targets: int = 2,
    **kw,
) -> nn.Module:
    """A model by name (``MODEL_NAMES``); LSEF variants take LSEF's keyword arguments.
    ``num_targets`` is the number of regression outputs (``task="regression"``)."""
    t = {"task": task, "num_targets": num_targets}
    if name == "lsef":
        return LSEF(d_in, num_classes, ops=ops, **t, **kw)
    if name.startswith("lsef-no-"):
        part = name[len("lsef-no-") :]
        if part not in ("sem", "ddm", "cim"):
            raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
        return LSEF(d_in, num_classes, ops=ops, **t, **{f"use_{part}": False}, **kw)
    if name == "meanpool-mlp":
        return MeanPoolMLP(d_in, num_classes, **t)
    if name == "transformer":
        return TemporalTransformer(d_in, num_classes, **t)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
