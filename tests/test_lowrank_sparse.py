"""lowrank_sparse (SPEC §3.5): robust PCA recovery of planted problems, and the unrolled form."""
import pytest
import torch
from conftest import DEVICES, requires_cuda_kernels

import lsef_ref
from lsef_ext import ops
from lsef_ref.rpca import rpca_ialm, universal_threshold


def planted(seed, n=120, rank=4, density=0.05, dtype=torch.float64):
    """M = L0 + S0: L0 of the given rank, S0 with `density` of its entries uniform in +-50."""
    g = torch.Generator().manual_seed(seed)
    L0 = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    support = torch.rand(n, n, generator=g) < density
    S0 = torch.where(support, (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * 50, 0.0)
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
    assert rel(L, L0) <= 1e-6  # SPEC §3.5
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


def test_torch_compile_fullgraph_unrolled_and_rpca():
    """The unrolled method traces whole and matches eager; rpca's data-dependent stopping test
    does not trace under fullgraph (README says so) and compiles with a graph break without it."""
    X = torch.randn(2, 12, 20, requires_grad=True)
    lam = torch.full((20,), 0.2, requires_grad=True)

    def unrolled(X, lam):
        L, S = ops.lowrank_sparse(X, 3, lam=lam, method="unrolled")
        return L.square().sum() + S.abs().sum()

    eager = torch.autograd.grad(unrolled(X, lam), (X, lam))
    compiled = torch.autograd.grad(torch.compile(unrolled, fullgraph=True, backend="aot_eager")(X, lam), (X, lam))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    rpca = lambda X: ops.lowrank_sparse(X, 3)  # noqa: E731
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Data-dependent branching"):
        torch.compile(rpca, fullgraph=True, backend="aot_eager")(X.detach())
    torch._dynamo.reset()
    for a, b in zip(torch.compile(rpca, backend="aot_eager")(X.detach()), rpca(X.detach())):
        torch.testing.assert_close(a, b)
