"""The fused CPU step of the robust-PCA loop (``lsef::_ialm_step_``, csrc/rpca/ialm_step_cpu.cpp).

An internal op: ``rpca_ialm`` calls it in plain eager mode on the CPU, where it stands for eight
ATen expressions, updating W, S and A in place. It must give their bits (S, W', A) and the
residual's squared norm, so that the fused and the unfused loop (traced code, functorch
transforms, CUDA, masks) agree bit for bit.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsef_ext import ops, rpca

DTYPES = [torch.float32, torch.float64]


def composite(X, L, W, t, ratio):
    """The ATen expressions of rpca_ialm's unfused step, with t and ratio as (*, 1, 1)."""
    B = (X + W) - L
    C = torch.clamp(B, -t, t)
    S = B - C
    W2 = C * ratio
    A = (X + W2) - S
    err2 = (C - W).double().pow(2).sum((-2, -1))
    return S, W2, A, err2


def inputs(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X, L, W = (scale * torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    lead = shape[:-2]
    t = scale * torch.rand(lead + (1, 1), generator=g, dtype=dtype)
    ratio = 0.5 + torch.rand(lead + (1, 1), generator=g, dtype=dtype)
    return X, L, W, t, ratio


def step(X, L, W, t, ratio, done=None):
    """The op on copies of W (and fresh S, A buffers): returns (S, W', A, err2)."""
    W, S, A = W.clone(), torch.full_like(X, 7.0), torch.full_like(X, 9.0)
    if done is None:
        done = torch.zeros(X.shape[:-2].numel(), dtype=torch.bool)
    err2 = ops._ialm_step_(X, L, W, S, A, t, ratio, done)
    return S, W, A, err2


def check_against_composite(X, L, W, t, ratio):
    S, W2, A, err2 = step(X, L, W, t, ratio)
    Sr, W2r, Ar, err2r = composite(X, L, W, t, ratio)
    assert torch.equal(S, Sr) and torch.equal(W2, W2r) and torch.equal(A, Ar)
    assert err2.dtype == torch.float64 and err2.shape == X.shape[:-2]
    rtol = 1e-5 if X.dtype == torch.float32 else 1e-12  # the sum's order differs
    torch.testing.assert_close(err2, err2r, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16, 512), (7, 5, 33), (2, 3, 30, 20), (4, 1, 1), (3, 17)])
def test_bits_of_the_aten_expressions(shape, dtype):
    check_against_composite(*inputs(shape, dtype))


def test_done_matrices_are_left_alone():
    X, L, W, t, ratio = inputs((2, 3, 8, 6), torch.float64)
    done = torch.tensor([False, True, False, False, True, True])
    S, W2, A, err2 = step(X, L, W, t, ratio, done)
    Sr, W2r, Ar, err2r = composite(X, L, W, t, ratio)
    d = done.view(2, 3)
    assert (S[d] == 7.0).all() and (A[d] == 9.0).all() and torch.equal(W2[d], W[d])
    assert torch.equal(S[~d], Sr[~d]) and torch.equal(W2[~d], W2r[~d])
    assert torch.equal(A[~d], Ar[~d])
    assert (err2[d] == 0).all()
    torch.testing.assert_close(err2[~d], err2r[~d], rtol=1e-12, atol=0)


def test_per_matrix_values_in_any_shape():
    X, L, W, t, ratio = inputs((2, 3, 8, 6), torch.float64)
    a = step(X, L, W, t, ratio)
    b = step(X, L, W, t.flatten(), ratio.reshape(3, 2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_as_the_aten_expressions(dtype):
    X, L, W, t, ratio = inputs((4, 6, 9), dtype)
    X[0, 1, 2] = float("nan")
    X[1, 0, 0] = float("inf")
    t[2] = float("nan")  # a NaN threshold makes the whole matrix NaN, as torch.clamp does
    ratio[3] = float("nan")
    S, W2, A, err2 = step(X, L, W, t, ratio)
    Sr, W2r, Ar, err2r = composite(X, L, W, t, ratio)
    for a, b in ((S, Sr), (W2, W2r), (A, Ar)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(S[2]).all() and torch.isnan(err2[[0, 2]]).all()
    assert torch.isinf(S[1, 0, 0])  # an Inf entry goes to S; the clamp, and so W', stay finite
    torch.testing.assert_close(err2[[1, 3]], err2r[[1, 3]], rtol=1e-5, atol=0)


def test_empty():
    X = torch.zeros(0, 4, 5)
    S, W2, A, err2 = step(X, X, X, torch.zeros(0), torch.zeros(0))
    assert S.shape == (0, 4, 5) and err2.shape == (0,)
    X = torch.zeros(3, 0, 5)
    S, _, _, err2 = step(X, X, X, torch.zeros(3), torch.ones(3))
    assert S.shape == (3, 0, 5) and torch.equal(err2, torch.zeros(3, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    log_scale=st.floats(-30.0, 30.0),
    m=st.integers(1, 20),
    n=st.integers(1, 40),
    b=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    double=st.booleans(),
)
def test_property_bits_at_any_scale(log_scale, m, n, b, seed, double):
    dtype = torch.float64 if double else torch.float32
    check_against_composite(*inputs((b, m, n), dtype, seed, scale=math.exp(log_scale)))


def test_opcheck():
    for dtype in DTYPES:
        X, L, W, t, ratio = inputs((3, 6, 5), dtype)
        done = torch.zeros(3, dtype=torch.bool)
        args = (X, L, W, torch.zeros_like(X), torch.zeros_like(X), t, ratio, done)
        torch.library.opcheck(torch.ops.lsef._ialm_step_.default, args)


def call(**change):
    args = dict(X=torch.zeros(3, 4, 5), L=torch.zeros(3, 4, 5), W=torch.zeros(3, 4, 5))
    args.update(S=torch.zeros(3, 4, 5), A=torch.zeros(3, 4, 5), t=torch.zeros(3))
    args.update(ratio=torch.ones(3), done=torch.zeros(3, dtype=torch.bool))
    args.update(change)
    return torch.ops.lsef._ialm_step_(*args.values())


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        (dict(L=torch.zeros(2, 4, 5)), ValueError, "_ialm_step: L must have X's shape"),
        (dict(W=torch.zeros(3, 4, 5, dtype=torch.float64)), RuntimeError, "W must have the dtype"),
        (dict(S=torch.zeros(3, 5, 4).mT), RuntimeError, "_ialm_step: S must be contiguous"),
        (dict(t=torch.zeros(4)), ValueError, "_ialm_step: t must hold one value per matrix"),
        (dict(ratio=torch.zeros(3, dtype=torch.float64)), RuntimeError, "ratio must have the"),
        (dict(done=torch.zeros(3)), RuntimeError, "_ialm_step: done must be a bool tensor"),
        (dict(done=torch.zeros(2, dtype=torch.bool)), ValueError, "done must hold one value"),
        (dict(X=torch.zeros(3, 4, 5, dtype=torch.int32)), RuntimeError, "float32 or float64"),
        (dict(X=torch.zeros(5)), ValueError, "X must have at least 2 dimensions"),
        (dict(X=torch.zeros(3, 5, 4).mT), RuntimeError, "_ialm_step: X must be contiguous"),
    ],
)
def test_bad_inputs(change, exc, msg):
    with pytest.raises(exc, match=msg):
        call(**change)


# ---------------------------------------------------------------------------------------------
# the loop: fused and unfused give the same bits
# ---------------------------------------------------------------------------------------------


def unfused(monkeypatch):
    monkeypatch.setattr(rpca, "_fused_step", lambda *a, **k: False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 16, 128), (3, 60, 60), (2, 2, 30, 20)])
def test_loop_fused_equals_unfused(shape, dtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(shape, generator=g, dtype=dtype)
    X = X + (torch.rand(shape, generator=g) < 0.05) * 20
    assert rpca._fused_step(ops, X, 0.1, None)
    fused = [rpca.rpca_ialm(ops, X, 3, early_stop=e) for e in (True, False)]
    unfused(monkeypatch)
    plain = [rpca.rpca_ialm(ops, X, 3, early_stop=e) for e in (True, False)]
    for a, b in zip(fused, plain):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_loop_with_a_nan_matrix_fused_equals_unfused(monkeypatch):
    X = torch.randn(3, 20, 30, dtype=torch.float64)
    X[1, 2, 3] = float("nan")
    a = ops.lowrank_sparse(X, 3)
    unfused(monkeypatch)
    b = ops.lowrank_sparse(X, 3)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


def test_which_loops_take_the_fused_step():
    X = torch.randn(2, 8, 9)
    assert rpca._fused_step(ops, X, 0.1, None)
    assert not rpca._fused_step(ops, X, 0.1, torch.ones(2, 8, 9, dtype=torch.bool))
    assert not rpca._fused_step(ops, X.half(), 0.1, None)
    assert not rpca._fused_step(ops, X.mT, 0.1, None)
    assert not rpca._fused_step(ops, X.requires_grad_(), 0.1, None)
    assert not rpca._fused_step(ops, X.detach(), torch.tensor(0.1, dtype=torch.float64), None)
    seen = []
    torch.vmap(lambda x: seen.append(rpca._fused_step(ops, x, 0.1, None)) or x)(X.detach())
    assert seen == [False]
