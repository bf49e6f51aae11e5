"""The LSEF modules of lsef_ext.nn: shapes, ablations, gradients, ext vs ref, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from lsef_ext import nn as lnn
from lsef_ext.nn import (
    CIM,
    DDM,
    LSEF,
    MODEL_NAMES,
    SEM,
    LSEFOutput,
    build_model,
    get_ops,
    robust_scale,
)

B, T, D, DM, K = 4, 12, 24, 16, 3


def clips(b=B, t=T, d=D, dtype=torch.float32, seed=0):
    """Low-rank + a few spikes + noise, like the data the modules are made for."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, t, 2, generator=g) @ torch.randn(b, 2, d, generator=g) * 2
    spikes = (torch.rand(b, t, d, generator=g) < 0.05) * 4.0
    X = X + spikes + 0.1 * torch.randn(b, t, d, generator=g)
    return X.to(dtype)


def small_lsef(**kw):
    kw.setdefault("d_model", DM)
    kw.setdefault("rank", K)
    return LSEF(D, 7, **kw)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpca_steps", [0, 2])
def test_sem_shapes(rpca_steps):
    sem = SEM(D, DM, rank=K, rpca_steps=rpca_steps)
    X = clips()
    L, Z, tone = sem(X)
    assert L.shape == (B, T, D) and Z.shape == (B, T, DM) and tone.shape == (B, DM)
    # L is the stable part: its rank is at most `rank`
    assert int(torch.linalg.matrix_rank(L.double(), rtol=1e-5).max()) <= K
    assert torch.isfinite(tone).all()


def test_ddm_shapes_and_sparse_part():
    ddm = DDM(D, DM, rank=K, refine=1)
    X = clips()
    L0 = lnn.get_ops("ext").lowrank(X, K)
    L, S, Z, transient = ddm(X, L0)
    assert L.shape == S.shape == (B, T, D)
    assert Z.shape == (B, T, DM) and transient.shape == (B, DM)
    # soft thresholding zeroes most entries of the residual (the spikes are ~5% of entries)
    assert 0 < (S != 0).float().mean() < 0.5


def test_cim_shapes_and_agreement():
    cim = CIM(DM, scales=(1, 2, 4))
    ZL, ZS = torch.randn(B, T, DM), torch.randn(B, T, DM)
    fused, H = cim(ZL, ZS)
    assert fused.shape == (B, DM) and H.shape == (3, B, DM)
    assert torch.equal(fused, H.mean(0))
    agr = CIM.agreement(H)
    assert agr.dim() == 0 and agr > 0
    assert torch.equal(agr, (H - fused).pow(2).mean())
    # the result depends only on the inputs: no state is kept between calls
    assert not any(isinstance(v, torch.Tensor) for v in vars(cim).values())
    fused2, H2 = cim(ZL + 1, ZS)
    assert torch.equal(CIM.agreement(H), agr) and not torch.equal(H2, H)
    # one scale: nothing to disagree with
    one = CIM(DM, scales=(2,))
    _, H1 = one(ZL, ZS)
    assert H1.shape == (1, B, DM) and CIM.agreement(H1) == 0


def test_lsef_agreement_term_is_cims():
    m = small_lsef().eval()
    X = torch.randn(4, 12, D)
    out = m(X)
    # rebuild CIM's inputs as LSEF.forward does
    L, ZL, _ = m.sem(X)
    L, _, ZS, _ = m.ddm(X, L)
    _, H = m.cim(m.sem.proj(L), ZS)
    assert torch.equal(out.terms["agreement"], CIM.agreement(H))


def test_cim_pool_signed_max_and_short_clips():
    x = torch.tensor([[[1.0], [-3.0], [2.0], [0.5], [7.0]]])  # (1, 5, 1)
    assert CIM._pool(x, 2, signed_max=True).flatten().tolist() == [-3.0, 2.0]
    assert CIM._pool(x, 2, signed_max=False).flatten().tolist() == [-1.0, 1.25]
    assert torch.equal(CIM._pool(x, 1, True), x)
    # a scale longer than the clip falls back to the mean over the clip
    assert CIM._pool(x, 8, False).shape == (1, 1, 1)
    cim = CIM(DM, scales=(1, 2, 4))
    fused, H = cim(torch.randn(2, 3, DM), torch.randn(2, 3, DM))
    assert fused.shape == (2, DM) and H.shape == (3, 2, DM)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_lsef_shapes(task):
    model = small_lsef(task=task)
    X = clips()
    out = model(X)
    assert isinstance(out, LSEFOutput)
    assert out.pred.shape == ((B, 7) if task == "classification" else (B, 2))
    assert out.L.shape == out.S.shape == X.shape
    assert set(out.terms) == {"recon", "sparsity", "agreement"}
    if task == "regression":
        assert out.pred.abs().max() <= 1.0
        # the tanh range holds even for inputs far outside the training scale
        big = model(1e3 * X).pred
        assert torch.isfinite(big).all() and big.abs().max() <= 1.0
    reg = model.regulariser(out)
    w = model.loss_weights
    expect = (
        w[0] * out.terms["recon"] + w[1] * out.terms["sparsity"] + w[2] * out.terms["agreement"]
    )
    torch.testing.assert_close(reg, expect)


def test_lsef_two_frames():
    model = small_lsef()
    assert model(clips(t=2)).pred.shape == (B, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_build_model_every_variant(name, task):
    torch.manual_seed(0)
    kw = {"d_model": DM, "rank": K} if name.startswith("lsef") else {}
    model = build_model(name, D, 5, task=task, **kw)
    X = clips()
    out = model(X)
    pred = out.pred if isinstance(out, LSEFOutput) else out
    assert pred.shape == ((B, 5) if task == "classification" else (B, 2))
    assert torch.isfinite(pred).all()
    if task == "regression":
        assert pred.abs().max() <= 1.0
    if name.startswith("lsef"):
        assert isinstance(model, LSEF)
        part = name[len("lsef-no-") :] if name != "lsef" else None
        assert model.use_sem == (part != "sem")
        assert model.use_ddm == (part != "ddm")
        assert model.use_cim == (part != "cim")
        assert hasattr(model, "ddm") == (part != "ddm")
        assert hasattr(model, "cim") == (part != "cim")
        assert ("agreement" in out.terms) == (part != "cim")
        if part == "ddm":
            torch.testing.assert_close(out.S, X - out.L)  # S = X - L: nothing thresholded
            torch.testing.assert_close(out.terms["recon"], torch.zeros(()))
        loss = pred.square().mean() + model.regulariser(out)
    else:
        loss = pred.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_no_sem_without_refinement_has_no_low_rank_part():
    torch.manual_seed(0)
    m = build_model("lsef-no-sem", D, 7, d_model=DM, rank=K, refine=0)
    out = m(clips())
    assert torch.count_nonzero(out.L) == 0


def test_no_sem_has_no_low_rank_part_default_refine():
    torch.manual_seed(0)
    m = build_model("lsef-no-sem", D, 7, d_model=DM, rank=K)
    out = m(clips())
    assert torch.count_nonzero(out.L) == 0


def test_ablation_changes_the_model():
    X = clips()
    outs = {}
    for name in ("lsef", "lsef-no-sem", "lsef-no-ddm", "lsef-no-cim"):
        torch.manual_seed(0)
        m = build_model(name, D, 7, d_model=DM, rank=K).eval()
        outs[name] = m(X).pred
    for name in ("lsef-no-sem", "lsef-no-ddm", "lsef-no-cim"):
        assert not torch.allclose(outs["lsef"], outs[name])


# ---------------------------------------------------------------------------------------------
# gradients, thresholds, robust scale, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_gradients_reach_every_parameter(task):
    model = small_lsef(task=task)
    X = clips()
    out = model(X)
    if task == "classification":
        loss = F.cross_entropy(out.pred, torch.arange(B) % 7)
    else:
        loss = F.mse_loss(out.pred, torch.rand(B, 2) * 2 - 1)
    (loss + model.regulariser(out)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets an identically zero gradient"


@pytest.mark.parametrize("ops", ["ext", "ref"])
def test_all_zero_clip_gives_finite_prediction_and_training_step(ops):
    """A clip whose frames were all dropped (all zeros) in a batch: finite outputs, finite
    gradients, and one RAO step leaves every parameter finite (robust PCA of a zero matrix
    was once NaN and turned every parameter NaN)."""
    from lsef_ext.optim import RAO

    torch.manual_seed(0)
    model = small_lsef(ops=ops)
    X = clips()
    X[1] = 0.0
    out = model(X)
    for t in (out.pred, out.L, out.S, *out.terms.values()):
        assert torch.isfinite(t).all()
    opt = RAO(torch.optim.AdamW(model.parameters(), lr=1e-3), ops=ops, update_every=1)
    (F.cross_entropy(out.pred, torch.arange(B) % 7) + model.regulariser(out)).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    opt.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_lsef_without_rpca_compiles_fullgraph():
    """With rpca_steps=0 (no robust PCA, whose stopping test depends on the data) the whole
    model traces under torch.compile(fullgraph=True), gradients included."""
    torch.manual_seed(0)
    model = small_lsef(rpca_steps=0, dropout=0.0)  # no dropout: eager and compiled draw apart
    X = clips()

    def loss(X):
        out = model(X)
        return F.cross_entropy(out.pred, torch.arange(B) % 7) + model.regulariser(out)

    eager = torch.autograd.grad(loss(X), list(model.parameters()))
    compiled = torch.autograd.grad(
        torch.compile(loss, fullgraph=True, backend="aot_eager")(X), list(model.parameters())
    )
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_ddm_thresholds_positive():
    ddm = DDM(D, DM, rank=K, lam_init=0.7)
    torch.testing.assert_close(ddm.lam, torch.full((D,), 0.7))
    with torch.no_grad():
        ddm.theta.fill_(-30.0)
        ddm.theta[0] = -80.0
    assert (ddm.lam > 0).all()
    X = clips()
    L, S, Z, tr = ddm(X, torch.zeros_like(X))
    assert torch.isfinite(tr).all()
    # thresholds ~0 (and no refinement): nothing is shrunk, S is the whole residual X - L
    ddm0 = DDM(D, DM, rank=K, refine=0)
    with torch.no_grad():
        ddm0.theta.fill_(-30.0)
    L0 = get_ops("ext").lowrank(X, K)
    _, S0, _, _ = ddm0(X, L0)
    torch.testing.assert_close(S0, X - L0, atol=1e-5, rtol=0)
    # even far below float32's softplus range they never go negative and nothing blows up
    with torch.no_grad():
        ddm.theta.fill_(-1e3)
    assert (ddm.lam >= 0).all() and torch.isfinite(ddm(X, L0)[3]).all()


def test_robust_scale_known_values():
    v = torch.arange(-4.0, 5.0)  # median 0, |dev| median 2
    R = torch.stack([v, 3 * v + 10]).reshape(2, 3, 3)
    s = robust_scale(R)
    assert s.shape == (2, 1, 1)
    torch.testing.assert_close(s.flatten(), torch.tensor([1.4826 * 2, 1.4826 * 6]))
    # a few outliers barely move it (the std would explode)
    R2 = R.clone().reshape(2, 9)
    R2[:, 0] = 1e6
    s2 = robust_scale(R2.reshape(2, 3, 3)).flatten()
    assert (s2 <= s.flatten() * 1.6).all() and (s2 >= s.flatten() * 0.5).all()
    # Gaussian noise: the MAD estimate is consistent for sigma, with or without 3% outliers
    g = torch.Generator().manual_seed(1)
    N = 0.7 * torch.randn(1, 100, 100, generator=g)
    assert abs(float(robust_scale(N)) - 0.7) < 0.03
    N[(torch.rand(N.shape, generator=g) < 0.03)] = 50.0
    assert abs(float(robust_scale(N)) - 0.7) < 0.06
    # a zero residual is clamped, never 0 (it divides)
    assert float(robust_scale(torch.zeros(1, 4, 4))) == pytest.approx(1e-6)


def test_robust_scale_no_grad():
    R = torch.randn(2, 5, 6, requires_grad=True)
    assert not robust_scale(R).requires_grad


def test_determinism_same_seed():
    X = clips()
    preds = []
    for _ in range(2):
        torch.manual_seed(123)
        m = small_lsef().eval()
        preds.append(m(X).pred)
    assert torch.equal(preds[0], preds[1])
    torch.manual_seed(124)
    other = small_lsef().eval()(X).pred
    assert not torch.allclose(preds[0], other)


def test_same_input_same_output_in_eval():
    m = small_lsef().eval()
    X = clips()
    assert torch.equal(m(X).pred, m(X).pred)


# ---------------------------------------------------------------------------------------------
# ext vs ref
# ---------------------------------------------------------------------------------------------


def twin_models(**kw):
    torch.manual_seed(0)
    ext = small_lsef(ops="ext", **kw).double().eval()
    ref = small_lsef(ops="ref", **kw).double().eval()
    ref.load_state_dict(ext.state_dict())
    return ext, ref


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_ext_and_ref_forward_agree(task):
    ext, ref = twin_models(task=task)
    X = clips(dtype=torch.float64)
    a, b = ext(X), ref(X)
    torch.testing.assert_close(a.pred, b.pred, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.L, b.L, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.S, b.S, rtol=1e-9, atol=1e-9)
    for k in a.terms:
        torch.testing.assert_close(a.terms[k], b.terms[k], rtol=1e-9, atol=1e-12)


def test_ext_and_ref_forward_agree_float32():
    ext, ref = twin_models()
    ext, ref = ext.float(), ref.float()
    X = clips()
    torch.testing.assert_close(ext(X).pred, ref(X).pred, rtol=1e-4, atol=1e-4)


def _grads(model, X):
    X = X.clone().requires_grad_(True)
    out = model(X)
    loss = F.cross_entropy(out.pred, torch.arange(X.shape[0]) % 7) + model.regulariser(out)
    loss.backward()
    return X.grad, {n: p.grad for n, p in model.named_parameters()}


def test_ext_and_ref_parameter_gradients_agree():
    # refine=0: no parameter's gradient flows back through a lowrank() call. (Through lowrank,
    # the ext backward is the tangent-space projection of the rank-k manifold, exact only where
    # rank(A) <= k, while the ref is plain autograd of the truncated SVD: they differ by design
    # on full-rank inputs, see lsef_ext.ops.lowrank.)
    ext, ref = twin_models(refine=0)
    X = clips(dtype=torch.float64)
    _, ga = _grads(ext, X)
    _, gb = _grads(ref, X)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-8, atol=1e-10, msg=name)


def low_rank_clips(t=T, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, t, K, generator=g, dtype=torch.float64) @ torch.randn(
        B, K, D, generator=g, dtype=torch.float64
    )


def _directional(sem, X, E, h=1e-6):
    Xr = X.clone().requires_grad_(True)
    sem(Xr)[2].sum().backward()
    with torch.no_grad():
        fd = (sem(X + h * E)[2].sum() - sem(X - h * E)[2].sum()) / (2 * h)
    return float((Xr.grad * E).sum()), float(fd)


_REF_QR_GRADIENT = pytest.mark.xfail(
    strict=True,
    reason=(
        "lsef_ref.rsvd (python/lsef_ref/rsvd.py): on the randomized path "
        "(k + oversample < min(m, n)) autograd differentiates through the QR of the sketch "
        "A @ Omega, which is rank-deficient when rank(A) < k + oversample; the gradient is then "
        "garbage (~1e7 vs a finite difference of ~0.4)"
    ),
)


@pytest.mark.parametrize("ops", ["ext", pytest.param("ref", marks=_REF_QR_GRADIENT)])
def test_sem_gradient_matches_finite_difference_randomized_path(ops):
    # T = 12 > k + oversample = 11: the randomized range finder is used.
    torch.manual_seed(0)
    sem = SEM(D, DM, rank=K, rpca_steps=0, ops=ops).double()
    X = low_rank_clips()
    E = torch.randn(X.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    an, fd = _directional(sem, X, E)
    assert an == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_ext_and_ref_input_gradients_agree_on_low_rank_input():
    # X of rank <= k: there the ext lowrank backward is exact, so all gradients must agree.
    # T = 8: k + oversample >= min(T, D), so both take the exact truncated-SVD path (see the
    # xfail below for the randomized path).
    ext, ref = twin_models(refine=0, rpca_steps=0)
    X = low_rank_clips(t=8)
    gxa, ga = _grads(ext, X)
    gxb, gb = _grads(ref, X)
    assert gxa.abs().max() > 0
    torch.testing.assert_close(gxa, gxb, rtol=1e-7, atol=1e-9)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-7, atol=1e-9, msg=name)


def test_get_ops():
    assert get_ops("ext").name == "ext" and get_ops("ref").name == "ref"
    import lsef_ref
    from lsef_ext import ops

    assert get_ops("ref").rsvd is lsef_ref.rsvd and get_ops("ext").rsvd is ops.rsvd
    with pytest.raises(ValueError, match="ops must be 'ext' or 'ref', got 'cuda'"):
        get_ops("cuda")


# ---------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------


def test_gradcheck_sem_generic_input_ref():
    # ops="ref": plain autograd through the exact truncated SVD (k + oversample >= min(T, D)).
    torch.manual_seed(0)
    sem = SEM(6, 4, rank=2, rpca_steps=0, ops="ref").double()
    X = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: sem(x)[2], (X,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("ops", ["ext", "ref"])
@pytest.mark.parametrize("rpca_steps", [0, 3])
def test_gradcheck_sem_low_rank_input(ops, rpca_steps):
    # On an exactly rank-k input the ext lowrank backward is exact, and robust PCA finds no
    # sparse part (S0 = 0 in a neighbourhood of X): the no-grad step is then constant and the
    # numerical Jacobian sees only the differentiable rest of SEM. Generic inputs move S0
    # (a soft-thresholded quantity, computed without gradient) and would not pass.
    torch.manual_seed(0)
    k = 2
    sem = SEM(8, 5, rank=k, rpca_steps=rpca_steps, ops=ops).double()
    g = torch.Generator().manual_seed(5)
    X = (
        torch.randn(2, 6, k, generator=g, dtype=torch.float64)
        @ torch.randn(2, k, 8, generator=g, dtype=torch.float64)
    ).requires_grad_(True)
    if rpca_steps:
        with torch.no_grad():
            _, S0 = get_ops(ops).lowrank_sparse(X, k, lam=2 / math.sqrt(8), n_steps=rpca_steps)
        assert torch.count_nonzero(S0) == 0

    def f(x):
        L, _, tone = sem(x)
        return L, tone

    # fast_mode (random directional derivatives) with robust PCA in the loop: each call runs it
    assert gradcheck(f, (X,), eps=1e-6, atol=1e-6, fast_mode=bool(rpca_steps))


def test_gradcheck_cim():
    # CIM is smooth except at ties of |.| in the signed max pooling and of amax (measure zero).
    torch.manual_seed(0)
    cim = CIM(4, scales=(1, 2)).double()
    ZL = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    ZS = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: cim(a, b), (ZL, ZS), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs():
    m = small_lsef()
    with pytest.raises(
        ValueError, match=r"LSEF: expected X of shape \(B, T, 24\), got \(4, 12, 23\)"
    ):
        m(torch.randn(4, 12, 23))
    with pytest.raises(ValueError, match=r"LSEF: expected X of shape \(B, T, 24\), got \(12, 24\)"):
        m(torch.randn(12, 24))
    with pytest.raises(ValueError, match="LSEF: needs at least 2 frames, got T = 1"):
        m(torch.randn(4, 1, 24))
    with pytest.raises(ValueError, match="SEM: expected X of shape"):
        SEM(D, DM)(torch.randn(2, 5, D + 1))
    with pytest.raises(ValueError, match="DDM: L must have X's shape"):
        DDM(D, DM)(torch.randn(2, 5, D), torch.randn(2, 4, D))
    with pytest.raises(ValueError, match="CIM: expected Z_L of shape"):
        CIM(DM)(torch.randn(2, 5, DM + 1), torch.randn(2, 5, DM + 1))
    with pytest.raises(ValueError, match="MeanPoolMLP: needs at least 2 frames"):
        build_model("meanpool-mlp", D, 7)(torch.randn(2, 1, D))
    with pytest.raises(ValueError, match="TemporalTransformer: T = 300 exceeds max_T = 256"):
        build_model("transformer", D, 7)(torch.randn(1, 300, D))


def test_bad_arguments():
    with pytest.raises(
        ValueError, match="LSEF: task must be 'classification' or 'regression', got 'ranking'"
    ):
        LSEF(D, task="ranking")
    with pytest.raises(ValueError, match="unknown model 'lsef-no-head'; expected one of"):
        build_model("lsef-no-head", D, 7)
    with pytest.raises(ValueError, match="unknown model 'resnet'; expected one of"):
        build_model("resnet", D, 7)
    with pytest.raises(ValueError, match="DDM: refine must be >= 0, got -1"):
        LSEF(D, refine=-1)
    with pytest.raises(ValueError, match="DDM: lam_init and sat_init must be > 0"):
        DDM(D, lam_init=0.0)
    with pytest.raises(ValueError, match=r"CIM: scales must be positive integers, got \(1, 0\)"):
        LSEF(D, scales=(1, 0))
    with pytest.raises(ValueError, match=r"CIM: scales must be positive integers, got \(\)"):
        CIM(DM, scales=())
    with pytest.raises(ValueError, match="SEM: rank must be >= 1, got 0"):
        LSEF(D, rank=0)
    with pytest.raises(ValueError, match="SEM: rpca_steps must be >= 0, got -2"):
        SEM(D, rpca_steps=-2)
    with pytest.raises(ValueError, match="ops must be 'ext' or 'ref'"):
        build_model("lsef", D, 7, ops="cpu")
