"""lowrank_sparse: robust PCA recovery of planted problems (exact and with noise), per-matrix
stopping, and the unrolled form."""

import pytest
import torch
from conftest import DEVICES, requires_cuda_kernels

import lsef_ref
from lsef_ext import ops, rpca
from lsef_ext.rpca import universal_threshold
from lsef_ref.rpca import rpca_ialm


def planted(seed, n=120, rank=4, density=0.05, dtype=torch.float64):
    """M = L0 + S0: L0 of the given rank, S0 with `density` of its entries uniform in +-50."""
    g = torch.Generator().manual_seed(seed)
    L0 = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, n, generator=g, dtype=torch.float64
    )
    support = torch.rand(n, n, generator=g) < density
    S0 = torch.where(
        support, (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * 50, 0.0
    )
    return L0.to(dtype), S0.to(dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def needs_kernels(device):
    for op in ("rsvd", "soft_threshold"):
        requires_cuda_kernels(device, op)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_call_recovers_planted_problem(device, seed):
    needs_kernels(device)
    L0, S0 = planted(seed)
    L, S = ops.lowrank_sparse((L0 + S0).to(device), 4)
    L, S = L.cpu(), S.cpu()
    assert rel(L, L0) <= 1e-6
    assert rel(S, S0) <= 1e-6
    assert torch.linalg.matrix_rank(L).item() == 4


def test_float32_recovers_to_float32_precision():
    L0, S0 = planted(0, dtype=torch.float32)
    L, _ = ops.lowrank_sparse(L0 + S0, 4)
    assert rel(L, L0) <= 100 * torch.finfo(torch.float32).eps


def test_matches_the_published_full_svd_solver():
    """Side by side with inexact-ALM PCP as published (Lin, Chen & Ma 2010: full SVD, no rank
    cap), in plain PyTorch: both recover the planted L0, to about the same error."""
    L0, S0 = planted(3)
    M = L0 + S0
    L_pcp, _, iters = rpca_ialm(M, None, svd=lsef_ref.truncated_svd)
    L, _ = ops.lowrank_sparse(M, 4)
    assert rel(L_pcp, L0) <= 1e-6 and rel(L, L0) <= 1e-6
    assert iters <= 40


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_and_is_batched(device):
    needs_kernels(device)
    pairs = [planted(s, n=60, rank=3) for s in range(3)]
    M = torch.stack([L0 + S0 for L0, S0 in pairs])
    L, S = (t.cpu() for t in ops.lowrank_sparse(M.to(device), 3))
    Lr, Sr = lsef_ref.lowrank_sparse(M, 3)
    torch.testing.assert_close(L, Lr, rtol=0, atol=1e-9)
    torch.testing.assert_close(S, Sr, rtol=0, atol=1e-9)
    for i, (L0, _) in enumerate(pairs):
        assert rel(L[i], L0) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_unrolled_is_differentiable_and_matches_reference(device):
    needs_kernels(device)
    L0, S0 = planted(0, n=40, rank=2)
    X = (L0 + S0).to(device).requires_grad_()
    L, S = ops.lowrank_sparse(X, 2, lam=0.5, n_steps=3, method="unrolled")
    Lr, Sr = lsef_ref.lowrank_sparse(X.detach().cpu(), 2, lam=0.5, n_steps=3, method="unrolled")
    torch.testing.assert_close(L.cpu(), Lr)
    torch.testing.assert_close(S.cpu(), Sr)
    (L.square().sum() + S.abs().sum()).backward()
    assert torch.isfinite(X.grad).all() and X.grad.abs().sum() > 0


def test_unrolled_default_lambda_and_learnable_lambda():
    L0, S0 = planted(1, n=40, rank=2)
    X = L0 + S0
    lam = universal_threshold(X - ops.lowrank(X, 2))
    default = ops.lowrank_sparse(X, 2, method="unrolled")
    explicit = ops.lowrank_sparse(X, 2, lam=lam, method="unrolled")
    for a, b in zip(default, explicit):
        torch.testing.assert_close(a, b)
    lam_param = torch.full((40,), 0.5, dtype=torch.float64, requires_grad=True)
    _, S = ops.lowrank_sparse(X, 2, lam=lam_param, method="unrolled")
    (g,) = torch.autograd.grad(S.abs().sum(), lam_param)
    assert (g <= 0).all() and g.sum() < 0  # raising a threshold shrinks |S|


def test_bad_input():
    X = torch.randn(10, 12)
    with pytest.raises(ValueError, match="method must be 'rpca' or 'unrolled', got 'svd'"):
        ops.lowrank_sparse(X, 2, method="svd")
    with pytest.raises(ValueError, match="n_steps must be >= 1, got 0"):
        ops.lowrank_sparse(X, 2, n_steps=0, method="unrolled")
    with pytest.raises(RuntimeError, match=r"method='rpca'\) is not differentiable"):
        ops.lowrank_sparse(X.requires_grad_(), 2)
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(m, n\)\]"):
        ops.lowrank_sparse(torch.randn(10, 12), 11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_rpca_zero_matrix_gives_zero_parts(device, dtype, impl):
    """An all-zero matrix (a clip whose frames were all dropped) splits into L = S = 0; its zero
    norms once made the solver's start 0/0 and every output NaN. In a batch it leaves the other
    matrices' results as they are alone."""
    needs_kernels(device)
    fn = ops.lowrank_sparse if impl == "ext" else lsef_ref.lowrank_sparse
    zero = torch.zeros(16, 24, dtype=dtype, device=device)
    L, S = fn(zero, 4)
    assert torch.equal(L, zero) and torch.equal(S, zero)
    L0, S0 = planted(3, n=24, dtype=dtype)
    M = (L0 + S0)[:16].to(device)
    L_alone, S_alone = fn(M, 4)
    L_b, S_b = fn(torch.stack([zero, M]), 4)
    assert torch.equal(L_b[0], zero) and torch.equal(S_b[0], zero)
    # To rounding: batched and single SVDs may sum in another order, and the solver iterates.
    atol = 32 * torch.finfo(dtype).eps * M.abs().max().item()
    torch.testing.assert_close(L_b[1], L_alone, rtol=0, atol=atol)
    torch.testing.assert_close(S_b[1], S_alone, rtol=0, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("noise", [None, 0.05, "auto"])
def test_rpca_is_scale_invariant(device, dtype, impl, noise):
    """lowrank_sparse(c X) = c lowrank_sparse(X) for c across the dtype's range (with the noise
    level scaled too): float32 once gave NaN at 1e-30, 1e10 and 1e30, from norms whose squares
    under- or overflowed. One batch holds every scale, so each matrix is also scaled alone."""
    needs_kernels(device)
    fn = ops.lowrank_sparse if impl == "ext" else lsef_ref.lowrank_sparse
    L0, S0 = planted(4, n=24, dtype=torch.float64)
    X = (L0 + S0)[:16]
    scales = [1e-30, 1e-10, 1e10, 1e30] if dtype == torch.float32 else [1e-300, 1e-150, 1e300]
    c = torch.tensor([1.0] + scales, dtype=torch.float64)[:, None, None]
    batch = (X * c).to(dtype=dtype, device=device)
    if isinstance(noise, float):
        # the noise level is absolute: every matrix gets the one at its own scale
        Ls, Ss = zip(*(fn(batch[i], 4, noise=noise * c[i].item()) for i in range(len(c))))
        L, S = torch.stack(Ls), torch.stack(Ss)
    else:
        L, S = fn(batch, 4, noise=noise)
    assert torch.isfinite(L).all() and torch.isfinite(S).all()
    atol = 1e3 * torch.finfo(dtype).eps * X.abs().max().item()
    L, S = L.cpu().double() / c, S.cpu().double() / c
    torch.testing.assert_close(L, L[:1].expand_as(L), rtol=0, atol=atol)
    torch.testing.assert_close(S, S[:1].expand_as(S), rtol=0, atol=atol)


def test_torch_compile_fullgraph_unrolled():
    """The unrolled method traces whole and matches eager, gradients included (rpca: the
    section on tracing at the end of this file)."""
    X = torch.randn(2, 12, 20, requires_grad=True)
    lam = torch.full((20,), 0.2, requires_grad=True)

    def unrolled(X, lam):
        L, S = ops.lowrank_sparse(X, 3, lam=lam, method="unrolled")
        return L.square().sum() + S.abs().sum()

    eager = torch.autograd.grad(unrolled(X, lam), (X, lam))
    compiled = torch.autograd.grad(
        torch.compile(unrolled, fullgraph=True, backend="aot_eager")(X, lam), (X, lam)
    )
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def planted_noisy(seed, m=100, n=150, rank=4, density=0.05, sigma=0.1):
    """X = L0 + S0 + E: L0 of the given rank (entries of variance `rank`), S0 with `density` of
    its entries of magnitude uniform in [2, 10] and random sign, E Gaussian of std sigma."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    L0 = torch.randn(m, rank, generator=g, dtype=f64) @ torch.randn(rank, n, generator=g, dtype=f64)
    support = torch.rand(m, n, generator=g) < density
    sign = torch.where(torch.rand(m, n, generator=g) < 0.5, -1.0, 1.0).to(f64)
    S0 = torch.where(support, sign * (2 + 8 * torch.rand(m, n, generator=g, dtype=f64)), 0.0)
    E = sigma * torch.randn(m, n, generator=g, dtype=f64)
    return L0, S0, E


def support_scores(S, S0):
    est, true = S != 0, S0 != 0
    tp = (est & true).sum().item()
    return tp / max(1, est.sum().item()), tp / true.sum().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", [0.1, "auto"])
def test_noise_aware_rpca_finds_the_outliers(device, noise):
    """With a noise term S holds the planted outliers and nothing else (precision and recall
    >= 0.95), and L is closer to L0 than the noise is; the exact solver, on the same data, puts
    the noise into S, which comes out dense."""
    needs_kernels(device)
    planted3 = [planted_noisy(seed) for seed in range(3)]
    X = torch.stack([L0 + S0 + E for L0, S0, E in planted3]).to(device)
    L, S = (t.cpu() for t in ops.lowrank_sparse(X, 4, noise=noise))
    _, S_exact = ops.lowrank_sparse(X, 4)
    for i, (L0, S0, E) in enumerate(planted3):
        precision, recall = support_scores(S[i], S0)
        assert precision >= 0.95 and recall >= 0.95, (i, precision, recall)
        assert rel(L[i], L0) < E.norm() / L0.norm()
        assert (S_exact[i] != 0).double().mean() > 0.9


def test_noise_auto_estimates_the_level():
    """The level "auto" uses, from the exact solution's residual, is within 10 % of the truth."""
    for sigma in (0.01, 0.1, 0.5):
        L0, S0, E = planted_noisy(0, sigma=sigma)
        X = L0 + S0 + E
        L, _, _ = rpca.rpca_ialm(ops, X, 4)
        assert abs(rpca.noise_level(X, L, 4).item() / sigma - 1) < 0.1


def test_noise_zero_is_the_exact_solver():
    L0, S0 = planted(0)
    exact = ops.lowrank_sparse(L0 + S0, 4)
    zero = ops.lowrank_sparse(L0 + S0, 4, noise=0.0)
    assert all(torch.equal(a, b) for a, b in zip(exact, zero))
    assert rel(zero[0], L0) <= 1e-6


@pytest.mark.parametrize("noise", [None, 0.1, "auto"])
def test_matches_the_per_matrix_reference(noise):
    """lsef_ref solves each matrix alone in a plain loop; the batched solver agrees."""
    X = torch.stack([sum(planted_noisy(seed, m=40, n=60)) for seed in range(3)])
    L, S = ops.lowrank_sparse(X, 4, noise=noise)
    Lr, Sr = lsef_ref.lowrank_sparse(X, 4, noise=noise)
    torch.testing.assert_close(L, Lr, rtol=0, atol=1e-9)
    torch.testing.assert_close(S, Sr, rtol=0, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", [None, 0.1])
def test_each_matrix_stops_on_its_own(device, noise):
    """In a batch with a NaN and a zero matrix, every matrix gets exactly its result alone: a
    matrix stops at its own test and its parts are frozen from then on (the batch once iterated
    until all had converged, which moved converged matrices by up to 1e-5). The zero and NaN
    matrices stop after one iteration."""
    needs_kernels(device)
    a = sum(planted_noisy(1, m=30, n=40, rank=3)).to(device)
    b = sum(planted_noisy(2, m=30, n=40, rank=3, sigma=0.0)).to(device)  # stops sooner
    nan = a.clone()
    nan[3, 5] = float("nan")
    X = torch.stack([a, nan, torch.zeros_like(a), b])
    L, S = ops.lowrank_sparse(X, 3, noise=noise)
    for i, M in ((0, a), (3, b)):
        La, Sa = ops.lowrank_sparse(M, 3, noise=noise)
        assert torch.equal(L[i], La) and torch.equal(S[i], Sa)
    assert not torch.isfinite(L[1]).all() and not torch.isfinite(S[1]).all()
    assert torch.equal(L[2], torch.zeros_like(a)) and torch.equal(S[2], torch.zeros_like(a))
    if noise is None:
        _, _, iters = rpca.rpca_ialm(ops, X, 3)
    else:
        _, _, iters = rpca.stable_pcp(
            ops, X, 3, torch.full((4, 1, 1), noise, dtype=X.dtype, device=device)
        )
    assert iters[1].item() == 1 and iters[2].item() == 1
    assert iters[0].item() > 1 and iters[3].item() > 1 and iters[0].item() != iters[3].item()


@pytest.mark.parametrize("solver", ["ialm", "stable"])
def test_stopping_checks_only_end_the_loop(solver):
    """How often the loop asks whether every matrix has stopped (the host synchronisation)
    changes nothing but when the loop ends."""
    X = torch.stack([sum(planted_noisy(seed, m=30, n=40, rank=3)) for seed in range(3)])

    def run(every):
        if solver == "ialm":
            return rpca.rpca_ialm(ops, X, 3, check_every=every)
        return rpca.stable_pcp(
            ops, X, 3, torch.full((3, 1, 1), 0.1, dtype=X.dtype), check_every=every
        )

    for a, b in zip(run(1), run(7)):
        assert torch.equal(a, b)


def test_bad_noise():
    X = torch.randn(10, 12)
    with pytest.raises(
        ValueError, match=r"noise must be None, a number >= 0 or 'auto', got 'loud'"
    ):
        ops.lowrank_sparse(X, 2, noise="loud")
    with pytest.raises(ValueError, match=r"noise must be a finite number >= 0, got -1"):
        ops.lowrank_sparse(X, 2, noise=-1)
    with pytest.raises(ValueError, match=r"noise must be a finite number >= 0, got nan"):
        ops.lowrank_sparse(X, 2, noise=float("nan"))
    with pytest.raises(TypeError, match=r"noise must be None, a number >= 0 or 'auto', got list"):
        ops.lowrank_sparse(X, 2, noise=[0.1])
    with pytest.raises(ValueError, match=r"noise applies to method='rpca' only"):
        ops.lowrank_sparse(X, 2, method="unrolled", noise=0.1)


def test_reference_refuses_k_out_of_range():
    """The reference once returned a zero low-rank part for k = 0."""
    for k in (0, 7):
        with pytest.raises(ValueError, match=r"lowrank_sparse: k must be in \[1, min\(m, n\)\]"):
            lsef_ref.lowrank_sparse(torch.randn(8, 6), k)


# --------------------------------------------------------------------------------------------
# rpca without host synchronisation: stopping on the device, a fixed bound, tracing (issue 31)
# --------------------------------------------------------------------------------------------


def staggered():
    """Four 30 x 40 matrices that stop at different iterations: two noisy planted problems
    (one without noise, which stops sooner), a matrix with a NaN and a zero one (both stop at
    the first iteration)."""
    a = sum(planted_noisy(1, m=30, n=40, rank=3))
    b = sum(planted_noisy(2, m=30, n=40, rank=3, sigma=0.0))
    nan = a.clone()
    nan[3, 5] = float("nan")
    return torch.stack([a, nan, torch.zeros_like(a), b])


def same_bits(a, b):
    """Bit for bit, NaNs included (torch.equal says a NaN differs from itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(ints), b.view(ints)
    return torch.equal(a, b)


class CountingOps:
    """The ext op set, counting rsvd calls (one per solver iteration, plus the start's)."""

    lowrank = staticmethod(ops.lowrank)
    soft_threshold = staticmethod(ops.soft_threshold)

    def __init__(self):
        self.rsvd_calls = 0

    def rsvd(self, *args, **kwargs):
        self.rsvd_calls += 1
        return ops.rsvd(*args, **kwargs)


def test_rpca_iteration_counts_are_unchanged():
    """The device-side stopping rule stops where the host-side one did (counts measured with
    the previous solver): the planted 120 x 120 rank-4 problem in 19 iterations."""
    L0, S0 = planted(0)
    _, _, iters = rpca.rpca_ialm(ops, L0 + S0, 4)
    assert iters.item() == 19
    M = torch.stack([sum(planted(s, n=60, rank=3)) for s in range(3)])
    assert rpca.rpca_ialm(ops, M, 3)[2].tolist() == [19, 19, 22]
    X = staggered()
    assert rpca.rpca_ialm(ops, X, 3)[2].tolist() == [36, 1, 1, 32]
    sigma = torch.full((4, 1, 1), 0.1, dtype=X.dtype)
    assert rpca.stable_pcp(ops, X, 3, sigma)[2].tolist() == [29, 1, 1, 21]


@pytest.mark.parametrize("solver", ["ialm", "stable"])
def test_rpca_early_stop_gives_the_bits_of_the_full_loop(solver):
    """Eager mode ends the loop once every matrix has stopped (a host read); the full fixed
    bound (early_stop=False, as traced code runs it), a check every 7 iterations, and the
    loop compiled with torch.compile(fullgraph=True) give the same bits, NaNs included, for a
    batch whose matrices stop at 1, 1, 21-36 iterations: a stopped matrix is frozen and no
    later iteration changes it. (backend="aot_eager": the same aten ops as eager; inductor's
    fused kernels may round differently, test_rpca_compiles_with_inductor.)"""
    X = staggered()
    max_iter = 60
    sigma = torch.full((4, 1, 1), 0.1, dtype=X.dtype)

    def run(op_set, X, **kwargs):
        if solver == "ialm":
            return rpca.rpca_ialm(op_set, X, 3, max_iter=max_iter, **kwargs)
        return rpca.stable_pcp(op_set, X, 3, sigma, max_iter=max_iter, **kwargs)

    start = 1 if solver == "ialm" else 0  # IALM's start takes the spectral norm by rsvd
    early_ops, full_ops = CountingOps(), CountingOps()
    early = run(early_ops, X)
    iters = early[2].tolist()
    assert iters[1] == iters[2] == 1 and 1 < iters[3] < iters[0] < max_iter
    assert early_ops.rsvd_calls == start + iters[0]  # it ended early
    full = run(full_ops, X, early_stop=False)
    assert full_ops.rsvd_calls == start + max_iter  # it ran to the bound
    every7 = run(ops, X, check_every=7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda X: run(ops, X), fullgraph=True, backend="aot_eager")(X)
    for other in (full, every7, compiled):
        assert all(same_bits(a, b) for a, b in zip(early, other))


@pytest.mark.parametrize("noise", [None, 0.1, "auto"])
def test_rpca_full_bound_switch_gives_the_same_bits(noise):
    """rpca.lowrank_sparse(..., early_stop=False), every loop run to its bound, returns the
    bits of the default eager call (which stops early), for each form of the solver."""
    X = staggered()
    full = rpca.lowrank_sparse(ops, X, 3, noise=noise, n_steps=50, early_stop=False)
    early = ops.lowrank_sparse(X, 3, noise=noise, n_steps=50)
    assert all(same_bits(a, b) for a, b in zip(full, early))


def rpca_batch():
    return torch.stack([sum(planted_noisy(seed, m=30, n=40, rank=3)) for seed in range(3)])


@pytest.mark.parametrize("noise", [None, 0.1, "auto"])
def test_rpca_compiles_fullgraph(noise):
    """lowrank_sparse(X, k) (method rpca, the default 100-iteration bound) traces whole under
    torch.compile(fullgraph=True) (it once failed: "Could not guard on data-dependent
    expression") and equals eager bit for bit (aot_eager), also on other data of the same
    shape without recompiling (the graph holds the stopping rule, not this data's counts).
    About 20 s each on 2 cores: dynamo traces 100 iterations (200 for "auto")."""
    X = rpca_batch()
    X2 = X.flip(0) * 3.0
    fn = lambda X: ops.lowrank_sparse(X, 3, noise=noise)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for data in (X, X2):
        assert all(same_bits(a, b) for a, b in zip(compiled(data), fn(data)))


def test_rpca_compiles_with_inductor():
    """The default backend (inductor) on a short bound (its compile time grows with the
    unrolled iterations: here ~130 s for 40, ~350 s for 100 on 2 cores), with a NaN and a zero
    matrix frozen from the first iteration: equal to eager to within a few units of float64
    rounding (inductor may fuse and round differently; on this CPU it gave the same bits)."""
    X = staggered()
    fn = lambda X: ops.lowrank_sparse(X, 3, n_steps=4)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(X)
    for a, b in zip(compiled, fn(X)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("noise", [None, "auto"])
def test_rpca_exports(noise):
    """torch.export.export of a module around lowrank_sparse (rpca) runs, and the exported
    program equals eager bit for bit, on its example input and on other data."""

    class Split(torch.nn.Module):
        def forward(self, X):
            return ops.lowrank_sparse(X, 3, noise=noise)

    X = rpca_batch()
    program = torch.export.export(Split(), (X,))
    for data in (X, X.flip(0) * 3.0):
        assert all(same_bits(a, b) for a, b in zip(program.module()(data), Split()(data)))


@pytest.mark.parametrize("noise", [None, 0.1, "auto"])
def test_rpca_under_vmap(noise):
    """torch.vmap over a batch dimension equals the batched call (it once failed: "Cannot
    access data pointer of Tensor that doesn't have storage"); a NaN and a zero matrix in the
    batch stop on their own there too."""
    X = staggered()
    mapped = torch.vmap(lambda x: ops.lowrank_sparse(x, 3, noise=noise))(X)
    assert all(same_bits(a, b) for a, b in zip(mapped, ops.lowrank_sparse(X, 3, noise=noise)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rpca_cuda_graph_capture():
    """The solver loop can be captured in a CUDA graph (no host read during capture) and its
    replay equals eager. Not yet run: no GPU in the session that wrote it."""
    needs_kernels("cuda")
    X = staggered().cuda()
    fn = lambda X: ops.lowrank_sparse(X, 3, n_steps=40)  # noqa: E731
    eager = fn(X)
    static = X.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as the CUDA graph docs do
        fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)
    graph.replay()
    torch.cuda.synchronize()
    assert all(same_bits(a, b) for a, b in zip(out, eager))
