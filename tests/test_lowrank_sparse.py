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


def test_torch_compile_fullgraph_unrolled_and_rpca():
    """The unrolled method traces whole and matches eager; rpca's data-dependent stopping test
    does not trace under fullgraph (README says so) and compiles with a graph break without it."""
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
    torch._dynamo.reset()
    rpca = lambda X: ops.lowrank_sparse(X, 3)  # noqa: E731
    # The stopping test reads the device (bool(done.all())): a data-dependent branch.
    with pytest.raises(
        (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError), match=r"(?i)data-dependent"
    ):
        torch.compile(rpca, fullgraph=True, backend="aot_eager")(X.detach())
    torch._dynamo.reset()
    for a, b in zip(torch.compile(rpca, backend="aot_eager")(X.detach()), rpca(X.detach())):
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
