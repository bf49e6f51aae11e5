"""lowrank_sparse with missing entries (``mask``): robust PCA that completes L, keeps S at 0
where unobserved and never reads X there; the reference; recovery of planted problems (and
TensorLy's test_RPCA, ported); bad masks."""

import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, requires_cuda_kernels
from hypothesis import given, settings
from hypothesis import strategies as st

import lsef_ref
from lsef_ext import ops, rpca

CALLS = [
    dict(),
    dict(noise=0.05),
    dict(noise="auto"),
    dict(method="unrolled"),
]
CALL_IDS = ["rpca", "noise", "auto", "unrolled"]


def needs_kernels(device):
    for op in ("rsvd", "soft_threshold"):
        requires_cuda_kernels(device, op)


def planted(seed, batch=(), m=100, n=100, rank=3, missing=0.2, outliers=0.05, dtype=None):
    """X = L0 + S0 (L0 of the given rank, S0 with `outliers` of its entries uniform in +-10)
    and a mask with `missing` of the entries unobserved."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    L0 = torch.randn(*batch, m, rank, generator=g, dtype=d) @ torch.randn(
        *batch, rank, n, generator=g, dtype=d
    )
    support = torch.rand(*batch, m, n, generator=g) < outliers
    S0 = torch.where(support, (torch.rand(*batch, m, n, generator=g, dtype=d) * 2 - 1) * 10, 0.0)
    mask = torch.rand(*batch, m, n, generator=g) >= missing
    dtype = dtype or d
    return L0.to(dtype), S0.to(dtype), mask


def rel(a, b):
    """||a - b|| / ||b|| (0 where both are 0)."""
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1e-300)).item()


def garbage_at(X, mask, value):
    """X with every unobserved entry replaced by `value`."""
    return torch.where(mask.expand(X.shape), X, torch.full_like(X, value))


# ------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", CALLS, ids=CALL_IDS)
@pytest.mark.parametrize(
    "mask_shape",
    [(3, 24, 18), (3, 24, 1), (3, 1, 18), (24, 18)],
    ids=["full", "rows", "cols", "shared"],
)
def test_unobserved_values_change_no_output(device, kw, mask_shape):
    """NaN, Inf or huge garbage where the mask is False gives the same bits as zeros there, and
    S is exactly 0 there."""
    needs_kernels(device)
    g = torch.Generator().manual_seed(7)
    X = torch.randn(3, 24, 18, generator=g, dtype=torch.float64)
    X[:, :2, :3] += 15
    mask = (torch.rand(mask_shape, generator=g) > 0.25).to(device)
    mask[..., 0, 0] = True
    X = X.to(device)
    L0, S0 = ops.lowrank_sparse(garbage_at(X, mask, 0.0), 3, mask=mask, **kw)
    assert torch.isfinite(L0).all() and torch.isfinite(S0).all()
    assert (S0[~mask.expand(X.shape)] == 0).all()
    for value in (math.nan, math.inf, -math.inf, 1e30):
        L, S = ops.lowrank_sparse(garbage_at(X, mask, value), 3, mask=mask, **kw)
        assert torch.equal(L, L0) and torch.equal(S, S0), value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", CALLS, ids=CALL_IDS)
@pytest.mark.parametrize(
    "mask_shape", [(2, 30, 20), (2, 30, 1), (1, 20)], ids=["full", "rows", "cols"]
)
def test_matches_the_reference(dtype, kw, mask_shape):
    """The batched solver against lsef_ref's per-matrix loops (written from the constraint's
    free term E), on a non-contiguous batch."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 20, 30, generator=g, dtype=dtype).mT  # non-contiguous (2, 30, 20)
    X[:, :3, :4] += 20
    mask = torch.rand(mask_shape, generator=g) > 0.3
    mask[..., 0, 0] = True
    a = ops.lowrank_sparse(X, 3, mask=mask, **kw)
    b = lsef_ref.lowrank_sparse(X, 3, mask=mask, **kw)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    for x, y in zip(a, b):
        assert rel(x, y) <= tol


@pytest.mark.parametrize("kw", CALLS, ids=CALL_IDS)
def test_an_all_true_mask_is_no_mask(kw):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(2, 30, 25, generator=g, dtype=torch.float64)
    X[:, 4, 5] += 30
    a = ops.lowrank_sparse(X, 3, mask=torch.ones(30, 25, dtype=torch.bool), **kw)
    b = ops.lowrank_sparse(X, 3, **kw)
    for x, y in zip(a, b):
        assert rel(x, y) <= 1e-11


def test_a_missing_row_is_completed_with_zeros():
    """A row with nothing observed: the completion of least nuclear norm gives it L = 0."""
    L0, S0, _ = planted(1, m=80, n=60, missing=0.0)
    mask = torch.ones(80, 1, dtype=torch.bool)
    mask[[3, 17]] = False
    L, S = ops.lowrank_sparse(L0 + S0, 3, mask=mask)
    assert L[[3, 17]].abs().max() <= 1e-12 * L.abs().max()
    keep = mask.flatten()
    assert rel(L[keep], L0[keep]) <= 1e-5


@pytest.mark.parametrize("method", ["rpca", "unrolled"])
def test_masked_lambda_rule(method):
    """lam's default counts the observed entries only: passing the rule's value by hand gives
    the same bits (rpca: 1 / sqrt(p max(m, n)), Candes et al. 2011; unrolled: the universal
    threshold over the observed residual)."""
    L0, S0, mask = planted(2, m=50, n=40)
    X = torch.where(mask, L0 + S0, 0.0)
    if method == "rpca":
        lam = 1 / math.sqrt(mask.double().mean().item() * 50)
        assert rpca.masked_lambda(X, mask).item() == pytest.approx(lam, rel=1e-15)
        lam = torch.full((1, 1), lam, dtype=X.dtype)
    else:
        R = X - ops.lowrank(X, 3)
        r = R.abs()[mask]
        lam = 1.4826 * r.median() * math.sqrt(2 * math.log(r.numel()))
        assert rpca.universal_threshold(R, mask).item() == pytest.approx(lam.item(), rel=1e-12)
        lam = rpca.universal_threshold(R, mask)
    a = ops.lowrank_sparse(X, 3, mask=mask, method=method)
    b = ops.lowrank_sparse(X, 3, lam=lam, mask=mask, method=method)
    for x, y in zip(a, b):
        assert rel(x, y) <= 1e-12


def test_unrolled_with_a_mask_is_differentiable_and_ignores_unobserved():
    """The gradient reaches X on observed entries only (0 elsewhere), and lam; with an all-True
    mask it is the unmasked gradient. (lowrank's gradient is the tangent-space projection, not
    the truncated SVD's derivative, by design: gradcheck applies to low-rank inputs only.)"""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(2, 12, 10, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 12, 10, generator=g) > 0.3
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def grads(mask):
        L, S = ops.lowrank_sparse(X, 2, lam=lam, mask=mask, method="unrolled", n_steps=2)
        return torch.autograd.grad(L.square().sum() + S.abs().sum(), (X, lam))

    gX, glam = grads(mask)
    assert torch.isfinite(gX).all() and (gX[~mask] == 0).all() and gX[mask].abs().sum() > 0
    assert glam.item() != 0
    for a, b in zip(grads(torch.ones(12, 10, dtype=torch.bool)), grads(None)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# recovery
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_recovers_a_planted_problem_with_missing_entries(device):
    """100 x 100, rank 3, 20 % missing, 5 % gross outliers, float64: L0 to 1e-5 on every entry,
    observed or not, and S0 on the observed ones."""
    needs_kernels(device)
    L0, S0, mask = planted(0)
    X = torch.where(mask, L0 + S0, math.nan).to(device)
    L, S = ops.lowrank_sparse(X, 3, mask=mask.to(device))
    L, S = L.cpu(), S.cpu()
    assert rel(L, L0) <= 1e-5
    assert rel(S, S0 * mask) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_64_recovers_each_as_alone(device):
    """PCP recovers a random instance with high probability, not always: over seeds 1-11 and
    20-27 of this generator (1152 matrices), 9 masked matrices converged to a solution other
    than the planted one (DESIGN §8). This seed's 64 all recover."""
    needs_kernels(device)
    L0, S0, mask = planted(2, batch=(64,))
    X = torch.where(mask, L0 + S0, math.nan).to(device)
    L, S = ops.lowrank_sparse(X, 3, mask=mask.to(device))
    L, S = L.cpu(), S.cpu()
    for i in range(64):
        assert rel(L[i], L0[i]) <= 1e-5
    for i in (0, 17, 63):
        La, Sa = ops.lowrank_sparse(X[i], 3, mask=mask[i].to(device))
        assert torch.equal(La.cpu(), L[i]) and torch.equal(Sa.cpu(), S[i])


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-30, 30),
    missing=st.floats(0.02, 0.5),
    m=st.integers(20, 60),
    n=st.integers(20, 60),
)
def test_masked_solution_properties(seed, log_scale, missing, m, n):
    """Random sizes, missing fractions and scales (log-uniform over 2^+-30): the constraint
    L + S = X holds on the observed entries, S is 0 on the others, and the split scales with
    X (c L, c S for c X, to rounding)."""
    L0, S0, mask = planted(seed, m=m, n=n, rank=2, missing=missing, outliers=0.03)
    mask[0, 0] = True
    X = torch.where(mask, L0 + S0, 0.0)
    c = 2.0**log_scale * 1.37
    L, S = ops.lowrank_sparse(torch.where(mask, X, math.nan) * c, 2, mask=mask)
    assert rel((L + S)[mask] / c, X[mask]) <= 1e-6
    assert (S[~mask] == 0).all()
    L1, S1 = ops.lowrank_sparse(X, 2, mask=mask)
    assert rel(L / c, L1) <= 1e-9 and rel(S / c, S1) <= 1e-9


def tensorly_rpca_data():
    """TensorLy's test_RPCA problem (tensorly/decomposition/tests/test_robust_decomposition.py):
    100 copies of a rank-1 2 x 4 slice, 5 % of entries +-100, and a mask with 5 % missing,
    drawn from the same NumPy generator in the same order. Our op is matrix robust PCA: the
    (100, 2, 4) tensor is taken as its mode-0 unfolding, a rank-1 100 x 8 matrix."""
    sample = np.array([[1.0, 2, 3, 4], [2, 4, 6, 8]])
    clean = np.vstack([sample[None, ...]] * 100)
    rng = np.random.RandomState(12345)
    p = 0.05
    noise = rng.choice(
        [0.0, 100.0, -100.0], size=clean.shape, replace=True, p=[1 - p, p / 2, p / 2]
    )
    mask = rng.choice([0, 1], clean.shape, replace=True, p=[0.05, 0.95])
    flat = lambda a: torch.tensor(a.reshape(100, 8), dtype=torch.float64)  # noqa: E731
    return flat(clean), flat(noise), flat(mask).bool()


# TensorLy's test passes its weight by hand (reg_E=0.4, for its tensor objective); ours is
# passed by hand too, chosen on validation draws (NumPy seeds 1-30 of the same recipe, lam in
# 0.1-0.4, by the number of halves recovered to one decimal: 0.1: 6, 0.15: 31, 0.2: 43, 0.25:
# 42 of 60). The default 1 / sqrt(100) = 0.1 fails this tall 100 x 8 matrix: a row of 8 with
# two +-100 entries is cheaper to explain in L. TensorLy's tensor objective has more structure.
TENSORLY_LAM = 0.2


def test_tensorly_rpca_first_half():
    """No mask: X = L + S (to the op's tolerance), L = clean to one decimal, S's support is
    the noise's, S = noise to one decimal (TensorLy's checks; its `decimal=tol` first check is
    far looser than this)."""
    clean, noise, _ = tensorly_rpca_data()
    X = clean + noise
    L, S = ops.lowrank_sparse(X, 1, lam=TENSORLY_LAM)
    assert rel(L + S, X) < 1e-7  # the op's stopping test
    assert (L - clean).abs().max() < 1.5e-1
    assert torch.equal(S > 0.01, noise > 0.01)
    assert (S - noise).abs().max() < 1.5e-1


def test_tensorly_rpca_second_half():
    """With a mask (unobserved entries set to 1, as TensorLy does): X = L + S on the observed
    entries only (S is 0 where unobserved, by the contract, so L + S = X cannot hold there),
    L and S right to one decimal on the observed entries, and L completes the unobserved ones
    to a relative error of at most 1e-2."""
    clean, noise, mask = tensorly_rpca_data()
    corrupted_clean = torch.where(mask, clean, 1.0)
    X = corrupted_clean + noise
    L, S = ops.lowrank_sparse(X, 1, lam=TENSORLY_LAM, mask=mask)
    assert rel((L + S)[mask], X[mask]) < 1e-7  # the op's stopping test, observed entries
    assert ((L - corrupted_clean) * mask).abs().max() < 1.5e-1
    assert ((S - noise) * mask).abs().max() < 1.5e-1
    missing = ~mask
    assert rel(L[missing], clean[missing]) <= 1e-2


# ------------------------------------------------------------------------------------------
# bad masks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask, error, match",
    [
        ([[True]], TypeError, "mask must be None or a bool tensor"),
        (torch.ones(6, 5), TypeError, r"mask must be a bool tensor .*torch.float32"),
        (torch.ones(6, 4, dtype=torch.bool), ValueError, r"mask of shape \[6, 4\] does not"),
        (torch.ones(3, 6, 5, dtype=torch.bool), ValueError, "does not broadcast to X's shape"),
    ],
)
def test_bad_mask_type_and_shape(mask, error, match):
    X = torch.randn(2, 6, 5)
    with pytest.raises(error, match=match):
        ops.lowrank_sparse(X, 2, mask=mask)


def test_a_matrix_with_nothing_observed():
    X = torch.randn(3, 6, 5)
    mask = torch.ones(3, 6, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="mask leaves no observed entry in matrix 1"):
        ops.lowrank_sparse(X, 2, mask=mask)


def test_k_too_large_for_the_observed_part():
    X = torch.randn(6, 5)
    mask = torch.zeros(6, 1, dtype=torch.bool)
    mask[:2] = True  # two observed rows
    with pytest.raises(ValueError, match=r"k = 3 is too large .* 2 row\(s\) and 5 column\(s\)"):
        ops.lowrank_sparse(X, 3, mask=mask)
    ops.lowrank_sparse(X, 2, mask=mask)  # k = 2 is fine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_on_another_device():
    with pytest.raises(ValueError, match="mask is on cpu but X is on cuda"):
        ops.lowrank_sparse(
            torch.randn(6, 5, device="cuda"), 2, mask=torch.ones(6, 5, dtype=torch.bool)
        )


# ------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------


def masked_batch():
    L0, S0, mask = planted(9, batch=(3,), m=30, n=24)
    return torch.where(mask, L0 + S0, math.nan), mask


def test_masked_rpca_compiles_fullgraph():
    """With a mask, lowrank_sparse still traces whole under torch.compile(fullgraph=True) (the
    mask's value checks, a host read, are skipped while traced) and equals eager bit for bit
    (aot_eager)."""
    X, mask = masked_batch()
    fn = lambda X, mask: ops.lowrank_sparse(X, 3, mask=mask)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(X, mask), fn(X, mask)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(noise="auto")], ids=["rpca", "auto"])
def test_masked_rpca_under_vmap(kw):
    """torch.vmap over X and mask equals the batched call bit for bit."""
    X, mask = masked_batch()
    mapped = torch.vmap(lambda x, w: ops.lowrank_sparse(x, 3, mask=w, **kw))(X, mask)
    for a, b in zip(mapped, ops.lowrank_sparse(X, 3, mask=mask, **kw)):
        assert torch.equal(a, b)
