"""Bad input, as a specification: for each kind of bad argument or bad file, the exception type
and a message that names the function or class, the argument (or the file) and what was wrong.

Conventions checked here (the kernels' own, for the ops):
* TypeError: an argument of the wrong Python type (a list for a tensor, a float for an integer,
  a string for a number); also a non-floating tensor given to a module or to the data helpers;
* RuntimeError: a tensor of a dtype an op's kernels do not take (as the compiled ops report it);
* ValueError: a value out of range, a wrong shape, a bad state dict, a bad file or labels line;
* FileNotFoundError: a file that is not there.

Cases already specified with their messages in the other test files are not repeated here; each
row below is a distinct kind of bad input. Each table row reads: (id, call, exception, message
pattern), where the pattern is searched in the message (``pytest.raises(match=...)``).
"""

import math

import numpy as np
import pytest
import torch

from lsef_ext import ops
from lsef_ext.data import FeatureFolder, SyntheticAffect, corrupt
from lsef_ext.nn import CIM, DDM, LSEF, SEM, MeanPoolMLP, TemporalTransformer
from lsef_ext.optim import RAO

NAN, INF = math.nan, math.inf


def X(*shape, dtype=torch.float32):
    return (
        torch.randn(*shape, dtype=dtype)
        if dtype.is_floating_point
        else torch.ones(*shape).to(dtype)
    )


def Q(*shape):
    """Orthonormal columns, shape (*, m, r)."""
    return torch.linalg.qr(torch.randn(*shape))[0]


def case(id, call, exc, match):
    return pytest.param(call, exc, match, id=id)


# ---------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------

OPS = [
    # soft_threshold
    case(
        "soft_threshold-X-list",
        lambda: ops.soft_threshold([1.0, 2.0], None, 0.1),
        TypeError,
        r"^soft_threshold: X must be a tensor, got list$",
    ),
    case(
        "soft_threshold-L-list",
        lambda: ops.soft_threshold(X(4, 6), [0.0] * 6, 0.1),
        TypeError,
        r"^soft_threshold: L must be a tensor or None, got list$",
    ),
    case(
        "soft_threshold-hard-str",
        lambda: ops.soft_threshold(X(4, 6), None, 0.1, hard="yes"),
        TypeError,
        r"^soft_threshold: hard must be a bool, got str 'yes'$",
    ),
    case(
        "soft_threshold-lam-complex",
        lambda: ops.soft_threshold(X(4, 6), None, 0.1j),
        TypeError,
        r"^soft_threshold: lam must be a number or a tensor, got complex$",
    ),
    case(
        "soft_threshold-X-complex",
        lambda: ops.soft_threshold(X(4, 6).to(torch.complex64), None, 0.1),
        RuntimeError,
        r"soft_threshold: X must be a floating-point tensor, got ComplexFloat",
    ),
    # rank_scale
    case(
        "rank_scale-G-list",
        lambda: ops.rank_scale([[1.0]], Q(6, 2), 0.5, 2.0),
        TypeError,
        r"^rank_scale: G must be a tensor, got list$",
    ),
    case(
        "rank_scale-U-None",
        lambda: ops.rank_scale(X(6, 7), None, 0.5, 2.0),
        TypeError,
        r"^rank_scale: U must be a tensor, got NoneType$",
    ),
    case(
        "torch.ops-rank_scale-U-None",
        lambda: torch.ops.lsef.rank_scale(X(6, 7), None, torch.tensor(0.5), torch.tensor(2.0)),
        TypeError,
        r"^rank_scale: U must be a tensor, got None$",
    ),
    case(
        "rank_scale-U-1d",
        lambda: ops.rank_scale(X(6, 7), X(6), 0.5, 2.0),
        ValueError,
        r"rank_scale: U must have at least 2 dimensions \(\*, m, r\), got shape \[6\]",
    ),
    case(
        "rank_scale-G-complex",
        lambda: ops.rank_scale(X(6, 7).to(torch.complex64), Q(6, 2), 0.5, 2.0),
        RuntimeError,
        r"^rank_scale: G must be float32 or float64 on the CPU, got ComplexFloat",
    ),
    # rank_aware_grad_scale: named after itself and its argument x, never rank_scale and G
    case(
        "rank_aware_grad_scale-x-list",
        lambda: ops.rank_aware_grad_scale([[1.0]], Q(6, 2), 0.5, 2.0),
        TypeError,
        r"^rank_aware_grad_scale: x must be a tensor, got list$",
    ),
    case(
        "rank_aware_grad_scale-U-None",
        lambda: ops.rank_aware_grad_scale(X(6, 7), None, 0.5, 2.0),
        TypeError,
        r"^rank_aware_grad_scale: U must be a tensor, got NoneType$",
    ),
    case(
        "rank_aware_grad_scale-x-integer",
        lambda: ops.rank_aware_grad_scale(X(6, 7, dtype=torch.int64), Q(6, 2).long(), 1, 2),
        RuntimeError,
        r"^rank_aware_grad_scale: x must be a floating-point tensor, got torch.int64$",
    ),
    case(
        "rank_aware_grad_scale-x-half-on-cpu",
        lambda: ops.rank_aware_grad_scale(X(6, 7).half(), Q(6, 2).half(), 0.5, 2.0),
        RuntimeError,
        r"^rank_aware_grad_scale: x must be float32 or float64 on the CPU, got torch.float16$",
    ),
    case(
        "rank_aware_grad_scale-x-1d",
        lambda: ops.rank_aware_grad_scale(X(7), Q(6, 2), 0.5, 2.0),
        ValueError,
        r"^rank_aware_grad_scale: x must have at least 2 dimensions \(\*, m, n\), got shape \[7\]$",
    ),
    case(
        "rank_aware_grad_scale-U-wider-than-tall",
        lambda: ops.rank_aware_grad_scale(X(3, 6, 7), X(3, 6, 7), 0.5, 2.0),
        ValueError,
        r"^rank_aware_grad_scale: U has 7 columns but only 6 rows",
    ),
    case(
        "rank_aware_grad_scale-U-other-batch",
        lambda: ops.rank_aware_grad_scale(X(3, 6, 7), Q(2, 6, 2), 0.5, 2.0),
        ValueError,
        r"^rank_aware_grad_scale: U must have x's batch shape \[3\] or be 2-D",
    ),
    # rsvd
    case(
        "rsvd-A-list",
        lambda: ops.rsvd([[1.0, 2.0]], 1),
        TypeError,
        r"^rsvd: A must be a tensor, got list$",
    ),
    case(
        "rsvd-k-float",
        lambda: ops.rsvd(X(8, 6), 2.5),
        TypeError,
        r"^rsvd: k must be an integer, got float 2.5$",
    ),
    case(
        "rsvd-k-bool",
        lambda: ops.rsvd(X(8, 6), True),
        TypeError,
        r"^rsvd: k must be an integer, got bool True$",
    ),
    case(
        "rsvd-k-None",
        lambda: ops.rsvd(X(8, 6), None),
        TypeError,
        r"^rsvd: k must be an integer, got NoneType None$",
    ),
    case(
        "rsvd-seed-float",
        lambda: ops.rsvd(X(8, 6), 2, seed=0.5),
        TypeError,
        r"^rsvd: seed must be an integer, got float 0.5$",
    ),
    case(
        "rsvd-empty-matrix",
        lambda: ops.rsvd(X(0, 6), 1),
        ValueError,
        r"^rsvd: A must have matrices of m, n >= 1 \(A is \(\*, m, n\)\), got shape \[0, 6\]$",
    ),
    case(
        "rsvd-A-complex",
        lambda: ops.rsvd(X(8, 6).to(torch.complex64), 2),
        RuntimeError,
        r"rsvd: A must be a floating-point tensor, got ComplexFloat",
    ),
    case(
        "rsvd-A-half-on-cpu",
        lambda: ops.rsvd(X(8, 6).half(), 2),
        RuntimeError,
        r"rsvd: A must be float32 or float64 on the CPU, got Half",
    ),
    # lowrank
    case(
        "lowrank-n_iter-float",
        lambda: ops.lowrank(X(8, 6), 2, n_iter=1.5),
        TypeError,
        r"^lowrank: n_iter must be an integer, got float 1.5$",
    ),
    case(
        "lowrank-oversample-str",
        lambda: ops.lowrank(X(8, 6), 2, oversample="8"),
        TypeError,
        r"^lowrank: oversample must be an integer, got str '8'$",
    ),
    case(
        "lowrank-A-1d",
        lambda: ops.lowrank(X(5), 1),
        ValueError,
        r"lowrank: A must have at least 2 dimensions \(\*, m, n\), got shape \[5\]",
    ),
    case(
        "lowrank-oversample-negative",
        lambda: ops.lowrank(X(8, 6), 2, oversample=-1),
        ValueError,
        r"lowrank: oversample must be >= 0, got -1",
    ),
    # lowrank_sparse
    case(
        "lowrank_sparse-k-0",
        lambda: ops.lowrank_sparse(X(8, 6), 0),
        ValueError,
        r"^lowrank_sparse: k must be in \[1, min\(m, n\)\] = \[1, 6\] for X of shape \[8, 6\], "
        r"got 0$",
    ),
    case(
        "lowrank_sparse-k-0-unrolled",
        lambda: ops.lowrank_sparse(X(8, 6), 0, method="unrolled"),
        ValueError,
        r"^lowrank_sparse: k must be in \[1, min\(m, n\)\] = \[1, 6\] .* got 0$",
    ),
    case(
        "lowrank_sparse-k-negative",
        lambda: ops.lowrank_sparse(X(2, 8, 6), -1),
        ValueError,
        r"^lowrank_sparse: k must be in \[1, min\(m, n\)\] = \[1, 6\] for X of shape "
        r"\[2, 8, 6\], got -1$",
    ),
    case(
        "lowrank_sparse-k-float",
        lambda: ops.lowrank_sparse(X(8, 6), 2.5),
        TypeError,
        r"^lowrank_sparse: k must be an integer, got float 2.5$",
    ),
    case(
        "lowrank_sparse-k-None",
        lambda: ops.lowrank_sparse(X(8, 6), None),
        TypeError,
        r"^lowrank_sparse: k must be an integer, got NoneType None$",
    ),
    case(
        "lowrank_sparse-lam-str",
        lambda: ops.lowrank_sparse(X(8, 6), 2, lam="0.1"),
        TypeError,
        r"^lowrank_sparse: lam must be None, a number >= 0 or a tensor, got str '0.1'$",
    ),
    case(
        "lowrank_sparse-lam-negative",
        lambda: ops.lowrank_sparse(X(8, 6), 2, lam=-0.1),
        ValueError,
        r"^lowrank_sparse: lam must be a number >= 0, got -0.1$",
    ),
    case(
        "lowrank_sparse-lam-nan",
        lambda: ops.lowrank_sparse(X(8, 6), 2, lam=NAN, method="unrolled"),
        ValueError,
        r"^lowrank_sparse: lam must be a number >= 0, got nan$",
    ),
    case(
        "lowrank_sparse-n_steps-float",
        lambda: ops.lowrank_sparse(X(8, 6), 2, n_steps=2.5),
        TypeError,
        r"^lowrank_sparse: n_steps must be an integer, got float 2.5$",
    ),
    case(
        "lowrank_sparse-X-list",
        lambda: ops.lowrank_sparse([[1.0, 2.0]], 1),
        TypeError,
        r"^lowrank_sparse: X must be a tensor, got list$",
    ),
    case(
        "lowrank_sparse-X-1d",
        lambda: ops.lowrank_sparse(X(5), 1),
        ValueError,
        r"^lowrank_sparse: X must have at least 2 dimensions \(\*, m, n\), got shape \[5\]$",
    ),
    case(
        "lowrank_sparse-X-integer",
        lambda: ops.lowrank_sparse(X(8, 6, dtype=torch.int64), 2),
        RuntimeError,
        r"^lowrank_sparse: X must be a floating-point tensor, got torch.int64$",
    ),
    case(
        "lowrank_sparse-X-empty-matrix",
        lambda: ops.lowrank_sparse(X(3, 0, 6), 1),
        ValueError,
        r"^lowrank_sparse: X must have matrices of m, n >= 1, got shape \[3, 0, 6\]$",
    ),
    case(
        "lowrank_sparse-noise-inf",
        lambda: ops.lowrank_sparse(X(8, 6), 2, noise=INF),
        ValueError,
        r"^lowrank_sparse: noise must be a finite number >= 0, got inf$",
    ),
]


@pytest.mark.parametrize("call, exc, match", OPS)
def test_ops(call, exc, match):
    with torch.no_grad(), pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------

D, DM = 8, 16

MODULES = [
    # constructor sizes and hyperparameters
    case(
        "LSEF-num_classes-0",
        lambda: LSEF(D, num_classes=0),
        ValueError,
        r"^LSEF: num_classes must be >= 1, got 0$",
    ),
    case("LSEF-d_in-0", lambda: LSEF(0), ValueError, r"^SEM: d_in must be >= 1, got 0$"),
    case(
        "LSEF-d_in-float",
        lambda: LSEF(8.0),
        TypeError,
        r"^SEM: d_in must be an integer, got float 8.0$",
    ),
    case(
        "LSEF-d_model-0",
        lambda: LSEF(D, d_model=0),
        ValueError,
        r"^SEM: d_model must be >= 1, got 0$",
    ),
    case(
        "LSEF-dropout-above-1",
        lambda: LSEF(D, dropout=1.5),
        ValueError,
        r"^LSEF: dropout must be in \[0, 1\], got 1.5$",
    ),
    case(
        "LSEF-loss_weights-two",
        lambda: LSEF(D, loss_weights=(0.1, 0.1)),
        ValueError,
        r"^LSEF: loss_weights must be three numbers \(recon, sparsity, agreement\), got 2",
    ),
    case(
        "LSEF-loss_weights-negative",
        lambda: LSEF(D, loss_weights=(0.1, -0.1, 0.1)),
        ValueError,
        r"^LSEF: loss_weights must be finite numbers >= 0, got \(0.1, -0.1, 0.1\)$",
    ),
    case(
        "LSEF-loss_weights-nan",
        lambda: LSEF(D, loss_weights=(0.1, 0.1, NAN)),
        ValueError,
        r"^LSEF: loss_weights must be finite numbers >= 0, got \(0.1, 0.1, nan\)$",
    ),
    case(
        "LSEF-loss_weights-str",
        lambda: LSEF(D, loss_weights="0.1"),
        TypeError,
        r"^LSEF: loss_weights must be a sequence of three numbers",
    ),
    case(
        "LSEF-loss_weights-entry-str",
        lambda: LSEF(D, loss_weights=(0.1, "0.1", 0.1)),
        TypeError,
        r"^LSEF: each of loss_weights must be a number, got str '0.1'$",
    ),
    case(
        "DDM-lam_init-str",
        lambda: DDM(D, lam_init="1"),
        TypeError,
        r"^DDM: lam_init must be a number, got str '1'$",
    ),
    case(
        "TemporalTransformer-heads-0",
        lambda: TemporalTransformer(D, heads=0),
        ValueError,
        r"^TemporalTransformer: heads must be >= 1, got 0$",
    ),
    case(
        "SEM-rank-float",
        lambda: SEM(D, rank=2.5),
        TypeError,
        r"^SEM: rank must be an integer, got float 2.5$",
    ),
    case(
        "SEM-rpca_steps-float",
        lambda: SEM(D, rpca_steps=1.0),
        TypeError,
        r"^SEM: rpca_steps must be an integer, got float 1.0$",
    ),
    case(
        "SEM-rpca_lam-negative",
        lambda: SEM(D, rpca_lam=-0.5),
        ValueError,
        r"^SEM: rpca_lam must be a finite number > 0, got -0.5$",
    ),
    case("DDM-rank-0", lambda: DDM(D, rank=0), ValueError, r"^DDM: rank must be >= 1, got 0$"),
    case(
        "DDM-lam_init-nan",
        lambda: DDM(D, lam_init=NAN),
        ValueError,
        r"^DDM: lam_init and sat_init must be > 0 and finite, got nan, 1.5$",
    ),
    case(
        "DDM-sat_init-inf",
        lambda: DDM(D, sat_init=INF),
        ValueError,
        r"^DDM: lam_init and sat_init must be > 0 and finite, got 1.0, inf$",
    ),
    case(
        "DDM-refine-str",
        lambda: DDM(D, refine="1"),
        TypeError,
        r"^DDM: refine must be an integer, got str '1'$",
    ),
    case("CIM-d_model-0", lambda: CIM(0), ValueError, r"^CIM: d_model must be >= 1, got 0$"),
    case(
        "CIM-scales-int",
        lambda: CIM(DM, scales=2),
        TypeError,
        r"^CIM: scales must be a sequence of positive integers, got int 2$",
    ),
    case(
        "CIM-scales-float",
        lambda: CIM(DM, scales=(1, 1.5)),
        TypeError,
        r"^CIM: scales must be positive integers, got \(1, 1.5\)$",
    ),
    case(
        "MeanPoolMLP-num_classes-0",
        lambda: MeanPoolMLP(D, num_classes=0),
        ValueError,
        r"^MeanPoolMLP: num_classes must be >= 1, got 0$",
    ),
    case(
        "MeanPoolMLP-hidden-0",
        lambda: MeanPoolMLP(D, hidden=0),
        ValueError,
        r"^MeanPoolMLP: hidden must be >= 1, got 0$",
    ),
    case(
        "MeanPoolMLP-task",
        lambda: MeanPoolMLP(D, task="ranking"),
        ValueError,
        r"^MeanPoolMLP: task must be 'classification' or 'regression', got 'ranking'$",
    ),
    case(
        "MeanPoolMLP-dropout-negative",
        lambda: MeanPoolMLP(D, dropout=-0.1),
        ValueError,
        r"^MeanPoolMLP: dropout must be in \[0, 1\], got -0.1$",
    ),
    case(
        "TemporalTransformer-heads-not-dividing-d_model",
        lambda: TemporalTransformer(D, d_model=64, heads=3),
        ValueError,
        r"^TemporalTransformer: d_model must be divisible by heads, got d_model = 64, heads = 3$",
    ),
    case(
        "TemporalTransformer-layers-0",
        lambda: TemporalTransformer(D, layers=0),
        ValueError,
        r"^TemporalTransformer: layers must be >= 1, got 0$",
    ),
    case(
        "TemporalTransformer-max_T-0",
        lambda: TemporalTransformer(D, max_T=0),
        ValueError,
        r"^TemporalTransformer: max_T must be >= 1, got 0$",
    ),
    case(
        "TemporalTransformer-task",
        lambda: TemporalTransformer(D, task="va"),
        ValueError,
        r"^TemporalTransformer: task must be 'classification' or 'regression', got 'va'$",
    ),
    # forward inputs
    case(
        "CIM-Z_S-other-channels",
        lambda: CIM(DM)(X(2, 5, DM), X(2, 5, DM - 1)),
        ValueError,
        r"^CIM: Z_S must have Z_L's shape \(2, 5, 16\), got \(2, 5, 15\)$",
    ),
    case(
        "CIM-Z_S-other-frames",
        lambda: CIM(DM)(X(2, 5, DM), X(2, 4, DM)),
        ValueError,
        r"^CIM: Z_S must have Z_L's shape \(2, 5, 16\), got \(2, 4, 16\)$",
    ),
    case(
        "CIM-Z_S-list",
        lambda: CIM(DM)(X(2, 5, DM), [0.0]),
        TypeError,
        r"^CIM: Z_S must be a tensor, got list$",
    ),
    case(
        "CIM-Z_L-wrong-shape",
        lambda: CIM(DM)(X(2, 5, DM + 1), X(2, 5, DM + 1)),
        ValueError,
        r"^CIM: expected Z_L of shape \(B, T, 16\), got \(2, 5, 17\)$",
    ),
    case(
        "LSEF-X-list",
        lambda: LSEF(D, d_model=DM)([[0.0] * D] * 4),
        TypeError,
        r"^LSEF: X must be a tensor, got list$",
    ),
    case(
        "LSEF-X-integer",
        lambda: LSEF(D, d_model=DM)(X(2, 6, D, dtype=torch.int64)),
        TypeError,
        r"^LSEF: X must be a floating-point tensor, got torch.int64$",
    ),
    case(
        "DDM-L-list",
        lambda: DDM(D, DM)(X(2, 6, D), [0.0]),
        TypeError,
        r"^DDM: L must be a tensor, got list$",
    ),
    case(
        "MeanPoolMLP-X-integer",
        lambda: MeanPoolMLP(D)(X(2, 6, D, dtype=torch.int32)),
        TypeError,
        r"^MeanPoolMLP: X must be a floating-point tensor, got torch.int32$",
    ),
]


@pytest.mark.parametrize("call, exc, match", MODULES)
def test_modules(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("kw", [{}, {"use_sem": False}, {"use_ddm": False}, {"use_cim": False}])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_lsef_empty_batch_gives_empty_outputs_and_zero_terms(kw, task):
    """B = 0 is valid input (the docstring says so): empty outputs and consistency terms of 0,
    not the NaN of a mean over nothing, with a graph to backpropagate through."""
    model = LSEF(D, 5, d_model=DM, rank=2, task=task, **kw)
    Xe = torch.randn(0, 6, D, requires_grad=True)
    out = model(Xe)
    assert out.pred.shape == (0, 5 if task == "classification" else 2)
    assert out.L.shape == out.S.shape == (0, 6, D)
    assert set(out.terms) == {"recon", "sparsity"} | (
        {"agreement"} if kw != {"use_cim": False} else set()
    )
    for name, t in out.terms.items():
        assert t.shape == () and t.item() == 0.0, name
    loss = out.pred.sum() + model.regulariser(out)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, Xe)
    assert g.shape == Xe.shape


# ---------------------------------------------------------------------------------------------
# RAO
# ---------------------------------------------------------------------------------------------


def sgd(*shapes, cls=torch.optim.SGD, **kw):
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    return params, cls(params, lr=0.1, **kw)


def stepped(*shapes, cls=torch.optim.SGD, **kw):
    """An RAO over fresh parameters after one step (so it has state)."""
    params, inner = sgd(*shapes, cls=cls, **kw)
    opt = RAO(inner, rank=2, update_every=1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def load_into(target_shapes, source, target_cls=torch.optim.SGD):
    def call():
        _, inner = sgd(*target_shapes, cls=target_cls)
        RAO(inner, rank=2).load_state_dict(source())

    return call


def with_step(step):
    def make():
        sd = stepped((16, 12)).state_dict()
        sd["step"] = step
        return sd

    return make


def edited(edit, shapes=((16, 12),), cls=torch.optim.SGD):
    """A saved RAO state (after one step) changed by ``edit(state_dict)``."""

    def make():
        sd = stepped(*shapes, cls=cls).state_dict()
        edit(sd)
        return sd

    return make


RAO_CASES = [
    case(
        "RAO-alpha_max-nan",
        lambda: RAO(sgd((16, 12))[1], alpha_max=NAN),
        ValueError,
        r"^RAO: alpha_max must be >= 1, got nan$",
    ),
    case(
        "RAO-alpha_max-str",
        lambda: RAO(sgd((16, 12))[1], alpha_max="2"),
        TypeError,
        r"^RAO: alpha_max must be a number, got str '2'$",
    ),
    case(
        "RAO-rank-float",
        lambda: RAO(sgd((16, 12))[1], rank=2.5),
        TypeError,
        r"^RAO: rank must be an integer, got float 2.5$",
    ),
    case(
        "RAO-rank-bool",
        lambda: RAO(sgd((16, 12))[1], rank=True),
        TypeError,
        r"^RAO: rank must be an integer, got bool True$",
    ),
    case(
        "RAO-update_every-float",
        lambda: RAO(sgd((16, 12))[1], update_every=1.5),
        TypeError,
        r"^RAO: update_every must be an integer, got float 1.5$",
    ),
    case(
        "RAO-min_size-1",
        lambda: RAO(sgd((16, 12))[1], min_size=1),
        ValueError,
        r"^RAO: min_size must be >= 2, got 1$",
    ),
    case(
        "RAO-momentum-str",
        lambda: RAO(sgd((16, 12))[1], momentum="0.9"),
        TypeError,
        r"^RAO: momentum must be a number, got str '0.9'$",
    ),
    case(
        "RAO-momentum-nan",
        lambda: RAO(sgd((16, 12))[1], momentum=NAN),
        ValueError,
        r"^RAO: momentum must be in \[0, 1\), got nan$",
    ),
    case(
        "RAO-strength-nan",
        lambda: RAO(sgd((16, 12))[1], strength=NAN),
        ValueError,
        r"^RAO: strength must be in \[0, 1\), got nan$",
    ),
    # load_state_dict of something else
    case(
        "RAO.load_state_dict-list",
        lambda: RAO(sgd((16, 12))[1]).load_state_dict([1, 2]),
        ValueError,
        r"^RAO.load_state_dict: expected a state dict saved by RAO.state_dict\(\)",
    ),
    case(
        "RAO.load_state_dict-step-negative",
        load_into([(16, 12)], with_step(-3)),
        ValueError,
        r"^RAO.load_state_dict: 'step' must be an integer >= 0, got -3$",
    ),
    case(
        "RAO.load_state_dict-step-float",
        load_into([(16, 12)], with_step(2.5)),
        ValueError,
        r"^RAO.load_state_dict: 'step' must be an integer >= 0, got 2.5$",
    ),
    case(
        "RAO.load_state_dict-rao-not-a-dict",
        load_into([(16, 12)], edited(lambda sd: sd.update(rao=[]))),
        ValueError,
        r"^RAO.load_state_dict: 'rao' must be a dict \(parameter index -> state\), got list$",
    ),
    case(
        "RAO.load_state_dict-entry-without-average",
        load_into([(16, 12)], edited(lambda sd: sd["rao"][0].pop("M"))),
        ValueError,
        r"^RAO.load_state_dict: the entry for parameter 0 lacks its gradient average 'M'$",
    ),
    case(
        "RAO.load_state_dict-basis-rows",
        load_into([(16, 12)], edited(lambda sd: sd["rao"][0].update(U=torch.zeros(15, 2)))),
        ValueError,
        r"^RAO.load_state_dict: the basis U for parameter 0 must have 16 rows, got \(15, 2\)$",
    ),
    case(
        "RAO.load_state_dict-optimizer-not-a-state-dict",
        load_into([(16, 12)], edited(lambda sd: sd.update(optimizer={"lr": 0.1}))),
        ValueError,
        r"^RAO.load_state_dict: 'optimizer' must be a torch optimizer's state dict",
    ),
    case(
        "RAO.load_state_dict-other-parameter-shape",
        load_into([(20, 12)], lambda: stepped((16, 12)).state_dict()),
        ValueError,
        r"^RAO.load_state_dict: parameter 0 has shape \(20, 12\) \(read as the matrix "
        r"\(20, 12\)\), but the state's gradient average for it has shape \(16, 12\)",
    ),
    case(
        "RAO.load_state_dict-more-parameters",
        load_into([(16, 12)], lambda: stepped((16, 12), (16, 12)).state_dict()),
        ValueError,
        r"^RAO.load_state_dict: the state has an entry for parameter 1, but this optimizer has "
        r"1 parameters",
    ),
    case(
        "RAO.load_state_dict-fewer-parameters",
        load_into([(16, 12), (16, 12)], lambda: stepped((16, 12)).state_dict()),
        ValueError,
        r"^RAO.load_state_dict: the wrapped SGD's state does not fit .*parameter group",
    ),
    case(
        "RAO.load_state_dict-other-optimizer",
        load_into([(16, 12)], lambda: stepped((16, 12), cls=torch.optim.Adam).state_dict()),
        ValueError,
        r"^RAO.load_state_dict: the wrapped optimizer's state lacks SGD's hyperparameter\(s\) "
        r"\['dampening', 'momentum'\]",
    ),
    case(
        "RAO.load_state_dict-other-model-before-RAO-state",
        load_into(
            [(20, 12)],
            lambda: RAO(stepped((16, 12), cls=torch.optim.Adam).optimizer, rank=2).state_dict(),
            target_cls=torch.optim.Adam,
        ),
        ValueError,
        r"^RAO.load_state_dict: the wrapped optimizer's state 'exp_avg' for parameter 0 has "
        r"shape \(16, 12\), but the parameter has shape \(20, 12\)",
    ),
]


@pytest.mark.parametrize("call, exc, match", RAO_CASES)
def test_rao(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_rao_refused_state_changes_nothing():
    """A refused load_state_dict leaves RAO and the wrapped optimizer as they were."""
    mine = stepped((16, 12), cls=torch.optim.SGD)
    before = mine.state_dict()
    groups = [dict(g) for g in mine.param_groups]
    for other in (stepped((16, 12), cls=torch.optim.Adam), stepped((20, 12))):
        with pytest.raises(ValueError, match="RAO.load_state_dict"):
            mine.load_state_dict(other.state_dict())
        after = mine.state_dict()
        assert after["step"] == before["step"]
        assert torch.equal(after["rao"][0]["M"], before["rao"][0]["M"])
        assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
        assert [dict(g) for g in mine.param_groups] == groups


# ---------------------------------------------------------------------------------------------
# data: SyntheticAffect and corrupt
# ---------------------------------------------------------------------------------------------

DATA = [
    case(
        "SyntheticAffect-noise-nan",
        lambda: SyntheticAffect(4, T=8, D=24, noise=NAN),
        ValueError,
        r"^SyntheticAffect: noise must be a finite number >= 0, got nan$",
    ),
    case(
        "SyntheticAffect-noise-negative",
        lambda: SyntheticAffect(4, T=8, D=24, noise=-0.5),
        ValueError,
        r"^SyntheticAffect: noise must be a finite number >= 0, got -0.5$",
    ),
    case(
        "SyntheticAffect-n_clips-float",
        lambda: SyntheticAffect(4.0, T=8, D=24),
        TypeError,
        r"^SyntheticAffect: n_clips must be an integer, got float 4.0$",
    ),
    case(
        "SyntheticAffect-D-str",
        lambda: SyntheticAffect(4, T=8, D="24"),
        TypeError,
        r"^SyntheticAffect: D must be an integer, got str '24'$",
    ),
    case(
        "SyntheticAffect-seed-float",
        lambda: SyntheticAffect(4, T=8, D=24, seed=0.5),
        TypeError,
        r"^SyntheticAffect: seed must be an integer, got float 0.5$",
    ),
    case(
        "corrupt-severity-nan",
        lambda: corrupt(X(2, 6, 4), "impulse", NAN),
        ValueError,
        r"^corrupt: severity must be finite, got nan$",
    ),
    case(
        "corrupt-severity-inf",
        lambda: corrupt(X(2, 6, 4), "gaussian", INF),
        ValueError,
        r"^corrupt: severity must be finite, got inf$",
    ),
    case(
        "corrupt-severity-str",
        lambda: corrupt(X(2, 6, 4), "frame_drop", "1"),
        TypeError,
        r"^corrupt: severity must be a number, got str '1'$",
    ),
    case(
        "corrupt-x-list",
        lambda: corrupt([[0.0]], "impulse"),
        TypeError,
        r"^corrupt: x must be a tensor, got list$",
    ),
    case(
        "corrupt-x-1d",
        lambda: corrupt(X(6), "frame_drop"),
        ValueError,
        r"^corrupt: x must have shape \(\*, T, D\), got \(6,\)$",
    ),
    case(
        "corrupt-x-integer",
        lambda: corrupt(X(2, 6, 4, dtype=torch.int64), "gaussian"),
        TypeError,
        r"^corrupt: x must be a floating-point tensor, got torch.int64$",
    ),
]


@pytest.mark.parametrize("call, exc, match", DATA)
def test_data(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# data: FeatureFolder files
# ---------------------------------------------------------------------------------------------


def folder(root, rows, arrays=None, header="clip,label,split", raw=None):
    """A FeatureFolder at ``root``: labels.csv from ``rows`` (or the bytes ``raw``), and a
    (5, 6) float32 array for every clip unless ``arrays`` gives one (None: no file)."""
    (root / "features").mkdir(parents=True, exist_ok=True)
    if raw is None:
        raw = (header + "\n" + "".join(",".join(r) + "\n" for r in rows)).encode()
    (root / "labels.csv").write_bytes(raw)
    arrays = dict(arrays or {})
    for r in rows:
        name = r[0]
        if name in arrays or not name or ".." in name or name.startswith("/"):
            continue
        arrays[name] = np.random.randn(5, 6).astype(np.float32)
    for name, a in arrays.items():
        if a is not None:
            path = root / "features" / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, a)
    return str(root)


ROWS = [("a", "x", "train"), ("b", "y", "train")]


def with_b(a):
    """The standard folder with clip b's features replaced by ``a``."""
    return lambda root: FeatureFolder(folder(root, ROWS, {"b": a}))


def with_b_bytes(data):
    def call(root):
        folder(root, ROWS)
        (root / "features" / "b.npy").write_bytes(data)
        return FeatureFolder(str(root))

    return call


def nan_at(t, d, value):
    a = np.random.randn(5, 6)
    a[t, d] = value
    return a


def npy_bytes(a, cut=0):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    data = buf.getvalue()
    return data[: len(data) - cut]


def npz_at_b(root):
    folder(root, ROWS, {"b": None})
    with open(root / "features" / "b.npy", "wb") as f:
        np.savez(f, x=np.zeros((5, 6)))
    return FeatureFolder(str(root))


def b_is_a_folder(root):
    folder(root, ROWS, {"b": None})
    (root / "features" / "b.npy").mkdir()
    return FeatureFolder(str(root))


def with_rows(rows, **kw):
    return lambda root: FeatureFolder(folder(root, rows), **kw)


def with_raw(raw, **kw):
    return lambda root: FeatureFolder(folder(root, [], raw=raw), **kw)


B_NPY = r"features[/\\]b\.npy"
CSV = r"labels\.csv"

FILES = [
    case(
        "FeatureFolder-nan-feature",
        with_b(nan_at(2, 3, np.nan)),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} has 1 non-finite value\(s\) .*first at frame 2, channel 3 "
        r"\(value nan\)",
    ),
    case(
        "FeatureFolder-inf-feature",
        with_b(nan_at(4, 0, -np.inf)),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} has 1 non-finite value\(s\) .*first at frame 4, channel 0 "
        r"\(value -inf\)",
    ),
    case(
        "FeatureFolder-beyond-float32",
        with_b(nan_at(1, 1, 1e300)),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} has 1 non-finite value\(s\) \(NaN, Inf, or beyond "
        r"float32's range\), the first at frame 1, channel 1 \(value 1e\+300\)",
    ),
    case(
        "FeatureFolder-complex",
        with_b(np.ones((5, 6)) + 1j),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} has dtype complex128 \(complex\); expected real numbers",
    ),
    case(
        "FeatureFolder-strings",
        with_b(np.full((5, 6), "x")),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} has dtype <U1 \(not numeric\)",
    ),
    case(
        "FeatureFolder-pickled-objects",
        with_b_bytes(npy_bytes(np.array([[None] * 6] * 5, dtype=object))),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} is not a readable \.npy array .*allow_pickle=False",
    ),
    case(
        "FeatureFolder-not-npy",
        with_b_bytes(b"T,D\n1,2\n"),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} is not a readable \.npy array",
    ),
    case(
        "FeatureFolder-empty-file",
        with_b_bytes(b""),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} is not a readable \.npy array",
    ),
    case(
        "FeatureFolder-truncated-npy",
        with_b_bytes(npy_bytes(np.ones((5, 6)), cut=16)),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} is not a readable \.npy array .*Failed to read all data",
    ),
    case(
        "FeatureFolder-npz-archive",
        npz_at_b,
        ValueError,
        rf"FeatureFolder: .*{B_NPY} is a \.npz archive; expected one \.npy array",
    ),
    case(
        "FeatureFolder-feature-path-is-a-folder",
        b_is_a_folder,
        ValueError,
        rf"FeatureFolder: feature file .*{B_NPY} for clip 'b' is not a file",
    ),
    case(
        "FeatureFolder-no-frames",
        with_b(np.zeros((0, 6), dtype=np.float32)),
        ValueError,
        rf"FeatureFolder: .*{B_NPY} has shape \(0, 6\); a clip needs T >= 1 frames",
    ),
    case(
        "FeatureFolder-no-channels",
        lambda root: FeatureFolder(folder(root, ROWS, {"a": np.zeros((5, 0)), "b": None})),
        ValueError,
        r"FeatureFolder: .*features[/\\]a\.npy has shape \(5, 0\); .*D >= 1 channels",
    ),
    case(
        "FeatureFolder-clip-leaves-features",
        with_rows([("a", "x", "train"), ("../outside", "y", "train")]),
        ValueError,
        rf"FeatureFolder: .*{CSV} line 3: clip name '\.\./outside' must be a path inside "
        r".*features",
    ),
    case(
        "FeatureFolder-clip-leaves-features-midway",
        with_rows([("a", "x", "train"), ("sub/../../outside", "y", "test")]),
        ValueError,
        rf"FeatureFolder: .*{CSV} line 3: clip name 'sub/\.\./\.\./outside' must be a path",
    ),
    case(
        "FeatureFolder-clip-absolute",
        with_rows([("/etc/passwd", "x", "train"), ("b", "y", "train")]),
        ValueError,
        rf"FeatureFolder: .*{CSV} line 2: clip name '/etc/passwd' must be a path inside",
    ),
    case(
        "FeatureFolder-clip-empty",
        with_rows([("a", "x", "train"), ("", "y", "train")]),
        ValueError,
        rf"FeatureFolder: .*{CSV} line 3: clip name '' must be a path inside",
    ),
    case(
        "FeatureFolder-labels-not-utf8",
        with_raw(b"clip,label,split\na,caf\xe9,train\n"),
        ValueError,
        rf"FeatureFolder: .*{CSV} is not UTF-8 text \(byte b'\\xe9' on line 2, offset 22\)",
    ),
    case(
        "FeatureFolder-labels-not-csv",
        with_raw(b"clip,label,split\n" + b"a" * 200_000 + b",x,train\n"),
        ValueError,
        rf"FeatureFolder: .*{CSV} is not a readable CSV file: field larger than field limit",
    ),
    case(
        "FeatureFolder-clip-nul",
        with_raw(b"clip,label,split\na\x00b,x,train\n"),
        ValueError,
        rf"FeatureFolder: .*{CSV} line 2: clip name 'a\\x00b' must be a path inside",
    ),
    case(
        "FeatureFolder-labels-too-many-fields",
        with_raw(b"clip,label,split\na,x,train\nb,y,train,extra\n"),
        ValueError,
        rf"FeatureFolder: .*{CSV} line 3: has 4 fields, expected 3 \(clip,label,split\)",
    ),
    case(
        "FeatureFolder-labels-too-few-fields",
        with_raw(b"clip,label,split\na,x\n"),
        ValueError,
        rf"FeatureFolder: .*{CSV} line 2: has 2 fields, expected 3 \(clip,label,split\)",
    ),
    case(
        "FeatureFolder-valence-nan",
        lambda root: FeatureFolder(
            folder(root, [("a", "0.5", "nan", "train")], header="clip,valence,arousal,split"),
            task="regression",
        ),
        ValueError,
        rf"FeatureFolder: .*{CSV}: clip 'a': targets \['valence', 'arousal'\] must be finite "
        r"numbers, got \['0.5', 'nan'\]",
    ),
    case(
        "FeatureFolder-frames-0",
        lambda root: FeatureFolder(folder(root, ROWS), frames=0),
        ValueError,
        r"^FeatureFolder: frames must be >= 1, got 0$",
    ),
    case(
        "FeatureFolder-frames-float",
        lambda root: FeatureFolder(folder(root, ROWS), frames=4.0),
        TypeError,
        r"^FeatureFolder: frames must be an integer, got float 4.0$",
    ),
    case(
        "FeatureFolder-classes-str",
        lambda root: FeatureFolder(folder(root, ROWS), classes="xy"),
        TypeError,
        r"^FeatureFolder: classes must be a sequence of names, got str 'xy'$",
    ),
    case(
        "FeatureFolder-classes-repeated",
        lambda root: FeatureFolder(folder(root, ROWS), classes=["x", "y", "x"]),
        ValueError,
        r"^FeatureFolder: classes lists \['x'\] more than once$",
    ),
    case(
        "FeatureFolder-root-None",
        lambda root: FeatureFolder(None),
        TypeError,
        r"^FeatureFolder: root must be a path \(str or os.PathLike\), got NoneType$",
    ),
]


@pytest.mark.parametrize("call, exc, match", FILES)
def test_files(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_feature_folder_file_checks_do_not_refuse_good_folders(tmp_path):
    """What the checks must still accept: a UTF-8 byte-order mark, clip names in subfolders
    (also with a '..' that stays inside), integer arrays, and a feature file that is a link to
    a file elsewhere."""
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    linked = np.arange(30, dtype=np.float64).reshape(5, 6)
    np.save(elsewhere / "c.npy", linked)
    root = tmp_path / "ds"
    rows = [
        ("s1/a", "x", "train"),
        ("s1/../b", "y", "train"),
        ("c", "x", "train"),
        ("d", "y", "train"),
    ]
    raw = ("\ufeffclip,label,split\n" + "".join(",".join(r) + "\n" for r in rows)).encode()
    ints = np.ones((5, 6), dtype=np.int64)
    folder(root, rows[:2], raw=raw, arrays={"b": np.zeros((5, 6), np.float32), "d": ints})
    (root / "features" / "c.npy").symlink_to(elsewhere / "c.npy")
    ds = FeatureFolder(str(root))
    assert ds.clips == ["s1/a", "s1/../b", "c", "d"]
    assert ds.x.shape == (4, 5, 6) and ds.x.dtype == torch.float32
    np.testing.assert_array_equal(ds.x[2].numpy(), linked.astype(np.float32))
    assert (ds.x[3] == 1).all()


def test_unreadable_feature_file_keeps_its_error_kind_and_names_the_file(tmp_path, monkeypatch):
    """An OSError while reading (permissions, I/O) stays an OSError of the same kind, now
    naming the file and the clip (a test run as root cannot make a file unreadable, so the read
    fails by substitution)."""
    root = folder(tmp_path, ROWS)

    def refuse(path, *args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "load", refuse)
    with pytest.raises(
        PermissionError,
        match=r"^FeatureFolder: cannot read feature file .*features[/\\]a\.npy for clip 'a': ",
    ):
        FeatureFolder(root)
