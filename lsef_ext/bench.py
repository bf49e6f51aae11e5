"""``lsef bench``: the benchmark harness.

A registry of cases; each case builds its inputs once and times several *variants* of the same
computation: ``lsef_ext`` (the compiled op), ``reference`` (python/lsef_ref) and the plain
PyTorch code a user would otherwise write. Every variant is timed in the same run as a median
over many calls after warm-up; speed is reported as the ratio ``variant time / lsef_ext time``
(> 1 means lsef_ext is faster), never as an absolute claim. Memory-bound cases also report their
time against the floor: the bytes they must move at the copy bandwidth measured in this run.
The CPU rsvd cases report theirs against a compute floor: the flops of the path the kernel runs
(:func:`rsvd_flops`) at the float32 matrix-multiply rate measured in this run.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import lsef_ref
from lsef_ext import ops, rpca

EXT = "lsef_ext"


@dataclass
class Setup:
    """What a case's factory returns: the variants to time, plus optional annotations."""

    variants: Dict[str, Callable[[], object]]
    targets: Dict[str, float] = field(default_factory=dict)  # variant -> minimum speedup of EXT
    bytes_moved: Optional[int] = None  # for the floor ratio (ext time / floor time)
    floor_target: Optional[float] = None  # maximum ext/floor ratio
    flops: Optional[float] = None  # for the compute floor (ext time / (flops / sgemm rate))
    flops_target: Optional[float] = None  # maximum ext/compute-floor ratio
    notes: Dict[str, str] = field(default_factory=dict)  # variant -> accuracy etc. (untimed)
    label: Optional[str] = None  # the case's name with the sizes used, where they differ (quick)


@dataclass
class Case:
    name: str
    device: str
    factory: Callable[[bool], Setup]  # factory(quick) -> Setup


CASES: List[Case] = []


def case(name: str, devices=("cpu",)):
    """Registers a case factory for each device it runs on."""

    def register(factory):
        for device in devices:
            CASES.append(Case(name, device, lambda quick, f=factory, d=device: f(d, quick)))
        return factory

    return register


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(
    fn: Callable[[], object], device: str, warmup: int, min_runs: int, min_seconds: float
) -> float:
    """Median wall time of fn() in seconds, after warm-up, over at least min_runs calls and at
    least min_seconds (at most 200 calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rate(device: str, n: int) -> float:
    """Flops per second of a float32 ``n x n`` matrix product (``2 n^3`` flops) on ``device``
    with the current thread count: the rate the compute floors are measured against."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    t = time_median(lambda: torch.mm(a, b, out=c), device, warmup=3, min_runs=10, min_seconds=0.3)
    return 2.0 * n**3 / t


def _orth_flops(rows: int, cols: int) -> float:
    """Householder QR of a ``rows x cols`` matrix plus forming its ``cols`` orthonormal columns
    (``2 cols^2 (rows - cols / 3)`` each)."""
    return 4.0 * cols * cols * (rows - cols / 3.0)


def _svd_tall_flops(rows: int, cols: int, r: int, sweeps: int = 6) -> float:
    """``dense::svd_tall`` of a ``rows x cols`` matrix: Householder QR, one-sided Jacobi on the
    ``cols x cols`` factor (``9 cols^3`` per sweep; ``sweeps`` assumed), then the reflectors
    applied to the ``r`` rotated columns that are kept (``4 r cols (rows - cols / 2)``)."""
    c = float(cols)
    return 2 * c * c * (rows - c / 3) + sweeps * 9 * c**3 + 4 * r * c * (rows - c / 2)


def rsvd_flops(
    shape, k: int, oversample: int = 8, n_iter: int = 2, path: Optional[str] = None
) -> float:
    """The flops of ``rsvd`` on the CPU for a batch ``shape = (B, m, n)``, counting what the
    path does (docs/DESIGN.md §6, "Flop counts"): ``path`` (one of ``ops.RSVD_PATHS``), by default
    the one the kernel's cost model takes for this shape (``LSEF_RSVD_PATH`` forces it). ``p, q``
    are the short and long sides, ``l = min(k + oversample, p)``.

    * exact SVDs (``jacobi``, ``exact``; every shape with ``l = p``): the SVD of the ``q x p``
      matrix, ``svd_tall(q, p)``, ``k`` columns of its left factor formed (LAPACK's count is
      of the same order; it is taken as this one).
    * ``fused``: Gram matrix ``p (p + 1) q``, sketch ``2 p q l``, orthonormalisation
      ``orth(p, l)`` after it and after each of the ``n_iter`` Gram products (``2 p^2 l``),
      projection ``2 p q l``, ``svd_tall(q, l)`` with ``k`` columns formed, and ``U = Q V_w``
      for ``k`` columns (``2 p l k``).
    * ``blas``, ``lapack``: sketch ``2 p q l`` and ``orth(p, l)``, per iteration two products
      (``4 p q l``) with ``orth(q, l) + orth(p, l)``, projection ``2 p q l``, ``svd_tall(q, l)``
      (``k`` columns) and ``2 p l k``."""
    B, m, n = shape
    p, q = min(m, n), max(m, n)
    l = min(k + oversample, p)
    if path is None:
        from lsef_ext.ops import rsvd_path

        path = rsvd_path(m, n, k, oversample, n_iter, batch=B)
    if l >= p or path in ("jacobi", "exact"):
        return B * _svd_tall_flops(q, p, k)
    tail = 2.0 * p * q * l + _svd_tall_flops(q, l, k) + 2.0 * p * l * k
    if path == "fused":
        one = p * (p + 1.0) * q + 2.0 * p * q * l + _orth_flops(p, l)
        one += n_iter * (2.0 * p * p * l + _orth_flops(p, l))
    else:
        one = 2.0 * p * q * l + _orth_flops(p, l)
        one += n_iter * (4.0 * p * q * l + _orth_flops(q, l) + _orth_flops(p, l))
    return B * (one + tail)


def copy_bandwidth(device: str, numel: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) into an existing buffer."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = time_median(lambda: dst.copy_(src), device, warmup=3, min_runs=20, min_seconds=0.3)
    return 2 * src.numel() * src.element_size() / t


# ---- cases ---------------------------------------------------------------------------------


def _grad(fn, inputs, G):
    return lambda: torch.autograd.grad(fn(), inputs, G)


def _elementwise_rows(device, quick):
    """Rows of 512 channels: 2^24 elements on the CPU, 2^28 on a GPU, 2^20 when quick."""
    return 2048 if quick else {"cpu": 32768, "cuda": 524288}[device]


@case("soft_threshold fwd, per-channel lam", devices=("cpu", "cuda"))
def _soft_threshold_channel(device, quick, dtype=torch.float32):
    rows, D = _elementwise_rows(device, quick), 512
    X = torch.randn(rows, D, device=device, dtype=dtype)
    L = torch.randn(rows, D, device=device, dtype=dtype)
    lam = torch.rand(D, device=device, dtype=dtype) * 0.5

    def composite():
        R = X - L
        return torch.sign(R) * torch.clamp(R.abs() - lam, min=0)

    return Setup(
        variants={
            EXT: lambda: ops.soft_threshold(X, L, lam),
            "reference": lambda: lsef_ref.soft_threshold(X, L, lam),
            "torch composite": composite,
        },
        targets={"torch composite": 4.0 if device == "cuda" else 3.5},
        bytes_moved=3 * X.numel() * X.element_size(),
        floor_target=1 / 0.85 if device == "cuda" else 1.3,  # GPU: >= 85% of copy bandwidth
        label=_quick_label(
            quick,
            "soft_threshold fwd, per-channel lam"
            + (", bfloat16" if dtype == torch.bfloat16 else ""),
            (rows, D),
        ),
    )


@case("soft_threshold fwd, per-channel lam, bfloat16", devices=("cuda",))
def _soft_threshold_bf16(device, quick):
    return _soft_threshold_channel(device, quick, torch.bfloat16)


@case("soft_threshold fwd, scalar lam", devices=("cpu", "cuda"))
def _soft_threshold_scalar(device, quick):
    rows, D = _elementwise_rows(device, quick), 512
    X = torch.randn(rows, D, device=device)
    L = torch.randn(rows, D, device=device)
    return Setup(
        variants={
            EXT: lambda: ops.soft_threshold(X, L, 0.3),
            "reference": lambda: lsef_ref.soft_threshold(X, L, 0.3),
            "F.softshrink(X - L)": lambda: F.softshrink(X - L, 0.3),
        },
        targets={"F.softshrink(X - L)": 1.3},
        bytes_moved=3 * X.numel() * X.element_size(),
        label=_quick_label(quick, "soft_threshold fwd, scalar lam", (rows, D)),
    )


@case("soft_threshold fwd+bwd (X, L, per-channel lam)", devices=("cpu", "cuda"))
def _soft_threshold_backward(device, quick):
    rows, D = _elementwise_rows(device, quick), 512
    X = torch.randn(rows, D, device=device, requires_grad=True)
    L = torch.randn(rows, D, device=device, requires_grad=True)
    lam = (torch.rand(D, device=device) * 0.5).requires_grad_()
    G = torch.randn(rows, D, device=device)
    inputs = (X, L, lam)

    def composite():
        R = X - L
        return torch.sign(R) * torch.clamp(R.abs() - lam, min=0)

    return Setup(
        variants={
            EXT: _grad(lambda: ops.soft_threshold(X, L, lam), inputs, G),
            "reference": _grad(lambda: lsef_ref.soft_threshold(X, L, lam), inputs, G),
            "torch composite (autograd)": _grad(composite, inputs, G),
        },
        targets={"torch composite (autograd)": 2.5},
        label=_quick_label(quick, "soft_threshold fwd+bwd (X, L, per-channel lam)", (rows, D)),
    )


@case("rank_scale (B,16,512) r=4, B=256 cpu/4096 gpu", devices=("cpu", "cuda"))
def _rank_scale(device, quick):
    batch = 32 if quick else {"cpu": 256, "cuda": 4096}[device]
    G = torch.randn(batch, 16, 512, device=device)
    U = torch.linalg.qr(torch.randn(batch, 16, 4, device=device))[0]
    alpha, beta = 0.5, 2.0
    return Setup(
        variants={
            EXT: lambda: ops.rank_scale(G, U, alpha, beta),
            "reference": lambda: lsef_ref.rank_scale(G, U, alpha, beta),
            "torch composite": lambda: beta * G + (alpha - beta) * (U @ (U.mT @ G)),
        },
        targets={"torch composite": 3.0 if device == "cuda" else 2.0},
        bytes_moved=2 * G.numel() * G.element_size(),
        label=f"rank_scale ({batch},16,512) r=4" if quick else None,
    )


def _quick_label(quick: bool, name: str, shape) -> Optional[str]:
    return f"{name} {tuple(shape)}" if quick else None


def _floor_verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"<= {target:.2f} " + ("ok" if ratio <= target else "MISSED")


def _max_rel_error(S: torch.Tensor, truth: torch.Tensor) -> float:
    k = truth.shape[-1]
    return ((S[..., :k] - truth).abs() / truth.clamp_min(1e-30)).max().item()


def _rsvd_setup(device, quick, shape, k):
    label = None
    if quick:  # a couple of small matrices: exercises every variant in well under a second
        shape = (2, min(shape[1], 64), min(shape[2], 128))
        label = f"rsvd {shape}, k = {k}"
    A = torch.randn(shape, device=device)
    q = k + 8
    truth = torch.linalg.svdvals(A.double())[..., :k].float()
    variants = {
        EXT: lambda: ops.rsvd(A, k, 8, 2),
        "reference": lambda: lsef_ref.rsvd(A, k, 8, 2),
        "torch.svd_lowrank": lambda: torch.svd_lowrank(A, q=q, niter=2),
        "torch.linalg.svd (exact)": lambda: torch.linalg.svd(A, full_matrices=False),
    }
    if quick:
        del variants["reference"], variants["torch.linalg.svd (exact)"]
    notes = {
        EXT: f"S max rel err {_max_rel_error(ops.rsvd(A, k)[1], truth):.1e}",
        "reference": f"S max rel err {_max_rel_error(lsef_ref.rsvd(A, k)[1], truth):.1e}",
        "torch.svd_lowrank": "S max rel err "
        f"{_max_rel_error(torch.svd_lowrank(A, q=q, niter=2)[1], truth):.1e}",
    }
    if device == "cuda":  # reported against the floor of reading A once (no target)
        return Setup(
            variants=variants,
            notes=notes,
            bytes_moved=A.numel() * A.element_size(),
            label=label,
        )
    try:
        from sklearn.utils.extmath import randomized_svd
    except ImportError:
        notes["sklearn randomized_svd"] = "not installed"
    else:
        mats = A.reshape(-1, *shape[-2:]).cpu().numpy()
        variants["sklearn randomized_svd (loop)"] = lambda: [
            randomized_svd(a, k, n_oversamples=8, n_iter=2, random_state=0) for a in mats
        ]
    return Setup(variants=variants, notes=notes, label=label, flops=rsvd_flops(A.shape, k, 8, 2))


def _register_rsvd_case(shape, k, targets, device, flops_target=None):
    def factory(device, quick):
        setup = _rsvd_setup(device, quick, shape, k)
        setup.targets = dict(targets)
        setup.flops_target = flops_target
        return setup

    case(f"rsvd {shape}, k = {k}", devices=(device,))(factory)


# (shape, k, minimum speedups of lsef_ext, device; the CPU targets are issue 16's). On CUDA the
# cases also report the time against the floor of reading A once at the measured copy
# bandwidth (no target: reported); on the CPU against the compute floor (the (256, 16, 512)
# case: within 3x of it).
_register_rsvd_case((256, 16, 512), 4, {"torch.svd_lowrank": 5.0}, "cpu", flops_target=3.0)
for _shape, _k, _targets, _device in [
    ((64, 32, 768), 8, {"torch.svd_lowrank": 3.0}, "cpu"),
    ((8, 512, 512), 16, {"torch.svd_lowrank": 1.2}, "cpu"),
    ((1024, 16, 512), 4, {"torch.svd_lowrank": 10.0, "torch.linalg.svd (exact)": 20.0}, "cuda"),
    ((256, 64, 1024), 8, {"torch.svd_lowrank": 5.0}, "cuda"),
    ((16, 1024, 1024), 32, {"torch.svd_lowrank": 1.0}, "cuda"),
]:
    _register_rsvd_case(_shape, _k, _targets, _device)


@case("rsvd exact path, rank 7 of (300, 300), k = 7", devices=("cpu",))
def _rsvd_rank_deficient(device, quick):
    """The exact path on a rank-deficient square matrix: 293 of the 300 columns of U and V come
    from the orthonormal completion (it once restarted its search for every column: O(n^4))."""
    n = 64 if quick else 300
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(1, n, 7, generator=g) @ torch.randn(1, 7, n, generator=g)).to(device)
    U, S, V = ops.rsvd(A, 7, oversample=n)
    err = (U.mT @ U - torch.eye(7, device=device)).abs().max().item()
    return Setup(
        variants={
            EXT: lambda: ops.rsvd(A, 7, oversample=n),
            "torch.linalg.svd (exact)": lambda: torch.linalg.svd(A, full_matrices=False),
        },
        notes={EXT: f"max |U^T U - I| {err:.1e}"},
        label=f"rsvd exact path, rank 7 of ({n}, {n}), k = 7" if quick else None,
    )


@case("lowrank fwd+bwd (1024, 16, 512), k = 4", devices=("cuda",))
@case("lowrank fwd+bwd (256, 16, 512), k = 4", devices=("cpu",))
def _lowrank_backward(device, quick):
    batch = 16 if quick else {"cpu": 256, "cuda": 1024}[device]
    A = torch.randn(batch, 16, 512, device=device, requires_grad=True)
    G = torch.randn(batch, 16, 512, device=device)

    def svd_lowrank():
        U, S, V = torch.svd_lowrank(A, q=12, niter=2)
        return (U[..., :4] * S[..., None, :4]) @ V[..., :4].mT

    return Setup(
        variants={
            EXT: _grad(lambda: ops.lowrank(A, 4), (A,), G),
            "reference": _grad(lambda: lsef_ref.lowrank(A, 4), (A,), G),
            "autograd through svd_lowrank": _grad(svd_lowrank, (A,), G),
        },
        targets={"autograd through svd_lowrank": 6.0 if device == "cpu" else 5.0},
        bytes_moved=None
        if device == "cpu"
        else 3 * A.numel() * A.element_size(),  # A, G read, dA written
        label=f"lowrank fwd+bwd ({batch}, 16, 512), k = 4" if quick else None,
    )


@case("lowrank_sparse rpca, planted 120 x 120, rank 4", devices=("cpu",))
def _lowrank_sparse(device, quick):
    from lsef_ref.rpca import rpca_ialm

    g = torch.Generator().manual_seed(0)
    n = 40 if quick else 120
    L0 = torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, n, generator=g, dtype=torch.float64
    )
    S0 = torch.where(
        torch.rand(n, n, generator=g) < 0.05,
        (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * 50,
        0.0,
    )
    M = (L0 + S0).to(device)
    published = lambda: rpca_ialm(M, None, svd=lsef_ref.truncated_svd)  # noqa: E731
    L_published, _, iterations = published()

    def error(L):
        return f"rel err of L {((L.cpu() - L0).norm() / L0.norm()).item():.1e}"

    return Setup(
        variants={
            EXT: lambda: ops.lowrank_sparse(M, 4),
            "reference": lambda: lsef_ref.lowrank_sparse(M, 4),
            "IALM-PCP, full SVD (published)": published,
        },
        notes={
            EXT: error(ops.lowrank_sparse(M, 4)[0]),
            "reference": error(lsef_ref.lowrank_sparse(M, 4)[0]),
            "IALM-PCP, full SVD (published)": error(L_published) + f", {iterations} iterations",
        },
        label=f"lowrank_sparse rpca, planted {n} x {n}, rank 4" if quick else None,
    )


@case("lowrank_sparse rpca, clip batch (256, 16, 512), k = 4", devices=("cpu", "cuda"))
def _lowrank_sparse_clips(device, quick):
    """LSEF's regime (issue 33's second speed row): a batch of clip matrices, 16 frames x 512
    features, each rank 4 plus 5 % outliers uniform in +-10, float32; with the solver's
    mean iteration count. Timed alone: the speed target is against earlier commits' rows.
    """
    g = torch.Generator().manual_seed(0)
    b, m, n, r = (16, 16, 128, 4) if quick else (256, 16, 512, 4)
    L0 = torch.randn(b, m, r, generator=g) @ torch.randn(b, r, n, generator=g)
    S0 = torch.where(
        torch.rand(b, m, n, generator=g) < 0.05,
        (torch.rand(b, m, n, generator=g) * 2 - 1) * 10,
        0.0,
    )
    M = (L0 + S0).to(device)
    X = M * rpca.pow2_normaliser(M)
    iterations = rpca.rpca_ialm(ops, X, r)[2].double().mean().item()
    L = ops.lowrank_sparse(M, r)[0].cpu()
    err = ((L - L0).norm() / L0.norm()).item()
    return Setup(
        variants={EXT: lambda: ops.lowrank_sparse(M, r)},
        notes={EXT: f"rel err of L {err:.1e}, {iterations:.1f} iterations (mean)"},
        label=f"lowrank_sparse rpca, clip batch ({b}, {m}, {n}), k = {r}" if quick else None,
    )


@case("lowrank_sparse rpca, sliding windows over a video, warm vs cold", devices=("cpu",))
def _lowrank_sparse_warm(device, quick):
    """Issue 33's warm start: robust PCA (k = 3) of every 32-frame window, stride 8, of a
    400-frame 24 x 32 surveillance-style video (``data.background_video``, float64), each
    window warm-started from the previous one's state against every window solved cold. The
    issue's target is in iterations (3x fewer at the same stopping test); the time ratio, which
    pays for the fresh rows' fit, is the timed target. The notes give the mean iterations per
    window after the first and the worst error of L against the planted background."""
    from lsef_ext.data import background_video

    frames, h, w = (64, 8, 10) if quick else (400, 24, 32)
    X, L0, _ = background_video(frames, h, w)
    window, stride = (16, 4) if quick else (32, 8)
    notes = {}
    for name, warm in ((EXT, True), ("cold starts", False)):
        chain = rpca.sliding_windows(ops, X, 3, window, stride, warm=warm)[1:]
        iters = statistics.mean(int(st.iterations) for _, st in chain)
        err = max(
            ((st.L - L0[s : s + window]).norm() / L0[s : s + window].norm()).item()
            for s, st in chain
        )
        notes[name] = f"{iters:.1f} iterations per window, worst rel err of L {err:.1e}"
    return Setup(
        variants={
            EXT: lambda: rpca.sliding_windows(ops, X, 3, window, stride, warm=True),
            "cold starts": lambda: rpca.sliding_windows(ops, X, 3, window, stride, warm=False),
        },
        targets={"cold starts": 3.0},
        notes=notes,
        label=(
            f"lowrank_sparse rpca, sliding windows ({frames} frames of {h} x {w}, window "
            f"{window}, stride {stride}), warm vs cold"
        ),
    )


@case("lowrank_sparse rpca, planted 400 x 400, rank 20, vs AccAltProj", devices=("cpu",))
def _lowrank_sparse_accaltproj(device, quick):
    """Issue 33's comparison: a planted rank-20 400 x 400 problem with 5 % outliers (uniform in
    +-10; L0's entries have unit variance), float64, against AccAltProj (Cai, Cai & Wei 2019) as
    the `rpca` package implements it, when that package is installed (`pip install rpca`); the
    notes give each result's error, since the methods stop on different tests."""
    g = torch.Generator().manual_seed(0)
    n, r = (100, 5) if quick else (400, 20)
    L0 = torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64
    )
    L0 = L0 / math.sqrt(r)
    S0 = torch.where(
        torch.rand(n, n, generator=g) < 0.05,
        (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * 10,
        0.0,
    )
    M = (L0 + S0).to(device)

    def error(L):
        L = torch.as_tensor(L, dtype=torch.float64).cpu()
        return f"rel err of L {((L - L0).norm() / L0.norm()).item():.1e}"

    variants = {EXT: lambda: ops.lowrank_sparse(M, r)}
    notes = {EXT: error(ops.lowrank_sparse(M, r)[0])}
    try:
        from rpca import RobustPCA
    except ImportError:
        notes[EXT] += "; AccAltProj not timed: the optional `rpca` package is not installed"
    else:
        Mn = M.cpu().numpy()

        def fit():
            with contextlib.redirect_stdout(io.StringIO()):  # it prints on convergence
                return RobustPCA(n_components=r, tol=1e-7, verbose=False).fit(Mn)

        variants["AccAltProj (rpca package, tol 1e-7)"] = fit
        notes["AccAltProj (rpca package, tol 1e-7)"] = error(fit().L_)
    return Setup(
        variants=variants,
        notes=notes,
        label=f"lowrank_sparse rpca, planted {n} x {n}, rank {r}, vs AccAltProj" if quick else None,
    )


# ---- running and reporting -----------------------------------------------------------------


def machine_description() -> Dict[str, object]:
    info: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(
    quick: bool = False, name_filter: str = "", devices=("cpu", "cuda"), out=sys.stdout
) -> Dict[str, object]:
    """Runs the selected cases, prints the table as it goes and returns everything measured."""
    warmup, min_runs, min_seconds = (2, 5, 0.05) if quick else (5, 15, 1.0)
    selected = [c for c in CASES if name_filter in c.name and c.device in devices]
    selected = [c for c in selected if c.device == "cpu" or torch.cuda.is_available()]
    report: Dict[str, object] = {"machine": machine_description(), "quick": quick, "rows": []}
    bandwidth: Dict[str, float] = {}
    for device in sorted({c.device for c in selected}):
        # Buffers well past the last-level cache: 64 MiB on the CPU; 1 GiB on a GPU. On an H200
        # a 64 MiB copy lasts about 40 us, of which the per-call launch and synchronisation of
        # this host-side timer are a large share: it reported 3.1 TB/s where a soft_threshold
        # pass over 3 GiB moved 3.8 TB/s (2026-11-26).
        bandwidth[device] = copy_bandwidth(
            device, 1 << (20 if quick else 28 if device == "cuda" else 24)
        )
    report["copy_bandwidth_GBps"] = {d: b / 1e9 for d, b in bandwidth.items()}
    rates: Dict[str, float] = {}  # sgemm flops/s, measured when a case first needs it

    width = 60 if quick else 48  # quick labels add the sizes used to names that lack them
    header = (
        f"{'case':<{width}} {'dev':<4} {'variant':<30} {'median ms':>10} {'speedup':>8} "
        f"{'target':>13}  note"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    out.flush()
    from tqdm.auto import tqdm

    # A bar over the cases on stderr (on a terminal only); each variant's row is printed as soon
    # as it is timed, lsef_ext's first (the others' speedups are relative to it).
    bar = tqdm(selected, desc="lsef bench", unit="case", disable=None, leave=False)

    def emit(line: str) -> None:
        tqdm.write(line, file=out)
        out.flush()

    def floor_row(name, device, ext, floor, target, variant, label, extra=None, note=""):
        """Records and prints lsef_ext's time ``ext`` against a floor (seconds)."""
        ratio = ext / floor
        target = None if quick else target
        report["rows"].append(
            {
                "case": name,
                "device": device,
                "variant": variant,
                "median_ms": floor * 1e3,
                **(extra or {}),
                "floor_ratio": ratio,
                "target": target,
                "met": None if target is None else ratio <= target,
            }
        )
        emit(
            f"{name:<{width}} {device:<4} {label:<30} {floor * 1e3:>10.3f} "
            f"{'ext/floor ' + format(ratio, '.2f'):>17} {_floor_verdict(ratio, target)}{note}"
        )

    for c in bar:
        bar.set_postfix_str(c.name[:40])
        setup = c.factory(quick)
        name = setup.label or c.name  # quick runs: the sizes used, not the full run's
        ext = None
        for variant in [EXT] + [v for v in setup.variants if v != EXT]:
            t = time_median(setup.variants[variant], c.device, warmup, min_runs, min_seconds)
            ext = t if ext is None else ext
            speedup = t / ext
            # Quick runs use small, cache-resident sizes: targets are only judged on full runs.
            target = None if quick else setup.targets.get(variant)
            row = {
                "case": name,
                "device": c.device,
                "variant": variant,
                "median_ms": t * 1e3,
                "speedup": speedup,
                "target": target,
                "met": None if target is None else speedup >= target,
            }
            report["rows"].append(row)
            note = setup.notes.get(variant, "")
            row["note"] = note
            emit(
                f"{name:<{width}} {c.device:<4} {variant:<30} {t * 1e3:>10.3f} "
                f"{speedup:>7.2f}x {_target_text(target, speedup):>13}  {note}"
            )
        if setup.bytes_moved is not None:
            floor_row(
                name, c.device, ext, setup.bytes_moved / bandwidth[c.device], setup.floor_target,
                "memory floor", "memory floor (copy bw)",
            )  # fmt: skip
        if setup.flops is not None:
            if c.device not in rates:
                rates[c.device] = gemm_rate(c.device, 256 if quick else 1024)
                report["sgemm_GFLOPs"] = {d: r / 1e9 for d, r in rates.items()}
            floor_row(
                name, c.device, ext, setup.flops / rates[c.device], setup.flops_target,
                "compute floor", "compute floor (sgemm rate)",
                {"flops": setup.flops}, f"  {setup.flops / 1e6:.0f} MFLOP",
            )  # fmt: skip
    bar.close()
    if quick:
        print(
            "\n--quick: small sizes and few runs, to exercise the harness; targets not judged.",
            file=out,
        )
    bw = ", ".join(f"{d}: {b / 1e9:.1f} GB/s" for d, b in bandwidth.items())
    gemm = "".join(f", float32 matrix product {d}: {r / 1e9:.1f} GFLOP/s" for d, r in rates.items())
    m = report["machine"]
    print(
        f"\nspeedup = variant time / {EXT} time (median of many runs after warm-up, same run). "
        f"copy bandwidth {bw}{gemm}. {m['processor']}, {m['threads']} threads, torch "
        f"{m['torch']}, {m['date']}.",
        file=out,
    )
    return report


def _target_text(target: Optional[float], speedup: float) -> str:
    if target is None:
        return ""
    return f">={target:g} " + ("ok" if speedup >= target else "MISSED")


def write_json(report: Dict[str, object], path: str) -> None:
    """Writes ``report`` to ``path`` whole: beside it first, then renamed over it."""
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


@case("LSEF training, 10 steps (32, 16, 512): fwd+bwd+RAO", devices=("cpu", "cuda"))
def _lsef_training_step(device, quick):
    """One optimisation step of the LSEF classifier (SEM + DDM + CIM + head, cross-entropy plus
    the consistency terms, RAO around AdamW), the same model and weights on the compiled ops and
    on the lsef_ref references. A timed call is 10 steps, so it holds one of RAO's subspace
    refreshes (every 10 steps by default) in its proportion."""
    from lsef_ext.nn import LSEF
    from lsef_ext.optim import RAO

    batch, T, D = (8, 16, 128) if quick else (32, 16, 512)
    X = torch.randn(batch, T, D, device=device)
    y = torch.randint(0, 7, (batch,), device=device)
    torch.manual_seed(0)
    ext_model = LSEF(D, ops="ext").to(device)
    ref_model = LSEF(D, ops="ref").to(device)
    ref_model.load_state_dict(ext_model.state_dict())

    def stepper(model, ops_name):
        opt = RAO(torch.optim.AdamW(model.parameters(), lr=1e-4), ops=ops_name)

        def steps():
            for _ in range(10):
                out = model(X)
                loss = torch.nn.functional.cross_entropy(out.pred, y) + model.regulariser(out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return steps

    return Setup(
        variants={EXT: stepper(ext_model, "ext"), "reference": stepper(ref_model, "ref")},
        # CUDA: the issue asks only that the compiled ops beat the references (ratio > 1).
        targets={"reference": 2.5 if device == "cpu" else 1.0},
        label=f"LSEF training, 10 steps ({batch}, {T}, {D}): fwd+bwd+RAO" if quick else None,
    )
