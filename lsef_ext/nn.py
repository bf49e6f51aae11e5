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
        k = min(self.rank, X.shape[1], X.shape[2])
        if self.rpca_steps:
            with torch.no_grad():
                lam = (
                    self.rpca_lam
                    if self.rpca_lam is not None
                    else 2.0 / math.sqrt(max(X.shape[1:]))
                )
                _, S0 = self.ops.lowrank_sparse(X.detach(), k, lam=lam, n_steps=self.rpca_steps)
            return self.ops.lowrank(X - S0, k)
        return self.ops.lowrank(X, k)

    def embed(self, L: Tensor) -> Tuple[Tensor, Tensor]:
        Z = self.proj(L)
        stats = torch.cat([Z.mean(1), Z.pow(2).mean(1).add(1e-6).sqrt()], dim=-1)
        return Z, self.tone(stats)

    def forward(self, X: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        _check_input("SEM", X, self.d_in)
        return self._forward(X)

    def _forward(self, X: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` without the checks (LSEF's own, which also runs one-frame clips)."""
        L = self.decompose(X)
        Z, tone = self.embed(L)
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

    def _forward(self, X: Tensor, L: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`forward` without the checks (LSEF's own, which also runs one-frame clips)."""
        sigma = robust_scale(X - L).to(X.dtype)
        lam = self.lam.to(X.dtype) * sigma
        S = self.ops.soft_threshold(X, L, lam)
        k = min(self.rank, X.shape[1], X.shape[2])
        for _ in range(self.refine):
            L = self.ops.lowrank(X - S, k)
            S = self.ops.soft_threshold(X, L, lam)
        c = F.softplus(self.phi).to(X.dtype) * sigma
        Z = self.proj(c * torch.tanh(S / c))
        h = F.gelu(self.conv(Z.transpose(1, 2)))  # (B, d, T)
        transient = self.out(torch.cat([h.amax(-1), h.mean(-1)], dim=-1))
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

    def _forward(self, ZL: Tensor, ZS: Tensor) -> Tuple[Tensor, Tensor]:
        """:meth:`forward` without the checks (LSEF's own, which also runs one-frame clips)."""
        hs = []
        for s in self.scales:
            Ls, Ss = self._pool(ZL, s, False), self._pool(ZS, s, True)
            g = torch.sigmoid(self.gate(torch.cat([Ls, Ss], -1)))
            Fs = g * self.stable(Ls) + (1 - g) * self.reactive(Ss)
            hs.append(self.out(torch.cat([Fs.mean(1), Fs.amax(1)], -1)))
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
    L: Tensor  # (B, T, d_in) stable part (0 in padded frames)
    S: Tensor  # (B, T, d_in) sparse part (0 in padded frames)
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
    frame, so a per-entry mask would not be exact; instead the clips are grouped by length and
    each group runs on its valid frames only (one pass per distinct length in the batch), with
    the results put back in batch order. ``pred`` is then the prediction of each clip alone;
    ``L`` and ``S`` are 0 in padded frames; ``recon`` and ``sparsity`` are means over valid
    entries, and ``agreement`` is taken over the per-scale summaries of every clip. When every
    length is ``T`` the batch takes the single-pass path, exactly as without ``lengths``.

    Ablations (``use_sem``, ``use_ddm``, ``use_cim``):

    * without SEM, no low-rank part: ``L = 0``, the tone embedding reads the projected ``X``;
    * without DDM, no sparse decoupling: ``S = X − L`` (no threshold, no refinement, no
      saturation), projected by a plain linear map, and the transient embedding is 0;
    * without CIM, ``fused = W [mean_t Z_L, mean_t Z_S]`` (one scale, no gate) and the
      agreement term is absent.

    ``loss_weights`` weigh (recon, sparsity, agreement) in :meth:`regulariser`.

    Sizes (``d_in``, ``num_classes``, ``num_targets``, ``d_model``, ``rank``) must be integers
    >= 1; a bad argument raises TypeError or ValueError naming it (and the part, SEM, DDM or CIM,
    that checks it), and so does a bad ``lengths``. An empty batch (``B = 0``) is valid:
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

    def forward(self, X: Tensor, lengths: Optional[Tensor] = None) -> LSEFOutput:
        """``X (B, T, d_in)``; ``lengths (B,)``, the valid frames of each clip (see the class
        docstring: clips are grouped by length, one pass per distinct length)."""
        _check_input("LSEF", X, self.d_in)
        lens = _check_lengths("LSEF", lengths, X)
        if lens is not None:
            return self._forward_grouped(X, lens)
        pred, L, S, H = self._forward_full(X)
        # An empty batch: sums over no clips (0) where the means would be NaN.
        reduce = torch.mean if X.shape[0] else torch.sum
        terms = {"recon": reduce((X - L - S).pow(2)), "sparsity": reduce(S.abs())}
        if H is not None:
            terms["agreement"] = CIM.agreement(H) if X.shape[0] else (H - H.mean(0)).pow(2).sum()
        return LSEFOutput(pred, L, S, terms)

    def _forward_full(self, X: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """``(pred, L, S, H)`` of clips that all have their ``T`` frames (``X`` checked, any
        ``T >= 1``: a group of one-frame clips comes here too); ``H (n_scales, B, d_model)`` is
        CIM's per-scale summaries, None without CIM."""
        if self.use_sem:
            L, ZL, tone = self.sem._forward(X)
        else:
            L = torch.zeros_like(X)
            ZL, tone = self.sem.embed(X)
        if self.use_ddm:
            L, S, ZS, transient = self.ddm._forward(X, L)
            if self.use_sem:  # the stable stream follows the refined L
                ZL = self.sem.proj(L)
        else:
            S = X - L
            ZS, transient = self.sparse_proj(S), torch.zeros_like(tone)
        if self.use_cim:
            fused, H = self.cim._forward(ZL, ZS)
        else:
            fused, H = self.plain(torch.cat([ZL.mean(1), ZS.mean(1)], -1)), None
        pred = self.head(torch.cat([tone, transient, fused], -1))
        if self.task == "regression":
            pred = torch.tanh(pred)
        return pred, L, S, H

    def _forward_grouped(self, X: Tensor, lens: List[int]) -> LSEFOutput:
        """The forward of clips of lengths ``lens`` (``B >= 1``, not all ``T``): one
        :meth:`_forward_full` per distinct length, on that group's valid frames, the results
        put back in batch order (``L``, ``S`` padded with zeros)."""
        T = X.shape[1]
        groups: Dict[int, List[int]] = {}
        for i, n in enumerate(lens):
            groups.setdefault(n, []).append(i)
        order, preds, Ls, Ss, Hs = [], [], [], [], []
        recon = sparsity = X.new_zeros(())
        for n, members in groups.items():
            idx = torch.tensor(members, device=X.device)
            Xg = X[idx, :n]
            pred, L, S, H = self._forward_full(Xg)
            recon = recon + (Xg - L - S).pow(2).sum()
            sparsity = sparsity + S.abs().sum()
            order += members
            preds.append(pred)
            Ls.append(F.pad(L, (0, 0, 0, T - n)))
            Ss.append(F.pad(S, (0, 0, 0, T - n)))
            Hs.append(H)
        inv = torch.tensor(order, device=X.device).argsort()  # batch position -> row of cat
        valid = sum(lens) * X.shape[2]
        terms = {"recon": recon / valid, "sparsity": sparsity / valid}
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
    values in ``[-1, 1]`` (tanh). ``forward(X, lengths=None)``: with ``lengths (B,)`` (integers
    in ``[1, T]``, the valid frames of each clip) the mean runs over the valid frames only
    (the LayerNorm is per frame), so padded frames change no output.
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

    def forward(self, X: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        _check_input("MeanPoolMLP", X, self.d_in)
        lens = _check_lengths("MeanPoolMLP", lengths, X)
        if lens is None:
            pooled = self.net[0](X).mean(1)
        else:  # padded frames zeroed first: whatever they hold reaches neither output nor grad
            mask = _frame_mask(lens, X)
            h = self.net[0](torch.where(mask, X, 0.0))
            n = torch.tensor(lens, dtype=X.dtype, device=X.device)[:, None]
            pooled = torch.where(mask, h, 0.0).sum(1) / n
        y = self.net[1:](pooled)
        return torch.tanh(y) if self.task == "regression" else y


class TemporalTransformer(nn.Module):
    """Baseline: linear embedding + learned positions, a small pre-norm transformer encoder,
    mean-pool over time, linear head.

    ``task="classification"`` gives ``num_classes`` logits, ``"regression"`` ``num_targets``
    values in ``[-1, 1]`` (tanh). ``forward(X, lengths=None)``: with ``lengths (B,)`` (integers
    in ``[1, T]``, the valid frames of each clip) padded frames are masked out of attention as
    keys (``src_key_padding_mask``) and out of the mean, so they change no output (in eval
    mode a clip gives what it gives alone, unpadded).
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

    def forward(self, X: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        _check_input("TemporalTransformer", X, self.d_in)
        if X.shape[1] > self.max_T:
            raise ValueError(f"TemporalTransformer: T = {X.shape[1]} exceeds max_T = {self.max_T}")
        lens = _check_lengths("TemporalTransformer", lengths, X)
        if lens is None:
            h = self.encoder(self.embed(X) + self.pos[: X.shape[1]])
            pooled = self.norm(h).mean(1)
        else:  # padded frames zeroed first: whatever they hold reaches neither output nor grad
            mask = _frame_mask(lens, X)
            h = self.embed(torch.where(mask, X, 0.0)) + self.pos[: X.shape[1]]
            h = self.norm(self.encoder(h, src_key_padding_mask=~mask[..., 0]))
            n = torch.tensor(lens, dtype=X.dtype, device=X.device)[:, None]
            pooled = torch.where(mask, h, 0.0).sum(1) / n
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
