"""Property-based tests (hypothesis): every op against its reference in python/lsef_ref over
random shapes (size-0 and size-1 dimensions, 0-3 leading dimensions), memory layouts
(contiguous, transposed, sliced, expanded), float32 and float64, every ``lam`` layout, forward
and backward.

Hypothesis chooses shapes, layouts and options; the values come from a torch generator seeded
by a number hypothesis also draws, so a failure shrinks to a small shape and replays exactly.
The profile (``derandomize``, a fixed number of examples) keeps the run deterministic and
inside the suite's budget on 2 cores; ``HYPOTHESIS_PROFILE=thorough`` searches ten times longer.
"""

import os

import pytest
import torch
from conftest import DEVICES, kernel_is_exact, requires_cuda_kernels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsef_ref
from lsef_ext import ops

settings.register_profile(
    "lsef",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lsef"))

DTYPES = st.sampled_from([torch.float32, torch.float64])
SEEDS = st.integers(0, 2**31 - 1)
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def lead_dims(max_size=3):
    return st.lists(st.integers(0, max_size), min_size=0, max_size=3).map(tuple)


def make(shape, dtype, device, layout, gen, scale=1.0):
    """A tensor of `shape` with values from `gen`, laid out as asked: transposed (the last two
    dimensions swapped in memory), sliced (every other column of a wider tensor) or expanded
    (the leading dimensions broadcast from size 1: zero strides)."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(shape[:-2] + shape[-2:][::-1], generator=gen, dtype=dtype)
        t = base.mT
    elif layout == "sliced" and len(shape) >= 1:
        base = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=dtype)
        t = base[..., ::2]
    elif layout == "expanded" and len(shape) >= 3:
        base = torch.randn((1,) * (len(shape) - 2) + shape[-2:], generator=gen, dtype=dtype)
        t = base.expand(shape)
    else:
        t = torch.randn(shape, generator=gen, dtype=dtype)
    return (t * scale).to(device) if device != "cpu" else t * scale


# ---- soft_threshold ----------------------------------------------------------------------

LAM_KINDS = ["float", "scalar", "channel", "channel_keepdim", "full", "row_broadcast"]


def make_lam(kind, shape, dtype, device, gen):
    if kind == "float":
        return 0.3
    n = shape[-1]
    sizes = {
        "scalar": (),
        "channel": (n,),
        "channel_keepdim": (1,) * (len(shape) - 1) + (n,),
        "full": tuple(shape),
        # one value per row of each matrix: (*, m, 1)
        "row_broadcast": tuple(shape[:-1]) + (1,),
    }[kind]
    return (torch.rand(sizes, generator=gen, dtype=dtype) * 0.6).to(device)


@st.composite
def soft_cases(draw):
    shape = draw(lead_dims()) + (draw(st.integers(0, 6)), draw(st.integers(0, 7)))
    if draw(st.booleans()):  # also plain vectors and single rows
        shape = shape[-draw(st.integers(1, 2)) :]
    return dict(
        shape=shape,
        dtype=draw(DTYPES),
        layout_X=draw(LAYOUTS),
        layout_L=draw(st.sampled_from(["none", "contiguous", "transposed", "sliced"])),
        lam=draw(st.sampled_from(LAM_KINDS)),
        hard=draw(st.booleans()),
        seed=draw(SEEDS),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=soft_cases())
def test_soft_threshold_matches_reference(device, case):
    requires_cuda_kernels(device, "soft_threshold")
    gen = torch.Generator().manual_seed(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    X = make(shape, dtype, device, case["layout_X"], gen)
    L = None if case["layout_L"] == "none" else make(shape, dtype, device, case["layout_L"], gen)
    lam = make_lam(case["lam"], shape, dtype, device, gen)
    # forward: the same arithmetic in the same dtype, bit for bit
    got = ops.soft_threshold(X, L, lam, case["hard"])
    want = lsef_ref.soft_threshold(X, L, lam, case["hard"])
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    # backward, with every input that can take a gradient
    X = X.detach().clone().requires_grad_()
    L = None if L is None else L.detach().clone().requires_grad_()
    lam_t = lam if isinstance(lam, float) else lam.detach().clone().requires_grad_()
    inputs = [t for t in (X, L, lam_t) if isinstance(t, torch.Tensor)]
    G = torch.randn(want.shape, generator=gen, dtype=dtype).to(device)
    got_g = torch.autograd.grad(ops.soft_threshold(X, L, lam_t, case["hard"]), inputs, G)
    want_g = torch.autograd.grad(
        lsef_ref.soft_threshold(X, L, lam_t, case["hard"]), inputs, G, materialize_grads=True
    )
    n_grads = 1 + (L is not None)
    for g, w in zip(got_g[:n_grads], want_g[:n_grads]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if not isinstance(lam, float):
        # lam's gradient is a sum over the entries lam broadcasts to (float64 in the kernel)
        n = max(1, X.numel() // max(1, lam_t.numel()))
        tol = {torch.float32: 2e-6, torch.float64: 1e-12}[dtype] * n**0.5
        torch.testing.assert_close(got_g[-1], want_g[-1], rtol=tol, atol=tol)


# ---- rank_scale / rank_aware_grad_scale ------------------------------------------------------


@st.composite
def rank_scale_cases(draw):
    lead = draw(lead_dims())
    m = draw(st.integers(1, 9))
    return dict(
        lead=lead,
        m=m,
        n=draw(st.integers(0, 9)),
        r=draw(st.integers(0, min(m, 4))),
        shared_U=draw(st.booleans()),
        dtype=draw(DTYPES),
        layout_G=draw(LAYOUTS),
        layout_U=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        alpha=draw(st.sampled_from(["float", "scalar", "per_matrix"])),
        beta=draw(st.sampled_from(["float", "scalar", "per_matrix"])),
        seed=draw(SEEDS),
    )


def coefficient(kind, lead, dtype, device, gen, low, high):
    if kind == "float":
        return (low + high) / 2
    shape = () if kind == "scalar" else lead
    return (low + (high - low) * torch.rand(shape, generator=gen, dtype=dtype)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@given(case=rank_scale_cases())
def test_rank_scale_matches_reference(device, case):
    requires_cuda_kernels(device, "rank_scale")
    gen = torch.Generator().manual_seed(case["seed"])
    lead, m, n, r, dtype = case["lead"], case["m"], case["n"], case["r"], case["dtype"]
    G = make(lead + (m, n), dtype, device, case["layout_G"], gen)
    U_lead = () if case["shared_U"] else lead
    U = make(U_lead + (m, r), dtype, device, case["layout_U"], gen, scale=1 / max(1, m) ** 0.5)
    alpha = coefficient(case["alpha"], lead, dtype, device, gen, 0.1, 0.9)
    beta = coefficient(case["beta"], lead, dtype, device, gen, 1.0, 3.0)
    got = ops.rank_scale(G, U, alpha, beta)
    want = lsef_ref.rank_scale(G, U, alpha, beta)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)  # a sum of r products: dtype-default tolerances

    # backward through rank_scale, and rank_aware_grad_scale's backward (rank_scale of the
    # incoming gradient) against the reference's plain-autograd version
    Gq = G.detach().clone().requires_grad_()
    coefs = [c for c in (alpha, beta) if isinstance(c, torch.Tensor)]
    coefs = [c.detach().clone().requires_grad_() for c in coefs]
    a = coefs.pop(0) if isinstance(alpha, torch.Tensor) else alpha
    b = coefs.pop(0) if isinstance(beta, torch.Tensor) else beta
    inputs = [t for t in (Gq, a, b) if isinstance(t, torch.Tensor)]
    W = torch.randn(want.shape, generator=gen, dtype=dtype).to(device)
    got_g = torch.autograd.grad(ops.rank_scale(Gq, U, a, b), inputs, W)
    want_g = torch.autograd.grad(lsef_ref.rank_scale(Gq, U, a, b), inputs, W)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w)
    x = G.detach().clone().requires_grad_()
    (got_x,) = torch.autograd.grad(ops.rank_aware_grad_scale(x, U, alpha, beta), x, W)
    (want_x,) = torch.autograd.grad(lsef_ref.rank_aware_grad_scale(x, U, alpha, beta), x, W)
    torch.testing.assert_close(got_x, want_x)


# ---- rsvd / lowrank / lowrank_sparse -------------------------------------------------------


def with_spectrum(lead, m, n, sigma, dtype, gen):
    """Matrices (*lead, m, n) with singular values `sigma`: singular vectors from QRs of random
    matrices, so the gaps of the spectrum (and the perturbation bounds) are known."""
    r = len(sigma)
    Q1 = torch.linalg.qr(torch.randn(lead + (m, r), generator=gen, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(lead + (n, r), generator=gen, dtype=torch.float64))[0]
    s = torch.tensor(sigma, dtype=torch.float64)
    return ((Q1 * s) @ Q2.mT).to(dtype)


@st.composite
def rsvd_cases(draw):
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    p = min(m, n)
    return dict(
        lead=draw(lead_dims(2)),
        m=m,
        n=n,
        k=draw(st.integers(1, min(p, 4))),
        oversample=draw(st.integers(0, 6)),
        n_iter=draw(st.integers(0, 2)),
        dtype=draw(DTYPES),
        layout=draw(LAYOUTS),
        seed=draw(SEEDS),
    )


def relayout(A, layout):
    """A itself, with the memory layout asked for (values unchanged)."""
    if layout == "transposed":
        return A.mT.contiguous().mT
    if layout == "sliced":
        wide = torch.zeros(A.shape[:-1] + (2 * A.shape[-1],), dtype=A.dtype)
        wide[..., ::2] = A
        return wide[..., ::2]
    if layout == "expanded" and A.dim() >= 3:
        return A[(slice(0, 1),) * (A.dim() - 2)].expand(A.shape)
    return A


@pytest.mark.parametrize("device", DEVICES)
@given(case=rsvd_cases())
def test_rsvd_and_lowrank_match_reference(device, case):
    """The same algorithm and test matrix as the reference: they differ by rounding, amplified
    by sigma_1 / gap for the singular vectors (Weyl and Wedin); the factors are orthonormal, the
    values sorted, and a batch gives each matrix's own result."""
    requires_cuda_kernels(device, "rsvd")
    gen = torch.Generator().manual_seed(case["seed"])
    lead, m, n, k, dtype = case["lead"], case["m"], case["n"], case["k"], case["dtype"]
    p = min(m, n)
    sigma = [1.0 / (i + 1) for i in range(p)]
    A = relayout(with_spectrum(lead, m, n, sigma, dtype, gen), case["layout"])
    gap = sigma[k - 1] - (sigma[k] if k < p else 0.0)
    tol = 40 * max(m, n) * EPS[dtype] / gap
    args = (k, case["oversample"], case["n_iter"])
    U, S, V = ops.rsvd(A.to(device), *args)
    exact = device == "cpu" and kernel_is_exact(A, *args)  # the CPU's cost model may go exact
    Ur, Sr, Vr = lsef_ref.rsvd(A, *args, exact=exact)
    assert U.shape == lead + (m, k) and S.shape == lead + (k,) and V.shape == lead + (n, k)
    for g, w in zip((U, S, V), (Ur, Sr, Vr)):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=tol)
    eye = torch.eye(k, dtype=dtype, device=device)
    bound = 40 * EPS[dtype] * max(m, n)
    assert ((U.mT @ U - eye).abs() <= bound).all() and ((V.mT @ V - eye).abs() <= bound).all()
    assert (S[..., :-1] >= S[..., 1:]).all() and (S >= 0).all()
    L = ops.lowrank(A.to(device), *args)
    torch.testing.assert_close(L.cpu(), lsef_ref.lowrank(A, *args, exact=exact), rtol=0, atol=tol)
    if A.numel() and A.dim() == 3 and A.shape[0] > 1:
        # bit for bit where the matrix alone and the batch both take an in-cache CPU path (the
        # fused paths, matrix by matrix; the CUDA fused path covers these sides), else rounding
        in_cache = ("fused", "jacobi")
        bitwise = device == "cuda" or (
            ops.rsvd_path(m, n, *args, dtype=dtype) in in_cache
            and ops.rsvd_path(m, n, *args, dtype=dtype, batch=A.shape[0]) in in_cache
        )
        for i in range(A.shape[0]):
            alone = ops.rsvd(A[i].to(device), *args)[1]
            if bitwise:
                assert torch.equal(alone, S[i])
            else:
                torch.testing.assert_close(alone, S[i], rtol=0, atol=tol)


@st.composite
def backward_cases(draw):
    m, n = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    return dict(
        lead=draw(lead_dims(2)),
        m=m,
        n=n,
        k=draw(st.integers(1, min(m, n))),
        layout=draw(LAYOUTS),
        seed=draw(SEEDS),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=backward_cases())
def test_rsvd_and_lowrank_backward(device, case):
    """float64. rsvd's backward (Townsend's formula) against autograd through torch.linalg.svd
    for k = min(m, n) with distinct singular values, where both are the exact derivative (for
    k < min(m, n) torch's derivative couples to the discarded singular values and is not finite
    for a rank-deficient input); lowrank's backward for a rank-k input, k drawn, against the
    tangent-space projection P_U G + G P_V - P_U G P_V written out."""
    requires_cuda_kernels(device, "rsvd")
    gen = torch.Generator().manual_seed(case["seed"])
    lead, m, n, k = case["lead"], case["m"], case["n"], case["k"]
    p = min(m, n)
    sigma = [2.0 - i / p for i in range(p)]  # distinct, >= 1: gaps 1/p
    A = relayout(with_spectrum(lead, m, n, sigma, torch.float64, gen), case["layout"])
    A = A.to(device).requires_grad_()
    gU = torch.randn(lead + (m, p), generator=gen, dtype=torch.float64).to(device)
    gS = torch.randn(lead + (p,), generator=gen, dtype=torch.float64).to(device)
    gV = torch.randn(lead + (n, p), generator=gen, dtype=torch.float64).to(device)
    U, S, V = ops.rsvd(A, p, oversample=0)
    (got,) = torch.autograd.grad((U * gU).sum() + (S * gS).sum() + (V * gV).sum(), A)
    Ut, St, Vht = torch.linalg.svd(A, full_matrices=False)
    Vt = Vht.mH
    # rsvd's sign convention applied to the reference factors (a differentiable flip)
    idx = Ut.detach().abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(Ut.detach(), -2, idx) < 0, -1.0, 1.0).to(A)
    Ut, Vt = Ut * sign, Vt * sign
    (want,) = torch.autograd.grad((Ut * gU).sum() + (St * gS).sum() + (Vt * gV).sum(), A)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)

    Ak = relayout(with_spectrum(lead, m, n, sigma[:k], torch.float64, gen), case["layout"])
    Ak = Ak.to(device).requires_grad_()
    G = torch.randn(lead + (m, n), generator=gen, dtype=torch.float64).to(device)
    (got_L,) = torch.autograd.grad(ops.lowrank(Ak, k), Ak, G)
    Ud, _, Vd = ops.rsvd(Ak.detach(), k)
    PUG = Ud @ (Ud.mT @ G)
    want_L = PUG + (G @ Vd) @ Vd.mT - (PUG @ Vd) @ Vd.mT
    torch.testing.assert_close(got_L, want_L, rtol=0, atol=1e-12)


@st.composite
def unrolled_cases(draw):
    m, n = draw(st.integers(2, 10)), draw(st.integers(2, 10))
    return dict(
        lead=draw(lead_dims(2)),
        m=m,
        n=n,
        k=draw(st.integers(1, min(m, n))),
        steps=draw(st.integers(1, 3)),
        lam=draw(st.sampled_from(["default", "float", "channel"])),
        dtype=draw(DTYPES),
        layout=draw(LAYOUTS),
        seed=draw(SEEDS),
    )


@given(case=unrolled_cases())
def test_lowrank_sparse_unrolled_matches_reference(case):
    """The unrolled alternation against the reference's (the same alternation over the
    reference ops). Inputs with a clear gap after k, so that the rank-k part is well defined and
    both agree to rounding over the steps. The backward is compared where the two derivatives
    are the same function: the reference differentiates the full truncated SVD (it also couples
    to the discarded singular values), the package uses the tangent-space projection, exact
    only where rank(X - S) <= k; so the gradients are compared for one step of rank-k input
    with lam large enough that S = 0 (L = lowrank(X), the projection of the incoming gradient),
    against that projection written out."""
    gen = torch.Generator().manual_seed(case["seed"])
    lead, m, n, k, dtype = case["lead"], case["m"], case["n"], case["k"], case["dtype"]
    p = min(m, n)
    sigma = [4.0 - 2.0 * i / k for i in range(k)] + [0.01] * (p - k)
    X = relayout(with_spectrum(lead, m, n, sigma, dtype, gen), case["layout"])
    lam = {"default": None, "float": 0.05, "channel": torch.full((n,), 0.05, dtype=dtype)}[
        case["lam"]
    ]
    X = X.detach().clone().requires_grad_()
    got = ops.lowrank_sparse(X, k, lam, n_steps=case["steps"], method="unrolled")
    want = lsef_ref.lowrank_sparse(X, k, lam, n_steps=case["steps"], method="unrolled")
    tol = 1e3 * EPS[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=tol)
    W = torch.randn(X.shape, generator=gen, dtype=dtype)
    X = relayout(with_spectrum(lead, m, n, sigma[:k], dtype, gen), case["layout"])
    X = X.detach().clone().requires_grad_()
    L, S = ops.lowrank_sparse(X, k, 1e6, n_steps=1, method="unrolled")
    assert not S.any()
    (got_g,) = torch.autograd.grad(L, X, W)
    U, _, V = lsef_ref.rsvd(X.detach(), k)
    PUW = U @ (U.mT @ W)
    torch.testing.assert_close(got_g, PUW + (W @ V) @ V.mT - (PUW @ V) @ V.mT, rtol=0, atol=tol)
