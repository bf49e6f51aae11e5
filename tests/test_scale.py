"""Scale equivariance over the whole finite range of each dtype, sampled continuously.

``rsvd(c A) = c rsvd(A)`` (S scaled, U and V unchanged), ``lowrank(c A) = c lowrank(A)`` and
``lowrank_sparse(c X) = c lowrank_sparse(X)`` must hold to working precision for every finite
``c``. Earlier tests sampled decades (1e-30, 1e10, ...) and stepped over a band where float32
rsvd lost 10 % of S: the Jacobi skip test formed a product of two squared column norms, which
overflowed for inputs whose largest magnitude was above about 2^30 (DESIGN.md §6, "Scale").

So here the scales are drawn log-uniformly and stratified: the range of log2 c is cut into
strata one octave wide (four for the slower solvers) and each stratum gets one uniform draw, all
in one batch. Every band of an octave is then hit in every example, at a point that moves from
example to example. Hypothesis draws the seed of those offsets, the matrix and the case.

The range: from ``c max|A|`` at the smallest normal number times 2^digits (below it the input
itself loses its low bits to subnormal rounding), to ``c sigma_1`` at half the largest finite
number (so that S itself stays finite).
"""

import math
import pathlib
import re

import pytest
import torch
from conftest import DEVICES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rsvd import backward_error_bound, select_path
from test_rsvd_cuda_logic import FUSED, LARGE, emulate, emulator  # noqa: F401 (a fixture)

from lsef_ext import ops

SETTINGS = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DTYPES = st.sampled_from([torch.float32, torch.float64])
SEEDS = st.integers(0, 2**31 - 1)
ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def spectrum_matrix(m, n, sigma, dtype, gen):
    """One random m x n matrix with singular values ``sigma`` (float64 first, then rounded)."""
    r = len(sigma)
    Q1 = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))[0]
    Q2 = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=gen))[0]
    return ((Q1 * torch.tensor(sigma, dtype=torch.float64)) @ Q2.mT).to(dtype)


def log_uniform_scales(A, dtype, gen, octaves_per_stratum=1.0):
    """Scales c, float64, log-uniform over the range in the module docstring, one per stratum."""
    info = torch.finfo(dtype)
    amax = A.double().abs().max().item()
    sigma1 = torch.linalg.matrix_norm(A.double(), ord=2).item()
    lo = math.log2(info.smallest_normal) + info.bits - math.log2(amax)  # bits >= the digits
    hi = math.log2(info.max / 2) - math.log2(sigma1)
    strata = math.ceil((hi - lo) / octaves_per_stratum)
    width = (hi - lo) / strata
    u = torch.rand(strata, dtype=torch.float64, generator=gen)
    return torch.exp2(lo + (torch.arange(strata, dtype=torch.float64) + u) * width)


def scaled_batch(A, c, dtype):
    """c A for every scale, rounded once to ``dtype`` (the product is formed in float64)."""
    return (A.double() * c[:, None, None]).to(dtype)


def assert_factors_scale(got, ref, c, tol, dtype):
    U, S, V = got
    U0, S0, V0 = ref
    assert torch.isfinite(S).all()
    bad = ((S.double() / c[:, None] - S0.double()).abs() > tol).any(dim=-1)
    assert not bad.any(), f"S off at scales {c[bad][:8].tolist()}"
    for name, X, X0 in (("U", U, U0), ("V", V, V0)):
        bad = ((X - X0).abs() > tol).flatten(1).any(dim=-1)
        assert not bad.any(), f"{name} off at scales {c[bad][:8].tolist()}"
    k = U.shape[-1]
    eye = torch.eye(k, dtype=dtype)
    ortho_tol = 4 * max(U.shape[-2], V.shape[-2]) * EPS[dtype]  # as test_rsvd's exact-path test
    assert (U.mT @ U - eye).abs().max().item() <= ortho_tol
    assert (V.mT @ V - eye).abs().max().item() <= ortho_tol


# (m, n, k, oversample): the exact branch (l = min(m, n)), the randomized one, wide and tall;
# each backend path ("default": the fused CPU kernel for these sides; "large": the BLAS path).
RSVD_CASES = [(16, 12, 4, 8), (16, 64, 4, 8), (64, 16, 4, 4), (40, 90, 3, 40), (24, 24, 3, 2)]


@pytest.mark.parametrize("path", ["default", "large"])
@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(dtype=DTYPES, case=st.sampled_from(RSVD_CASES), seed=SEEDS)
def test_rsvd_and_lowrank_are_scale_equivariant(device, path, dtype, case, seed, monkeypatch):
    select_path(device, path, monkeypatch)
    m, n, k, oversample = case
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    sigma = [4.0, 3.0, 2.0] + [1.0 / (i + 2) for i in range(p - 3)]
    A = spectrum_matrix(m, n, sigma, dtype, gen)
    k = min(k, 3)
    gap = sigma[k - 1] - sigma[k]
    c = log_uniform_scales(A, dtype, gen)
    tol = backward_error_bound(A[None]) * 10 / gap
    ref = [t[None] for t in ops.rsvd(A.to(device), k, oversample)]
    got = ops.rsvd(scaled_batch(A, c, dtype).to(device), k, oversample)
    assert_factors_scale([t.cpu() for t in got], [t.cpu() for t in ref], c, tol, dtype)
    # lowrank: the same factors multiplied out, c times A's
    L0 = ops.lowrank(A.to(device), k, oversample).cpu().double()
    L = ops.lowrank(scaled_batch(A, c, dtype).to(device), k, oversample).cpu().double()
    err = (L / c[:, None, None] - L0).abs().flatten(1).max(dim=-1).values
    bad = err > tol * (1 + sigma[0] / gap)
    assert not bad.any(), f"lowrank off at scales {c[bad][:8].tolist()}"


def unscaled_band(dtype):
    """log2 of rescale.h's band edge for ``dtype``: matrices whose largest magnitude lies in
    [2^-e, 2^e] are factored unscaled."""
    text = (ROOT / "csrc" / "rsvd" / "rescale.h").read_text()
    name = "float" if dtype == torch.float32 else "double"
    found = re.search(rf"ScaleBand<{name}> {{\s*static constexpr {name} lo = 0x1p-(\d+)f?", text)
    return int(found.group(1))


@pytest.mark.parametrize("path", [FUSED, LARGE])
@settings(SETTINGS, max_examples=2)
@given(dtype=DTYPES, exact=st.booleans(), seed=SEEDS)
def test_block_code_is_scale_equivariant(emulator, tmp_path, path, dtype, exact, seed):  # noqa: F811
    """The CUDA block code (rsvd_block.cuh under the fiber emulator), fused and large paths.

    The emulator runs about 0.3 s a matrix, too slow for one stratum per octave of the whole
    range. The magnitudes of every intermediate grow with c, so whatever under- or overflows
    inside the unscaled band does so first at its edges: the four octaves inside each edge get
    one stratum each, and 16 more scales are log-uniform over the whole range (outside the band
    the input is scaled into [1, 2) by a power of two, exactly)."""
    gen = torch.Generator().manual_seed(seed)
    m, n, k = 12, 40, 3
    sigma = [4.0, 3.0, 2.0] + [0.01] * 9
    A = spectrum_matrix(m, n, sigma, dtype, gen)
    edge = unscaled_band(dtype)
    log_amax = math.log2(A.double().abs().max().item())
    u = torch.rand(8, dtype=torch.float64, generator=gen)
    near_edges = torch.cat([edge - 4 + torch.arange(4) + u[:4], -edge + torch.arange(4) + u[4:]])
    whole = log_uniform_scales(A, dtype, gen, octaves_per_stratum=1.0)
    c = torch.cat(
        [torch.exp2(near_edges - log_amax), whole[torch.randperm(len(whole), generator=gen)[:16]]]
    )
    oversample = 12 if exact else 4
    tol = backward_error_bound(A[None]) * 10 / (sigma[k - 1] - sigma[k])
    batch = torch.cat([A[None], scaled_batch(A, c, dtype)])
    U, S, V = emulate(emulator, tmp_path, path, batch, k, oversample)
    assert_factors_scale((U[1:], S[1:], V[1:]), (U[:1], S[:1], V[:1]), c, tol, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "method,noise", [("rpca", None), ("rpca", "auto"), ("unrolled", None)], ids=str
)
@settings(SETTINGS, max_examples=3)
@given(dtype=DTYPES, seed=SEEDS)
def test_lowrank_sparse_is_scale_equivariant(device, method, noise, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    m, n, k = 20, 24, 2
    X = spectrum_matrix(m, n, [3.0, 2.0], torch.float64, gen)
    spikes = torch.rand(m, n, generator=gen, dtype=torch.float64) < 0.05
    X = (X + spikes * 5.0 + 0.01 * torch.randn(m, n, generator=gen, dtype=torch.float64)).to(dtype)
    c = log_uniform_scales(X, dtype, gen, octaves_per_stratum=4.0)
    L0, S0 = (
        t.cpu().double() for t in ops.lowrank_sparse(X.to(device), k, method=method, noise=noise)
    )
    L, S = (
        t.cpu().double()
        for t in ops.lowrank_sparse(
            scaled_batch(X, c, dtype).to(device), k, method=method, noise=noise
        )
    )
    # Iterative solvers amplify rounding; the bound is a few hundred rounding errors of ||X||.
    tol = 1000 * EPS[dtype] * torch.linalg.matrix_norm(X.double()).item()
    for name, got, want in (("L", L, L0), ("S", S, S0)):
        err = (got / c[:, None, None] - want).abs().flatten(1).max(dim=-1).values
        bad = ~(err <= tol)
        assert not bad.any(), (
            f"{name} off at scales {c[bad][:8].tolist()} (err {err[bad][:4].tolist()})"
        )
