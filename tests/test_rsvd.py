"""rsvd and lowrank against the exact truncated SVD and the references.

Tolerances come from perturbation theory, not tuning: a backward-stable SVD of A is the exact
SVD of A + E with ||E|| <= c eps ||A||, so singular values move by at most ||E|| (Weyl) and
singular vectors of a value separated by `gap` from the others by at most ||E|| / gap (Wedin).
We take c = 4 max(m, n), a generous stand-in for LAPACK's "modest polynomial in m and n".
"""

import numpy as np
import pytest
import torch
from conftest import DEVICES, DTYPES, kernel_is_exact, requires_cuda_kernels

import lsef_ref
from lsef_ext import ops
from lsef_ref.philox import gaussian, philox_words

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}
# "default": each backend picks its path (the CPU by its cost model, csrc/rsvd/cost_model.h);
# "large": the large path forced for every shape (both backends read their switch at every
# call), so both paths see every case: on CUDA cuBLAS products + batched QR/SVD kernels (exact
# shapes too), on the CPU the BLAS path (own QRs and Jacobi SVD; exact shapes take the in-cache
# Jacobi SVD); "lapack": the CPU's LAPACK path (geqrf/orgqr QRs and gesdd for the projection;
# exact shapes: gesdd of the matrix), which CUDA does not have.
PATHS = ["default", "large", "lapack"]
CPU_PATH = {"large": "blas", "lapack": "lapack"}
PATH_NAMES = ops.RSVD_PATHS  # csrc/rsvd/cost_model.h's order


def select_path(device, path, monkeypatch):
    requires_cuda_kernels(device, "rsvd")
    if device == "cuda":
        if path == "lapack":
            pytest.skip("the LAPACK path is the CPU kernel's")
        # CPU results these tests compare with come from the algorithm CUDA runs
        monkeypatch.setenv("LSEF_RSVD_PATH", "fused")
        if path == "large":
            monkeypatch.setenv("LSEF_RSVD_CUDA_FUSED_MAX_SIDE", "0")
    elif path != "default":
        monkeypatch.setenv("LSEF_RSVD_PATH", CPU_PATH[path])


def cpu_path(m, n, k, oversample=8, n_iter=2, dtype=torch.float32, batch=1):
    """The CPU kernel's choice for a batch of (m, n) matrices, by name."""
    return ops.rsvd_path(m, n, k, oversample, n_iter, dtype, batch)


def with_spectrum(batch, m, n, sigma, dtype, device="cpu"):
    """Random matrices (batch, m, n) with singular values `sigma` (length <= min(m, n))."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    r = sigma.numel()
    Q1 = torch.linalg.qr(torch.randn(batch, m, r, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(batch, n, r, dtype=torch.float64))[0]
    return ((Q1 * sigma) @ Q2.mT).to(dtype=dtype, device=device)


def backward_error_bound(A):
    m, n = A.shape[-2:]
    return 4 * max(m, n) * EPS[A.dtype] * torch.linalg.matrix_norm(A.double(), ord=2).max().item()


SPECTRA = {
    "fast decay": lambda r: [2.0**-i for i in range(r)],
    "slow decay": lambda r: [1.0 / (i + 1) for i in range(r)],
    "rank 3": lambda r: [3.0, 2.0, 1.0],
    "repeated": lambda r: [3.0, 3.0, 2.0, 2.0, 2.0] + [1.0] * (r - 5),
}


def test_philox_known_answer_and_reference_stream():
    # Random123's known-answer test for philox4x32-10 with counter 0 and key 0.
    words = torch.ops.lsef._philox_words(1, 0)[0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    for seed in (0, 1, 2**40 + 7):
        got = torch.ops.lsef._philox_words(513, seed).numpy().astype(np.uint32)
        assert np.array_equal(got, philox_words(513, seed))  # bit for bit
        torch.testing.assert_close(
            torch.ops.lsef._philox_normal(1001, seed), gaussian(1001, seed), rtol=0, atol=1e-13
        )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("mn", [(8, 40), (40, 8), (12, 12), (70, 90)])
def test_exact_path_matches_truncated_svd(device, dtype, spectrum, mn, path, monkeypatch):
    select_path(device, path, monkeypatch)
    m, n = mn
    sigma = SPECTRA[spectrum](min(m, n))
    A = with_spectrum(3, m, n, sigma, dtype, device)
    k = min(5, m, n)
    U, S, V = ops.rsvd(A, k, oversample=min(m, n))  # l = min(m, n): the exact path
    tol = backward_error_bound(A)
    s_true = torch.tensor(sigma + [0.0] * (min(m, n) - len(sigma)), dtype=torch.float64)[:k]
    torch.testing.assert_close(S.double().cpu(), s_true.expand(3, k), rtol=0, atol=tol)
    eye = torch.eye(k, dtype=dtype, device=device)
    ortho_tol = 4 * max(m, n) * EPS[dtype]
    torch.testing.assert_close(U.mT @ U, eye.expand(3, k, k), rtol=0, atol=ortho_tol)
    torch.testing.assert_close(V.mT @ V, eye.expand(3, k, k), rtol=0, atol=ortho_tol)
    # The rank-k approximation is unique when sigma_k > sigma_{k+1}, whatever the basis.
    full = torch.tensor(sigma + [0.0] * (min(m, n) - len(sigma)))
    if k == min(m, n) or full[k - 1] > full[k]:
        gap = (full[k - 1] - full[k]).item() if k < min(m, n) else full[k - 1].item() or 1.0
        L = (U * S.unsqueeze(-2)) @ V.mT
        want = lsef_ref.lowrank(A.double().cpu(), k, oversample=min(m, n))
        torch.testing.assert_close(
            L.double().cpu(), want, rtol=0, atol=tol * (1 + full[0].item() / gap)
        )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(4, 16, 512), (3, 32, 200), (2, 200, 32), (2, 100, 130), (2, 64, 64)]
)
def test_randomized_path_matches_reference(device, dtype, shape, path, monkeypatch):
    """Same algorithm, same test matrix: the kernel equals the reference up to rounding,
    amplified by at most sigma_1 / gap for the singular vectors (Wedin)."""
    select_path(device, path, monkeypatch)
    b, m, n = shape
    sigma = [1.0 / (i + 1) for i in range(min(m, n))]  # relative gaps >= 1/(k+1)^2 among the top k
    A = with_spectrum(b, m, n, sigma, dtype, device)
    k = 4
    got = ops.rsvd(A, k)
    exact = device == "cpu" and path == "default" and kernel_is_exact(A, k)
    want = lsef_ref.rsvd(A.cpu(), k, exact=exact)
    gap = sigma[k - 1] - sigma[k]
    tol = backward_error_bound(A) / gap * 10  # x10: the sketch's n_iter + 2 products and QRs
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 16, 512), (2, 200, 300)])
def test_randomized_recovers_low_rank_exactly(device, dtype, shape):
    """rank(A) <= l: the range finder captures range(A), so the result is the truncated SVD."""
    requires_cuda_kernels(device, "rsvd")
    b, m, n = shape
    A = with_spectrum(b, m, n, [4.0, 3.0, 2.0, 1.0], dtype)
    U, S, V = (t.cpu() for t in ops.rsvd(A.to(device), 4))
    Ue, Se, Ve = lsef_ref.truncated_svd(A.double(), 4)
    tol = backward_error_bound(A)
    torch.testing.assert_close(S.double(), Se, rtol=0, atol=tol)
    torch.testing.assert_close(U.double(), Ue, rtol=0, atol=tol * 4)  # gap 1, sigma_1 = 4
    torch.testing.assert_close(V.double(), Ve, rtol=0, atol=tol * 4)


def test_randomized_singular_values_never_exceed_the_true_ones():
    """sigma_i(Q^T A) <= sigma_i(A) for any orthonormal Q (interlacing)."""
    A = torch.randn(8, 32, 300, dtype=torch.float64)
    S = ops.rsvd(A, 8, n_iter=0)[1]
    true = torch.linalg.svdvals(A)[..., :8]
    assert (S <= true * (1 + 1e-12)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 16, 512), (3, 200, 300)])  # fused and BLAS/large paths
def test_reproducible_and_batch_independent(device, shape):
    requires_cuda_kernels(device, "rsvd")
    A = torch.randn(shape, device=device)
    first = ops.rsvd(A, 6, seed=123)
    again = ops.rsvd(A, 6, seed=123)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # The in-cache paths (the CPU's fused and Jacobi paths, CUDA's fused one up to short side 64)
    # compute each matrix alone: bit for bit (the CPU groups matrices for its Jacobi step, one per
    # vector lane; see test_fused_groups_do_not_change_a_matrix's result). The CPU's BLAS and
    # LAPACK paths and CUDA's large path run their products as BLAS GEMMs over the whole batch,
    # whose kernel (and so summation order) may change with the batch size, and LAPACK's
    # threading with it: there rsvd(A)[i] equals rsvd(A[i]) to rounding only (docs/DESIGN.md §6
    # and §10; seen on the CPU with 16 threads). The CPU's choice of path does not depend on the
    # batch, so a matrix takes the same path alone and in its batch.
    if device == "cpu":  # both calls on an in-cache path (alone: a batch of one)
        in_cache = ("fused", "jacobi")
        bitwise = cpu_path(*shape[1:], 6) in in_cache
        bitwise = bitwise and cpu_path(*shape[1:], 6, batch=shape[0]) in in_cache
    else:
        bitwise = min(shape[1:]) <= 64
    for i in range(shape[0]):
        for a, b in zip(first, ops.rsvd(A[i], 6, seed=123)):
            if bitwise:
                assert torch.equal(a[i], b)
            else:
                torch.testing.assert_close(a[i], b, rtol=0, atol=1e-3)
    other = ops.rsvd(A, 6, seed=124)[1]
    assert not torch.equal(first[1], other)  # the seed matters on the randomized path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(11, 40, 24), (13, 16, 100), (9, 30, 70)])
def test_fused_groups_do_not_change_a_matrix(dtype, shape, monkeypatch):
    """The CPU's fused path runs the small QRs and Jacobi SVDs of 8 (float32) or 4 (float64)
    matrices at once, one per vector lane, and a lane goes on being swept (by identity rotations)
    while the others converge. Each matrix's result must still be what it gets alone, bit for
    bit: in batches that are not a multiple of the group, tall and wide, with a non-finite
    matrix (NaN factors, left out of its group), a zero matrix, a rank-one one and one with
    graded rows among them. (The fused path forced: the cost model may send a lone matrix
    elsewhere.)"""
    monkeypatch.setenv("LSEF_RSVD_PATH", "fused")
    A = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(shape[0]))
    A[3] = float("nan")
    A[5] = 0.0
    A[1] *= 1e30 if dtype == torch.float32 else 1e300  # rescaled before factoring
    A[7] = torch.outer(A[7, :, 0], A[7, 0, :])  # rank one
    # graded rows: the range finder's later columns have norms below 2^-42 (2^-341 in float64),
    # which the lane QR hands to the scalar one (it rescales such columns)
    A[8, 1:] *= 1e-20 if dtype == torch.float32 else 1e-120
    U, S, V = ops.rsvd(A, 3)
    assert torch.isnan(U[3]).all() and torch.isnan(S[3]).all() and torch.isnan(V[3]).all()
    for i in range(shape[0]):
        if i == 3:
            continue
        for batched, alone in zip((U, S, V), ops.rsvd(A[i : i + 1], 3)):
            assert torch.equal(batched[i : i + 1], alone), i


@pytest.mark.parametrize("device", DEVICES)
def test_path_switch_is_read_at_every_call(device, monkeypatch):
    """Each backend reads its fused/large switch through one helper at every call: the same call
    under the forced large path takes the other algorithm (other rounding), then switches back."""
    requires_cuda_kernels(device, "rsvd")
    A = torch.randn(3, 20, 60, dtype=torch.float64, device=device)
    if device == "cpu":
        monkeypatch.setenv("LSEF_RSVD_PATH", "fused")
    fused = ops.rsvd(A, 4, seed=5)
    select_path(device, "large", monkeypatch)
    large = ops.rsvd(A, 4, seed=5)
    monkeypatch.undo()
    if device == "cpu":
        monkeypatch.setenv("LSEF_RSVD_PATH", "fused")
    again = ops.rsvd(A, 4, seed=5)
    assert not torch.equal(fused[0], large[0])  # the large path ran
    for a, b, c in zip(fused, large, again):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
        assert torch.equal(a, c)  # and the default came back


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty(device):
    requires_cuda_kernels(device, "rsvd")
    A = torch.randn(3, 40, 12, dtype=torch.float64).mT  # (3, 12, 40), transposed strides
    exact = device == "cpu" and kernel_is_exact(A, 3)
    for a, b in zip(ops.rsvd(A.to(device), 3), lsef_ref.rsvd(A, 3, exact=exact)):
        torch.testing.assert_close(a.cpu(), b)
    U, S, V = ops.rsvd(torch.randn(0, 6, 9, device=device), 2)
    assert U.shape == (0, 6, 2) and S.shape == (0, 2) and V.shape == (0, 9, 2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_zero_matrix(device, path, monkeypatch):
    select_path(device, path, monkeypatch)
    U, S, V = (
        t.cpu() for t in ops.rsvd(torch.zeros(2, 6, 9, dtype=torch.float64, device=device), 3)
    )
    assert torch.equal(S, torch.zeros_like(S))
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(U.mT @ U, eye.expand(2, 3, 3))
    torch.testing.assert_close(V.mT @ V, eye.expand(2, 3, 3))


SCALES = {
    torch.float32: [1e-30, 1e-20, 1e-12, 1e-6, 1e9, 1e20, 1e30],
    torch.float64: [1e-300, 1e-200, 1e-150, 1e-100, 1e100, 1e150, 1e200, 1e300],
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,oversample",
    [((2, 16, 64), 4), ((2, 16, 64), 16), ((2, 40, 12), 2), ((2, 40, 12), 12), ((1, 1, 9), 0)],
)
def test_scale_invariance(path, device, dtype, shape, oversample, monkeypatch):
    """rsvd(c A) = c rsvd(A): same U and V, S scaled, to working precision, for c across the
    dtype's range (randomized and exact branches, wide and tall, both paths). Before the input
    was scaled, float32 lost orthonormality at 1e9 and returned NaN or S = 0 at the extremes."""
    select_path(device, path, monkeypatch)
    b, m, n = shape
    p = min(m, n)
    sigma = [4.0, 3.0, 2.0, 1.0][:p] + [0.01] * (p - 4)
    A = with_spectrum(b, m, n, sigma, torch.float64)
    k = min(3, p)
    gap = sigma[k - 1] - (sigma[k] if k < p else 0.0)
    U0, S0, V0 = ops.rsvd(A.to(dtype=dtype, device=device), k, oversample)
    tol = backward_error_bound(A.to(dtype)) * 10 / gap
    for c in SCALES[dtype]:
        U, S, V = ops.rsvd((A * c).to(dtype=dtype, device=device), k, oversample)
        assert torch.isfinite(S).all() and (S > 0).all(), c
        torch.testing.assert_close((S.double() / c).cpu(), S0.double().cpu(), rtol=0, atol=tol)
        torch.testing.assert_close(U.cpu(), U0.cpu(), rtol=0, atol=tol)
        torch.testing.assert_close(V.cpu(), V0.cpu(), rtol=0, atol=tol)
        eye = torch.eye(k, dtype=dtype)
        assert (U.mT @ U - eye).abs().max().item() <= 40 * EPS[dtype]
        assert (V.mT @ V - eye).abs().max().item() <= 40 * EPS[dtype]


def test_scale_invariance_of_lowrank():
    A = with_spectrum(2, 16, 64, [4.0, 3.0, 2.0] + [0.01] * 13, torch.float64)
    L0 = ops.lowrank(A.float(), 3)[0]
    for c in SCALES[torch.float32]:
        L = ops.lowrank((A * c).float(), 3)[0]
        torch.testing.assert_close(L.double() / c, L0.double(), rtol=0, atol=1e-5)


def tiny_tail_matrix(dtype):
    """4 x 4, singular values 1 and three tiny ones (1e-21 ... 1e-23 in float32, 1e-160 ... in
    float64) that are normal numbers but whose squares are not: rows and columns of a scaled
    identity, permuted."""
    tiny = [1e-21, 3e-22, 1e-23] if dtype == torch.float32 else [1e-160, 3e-161, 1e-162]
    return torch.diag(torch.tensor([1.0] + tiny, dtype=torch.float64)).to(dtype)[[2, 0, 3, 1]][
        :, [1, 3, 0, 2]
    ]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,k,oversample",
    [((300, 4, 4), 4, 0), ((40, 6, 9), 3, 0), ((40, 6, 9), 2, 2), ((20, 40, 70), 4, 70)],
)
def test_rank_one_input_keeps_orthonormal_factors(
    device, dtype, path, shape, k, oversample, monkeypatch
):
    """Rank 1 (a row repeated): the trailing columns the QRs see are rounding noise, down to
    1e-23 in float32, whose squared norms underflowed and left U or V off orthonormal by up to
    0.33 (and a matrix with tiny singular values, by construction). Orthonormal to a few units
    of the dtype's epsilon on every path, exact and randomized."""
    select_path(device, path, monkeypatch)
    b, m, n = shape
    g = torch.Generator().manual_seed(0)
    A = torch.randn(b, 1, n, generator=g, dtype=dtype).expand(b, m, n).to(device)
    U, S, V = (t.cpu() for t in ops.rsvd(A, k, oversample=oversample, n_iter=0))
    eye = torch.eye(k, dtype=dtype)
    bound = 10 * max(m, n) * torch.finfo(dtype).eps
    assert (U.mT @ U - eye).abs().max() <= bound
    assert (V.mT @ V - eye).abs().max() <= bound
    torch.testing.assert_close(S[:, 0], A[:, 0].cpu().norm(dim=-1) * m**0.5)
    if shape[1:] == (4, 4):
        U, S, V = (t.cpu() for t in ops.rsvd(tiny_tail_matrix(dtype)[None].to(device), 4, 0, 0))
        assert (U.mT @ U - eye).abs().max() <= bound
        assert (V.mT @ V - eye).abs().max() <= bound
        assert S[0, 0] == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("oversample", [8, 200])  # randomized, exact
@pytest.mark.parametrize("shape", [(4, 16, 512), (4, 100, 130)])  # fused and BLAS/large paths
def test_nan_input_gives_nan_for_that_matrix_only(device, oversample, shape):
    requires_cuda_kernels(device, "rsvd")
    A = torch.randn(shape)
    A[1, 3, 5] = float("nan")
    A[2, 0, 0] = float("inf")
    U, S, V = (t.cpu() for t in ops.rsvd(A.to(device), 3, oversample))
    for t in (U, S, V):
        assert t[1:3].isnan().all() and not t[0].isnan().any() and not t[3:].isnan().any()


# ---- CUDA against the CPU kernel ------------------------------------------------------------


def _requires_cuda():
    requires_cuda_kernels("cuda", "rsvd")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        (64, 16, 512),
        (8, 300, 16),
        (4, 32, 768),
        (3, 100, 130),
        (5, 12, 12),
        (2, 64, 2000),
        (2, 1, 50),
    ],
)
def test_cuda_agrees_with_cpu_kernel(shape, dtype, path, monkeypatch):
    """One matrix, both backends: one algorithm on one test matrix, so they differ by rounding
    (amplified by sigma_1 / gap for the vectors), on the randomized and the exact path."""
    _requires_cuda()
    select_path("cuda", path, monkeypatch)
    b, m, n = shape
    p = min(m, n)
    sigma = [1.0 / (i + 1) for i in range(p)]
    A = with_spectrum(b, m, n, sigma, dtype)
    k = min(4, p)
    gap = sigma[k - 1] - sigma[k] if k < p else sigma[-1]
    tol = backward_error_bound(A) / gap * 10
    for oversample in (8, p):
        for g, c in zip(ops.rsvd(A.cuda(), k, oversample), ops.rsvd(A, k, oversample)):
            torch.testing.assert_close(g.cpu(), c, rtol=0, atol=tol)


@pytest.mark.parametrize("path", PATHS)
def test_cuda_draws_the_cpu_test_matrix(path, monkeypatch):
    """With no power iteration and a slowly decaying spectrum the result depends on the test
    matrix itself: CUDA must match the CPU to float64 rounding, while another seed does not."""
    _requires_cuda()
    select_path("cuda", path, monkeypatch)
    A = with_spectrum(4, 16, 400, [1.0 / (i + 1) ** 0.5 for i in range(16)], torch.float64)
    for seed in (0, 7, 2**40 + 3):
        got = ops.rsvd(A.cuda(), 4, 4, 0, seed)[1].cpu()
        want = ops.rsvd(A, 4, 4, 0, seed)[1]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        other = ops.rsvd(A, 4, 4, 0, seed + 1)[1]
        assert (other - want).abs().max() > 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 16, 300), (3, 80, 20)])
def test_half_inputs_are_computed_in_float32(shape, dtype, path, monkeypatch):
    """float16/bfloat16 in, same dtype out: the float32 computation on the same values, each
    result rounded once (so equal to rounding the float32 call's results)."""
    _requires_cuda()
    select_path("cuda", path, monkeypatch)
    A = torch.randn(shape, device="cuda").to(dtype)
    got = ops.rsvd(A, 4)
    want = ops.rsvd(A.float(), 4)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert torch.equal(g, w.to(dtype))
    L = ops.lowrank(A, 4)
    assert L.dtype == dtype and torch.isfinite(L).all()


def test_cuda_large_inputs_and_non_finite_on_the_fused_path_with_global_scratch():
    """q so long that the fused kernel's work arrays exceed shared memory (global scratch)."""
    _requires_cuda()
    A = with_spectrum(3, 8, 40000, [1.0 / (i + 1) for i in range(8)], torch.float64)
    A[1, 0, 0] = float("nan")
    got = ops.rsvd(A.cuda(), 2, 2)
    want = ops.rsvd(A, 2, 2)
    for g, w in zip(got, want):
        assert g[1].isnan().all()
        gap = 1 / 2 - 1 / 3
        torch.testing.assert_close(
            g.cpu()[0::2], w[0::2], rtol=0, atol=backward_error_bound(A[0::2]) / gap * 10
        )


# ---- gradients ---------------------------------------------------------------------------


def rank_k(m, n, k, dtype=torch.float64):
    return (torch.randn(m, k, dtype=dtype) @ torch.randn(k, n, dtype=dtype)).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rsvd", "lowrank"])
@pytest.mark.parametrize("mnk", [(5, 7, 5), (7, 5, 5), (6, 9, 3), (9, 6, 2)])
def test_gradcheck(device, op, mnk):
    """Forward exact (l = min(m, n)) and derivative exact (k = min(m, n) or rank(A) = k)."""
    requires_cuda_kernels(device, "rsvd")
    m, n, k = mnk
    A = rank_k(m, n, k) if k < min(m, n) else torch.randn(m, n, dtype=torch.float64)
    A = A.detach().to(device).requires_grad_()
    fn = getattr(ops, op)
    assert torch.autograd.gradcheck(lambda A: fn(A, k, oversample=min(m, n)), (A,))


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_backward_is_the_tangent_projection(device):
    requires_cuda_kernels(device, "rsvd")
    A = torch.randn(3, 16, 100, dtype=torch.float64, device=device, requires_grad=True)
    G = torch.randn(3, 16, 100, dtype=torch.float64, device=device)
    (dA,) = torch.autograd.grad(ops.lowrank(A, 4), A, G)
    U, _, V = ops.rsvd(A.detach(), 4)
    PU, PV = U @ U.mT, V @ V.mT
    torch.testing.assert_close(dA, PU @ G + G @ PV - PU @ G @ PV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "lead, m, n, k",
    [
        ((3,), 16, 100, 4),
        ((2, 2), 33, 7, 5),
        ((), 9, 9, 1),
        ((4,), 1, 50, 1),
        ((2,), 70, 70, 12),  # the widest factors the kernel takes
        ((2,), 40, 60, 20),  # wider: the composite's GEMMs (faster from k = 16 on)
    ],
)
def test_lowrank_backward_cpu_kernel_matches_the_products(dtype, lead, m, n, k):
    """The CPU kernel of lowrank_backward (one matrix at a time in cache, for k <= 12) against
    the tangent projection written with torch products, on contiguous and transposed
    (non-contiguous) inputs; shapes the kernel does not take (wider factors, broadcast batch
    dimensions, mixed dtypes) go through the composite and give the same values."""
    g = torch.Generator().manual_seed(m * n + k)
    G = torch.randn(lead + (m, n), generator=g, dtype=dtype)
    U = torch.linalg.qr(torch.randn(lead + (m, k), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(lead + (n, k), generator=g, dtype=torch.float64))[0]
    U, V = U.to(dtype), V.to(dtype)
    want = U @ (U.mT @ G) + (G @ V - U @ (U.mT @ G @ V)) @ V.mT
    tol = {"rtol": 0, "atol": 50 * torch.finfo(dtype).eps * max(1.0, G.abs().max().item())}
    op = torch.ops.lsef.lowrank_backward
    torch.testing.assert_close(op(G, U, V), want, **tol)
    Gt = G.mT.contiguous().mT  # same values, column-major strides
    torch.testing.assert_close(op(Gt, U.mT.contiguous().mT, V), want, **tol)
    if lead:
        one = op(G[..., :1, :, :], U[..., :1, :, :], V[..., :1, :, :])  # a batch of one
        torch.testing.assert_close(one, want[..., :1, :, :], **tol)
        bU, bV = U[..., :1, :, :], V[..., :1, :, :]  # broadcast: the composite takes it
        bwant = bU @ (bU.mT @ G) + (G @ bV - bU @ (bU.mT @ G @ bV)) @ bV.mT
        torch.testing.assert_close(op(G, bU, bV), bwant, **tol)


@pytest.mark.parametrize(
    "A",
    [
        torch.zeros(6, 9, dtype=torch.float64),
        torch.ones(6, 9, dtype=torch.float64),  # rank 1: sigma_2.. = 0
        torch.eye(6, 9, dtype=torch.float64) * 2.0,  # all singular values repeated
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_spectra_give_finite_gradients(A, device):
    requires_cuda_kernels(device, "rsvd")
    A = A.clone().to(device).requires_grad_()
    U, S, V = ops.rsvd(A, 3)
    weights = torch.arange(9.0, dtype=torch.float64, device=device)[:, None]
    loss = U.sum() + S.sum() + (V**2 * weights).sum()
    (dA,) = torch.autograd.grad(loss, A)
    assert torch.isfinite(dA).all()
    (dL,) = torch.autograd.grad(ops.lowrank(A, 3).sum(), A)
    assert torch.isfinite(dL).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    requires_cuda_kernels(device, "rsvd")
    for A in (
        torch.randn(2, 6, 9, device=device),
        torch.randn(3, 16, 40, device=device, requires_grad=True),
    ):
        torch.library.opcheck(torch.ops.lsef.rsvd.default, (A, 3, 8, 2, 0))
        torch.library.opcheck(torch.ops.lsef.lowrank.default, (A, 3, 2, 1, 5))


def test_torch_compile_fullgraph():
    fn = torch.compile(
        lambda A: ops.lowrank(A, 3).square().sum(), fullgraph=True, backend="aot_eager"
    )
    A = torch.randn(2, 8, 30, requires_grad=True)
    (got,) = torch.autograd.grad(fn(A), A)
    (want,) = torch.autograd.grad(ops.lowrank(A, 3).square().sum(), A)
    torch.testing.assert_close(got, want)
    factors = torch.compile(lambda A: ops.rsvd(A, 3), fullgraph=True, backend="aot_eager")(
        A.detach()
    )
    for a, b in zip(factors, ops.rsvd(A.detach(), 3)):
        torch.testing.assert_close(a, b)


# ---- bad input ---------------------------------------------------------------------------


def test_huge_oversample_is_the_exact_path():
    """k + oversample once overflowed int64 (2**63 - 1 gave std::vector's length error)."""
    A = torch.randn(2, 6, 9, dtype=torch.float64)
    for a, b in zip(ops.rsvd(A, 2, oversample=2**63 - 1), ops.rsvd(A, 2, oversample=6)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 24, 70), (3, 70, 24), (3, 12, 12)])
def test_every_cpu_path_keeps_the_contract(path, dtype, shape, monkeypatch):
    """Each of the five CPU paths, forced: the exact ones (jacobi, exact) give the truncated SVD
    on a randomized shape too (what the cost model may choose there); the sketching ones (fused,
    blas, lapack) agree with the reference, which runs the same algorithm on the same test
    matrix. On all: orthonormal factors, the sign rule, NaN factors for a non-finite matrix
    only, zero singular values for a zero matrix, and the same call gives the same bits."""
    monkeypatch.setenv("LSEF_RSVD_PATH", path)
    b, m, n = shape
    p = min(m, n)
    sigma = [1.0 / (i + 1) for i in range(p)]
    A = with_spectrum(b, m, n, sigma, dtype)
    A[1] = 0.0
    k = 4
    gap = sigma[k - 1] - sigma[k]
    tol = backward_error_bound(A) / gap * 10
    for oversample in (4, p):  # the randomized shape (l = 8 < p), then the exact one
        U, S, V = ops.rsvd(A, k, oversample)
        if path in ("jacobi", "exact") or oversample == p:
            want = lsef_ref.truncated_svd(A.double(), k)
        else:
            want = lsef_ref.rsvd(A, k, oversample)
        for g, w in zip((U, S, V), want):
            torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=tol)
        eye = torch.eye(k, dtype=dtype)
        assert (U.mT @ U - eye).abs().max().item() <= 40 * EPS[dtype]
        assert (V.mT @ V - eye).abs().max().item() <= 40 * EPS[dtype]
        arg = U.abs().argmax(dim=-2, keepdim=True)
        assert (U.gather(-2, arg) > 0).all()  # the sign rule
        assert torch.equal(S[1], torch.zeros_like(S[1]))
        for a, c in zip((U, S, V), ops.rsvd(A, k, oversample)):
            assert torch.equal(a, c)
        bad = A.clone()
        bad[2, 0, 0] = float("inf")
        Ub, Sb, Vb = ops.rsvd(bad, k, oversample)
        assert torch.isnan(Sb[2]).all() and torch.isnan(Ub[2]).all() and torch.isnan(Vb[2]).all()
        keep = [i for i in range(b) if i != 2]
        assert torch.isfinite(Sb[keep]).all()
        torch.testing.assert_close(Sb[keep], S[keep], rtol=0, atol=tol)


def test_cost_model_choices():
    """The CPU kernel's choice (csrc/rsvd/cost_model.h): exact shapes take one of the two exact
    SVDs; a sketch as wide as nearly the whole matrix costs more than LAPACK's SVD of it, so such
    calls are exact too; the video case (short side 16, rank 4, a batch) stays on the in-cache
    fused path. Whether a call is exact does not depend on the batch or the threads."""
    exact = ("jacobi", "exact")
    for m, n in [(8, 8), (16, 512), (100, 130), (300, 300), (512, 2048), (2048, 512)]:
        for dtype in DTYPES:
            assert cpu_path(m, n, min(m, n), dtype=dtype) in exact
            assert cpu_path(m, n, 1, oversample=min(m, n), dtype=dtype) in exact
    for m, n, k in [(300, 300, 290), (256, 256, 240), (512, 512, 500), (512, 2048, 500)]:
        assert cpu_path(m, n, k) in exact, (m, n, k)
    assert cpu_path(16, 512, 4, batch=256) == "fused"
    assert cpu_path(512, 16, 4, batch=256) == "fused"  # a tall matrix is factored as A^T
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 7):
            torch.set_num_threads(t)
            for m, n, k in [(16, 512, 4), (64, 64, 56), (128, 512, 64), (512, 512, 16)]:
                answers = {cpu_path(m, n, k, batch=b) in exact for b in (1, 3, 8, 64, 256)}
                assert len(answers) == 1, (m, n, k, t)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="_rsvd_path: needs"):
        torch.ops.lsef._rsvd_path(4, 4, 5, 8, 2, False)
    with pytest.raises(ValueError, match="_rsvd_path: needs batch >= 1, got 0"):
        torch.ops.lsef._rsvd_path(4, 4, 2, 8, 2, False, 0)


def test_unknown_forced_path_is_a_value_error(monkeypatch):
    monkeypatch.setenv("LSEF_RSVD_PATH", "gesvd")
    with pytest.raises(ValueError, match="LSEF_RSVD_PATH must be auto, fused, jacobi, blas, "):
        ops.rsvd(torch.randn(2, 8, 20), 2)
    monkeypatch.setenv("LSEF_RSVD_PATH", "auto")
    ops.rsvd(torch.randn(2, 8, 20), 2)


def test_bad_input():
    A = torch.randn(2, 6, 9)
    with pytest.raises(
        ValueError, match=r"rsvd: k must be in \[1, min\(m, n\)\] = \[1, 6\] .* got 0"
    ):
        ops.rsvd(A, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(m, n\)\] = \[1, 6\] .* got 7"):
        ops.rsvd(A, 7)
    with pytest.raises(
        ValueError, match=r"A must have at least 2 dimensions \(\*, m, n\), got shape \[9\]"
    ):
        ops.rsvd(torch.randn(9), 1)
    with pytest.raises(RuntimeError, match="A must be a floating-point tensor, got Long"):
        ops.rsvd(A.long(), 2)
    with pytest.raises(ValueError, match="oversample must be >= 0, got -1"):
        ops.rsvd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter must be >= 0, got -2"):
        ops.rsvd(A, 2, n_iter=-2)
    with pytest.raises(ValueError, match=r"lowrank: k must be in"):
        ops.lowrank(A, 0)
