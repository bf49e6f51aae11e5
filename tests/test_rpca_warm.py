"""Warm starts of the robust-PCA solver (issue 33, part 3): ``lowrank_sparse(...,
return_state=True)`` returns an ``RPCAState``, ``init=`` resumes from it, ``state.slide(stride)``
moves it to the next window of a sliding window over frames.

The measure is the one the issue names: sliding windows of 32 frames, stride 8, over a
surveillance-style video (``lsef_ext.data.background_video``), warm calls against cold ones at
the same stopping test. The warm split is checked against the planted background as well as the
test, so a start that merely satisfies the residual test quickly (a frozen split) fails.
"""

import pytest
import torch

from lsef_ext import ops, rpca
from lsef_ext.data import background_video

WINDOW, STRIDE, K = 32, 8, 3


def chain(X, warm):
    """Every window's (start, L, S, state), through rpca.sliding_windows."""
    return [(s, st.L, st.S, st) for s, st in rpca.sliding_windows(ops, X, K, WINDOW, STRIDE, warm)]


def rel(A, B):
    return (torch.linalg.norm(A - B) / torch.linalg.norm(B)).item()


def check_warm_chain(X, L0, tol):
    """Cold and warm chains over X: the warm one needs at least 3x fewer iterations in total
    (after the first window, cold in both), meets the residual test ``tol`` in every window
    before the bound, and its L is at least as close to the planted background L0 as the cold
    run's at its worst (the warm split keeps the background's subspace across windows)."""
    cold, warm = chain(X, False), chain(X, True)
    c_iters = sum(int(st.iterations) for _, _, _, st in cold[1:])
    w_iters = sum(int(st.iterations) for _, _, _, st in warm[1:])
    assert 3 * w_iters <= c_iters, (c_iters, w_iters)
    worst_cold = max(rel(L, L0[s : s + WINDOW]) for s, L, _, _ in cold[1:])
    for s, L, S, st in warm[1:]:
        assert rel(L + S, X[s : s + WINDOW]) < tol
        assert int(st.iterations) < rpca.RPCA_MAX_ITER
        assert rel(L, L0[s : s + WINDOW]) <= worst_cold


@pytest.mark.parametrize("seed, noise", [(0, 0.0), (1, 0.0), (0, 0.02)])
def test_sliding_windows_need_3x_fewer_iterations(seed, noise):
    """float64, with and without noise: the test of ``check_warm_chain`` (the residual
    recomputed in X's units, so to 5 % of the solver's tolerance)."""
    X, L0, _ = background_video(200, seed=seed, noise=noise)
    check_warm_chain(X, L0, 1.05 * rpca.RPCA_TOL)


def test_float32_warm_windows():
    """float32, with noise (without noise a clean video's residual sits at float32's rounding
    floor, where the cold runs grind to the bound too: see DESIGN §8); the residual recomputed
    in float32 to twice the tolerance."""
    X, L0, _ = background_video(200, noise=0.02, dtype=torch.float32)
    check_warm_chain(X, L0, 2 * rpca.RPCA_TOL)


def test_batched_warm_chain_equals_each_alone():
    """Three videos in one batch, warm-started together: each matrix gets its result alone,
    bit for bit (each stops on its own test; the fresh-row fit and the warm penalty are per
    matrix)."""
    videos = [background_video(120, seed=s)[0] for s in range(3)]
    batched = chain(torch.stack(videos), True)
    for i, v in enumerate(videos):
        for (_, Lb, Sb, stb), (_, La, Sa, sta) in zip(batched, chain(v, True)):
            assert torch.equal(Lb[i], La) and torch.equal(Sb[i], Sa)
            assert torch.equal(stb.Y[i], sta.Y) and torch.equal(stb.mu[i], sta.mu)
            assert int(stb.iterations[i]) == int(sta.iterations)


def test_fused_and_unfused_warm_loops_agree(monkeypatch):
    """The fused CPU step (ops._ialm_step_) and the ATen expressions give the same bits from
    a warm start too."""
    X = background_video(80)[0]
    fused = chain(X, True)
    monkeypatch.setattr(rpca, "_fused_step", lambda *a, **k: False)
    for (_, La, Sa, sta), (_, Lb, Sb, stb) in zip(fused, chain(X, True)):
        assert torch.equal(La, Lb) and torch.equal(Sa, Sb) and torch.equal(sta.Y, stb.Y)


def test_resume_on_the_same_matrix():
    """``init`` the state of a solve of the same X (``fresh = 0``): the solver stops within a
    few iterations, at a split as close to the cold one as the test allows."""
    X = background_video(32)[0]
    L, S, st = ops.lowrank_sparse(X, K, return_state=True)
    L2, S2, st2 = ops.lowrank_sparse(X, K, init=st, return_state=True)
    assert int(st2.iterations) <= rpca.WARM_BACKOFF + 2 < int(st.iterations)
    assert rel(L2, L) < 1e-6 and rel(L2 + S2, X) < rpca.RPCA_TOL


def test_state_contents():
    """The state holds the returned split, the multiplier (|Y| <= lam: it lies in lam times the
    subdifferential of the l1 norm), the penalty per matrix and the iterations."""
    X = torch.stack([background_video(32, seed=s)[0] for s in range(2)])
    L, S, st = ops.lowrank_sparse(X, K, return_state=True)
    assert isinstance(st, ops.RPCAState) and st.fresh == 0
    assert torch.equal(st.L, L) and torch.equal(st.S, S)
    lam = rpca.pcp_lambda(X)
    assert st.Y.abs().max().item() <= lam * (1 + 1e-12)
    assert st.mu.shape == (2, 1, 1) and bool((st.mu > 0).all())
    assert st.iterations.shape == (2,) and st.iterations.dtype == torch.int64
    # the default return is unchanged, bit for bit
    L1, S1 = ops.lowrank_sparse(X, K)
    assert torch.equal(L1, L) and torch.equal(S1, S)


def test_warm_start_is_scale_free():
    """Multiplying X and the state by a power of two multiplies the warm result by it exactly
    (the solver runs on X scaled by a power of two; the state is stored in X's units)."""
    X = background_video(64)[0]
    _, _, st = ops.lowrank_sparse(X[:32], K, return_state=True)
    L, S = ops.lowrank_sparse(X[8:40], K, init=st.slide(8))
    c = 2.0**-20
    st_c = st._replace(L=st.L * c, S=st.S * c, mu=st.mu / c)
    Lc, Sc = ops.lowrank_sparse(X[8:40] * c, K, init=st_c.slide(8))
    assert torch.equal(Lc, L * c) and torch.equal(Sc, S * c)


def test_too_few_kept_rows_start_cold():
    """A state slid by more than m - k rows keeps fewer rows than the rank: a cold start, bit
    for bit."""
    X = background_video(64)[0]
    _, _, st = ops.lowrank_sparse(X[:32], K, return_state=True)
    Xw = X[30:62]
    cold = ops.lowrank_sparse(Xw, K)
    for stride in (32 - K + 1, 32):
        warm = ops.lowrank_sparse(Xw, K, init=st.slide(stride))
        assert all(torch.equal(a, b) for a, b in zip(warm, cold))


def test_slide():
    X = background_video(32)[0]
    _, _, st = ops.lowrank_sparse(X, K, return_state=True)
    s = st.slide(8)
    assert s.fresh == 8 and s.S.shape == st.S.shape
    assert torch.equal(s.S[:24], st.S[8:]) and torch.equal(s.Y[:24], st.Y[8:])
    assert not s.S[24:].any() and not s.Y[24:].any() and not s.L[24:].any()
    assert s.slide(8).fresh == 16 and s.slide(30).fresh == 32
    same = st.slide(0)
    assert same.fresh == 0 and all(torch.equal(getattr(same, f), getattr(st, f)) for f in "LSY")
    with pytest.raises(ValueError, match=r"stride must be in \[0, m\] = \[0, 32\], got 33"):
        st.slide(33)
    with pytest.raises(TypeError, match="stride must be an int, got float"):
        st.slide(8.0)


def _bad_init_cases():
    X = background_video(32)[0]
    _, _, st = ops.lowrank_sparse(X, K, return_state=True)
    return X, st


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (
            dict(method="unrolled"),
            ValueError,
            "apply to method='rpca' with noise=None and no mask, got method='unrolled'",
        ),
        (dict(noise=0.1), ValueError, "got noise=0.1"),
        (dict(noise="auto"), ValueError, "got noise='auto'"),
        (dict(mask=True), ValueError, "got a mask"),
    ],
)
@pytest.mark.parametrize("which", ["init", "return_state"])
def test_warm_start_applies_to_the_exact_unmasked_solver(kwargs, exc, msg, which):
    X, st = _bad_init_cases()
    if kwargs.get("mask") is True:
        kwargs = dict(mask=torch.ones(32, 1, dtype=torch.bool))
    extra = dict(init=st) if which == "init" else dict(return_state=True)
    with pytest.raises(exc, match=msg):
        ops.lowrank_sparse(X, K, **kwargs, **extra)


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        (
            lambda st: (st.L, st.S, st.Y, st.mu),
            TypeError,
            "init must be the RPCAState a call with return_state=True returned, got tuple",
        ),
        (
            lambda st: st._replace(S=st.S[:16]),
            ValueError,
            r"init.S has shape \[16, 768\], but X "
            r"of shape \[32, 768\] needs \[32, 768\] \(slide the state",
        ),
        (lambda st: st._replace(mu=st.mu[0]), ValueError, r"init.mu has shape \[1\]"),
        (lambda st: st._replace(Y=st.Y.int()), TypeError, "init.Y must be a floating-point"),
        (lambda st: st._replace(L=None), TypeError, "init.L must be a floating-point tensor"),
        (
            lambda st: st._replace(S=st.S.to("meta")),
            ValueError,
            "init.S is on meta but X is on cpu",
        ),
        (
            lambda st: st._replace(fresh=33),
            ValueError,
            r"init.fresh must be an int in \[0, m\] "
            r"= \[0, 32\], got 33",
        ),
        (lambda st: st._replace(fresh=True), ValueError, "init.fresh must be an int"),
    ],
)
def test_bad_init(change, exc, msg):
    X, st = _bad_init_cases()
    with pytest.raises(exc, match=msg):
        ops.lowrank_sparse(X, K, init=change(st))


def test_background_video():
    X, L, S = background_video(60, height=8, width=10, seed=3)
    assert X.shape == L.shape == S.shape == (60, 80) and X.dtype == torch.float64
    assert torch.equal(X, L + S)
    assert torch.linalg.matrix_rank(L).item() == 3
    assert 0 < (S != 0).double().mean().item() < 0.35
    Xn, Ln, _ = background_video(60, height=8, width=10, seed=3, noise=0.1)
    assert torch.equal(Ln, L) and 0.05 < (Xn - X).std().item() < 0.15
    with pytest.raises(ValueError, match="noise must be a finite number >= 0, got -1"):
        background_video(noise=-1.0)
    with pytest.raises(ValueError, match="height"):
        background_video(height=2)


def test_warm_start_compiles_whole():
    """Under torch.compile(fullgraph=True) the warm start (the fresh-row fit, the penalty, the
    loop to its bound) traces whole and gives eager's bits."""
    X = background_video(40)[0]
    _, _, st = ops.lowrank_sparse(X[:32], K, return_state=True)
    init = st.slide(8)

    def f(x, L, S, Y, mu, iters):
        return ops.lowrank_sparse(x, K, init=ops.RPCAState(L, S, Y, mu, iters, 8))

    args = (X[8:40], init.L, init.S, init.Y, init.mu, init.iterations)
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
