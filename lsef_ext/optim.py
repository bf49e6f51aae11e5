"""RAO: rank-aware optimisation (docs/DESIGN.md §4, §11), a wrapper around any ``torch.optim``
optimizer.

Usage (the one line that changes)::

    opt = RAO(torch.optim.AdamW(model.parameters(), lr=2e-3))

Before every step of the wrapped optimizer, RAO rescales the gradient ``G`` of each matrix
parameter (``W (m, n)``; a higher-rank weight such as a convolution kernel is read as
``(m, prod(rest))``) with the fused ``rank_scale`` op::

    G' = beta·G + (alpha − beta)·U Uᵀ G

where ``U (m, r)`` is an orthonormal basis of the **stable subspace**: the top-``r`` left
singular vectors of ``M``, an exponential moving average of past gradients (``M ← μM + (1−μ)G``),
recomputed with the batched randomized SVD every ``update_every`` steps. ``alpha`` and ``beta``
are adapted from one spectral statistic, the share of the gradient's energy that lies in the
stable subspace, ``ρ = ||Uᵀ G||² / ||G||²``, averaged over steps (``ρ̄``, same ``μ``):

    beta  = 1 − strength·ρ̄                                 (sensitivity: the rest is damped
                                                              only as far as U explains G)
    alpha = min(sqrt((1 − beta²(1 − ρ̄)) / ρ̄), alpha_max)   (smoothness: the persistent part is
                                                              raised so ||G'|| ≈ ||G|| on average)

So when the recent gradients share a few directions (ρ̄ near 1) the minibatch noise outside them
is damped and the consistent directions carry the step; when they do not (ρ̄ small) RAO is
close to the identity. Vectors (biases, norms) pass through unchanged. docs/DESIGN.md §11 has
the reasoning and the ablation that measures it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .ops import _check_int, _check_number, get_ops

__all__ = ["RAO"]

# State entries that torch's SGD, Adam, AdamW, RMSprop and Adagrad keep in the shape of their
# parameter: load_state_dict compares them with the parameters before it loads anything.
_PARAM_SHAPED_STATE = (
    "momentum_buffer",
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "square_avg",
    "grad_avg",
    "sum",
)


def _check_real(p: Tensor, i: int, j: int, group: Dict[str, Any], min_size: int) -> None:
    """Refuses a complex matrix that RAO would scale (its rule and its rsvd are real): a
    TypeError naming the parameter (``param_groups[i]['params'][j]``, and its name where the
    group has ``param_names``) and its dtype. Vectors and small matrices pass through RAO
    unscaled, complex or not."""
    if not (p.is_complex() and p.dim() >= 2 and min(p.shape[0], p[0].numel()) >= min_size):
        return
    names = group.get("param_names")
    name = f" ({names[j]!r})" if isinstance(names, (list, tuple)) and j < len(names) else ""
    raise TypeError(
        f"RAO: parameter param_groups[{i}]['params'][{j}]{name} of shape {tuple(p.shape)} is "
        f"complex ({p.dtype}): RAO scales real matrices only; optimise it with an optimizer "
        "that RAO does not wrap, or as two real parameters (its real and imaginary parts)"
    )


class RAO(torch.optim.Optimizer):
    """Rank-aware gradient scaling around ``optimizer`` (see the module docstring for the rule).

    Args:
        optimizer: any ``torch.optim.Optimizer``; RAO shares its ``param_groups``, so learning
            rate schedulers may be given either object.
        rank: dimension ``r`` of the stable subspace per matrix (capped at ``min(m, n) − 1``).
        update_every: steps between recomputations of ``U``.
        momentum: ``μ`` of the gradient average ``M`` and of ``ρ̄``.
        strength: how far the non-stable part may be damped (``beta ≥ 1 − strength``).
        alpha_max: cap on ``alpha`` (``>= 1``; ``float("inf")`` for no cap).
        min_size: matrices whose smaller side is below this are left alone (``>= 2``: a
            matrix needs a smaller side of 2 for a subspace of rank >= 1).
        ops: ``"ext"`` (compiled kernels) or ``"ref"`` (lsef_ref), as for the modules.

    ``stats()`` reports the current ``alpha``, ``beta`` and ``ρ̄`` of every scaled parameter.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rank: int = 4,
        update_every: int = 10,
        momentum: float = 0.9,
        strength: float = 0.5,
        alpha_max: float = 2.0,
        min_size: int = 8,
        ops: str = "ext",
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"RAO: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        # Checked here, not at the first step: integers are integers, numbers are not NaN.
        _check_int("RAO", "rank", rank, 1)
        _check_int("RAO", "update_every", update_every, 1)
        _check_int("RAO", "min_size", min_size, 2)
        for name, value in (("momentum", momentum), ("strength", strength)):
            _check_number("RAO", name, value)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"RAO: {name} must be in [0, 1), got {value}")
        _check_number("RAO", "alpha_max", alpha_max)
        if not alpha_max >= 1.0:  # NaN too
            raise ValueError(f"RAO: alpha_max must be >= 1, got {alpha_max}")
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                _check_real(p, i, j, group, min_size)
        self.rank, self.update_every, self.momentum = rank, update_every, momentum
        self.strength, self.alpha_max, self.min_size = strength, alpha_max, min_size
        self._ops = get_ops(ops)
        self._step = 0
        self.nonfinite_skips = 0  # gradients left unscaled because they held NaN or Inf
        self._rao: Dict[Tensor, Dict[str, Any]] = {}
        # Not Optimizer.__init__: the wrapped optimizer owns the groups and its state (the
        # properties below read them from it, also after its load_state_dict replaces them).

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def state(self):
        return self.optimizer.state

    def __repr__(self) -> str:
        return (
            f"RAO(rank={self.rank}, update_every={self.update_every}, momentum={self.momentum}, "
            f"strength={self.strength}, alpha_max={self.alpha_max}, ops={self._ops.name!r}, "
            f"optimizer={self.optimizer!r})"
        )

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                if (
                    p.grad is not None
                    and p.dim() >= 2
                    and min(p.shape[0], p[0].numel()) >= self.min_size
                ):
                    yield p

    @torch.no_grad()
    def scale_gradients(self) -> None:
        """Rescale the current gradients in place (what :meth:`step` does before the inner step)."""
        refresh = self._step % self.update_every == 0
        mu = self.momentum
        for p in self._params():
            if p.grad.is_sparse:
                raise RuntimeError("RAO: sparse gradients are not supported")
            G = p.grad.reshape(p.shape[0], -1)
            g2 = float(G.pow(2).sum())
            if not math.isfinite(g2) and not bool(torch.isfinite(G).all()):
                # Left as it is, and RAO's state untouched: one bad batch must not poison the
                # moving average M (and through it every later step).
                self.nonfinite_skips += 1
                warnings.warn(
                    f"RAO: non-finite gradient for a parameter of shape {tuple(p.shape)} "
                    f"at step {self._step}; it is passed on unscaled and RAO's state for "
                    f"it is unchanged ({self.nonfinite_skips} such gradients so far)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            st = self._rao.get(p)
            if st is None:
                st = self._rao[p] = {
                    "M": torch.zeros_like(G),
                    "U": None,
                    "rho": 0.0,
                    "alpha": 1.0,
                    "beta": 1.0,
                }
            st["M"].mul_(mu).add_(G, alpha=1 - mu)
            if refresh:
                r = min(self.rank, min(G.shape) - 1)
                U, _, _ = self._ops.rsvd(st["M"], r)
                st["U"] = U.contiguous()
            U = st["U"]
            if U is None:
                continue
            if g2 == 0.0 or not math.isfinite(g2):  # zero, or finite but its square overflows
                continue
            rho = float((U.T @ G).pow(2).sum()) / g2
            st["rho"] = mu * st["rho"] + (1 - mu) * rho
            r_bar = max(st["rho"], 1e-6)
            beta = 1.0 - self.strength * r_bar
            alpha = min(
                math.sqrt(max(1.0 - beta * beta * (1.0 - r_bar), 0.0) / r_bar), self.alpha_max
            )
            st["alpha"], st["beta"] = alpha, beta
            p.grad.copy_(self._ops.rank_scale(G, U, alpha, beta).reshape(p.shape))

    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.scale_gradients()
        self._step += 1
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        i = len(self.param_groups) - 1
        group = self.param_groups[i]
        for j, p in enumerate(group["params"]):
            try:
                _check_real(p, i, j, group, self.min_size)
            except TypeError:
                self.param_groups.pop()  # refused: the inner optimizer does not keep it either
                raise

    def stats(self) -> List[Dict[str, float]]:
        """``[{"shape", "alpha", "beta", "rho"}]`` for every matrix parameter RAO has seen."""
        return [
            {"shape": tuple(p.shape), "alpha": s["alpha"], "beta": s["beta"], "rho": s["rho"]}
            for p, s in self._rao.items()
        ]

    def state_dict(self) -> Dict[str, Any]:
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        rao = {
            index[id(p)]: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
            for p, s in self._rao.items()
        }
        return {"optimizer": self.optimizer.state_dict(), "rao": rao, "step": self._step}

    def _check_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Everything :meth:`load_state_dict` can check before it changes anything: the layout
        of RAO's own part and that it fits this optimizer's parameters."""
        where = "RAO.load_state_dict"
        if not isinstance(state_dict, dict) or not {"optimizer", "rao", "step"} <= set(state_dict):
            raise ValueError(
                f"{where}: expected a state dict saved by RAO.state_dict() "
                "(keys 'optimizer', 'rao', 'step')"
            )
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{where}: 'step' must be an integer >= 0, got {step!r}")
        if not isinstance(state_dict["rao"], dict):
            raise ValueError(
                f"{where}: 'rao' must be a dict (parameter index -> state), got "
                f"{type(state_dict['rao']).__name__}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in state_dict["rao"].items():
            if (
                isinstance(i, bool)
                or not isinstance(i, numbers.Integral)
                or not 0 <= i < len(params)
            ):
                raise ValueError(
                    f"{where}: the state has an entry for parameter {i!r}, but this optimizer "
                    f"has {len(params)} parameters (indices 0..{len(params) - 1}); is it "
                    "another model's state?"
                )
            if not isinstance(s, dict) or not isinstance(s.get("M"), Tensor):
                raise ValueError(
                    f"{where}: the entry for parameter {i} lacks its gradient average 'M'"
                )
            p = params[i]
            matrix = (p.shape[0], math.prod(p.shape[1:])) if p.dim() >= 2 else None
            if tuple(s["M"].shape) != matrix:
                raise ValueError(
                    f"{where}: parameter {i} has shape {tuple(p.shape)} (read as the matrix "
                    f"{matrix}), but the state's gradient average for it has shape "
                    f"{tuple(s['M'].shape)}; is it another model's state?"
                )
            U = s.get("U")
            if U is not None and (not isinstance(U, Tensor) or U.shape[0] != matrix[0]):
                raise ValueError(
                    f"{where}: the basis U for parameter {i} must have {matrix[0]} rows, got "
                    f"{tuple(U.shape) if isinstance(U, Tensor) else type(U).__name__}"
                )
        # The wrapped optimizer's state: torch compares only the number of parameters per group,
        # so another model's state of the same size would load and fail at the next step.
        inner = state_dict["optimizer"]
        if not isinstance(inner, dict) or not {"state", "param_groups"} <= set(inner):
            raise ValueError(
                f"{where}: 'optimizer' must be a torch optimizer's state dict (keys 'state', "
                "'param_groups')"
            )
        saved = [i for g in inner["param_groups"] for i in g.get("params", ())]
        by_saved_index = dict(zip(saved, params))
        for i, st in inner["state"].items():
            p = by_saved_index.get(i)
            if p is None or not isinstance(st, dict):
                continue  # torch's own checks report a count mismatch
            for key in _PARAM_SHAPED_STATE:
                t = st.get(key)
                if isinstance(t, Tensor) and t.shape != p.shape:
                    raise ValueError(
                        f"{where}: the wrapped optimizer's state {key!r} for parameter "
                        f"{saved.index(i)} has shape {tuple(t.shape)}, but the parameter has "
                        f"shape {tuple(p.shape)}; is it another model's state?"
                    )

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of an RAO over the same parameters.

        Raises ValueError, naming what does not match, for a state of another kind or of
        another model (other parameter count or shapes); nothing is changed then."""
        self._check_state_dict(state_dict)
        kind = type(self.optimizer).__name__
        before = self.optimizer.state_dict()
        try:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"RAO.load_state_dict: the wrapped {kind}'s state does not fit (is it another "
                f"model's or another optimizer's state?): {e}"
            ) from e
        # Another optimizer's state loads without a word (its groups replace these) and fails
        # at the next step: every hyperparameter of this optimizer must be in the loaded groups.
        missing = sorted(
            {k for g in self.param_groups for k in self.optimizer.defaults if k not in g}
        )
        if missing:
            self.optimizer.load_state_dict(before)
            raise ValueError(
                f"RAO.load_state_dict: the wrapped optimizer's state lacks {kind}'s "
                f"hyperparameter(s) {missing}; was it saved by another optimizer?"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        self._rao = {}
        for i, s in state_dict["rao"].items():
            p = params[int(i)]
            self._rao[p] = {
                k: (v.to(p.device) if isinstance(v, Tensor) else v) for k, v in s.items()
            }
        self._step = int(state_dict["step"])
