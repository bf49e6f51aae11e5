"""The CUDA rsvd kernels' per-block code, run on the CPU (no GPU needed).

tests/rsvd_block_emulator.cpp compiles csrc/rsvd/rsvd_block.cuh, the code each CUDA thread
block runs, with 256 emulated threads (cooperative fibers with CUDA's barrier, warp-barrier and
shuffle semantics). Its results must agree with the CPU kernel (the same algorithm on the same
test matrix) and with lsef_ref, within the same perturbation bounds as tests/test_rsvd.py. This
checks the numerical logic of the fused and large paths; it says nothing about speed, memory
access patterns or the device's math library. Skips where no C++20 compiler is found.
"""

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch
from test_rsvd import backward_error_bound, tiny_tail_matrix, with_spectrum

import lsef_ref
from lsef_ext import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
FUSED, LARGE = 0, 1


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("emu") / "rsvd_block_emulator"
    cmd = [
        cxx,
        "-std=c++20",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-I{ROOT / 'csrc'}",
        str(ROOT / "tests" / "rsvd_block_emulator.cpp"),
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True)
    return exe


def emulate(exe, tmp_path, path, A, k, oversample=8, n_iter=2, seed=0):
    b, m, n = A.shape
    header = np.array(
        [path, 0 if A.dtype == torch.float32 else 1, b, m, n, k, oversample, n_iter, seed],
        dtype=np.int64,
    )
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        f.write(header.tobytes())
        f.write(A.contiguous().numpy().tobytes())
    subprocess.run([str(exe), str(src), str(dst)], check=True)
    out = np.fromfile(dst, dtype=np.float32 if A.dtype == torch.float32 else np.float64)
    sizes = [b * m * k, b * k, b * n * k]
    U, S, V = np.split(out, np.cumsum(sizes)[:-1])
    return (
        torch.from_numpy(U.copy()).view(b, m, k),
        torch.from_numpy(S.copy()).view(b, k),
        torch.from_numpy(V.copy()).view(b, n, k),
    )


@pytest.mark.parametrize("path", [FUSED, LARGE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 16, 200), (2, 90, 24), (1, 33, 33), (1, 1, 7)])
def test_randomized_and_exact_agree_with_cpu_kernel(
    emulator, tmp_path, path, dtype, shape, monkeypatch
):
    """Same bounds as test_rsvd.test_randomized_path_matches_reference: the kernels, the CPU
    kernel and the reference are one algorithm on one test matrix, so they differ by rounding,
    amplified by sigma_1 / gap for the singular vectors. (The CPU kernel on its fused path: its
    cost model could answer a randomized shape exactly.)"""
    monkeypatch.setenv("LSEF_RSVD_PATH", "fused")
    b, m, n = shape
    p = min(m, n)
    sigma = [1.0 / (i + 1) for i in range(p)]
    A = with_spectrum(b, m, n, sigma, dtype)
    k = min(4, p)
    gap = sigma[k - 1] - sigma[k] if k < p else sigma[k - 1]
    tol = backward_error_bound(A) / gap * 10
    for oversample in (8, p):  # randomized (where l < p), then exact
        got = emulate(emulator, tmp_path, path, A, k, oversample)
        for g, c, r in zip(got, ops.rsvd(A, k, oversample), lsef_ref.rsvd(A, k, oversample)):
            torch.testing.assert_close(g, c, rtol=0, atol=tol)
            torch.testing.assert_close(g, r, rtol=0, atol=tol)


@pytest.mark.parametrize("path", [FUSED, LARGE])
def test_rank_deficient_zero_and_repeated(emulator, tmp_path, path):
    """Rank below l (the Householder QR must stay orthonormal), the zero matrix (every column
    completed), repeated singular values (Jacobi on equal norms)."""
    A = torch.stack(
        [
            with_spectrum(1, 12, 70, [3.0, 2.0], torch.float64)[0],
            torch.zeros(12, 70, dtype=torch.float64),
            with_spectrum(1, 12, 70, [2.0] * 12, torch.float64)[0],
        ]
    )
    k = 3
    U, S, V = emulate(emulator, tmp_path, path, A, k, oversample=4)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(U.mT @ U, eye.expand(3, k, k), rtol=0, atol=1e-12)
    torch.testing.assert_close(V.mT @ V, eye.expand(3, k, k), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        S[0], torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-13
    )
    assert torch.equal(S[1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(S[2], torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=1e-13)
    L = (U * S.unsqueeze(-2)) @ V.mT
    torch.testing.assert_close(L[0], A[0], rtol=0, atol=1e-12)  # rank 2 <= k: exact
    # The CPU kernel's factors for the rank-2 matrix (the zero and repeated ones have no unique
    # singular vectors).
    Uc, Sc, Vc = ops.rsvd(A[:1], k, oversample=4)
    torch.testing.assert_close(U[0, :, :2], Uc[0, :, :2], rtol=0, atol=1e-12)
    torch.testing.assert_close(V[0, :, :2], Vc[0, :, :2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", [FUSED, LARGE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_one_input_keeps_orthonormal_factors(emulator, tmp_path, path, dtype):
    """As test_rsvd.test_rank_one_input_keeps_orthonormal_factors, for the block code: the QR of
    columns of tiny entries (1e-21 in float32) must rescale them, not square them to subnormals."""
    g = torch.Generator().manual_seed(0)
    A = torch.cat(
        [
            tiny_tail_matrix(dtype)[None],
            torch.randn(7, 1, 4, generator=g, dtype=dtype).expand(7, 4, 4),
        ]
    )
    for k, oversample in ((4, 0), (2, 1)):  # exact; randomized (l = 3 < 4)
        U, S, V = emulate(emulator, tmp_path, path, A, k, oversample, n_iter=0)
        eye = torch.eye(k, dtype=dtype)
        bound = 40 * torch.finfo(dtype).eps
        assert (U.mT @ U - eye).abs().max() <= bound
        assert (V.mT @ V - eye).abs().max() <= bound
        torch.testing.assert_close(S[1:, 0], A[1:, 0].norm(dim=-1) * 2)


@pytest.mark.parametrize("path", [FUSED, LARGE])
def test_non_finite_matrix_gives_nan_for_that_matrix_only(emulator, tmp_path, path):
    A = torch.randn(3, 10, 40)
    A[1, 2, 3] = float("nan")
    A[2, 9, 39] = float("inf")
    for oversample in (8, 10):  # randomized, exact
        U, S, V = emulate(emulator, tmp_path, path, A, 2, oversample)
        for t in (U, S, V):
            assert t[1:].isnan().all() and not t[0].isnan().any()


def test_fused_and_large_path_agree_bit_for_bit_where_they_share_code(emulator, tmp_path):
    """n_iter = 0 with l = 1: Y = W Omega, one orthonormalisation; both paths then run the same
    tail. The only difference is the order of the sums in the products, so results agree to
    rounding (not bits): the check is that neither path mixes up layouts."""
    A = torch.randn(2, 8, 50, dtype=torch.float64)
    fused = emulate(emulator, tmp_path, FUSED, A, 1, 0, 0)
    large = emulate(emulator, tmp_path, LARGE, A, 1, 0, 0)
    for f, g in zip(fused, large):
        torch.testing.assert_close(f, g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", [FUSED, LARGE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_invariance(emulator, tmp_path, path, dtype):
    """The block code scales an input outside the band by a power of two (rescale.h), as the CPU
    kernel does: c A for c across the dtype's range gives c times the factors of A (S scaled,
    U and V equal), randomized (both passes of the fused path's first sweep) and exact."""
    scales = [1e-30, 1e-12, 1e20, 1e30] if dtype == torch.float32 else [1e-300, 1e-150, 1e300]
    sigma = [4.0, 3.0, 2.0] + [0.01] * 9
    A = with_spectrum(1, 12, 70, sigma, torch.float64)
    batch = torch.cat([A] + [A * c for c in scales]).to(dtype)
    c = torch.tensor([1.0] + scales, dtype=torch.float64)
    k = 3
    tol = backward_error_bound(A.to(dtype)) * 10
    for oversample in (4, 12):  # randomized, exact
        U, S, V = emulate(emulator, tmp_path, path, batch, k, oversample)
        assert torch.isfinite(S).all()
        torch.testing.assert_close(
            S.double() / c[:, None], S[:1].double().expand_as(S), rtol=0, atol=tol
        )
        torch.testing.assert_close(U, U[:1].expand_as(U), rtol=0, atol=tol)
        torch.testing.assert_close(V, V[:1].expand_as(V), rtol=0, atol=tol)
        # and the CPU kernel agrees on every scale
        Uc, Sc, Vc = ops.rsvd(batch, k, oversample)
        torch.testing.assert_close(
            S.double() / c[:, None], Sc.double() / c[:, None], rtol=0, atol=tol
        )
        torch.testing.assert_close(U, Uc, rtol=0, atol=tol)
