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
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .ops import get_ops

__all__ = ["RAO"]


class RAO(torch.optim.Optimizer):
    """Rank-aware gradient scaling around ``optimizer`` (see the module docstring for the rule).

    Args:
        optimizer: any ``torch.optim.Optimizer``; RAO shares its ``param_groups``, so learning
            rate schedulers may be given either object.
        rank: dimension ``r`` of the stable subspace per matrix (capped at ``min(m, n) − 1``).
        update_every: steps between recomputations of ``U``.
        momentum: ``μ`` of the gradient average ``M`` and of ``ρ̄``.
        strength: how far the non-stable part may be damped (``beta ≥ 1 − strength``).
        alpha_max: cap on ``alpha``.
        min_size: matrices whose smaller side is below this are left alone.
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
        if rank < 1:
            raise ValueError(f"RAO: rank must be >= 1, got {rank}")
        if update_every < 1:
            raise ValueError(f"RAO: update_every must be >= 1, got {update_every}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"RAO: momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"RAO: strength must be in [0, 1), got {strength}")
        if alpha_max < 1.0:
            raise ValueError(f"RAO: alpha_max must be >= 1, got {alpha_max}")
        self.optimizer = optimizer
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

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not {"optimizer", "rao", "step"} <= set(state_dict):
            raise ValueError(
                "RAO.load_state_dict: expected a state dict saved by RAO.state_dict() "
                "(keys 'optimizer', 'rao', 'step')"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        params = [p for g in self.param_groups for p in g["params"]]
        self._rao = {}
        for i, s in state_dict["rao"].items():
            p = params[int(i)]
            self._rao[p] = {
                k: (v.to(p.device) if isinstance(v, Tensor) else v) for k, v in s.items()
            }
        self._step = int(state_dict["step"])
