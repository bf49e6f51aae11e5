"""The public functional API of lsef_ext, and the Python half of every op's registration.

Each op has: a documented function calling ``torch.ops.lsef.<op>.default``; a fake kernel
(``register_fake``: shapes, dtypes and devices only) so ``torch.compile`` can trace it; an
``autograd.Function`` registered as the op's Autograd kernel, with ``setup_context`` (so
``torch.func`` transforms work), a backward written in differentiable pieces (double backward)
and a ``jvp`` (forward mode); a batching rule (``vmap``); and an autocast rule. The table of
what works under which transform is in the README ("Works with") and docs/DESIGN.md §14.
"""

from __future__ import annotations

import math
import numbers
import sys
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.utils._pytree import tree_map

from . import rpca as _rpca
from .rpca import RPCAState

Scalar = Union[float, Tensor]

__all__ = [
    "soft_threshold",
    "rank_scale",
    "rank_aware_grad_scale",
    "rsvd",
    "rsvd_path",
    "RSVD_PATHS",
    "lowrank",
    "lowrank_sparse",
    "RPCAState",
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
# transforms: autograd kernels, batching rules and autocast, shared by every op
# --------------------------------------------------------------------------------------------

_LIB = torch.library.Library("lsef", "IMPL")
_HALF = (torch.float16, torch.bfloat16)


def _transform_active() -> bool:
    """A functorch transform (grad, vjp, jacrev, jacfwd, hessian, jvp, vmap) or a forward-mode
    dual level is active: a call may then be differentiated other than by plain reverse mode."""
    return torch._C._are_functorch_transforms_active() or _fwAD._current_level >= 0


def _higher_order() -> bool:
    """Inside a backward or jvp: whether what it computes may itself be differentiated
    (``create_graph=True``, a functorch transform, a dual level). Backward formulas then use
    differentiable pieces; otherwise the fused kernels."""
    return torch.is_grad_enabled() or _transform_active()


def _below_autograd():
    return torch._C._AutoDispatchBelowAutograd()


def _refuse_nested_jvp(op: str) -> None:
    """Called first in a jvp whose result depends on the op's saved inputs through more than a
    mask: under forward mode over forward mode (``jacfwd(jacfwd(f))``, nested ``jvp``) PyTorch
    hands a custom Function's jvp its saved tensors without the outer tangent
    (pytorch#197867), which would give wrong second derivatives in silence; raise instead."""
    jvps = sum(1 for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp)
    if jvps > 1:
        raise RuntimeError(
            f"{op}: forward mode over forward mode (nested jvp, jacfwd(jacfwd(...))) is not "
            "supported: PyTorch passes a custom Function's jvp its saved inputs without the outer "
            "tangent (pytorch#197867); use torch.func.hessian (forward over reverse) or "
            "jacrev(jacfwd(...))"
        )


def _refuse_compiled_forward_mode(op: str) -> None:
    """Forward-mode AD inside a compiled region: Dynamo traces the op, not its Function, and a
    custom jvp would be dropped (pytorch#192985): raise rather than give wrong tangents."""
    if _fwAD._current_level >= 0:
        raise RuntimeError(
            f"{op}: forward-mode AD inside torch.compile is not supported (a custom jvp is "
            "dropped under compile, pytorch#192985); call the compiled function outside "
            "forward mode, or take the jvp of the eager function"
        )


def _with_eager_variant(full):
    """Adds ``full.eager``: the same forward and backward in the older ``forward(ctx, ...)``
    form, for plain reverse mode in eager code. ``autograd.Function.apply`` binds the
    arguments of a Function with ``setup_context`` through ``inspect.signature`` on every call
    (several microseconds); this form skips that. Transforms use ``full`` itself."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = full.forward(*args)
            full.setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return full.backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"{full.__name__}Eager"
    full.eager = Eager
    return full


def _save_for_forward(ctx, *tensors) -> None:
    """Saves tensors for a jvp, which runs only under forward mode or a functorch transform."""
    if _transform_active():
        ctx.save_for_forward(*tensors)


def _apply(function, name: str, *args):
    """The call of op ``lsef::name`` from the Python API: through ``function`` (an
    autograd.Function, so that every transform sees its setup_context, backward and jvp) where
    a derivative may be taken (an input requires grad with grad mode on, a forward-mode dual
    level, a functorch transform), else straight to the kernel, with no Python overhead.
    Under torch.compile the op itself is traced (Dynamo cannot trace a Function with a custom
    jvp); its Autograd kernel is the same Function, so AOTAutograd gets the same backward."""
    op = getattr(torch.ops.lsef, name).default
    if torch.compiler.is_compiling():
        _refuse_compiled_forward_mode(name)
        return op(*args)
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(args[0].device.type):
        # The autocast rule (float32) applied here, before the Function saves its inputs: the
        # op's own Autocast kernel would cast only below it, leaving the backward with the
        # uncast inputs.
        args = tuple(_to_float32(a) for a in args)
    if _transform_active():
        return function.apply(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return function.eager.apply(*args)
    return op(*args)


def _to_float32(a):
    if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64:
        return a.float()
    return a


def _register_autograd(name: str, function, public: str) -> None:
    """``function`` (an autograd.Function) as the Autograd kernel of ``lsef::name``, for calls
    of ``torch.ops.lsef.name`` itself: plain reverse mode goes through the Function. A forward
    dual level or a functorch transform cannot reach the Function from inside the dispatcher
    (PyTorch runs ``custom_function_call`` above it; pytorch#168393), so such calls raise and
    name the Python function that supports them, instead of giving zero derivatives."""
    op = getattr(torch.ops.lsef, name).default
    # The dispatcher leaves out trailing arguments equal to their defaults: put them back.
    defaults = [a.default_value for a in op._schema.arguments]
    # A non-optional tensor given as None is a TypeError, checked here: no exception of the
    # stable ABI's kernels reaches Python as one (csrc/common/checks.h).
    required = [(i, a.name) for i, a in enumerate(op._schema.arguments) if str(a.type) == "Tensor"]

    def autograd_kernel(keyset, *args):
        for i, arg_name in required:
            if args[i] is None:
                raise TypeError(f"{name}: {arg_name} must be a tensor, got None")
        if _transform_active():
            raise RuntimeError(
                f"torch.ops.lsef.{name} called directly under forward-mode AD or a torch.func "
                f"transform: call lsef_ext.ops.{public}, which supports both"
            )
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.eager.apply(*args, *defaults[len(args) :])
        with _below_autograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def _register_autocast(names: Sequence[str]) -> None:
    """Under autocast every lsef op computes in float32 (float64 inputs stay float64): lower
    precision inputs are cast up on entry, as PyTorch's own float32-list ops do (DESIGN.md §14)."""
    for name in names:
        for device in ("cpu", "cuda"):
            if torch.amp.is_autocast_available(device):
                torch.library.register_autocast(f"lsef::{name}", device, torch.float32, lib=_LIB)


def _batch_first(x, dim, size: int):
    """A vmapped tensor with its batch dimension first, or an unbatched one expanded to it."""
    if not isinstance(x, Tensor):
        return x
    return x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)


def _out_dims(out):
    return tree_map(lambda t: 0 if isinstance(t, Tensor) else None, out)


def _vmap_leading(name: str) -> None:
    """The batching rule of an op batched over the leading dimensions of all its tensors alike:
    the vmapped dimension becomes one more leading dimension of each (rsvd's test matrix is
    shared by the batch, so each sample still gets its own result)."""
    op = getattr(torch.ops.lsef, name).default

    def rule(info, in_dims, *args):
        out = op(*(_batch_first(a, d, info.batch_size) for a, d in zip(args, in_dims)))
        return out, _out_dims(out)

    torch.library.register_vmap(f"lsef::{name}", rule, lib=_LIB)


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

    float16 and bfloat16 work on every device (on the CPU they are computed in float32 and
    rounded once). Under ``torch.autocast`` the op computes in float32, so ``X``, ``L`` and
    ``lam`` may then come in the mix of dtypes autocast produces.

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
    lam = _as_tensor(lam, X, op, "lam")
    if X.dtype in _HALF and X.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        # The CPU kernel is float32/float64: half-precision inputs are computed in float32
        # and rounded once (the CUDA kernels also compute in float32; DESIGN.md §14).
        _check_soft_threshold(op, X, L, lam)
        up = [t if t is None else t.float() for t in (X, L, lam)]
        return _apply(_SoftThreshold, op, *up, hard).to(X.dtype)
    return _apply(_SoftThreshold, op, X, L, lam, hard)


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


def _soft_threshold_jvp(X, L, lam, hard, tX, tL, tlam) -> Tensor:
    """The directional derivative of soft_threshold: with ``M = 1[|R| > lam]``,
    ``M (tX - tL)``, minus ``sign(R) M tlam`` when soft. Away from the kinks ``|R| = lam`` it is
    exact, and it is the adjoint of the backward (so also the backward's own derivative in its
    gradient argument)."""
    R = X if L is None else X - L
    mask = R.abs() > lam
    t = torch.zeros_like(X) if tX is None else tX
    if tL is not None:
        t = t - tL
    out = torch.where(mask, t, 0)
    if not hard and tlam is not None:
        out = out - torch.where(mask, torch.sign(R) * tlam, 0)
    return out


@_with_eager_variant
class _SoftThreshold(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(X, L, lam, hard):
        with _below_autograd():
            return torch.ops.lsef.soft_threshold.default(X, L, lam, hard)

    @staticmethod
    def setup_context(ctx, inputs, output):
        X, L, lam, hard = inputs
        ctx.hard = hard
        ctx.save_for_backward(X, L, lam)
        _save_for_forward(ctx, X, L, lam)

    @staticmethod
    def backward(ctx, grad):
        X, L, lam = ctx.saved_tensors
        mask = ctx.needs_input_grad[:3]
        if not any(mask):
            return None, None, None, None
        dX, dL, dlam = _SoftThresholdBackward.apply(grad, X, L, lam, ctx.hard, *mask)
        return dX, dL, dlam, None

    @staticmethod
    def jvp(ctx, tX, tL, tlam, _):
        X, L, lam = ctx.saved_tensors
        return _soft_threshold_jvp(X, L, lam, ctx.hard, tX, tL, tlam)


class _SoftThresholdBackward(torch.autograd.Function):
    """soft_threshold's backward (the fused kernel) as a function of its gradient argument, in
    which it is linear: its derivative there is soft_threshold's jvp. In X, L and lam it is
    piecewise constant (the mask), so its derivative there is exactly zero away from the kinks:
    second derivatives of soft_threshold are zero, and so are those given here."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, X, L, lam, hard, want_X, want_L, want_lam):
        # (three bools, not a list: functorch would take a list for three more inputs)
        mask = [want_X, want_L, want_lam]
        with _below_autograd():
            return torch.ops.lsef.soft_threshold_backward.default(grad, X, L, lam, hard, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, X, L, lam, hard, *mask = inputs
        ctx.hard, ctx.mask = hard, mask
        ctx.save_for_backward(X, L, lam)
        _save_for_forward(ctx, X, L, lam)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, hX, hL, hlam):
        X, L, lam = ctx.saved_tensors
        if hX is None and hL is None and hlam is None:
            return (None,) * 8
        return (_soft_threshold_jvp(X, L, lam, ctx.hard, hX, hL, hlam),) + (None,) * 7

    @staticmethod
    def jvp(ctx, tgrad, tX, tL, tlam, *_flags):
        X, L, lam = ctx.saved_tensors
        if tgrad is None:
            tgrad = torch.zeros_like(X)
        with _below_autograd():
            out = torch.ops.lsef.soft_threshold_backward.default(
                tgrad, X, L, lam, ctx.hard, ctx.mask
            )
        return tuple(out)


def _soft_threshold_vmap(info, in_dims, X, L, lam, hard=False):
    B = info.batch_size
    X = _batch_first(X, in_dims[0], B)
    L = _batch_first(L, in_dims[1], B)
    if in_dims[2] is not None:  # one lam per sample, aligned with X's trailing dimensions
        lam = lam.movedim(in_dims[2], 0)
        lam = lam.reshape(B, *([1] * (X.dim() - lam.dim())), *lam.shape[1:])
    return torch.ops.lsef.soft_threshold.default(X, L, lam, hard), 0


def _soft_threshold_backward_vmap(info, in_dims, grad, X, L, lam, hard, mask):
    B = info.batch_size
    grad, X, L = (_batch_first(t, d, B) for t, d in zip((grad, X, L), in_dims[:3]))
    per_sample = lam.shape if in_dims[3] is None else lam.movedim(in_dims[3], 0).shape[1:]
    # lam per sample (expanded where shared): its gradient is then per sample too
    lam = _batch_first(lam, in_dims[3], B)
    lam = lam.reshape(B, *([1] * (X.dim() - 1 - len(per_sample))), *per_sample)
    dX, dL, dlam = torch.ops.lsef.soft_threshold_backward.default(grad, X, L, lam, hard, mask)
    if dlam is not None:
        dlam = dlam.reshape(B, *per_sample)
    out = (dX, dL, dlam)
    return out, _out_dims(out)


_register_autograd("soft_threshold", _SoftThreshold, "soft_threshold")
torch.library.register_vmap("lsef::soft_threshold", _soft_threshold_vmap, lib=_LIB)
torch.library.register_vmap(
    "lsef::soft_threshold_backward", _soft_threshold_backward_vmap, lib=_LIB
)
_register_autocast(["soft_threshold", "soft_threshold_backward"])


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
    alpha, beta = _as_tensor(alpha, G, op, "alpha"), _as_tensor(beta, G, op, "beta")
    return _apply(_RankScale, op, G, U, alpha, beta)


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


def _reduce_to(t: Tensor, like: Tensor) -> Tensor:
    """Per-matrix values reduced to a coefficient's shape (a scalar sums over the batch)."""
    return t.reshape(like.shape) if like.numel() != 1 else t.sum().reshape(like.shape)


def _per_matrix(c: Tensor, G: Tensor) -> Tensor:
    """A coefficient (one value, or one per matrix of ``G``) broadcastable over ``G``."""
    return c.reshape(()) if c.numel() == 1 else c.reshape(*G.shape[:-2], 1, 1)


@_with_eager_variant
class _RankScale(torch.autograd.Function):
    """rank_scale's derivatives, all in differentiable pieces (rank_scale itself and matrix
    products), so every order is exact: the op is linear in G and polynomial in U, alpha,
    beta."""

    generate_vmap_rule = True

    @staticmethod
    def forward(G, U, alpha, beta):
        with _below_autograd():
            return torch.ops.lsef.rank_scale.default(G, U, alpha, beta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        G, U, alpha, beta = inputs
        # G itself is only needed for the gradients of U, alpha and beta.
        needs_G = any(ctx.needs_input_grad[1:])
        ctx.save_for_backward(G if needs_G else None, U, alpha, beta)
        _save_for_forward(ctx, G, U, alpha, beta)

    @staticmethod
    def backward(ctx, grad):
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
                # alpha and beta are each one value or one per matrix (in any mix): their
                # difference is one value, or one per matrix broadcast over each (m, r) gradient.
                dU = _per_matrix(alpha - beta, G) * (grad @ C.mT + G @ D.mT)
                if U.dim() == 2 and dU.dim() > 2:
                    dU = dU.sum(dim=tuple(range(dU.dim() - 2)))
        return dG, dU, dalpha, dbeta

    @staticmethod
    def jvp(ctx, tG, tU, talpha, tbeta):
        _refuse_nested_jvp("rank_scale")
        # d[beta G + (alpha - beta) U U^T G] = rank_scale(tG) + tbeta G
        #     + (talpha - tbeta) U U^T G + (alpha - beta) (tU U^T G + U tU^T G)
        G, U, alpha, beta = ctx.saved_tensors
        out = torch.zeros_like(G) if tG is None else rank_scale(tG, U, alpha, beta)
        if tbeta is not None:
            out = out + _per_matrix(tbeta, G) * G
        if talpha is not None or tbeta is not None:
            dd = (0 if talpha is None else talpha) - (0 if tbeta is None else tbeta)
            out = out + _per_matrix(torch.as_tensor(dd), G) * (U @ (U.mT @ G))
        if tU is not None:
            out = out + _per_matrix(alpha - beta, G) * (tU @ (U.mT @ G) + U @ (tU.mT @ G))
        return out


def _rank_scale_vmap(info, in_dims, G, U, alpha, beta):
    B = info.batch_size
    G = _batch_first(G, in_dims[0], B)
    batch = G.shape[:-2]  # (B, *)
    if in_dims[1] is not None:
        U = U.movedim(in_dims[1], 0)
        if U.dim() == 3 and len(batch) > 1:  # one (m, r) U per sample, over its matrices
            U = U.reshape(B, *([1] * (len(batch) - 1)), *U.shape[1:]).expand(*batch, *U.shape[1:])
    elif U.dim() > 2:
        U = U.expand(B, *U.shape)
    coefs = []
    for c, d in ((alpha, in_dims[2]), (beta, in_dims[3])):
        if d is not None:
            c = c.movedim(d, 0)
            if c[0].numel() == 1:  # one value per sample, over its matrices
                c = c.reshape(B, *([1] * (len(batch) - 1))).expand(batch)
        elif c.numel() != 1:
            c = c.expand(B, *c.shape)
        coefs.append(c)
    return torch.ops.lsef.rank_scale.default(G, U, *coefs), 0


_register_autograd("rank_scale", _RankScale, "rank_scale")
torch.library.register_vmap("lsef::rank_scale", _rank_scale_vmap, lib=_LIB)
_register_autocast(["rank_scale"])


@_with_eager_variant
class _RankAwareGradScaleReverse(torch.autograd.Function):
    """The identity in value, whose derivative in x is defined to be rank_scale (self-adjoint).
    The output does not depend on U, alpha or beta (zero derivatives, exact); the backward is
    rank_scale, differentiable in every argument, so double backward sees how the scaled
    gradient depends on U, alpha and beta too. This class (reverse mode only) is what
    torch.compile traces: Dynamo cannot trace a Function with a custom jvp."""

    @staticmethod
    def forward(x, U, alpha, beta):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, U, alpha, beta = inputs
        ctx.save_for_backward(U, alpha, beta)
        _save_for_forward(ctx, U, alpha, beta)

    @staticmethod
    def backward(ctx, grad):
        U, alpha, beta = ctx.saved_tensors
        return rank_scale(grad, U, alpha, beta), None, None, None


class _RankAwareGradScale(_RankAwareGradScaleReverse):
    """The same with forward mode, used under forward AD and torch.func: the jvp scales the
    tangent as the backward scales the gradient, so jacfwd equals jacrev (as for the
    reference, ``x.detach() + rank_scale(x - x.detach(), ...)``). Its output is a copy: a
    Function returning a view must have a view for a tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, U, alpha, beta):
        return x.clone()

    @staticmethod
    def jvp(ctx, tx, tU, talpha, tbeta):
        _refuse_nested_jvp("rank_aware_grad_scale")
        U, alpha, beta = ctx.saved_tensors
        return rank_scale(tx, U, alpha, beta)


_RankAwareGradScaleEager = _RankAwareGradScaleReverse.eager


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
    if torch.compiler.is_compiling():
        _refuse_compiled_forward_mode(op)
        return _RankAwareGradScaleReverse.apply(x, U, alpha, beta)
    if _transform_active():
        return _RankAwareGradScale.apply(x, U, alpha, beta)
    return _RankAwareGradScaleEager.apply(x, U, alpha, beta)


# --------------------------------------------------------------------------------------------
# rsvd and lowrank
# --------------------------------------------------------------------------------------------


# The CPU kernel's paths, in the order of csrc/rsvd/cost_model.h (torch.ops.lsef._rsvd_path
# returns an index into it).
RSVD_PATHS = ("fused", "jacobi", "blas", "lapack", "exact")


def rsvd_path(
    m: int,
    n: int,
    k: int,
    oversample: int = 8,
    n_iter: int = 2,
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
) -> str:
    """The path the CPU ``rsvd`` kernel takes for a batch of ``batch`` ``(m, n)`` matrices with
    these settings at the current thread count (its cost model's choice, or
    ``LSEF_RSVD_PATH``'s): one of :data:`RSVD_PATHS`. Whether the answer is exact or randomized
    does not depend on ``batch`` or the threads; which sketching path computes it may
    (docs/DESIGN.md §6)."""
    index = torch.ops.lsef._rsvd_path(m, n, k, oversample, n_iter, dtype == torch.float64, batch)
    return RSVD_PATHS[index]


def rsvd(A: Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0):
    """Truncated SVD of every matrix of ``A (*, m, n)``: ``A ~ U diag(S) V^T``.

    A randomized range finder (Halko, Martinsson & Tropp 2011) with
    ``l = min(k + oversample, min(m, n))`` columns and ``n_iter`` power iterations, each
    re-orthonormalised, then an exact SVD of the small projected matrix. When
    ``l == min(m, n)`` the result is the exact truncated SVD (no randomness). The Gaussian test
    matrix comes from a counter-based generator keyed by ``seed`` alone and is shared by the
    batch: the same call gives the same bits, and ``rsvd(A)[i] == rsvd(A[i])`` (bit for bit on
    the in-cache paths, to rounding where BLAS or LAPACK run the batch).

    The CPU kernel picks the cheapest of its paths for the matrix shape by a measured cost
    model (docs/DESIGN.md §6): in-cache fused or Jacobi kernels, BLAS products with its own
    QRs, or LAPACK. Where the full SVD costs less than the sketch (``l`` close to
    ``min(m, n)``), it returns the exact truncated SVD, which the randomized one approximates.
    ``LSEF_RSVD_PATH`` (``fused``, ``jacobi``, ``blas``, ``lapack``, ``exact``) forces a path.

    Returns:
        ``U (*, m, k)``, ``S (*, k)`` (descending, non-negative), ``V (*, n, k)``; each pair
        ``(u_i, v_i)`` is signed so the largest-magnitude entry of ``u_i`` is positive. A matrix
        containing NaN or Inf gives NaN factors (for that matrix only).

    Gradients follow Townsend (2016) for the rank-k truncated SVD with the discarded singular
    values taken as zero: exact where ``rank(A) <= k`` or ``k == min(m, n)``, an approximation
    elsewhere; close, repeated and zero singular values are regularised (docs/DESIGN.md §6).
    """
    _check_rsvd_types("rsvd", A, k, oversample, n_iter, seed)
    return _apply(_Rsvd, "rsvd", A, k, oversample, n_iter, seed)


def lowrank(A: Tensor, k: int, oversample: int = 8, n_iter: int = 2, seed: int = 0) -> Tensor:
    """The rank-k approximation ``L = U diag(S) V^T`` of every matrix of ``A (*, m, n)``, with
    ``U, S, V = rsvd(A, k, oversample, n_iter, seed)``.

    Its gradient is the projection onto the tangent space of the rank-k matrices at ``L``,
    ``P_U G + G P_V - P_U G P_V`` (exact where ``rank(A) <= k``): no division by singular-value
    gaps, so it is stable where ``rsvd``'s is not.
    """
    _check_rsvd_types("lowrank", A, k, oversample, n_iter, seed)
    return _apply(_Lowrank, "lowrank", A, k, oversample, n_iter, seed)[0]


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


@torch.library.register_fake("lsef::_ialm_step_")
def _ialm_step_fake(X, L, W, S, A, t, ratio, done):
    return X.new_empty((X.shape[:-2].numel(),), dtype=torch.float64)


def _ialm_step_(
    X: Tensor, L: Tensor, W: Tensor, S: Tensor, A: Tensor, t: Tensor, ratio: Tensor, done: Tensor
) -> Tensor:
    """The elementwise half of one iteration of :func:`lsef_ext.rpca.rpca_ialm` in one pass (CPU
    kernel; internal). ``X``, ``L``, ``W``, ``S``, ``A``: contiguous ``(*, m, n)``; ``t``,
    ``ratio``: one value per matrix, ``done`` (bool) too, in any shape holding ``*`` values.
    With ``B = (X + W) - L`` and ``C = clamp(B, -t, t)``, it sets ``S = B - C``,
    ``W = C ratio`` and ``A = (X + W) - S`` (the new W) in place, the bits of those ATen
    expressions, except in the matrices where ``done`` is True, which it leaves alone; returns
    the sum of ``(C - W_old)^2`` per matrix (float64, shape ``*``; 0 where done)."""
    err2 = torch.ops.lsef._ialm_step_(X, L, W, S, A, t, ratio, done)
    return err2.view(X.shape[:-2])


def _svd_factors(S: Tensor):
    """Townsend's regularised factors for a spectrum S (*, k), as rsvd_backward (C++) forms
    them: ``F_ij = E / (E^2 + tau^4)``, ``E = s_j^2 - s_i^2``, and ``S^-1 = s / (s^2 +
    tau^2)``, ``tau = sqrt(eps) s_max``, computed on ``w S`` (``w`` the power of two bringing
    s_max into [1, 2), exact) so that no square under- or overflows. Returns ``(F, S_inv, Sw,
    w)`` at that scale: F is homogeneous of degree -2 in S and S_inv of degree -1, so a term
    ``F (P S)`` is ``w F_w (P S_w)`` and ``S^-1`` is ``w S_inv_w``."""
    w = _rpca.pow2_normaliser(S.unsqueeze(-1))  # (*, 1, 1)
    Sw = S * w.squeeze(-1)
    info = torch.finfo(S.dtype)
    tau = (math.sqrt(info.eps) * Sw.amax(dim=-1, keepdim=True)).clamp_min(info.tiny)
    s2 = Sw * Sw
    E = s2.unsqueeze(-2) - s2.unsqueeze(-1)
    tau2 = (tau * tau).unsqueeze(-1)
    F = torch.where(E != 0, E / (E * E + tau2 * tau2), 0)
    S_inv = torch.where(Sw > 0, Sw / (s2 + tau * tau), 0)
    return F, S_inv, Sw, w


def _svd_tangents(tA: Tensor, U: Tensor, S: Tensor, V: Tensor):
    """The directional derivative of the rank-k truncated SVD ``(U, S, V)`` along ``tA``, with
    the discarded singular values taken as zero (Townsend 2016; the adjoint of rsvd_backward,
    regularised the same way): with ``P = U^T tA V``,
    ``tS = diag(P)``, ``tU = U (F o (P S + S P^T)) + (I - U U^T) tA V S^-1``,
    ``tV = V (F o (S P + P^T S)) + (I - V V^T) tA^T U S^-1``."""
    P = U.mT @ tA @ V
    F, S_inv, Sw, w = _svd_factors(S)
    row, col = Sw.unsqueeze(-2), Sw.unsqueeze(-1)  # (P S)_ij = P_ij s_j, (S P)_ij = s_i P_ij
    inv = (S_inv * w.squeeze(-1)).unsqueeze(-2)
    tU = U @ (w * F * (P * row + col * P.mT)) + (tA @ V - U @ P) * inv
    tV = V @ (w * F * (col * P + P.mT * row)) + (tA.mT @ U - V @ P.mT) * inv
    return tU, P.diagonal(dim1=-2, dim2=-1), tV


class _SvdBackward(torch.autograd.Function):
    """rsvd_backward (Townsend's dA for gradients of U, S and V). It is linear in the gradients
    gU, gS, gV, its derivative there being the jvp of the SVD (:func:`_svd_tangents`), but it
    has no derivative in U, S, V: asking for one, by either mode, raises ``message``, which
    names the op, instead of giving zero."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gU, gS, gV, U, S, V, message):
        with _below_autograd():
            return torch.ops.lsef.rsvd_backward.default(gU, gS, gV, U, S, V)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[-1]
        ctx.save_for_backward(*inputs[3:6])
        _save_for_forward(ctx, *inputs[3:6])

    @staticmethod
    def backward(ctx, grad):
        # A gradient for U, S or V is asked for only if the engine goes on to run the node it
        # flows into (needs_input_grad is fixed at forward time; a Hessian-vector product by
        # the double-backward trick differentiates this node in its linear arguments only).
        for node, _ in ctx.next_functions[3:6]:
            if node is not None and torch._C._will_engine_execute_node(node):
                raise RuntimeError(ctx.message)
        tU, tS, tV = _svd_tangents(grad, *ctx.saved_tensors)
        want = ctx.needs_input_grad
        return (tU if want[0] else None, tS if want[1] else None, tV if want[2] else None) + (
            None,
        ) * 4

    @staticmethod
    def jvp(ctx, tgU, tgS, tgV, tU, tS, tV, _message):
        _refuse_nested_jvp("rsvd")
        if tU is not None or tS is not None or tV is not None:
            raise RuntimeError(ctx.message)
        U, S, V = ctx.saved_tensors
        with _below_autograd():
            return torch.ops.lsef.rsvd_backward.default(tgU, tgS, tgV, U, S, V)


def _svd_backward(gU, gS, gV, U, S, V, op: str) -> Tensor:
    """dA for gradients of (U, S, V) (any may be None): the fused rsvd_backward kernel. Where
    only S has a gradient, ``U diag(gS) V^T`` in differentiable pieces: its own derivative (the
    second derivative of S) then comes from the derivatives of U and V. Through U or V there is
    no second derivative: differentiating the result raises, naming the op."""
    if gU is None and gV is None:
        return (U * gS.unsqueeze(-2)) @ V.mT
    if not _higher_order():
        return torch.ops.lsef.rsvd_backward.default(gU, gS, gV, U, S, V)
    message = (
        f"{op}: no second derivative through the singular vectors U, V with respect to A "
        "(double backward, hessian, forward-over-reverse); it exists for rsvd's S and for "
        "lowrank's L"
    )
    return _SvdBackward.apply(gU, gS, gV, U, S, V, message)


def _factorisation_forward(name: str):
    """The forward of rsvd's and lowrank's Functions: the op below autograd."""
    op = getattr(torch.ops.lsef, name).default

    def forward(A, k, oversample, n_iter, seed):
        with _below_autograd():
            return op(A, k, oversample, n_iter, seed)

    return staticmethod(forward)


def _save_outputs(ctx, inputs, output) -> None:
    """setup_context of rsvd's and lowrank's Functions: both derivatives need the outputs only."""
    ctx.save_for_backward(*output)
    _save_for_forward(ctx, *output)
    ctx.set_materialize_grads(False)


@_with_eager_variant
class _Rsvd(torch.autograd.Function):
    generate_vmap_rule = True
    forward = _factorisation_forward("rsvd")
    setup_context = staticmethod(_save_outputs)

    @staticmethod
    def backward(ctx, gU, gS, gV):
        U, S, V = ctx.saved_tensors
        if gU is None and gS is None and gV is None:
            return (None,) * 5
        return _svd_backward(gU, gS, gV, U, S, V, "rsvd"), None, None, None, None

    @staticmethod
    def jvp(ctx, tA, *_ints):
        _refuse_nested_jvp("rsvd")
        U, S, V = ctx.saved_tensors
        return _svd_tangents(tA, U, S, V)


def _tangent_projection(G: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """``P_U G + G P_V - P_U G P_V``: the fused kernel, or differentiable products where the
    result may be differentiated again (its derivative in U and V is then exact)."""
    if not _higher_order():
        return torch.ops.lsef.lowrank_backward.default(G, U, V)
    UtG = U.mT @ G
    return U @ UtG + (G @ V - U @ (UtG @ V)) @ V.mT


def _lowrank_spectrum(L: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """S from L = U diag(S) V^T (U, V orthonormal): diag(U^T L V)."""
    return (U.mT @ L @ V).diagonal(dim1=-2, dim2=-1)


@_with_eager_variant
class _Lowrank(torch.autograd.Function):
    """lowrank's outputs are (L, U, V) (the Python API returns L). L's derivative is the
    tangent-space projection, exact where rank(A) <= k, in both modes. U and V are
    differentiable outputs so that the projection's own derivative (second derivatives of L)
    flows back through them: their derivative is Townsend's, as rsvd's."""

    generate_vmap_rule = True
    forward = _factorisation_forward("lowrank")
    setup_context = staticmethod(_save_outputs)

    @staticmethod
    def backward(ctx, gL, gU, gV):
        L, U, V = ctx.saved_tensors
        dA = None if gL is None else _tangent_projection(gL, U, V)
        if gU is not None or gV is not None:
            d = _svd_backward(gU, None, gV, U, _lowrank_spectrum(L, U, V), V, "lowrank")
            dA = d if dA is None else dA + d
        return dA, None, None, None, None

    @staticmethod
    def jvp(ctx, tA, *_ints):
        _refuse_nested_jvp("lowrank")
        L, U, V = ctx.saved_tensors
        tU, _, tV = _svd_tangents(tA, U, _lowrank_spectrum(L, U, V), V)
        return _tangent_projection(tA, U, V), tU, tV


_register_autograd("rsvd", _Rsvd, "rsvd")
_register_autograd("lowrank", _Lowrank, "lowrank")
for _name in ("rsvd", "rsvd_backward", "lowrank", "lowrank_backward"):
    _vmap_leading(_name)
_register_autocast(["rsvd", "rsvd_backward", "lowrank", "lowrank_backward"])


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
    *,
    mask: Optional[Tensor] = None,
    init: Optional[RPCAState] = None,
    return_state: bool = False,
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

    ``mask`` (a bool tensor broadcastable to ``X``, e.g. ``(*, m, n)``, ``(*, m, 1)`` for whole
    rows missing, ``(*, 1, n)``; False = unobserved), for either method and any ``noise``:
    only the observed entries constrain the split. ``rpca`` solves ``min ||L||_* + lam ||S||_1``
    subject to ``P(X) = P(L + S)`` on the observed entries (with ``noise``, the data term covers
    them only): ``L`` is completed where X is unobserved, ``S`` is 0 there, and the values of
    ``X`` there (NaN, Inf, anything) change no output. ``lam`` then defaults to
    ``1 / sqrt(p max(m, n))`` with ``p`` each matrix's observed fraction (Candes et al. 2011,
    Thm. 1.2), and with ``noise`` the thresholds count the observed entries only (DESIGN §8).
    A row or column with nothing observed gets ``L = 0`` (the completion of least nuclear norm).

    ``return_state=True`` (``method="rpca"``, ``noise=None``, no ``mask``) returns
    ``(L, S, state)``, an :class:`~lsef_ext.rpca.RPCAState` (the split, the multiplier, the
    penalty and the iterations run); ``init=state`` starts the solver from it instead of cold:
    on the same shape (``X`` changed a little, as the next training step's batch), or after
    ``state.slide(stride)`` on the next window of a sliding window over the rows (frames). Its
    fresh rows are first fitted robustly on the row space of the kept rows' ``L``, and the
    penalty resumes a few growth steps below where the previous solve ended (DESIGN §8, "Warm
    starts"). The stopping test is the cold one; the split is as good as the start it is given,
    so start cold again after a cut in the video. Fewer than ``k`` kept rows: a cold start.

    The algorithms are in :mod:`lsef_ext.rpca`, written over this module's ops.

    Raises:
        TypeError: ``X`` not a tensor; ``k`` or ``n_steps`` not an integer; ``lam`` neither
            None, a number nor a tensor; ``mask`` not a bool tensor.
        ValueError: ``X`` with fewer than 2 dimensions or an empty matrix; ``k`` outside
            ``[1, min(m, n)]``; a number ``lam`` below 0 or NaN; ``n_steps < 1``; an unknown
            ``method`` or ``noise``; ``mask`` not broadcastable to ``X`` or on another device;
            ``init`` or ``return_state`` with ``method="unrolled"``, a ``noise`` or a ``mask``;
            ``init`` not an ``RPCAState``, or its tensors of the wrong shape or device;
            and, checked in eager mode only (not while traced or under a functorch transform),
            a matrix with no observed entry, or ``k`` above the number of rows or of columns
            that hold an observed entry.
        RuntimeError: ``X`` not floating-point; ``method="rpca"`` where ``X`` or a tensor
            ``lam`` asks for a derivative (requires grad with grad mode on, or carries a
            forward-mode tangent: torch.func.jvp, jacfwd, forward_ad).

    Under ``torch.autocast`` it computes in float32 (float64 stays float64), with autocast off
    inside, and returns float32.
    """
    _check_lowrank_sparse(X, k, lam, n_steps)
    if mask is not None:
        _check_rpca_mask(X, k, mask)
    if init is not None or return_state:
        _check_rpca_init(X, method, noise, mask, init)
    if method == "rpca":
        _refuse_rpca_derivative(X, lam)
    warm = dict(mask=mask, init=init, return_state=return_state)
    if X.dtype in _HALF + (torch.float32,) and torch.is_autocast_enabled(X.device.type):
        # A factorisation: computed in float32 with autocast off inside (DESIGN.md §14).
        with torch.autocast(X.device.type, enabled=False):
            up = lam.float() if isinstance(lam, Tensor) and lam.dtype in _HALF else lam
            return lowrank_sparse(X.float(), k, up, n_steps, method, noise, **warm)
    return _rpca.lowrank_sparse(sys.modules[__name__], X, k, lam, n_steps, method, noise, **warm)


def _check_rpca_init(X: Tensor, method, noise, mask, init) -> None:
    """The checks of lowrank_sparse's ``init`` and ``return_state``: the exact unmasked solver
    only; ``init`` an RPCAState whose tensors match X's batch, shape and device."""
    op = "lowrank_sparse"
    for bad, what in (
        (method != "rpca", f"method={method!r}"),
        (noise is not None, f"noise={noise!r}"),
        (mask is not None, "a mask"),
    ):
        if bad:
            raise ValueError(
                f"{op}: init and return_state (a warm start) apply to method='rpca' with "
                f"noise=None and no mask, got {what}"
            )
    if init is None:
        return
    if not isinstance(init, RPCAState):
        raise TypeError(
            f"{op}: init must be the RPCAState a call with return_state=True returned, got "
            f"{type(init).__name__}"
        )
    batch = tuple(X.shape[:-2])
    for name, want in (
        ("L", X.shape),
        ("S", X.shape),
        ("Y", X.shape),
        ("mu", batch + (1, 1)),
    ):
        t = getattr(init, name)
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{op}: init.{name} must be a floating-point tensor")
        if tuple(t.shape) != tuple(want):
            raise ValueError(
                f"{op}: init.{name} has shape {list(t.shape)}, but X of shape {list(X.shape)} "
                f"needs {list(want)} (slide the state for the next window: init.slide(stride))"
            )
        if t.device != X.device:
            raise ValueError(f"{op}: init.{name} is on {t.device} but X is on {X.device}")
    m = X.shape[-2]
    fresh = init.fresh
    if isinstance(fresh, bool) or not isinstance(fresh, int) or not 0 <= fresh <= m:
        raise ValueError(f"{op}: init.fresh must be an int in [0, m] = [0, {m}], got {fresh!r}")


def _check_rpca_mask(X: Tensor, k: int, mask) -> None:
    """The checks of lowrank_sparse's ``mask``: its type, dtype, shape and device always; the
    observed part of each matrix (a host read) only where the solver may read the host."""
    op = "lowrank_sparse"
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{op}: mask must be None or a bool tensor broadcastable to X, got "
            f"{type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (False = unobserved), got {mask.dtype}")
    try:
        shape = torch.broadcast_shapes(mask.shape, X.shape)
    except RuntimeError:
        shape = None
    if shape != X.shape:
        raise ValueError(
            f"{op}: mask of shape {list(mask.shape)} does not broadcast to X's shape "
            f"{list(X.shape)}"
        )
    if mask.device != X.device:
        raise ValueError(f"{op}: mask is on {mask.device} but X is on {X.device}")
    if not _rpca.may_sync(mask) or not _rpca.may_sync(X) or X.numel() == 0:
        return
    full = mask.expand(X.shape).reshape(-1, *X.shape[-2:])
    rows = full.any(dim=-1).sum(dim=-1)
    cols = full.any(dim=-2).sum(dim=-1)
    short = torch.minimum(rows, cols)
    bad = torch.nonzero(short < max(1, int(k))).flatten().tolist()
    if bad:
        i = bad[0]
        where = f"matrix {i} of the batch (flattened)" if X.dim() > 2 else "the matrix"
        if int(short[i]) == 0:
            raise ValueError(f"{op}: mask leaves no observed entry in {where}")
        raise ValueError(
            f"{op}: k = {k} is too large for the observed part of {where}: mask leaves "
            f"{int(rows[i])} row(s) and {int(cols[i])} column(s) with an observed entry, "
            f"and k must not exceed either"
        )


def _refuse_rpca_derivative(X: Tensor, lam) -> None:
    """The robust-PCA solver has no derivative: a call that asks for one (an input that
    requires grad, or carries a forward-mode tangent) raises, naming the argument and mode."""
    for name, t in (("X", X), ("lam", lam)):
        if not isinstance(t, Tensor):
            continue
        if torch.is_grad_enabled() and t.requires_grad:
            mode = "a gradient (backward, torch.func.grad, vjp, jacrev)"
        elif (
            not torch.compiler.is_compiling()
            and _transform_active()
            and _fwAD.unpack_dual(t).tangent is not None
        ):
            mode = "a forward-mode tangent (torch.func.jvp, jacfwd, torch.autograd.forward_ad)"
        else:
            continue
        raise RuntimeError(
            f"lowrank_sparse(method='rpca') is not differentiable, but {name} asks for {mode}; "
            f"call it under torch.no_grad() on {name}.detach(), or use method='unrolled'"
        )


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
