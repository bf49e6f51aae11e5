"""rank_scale and rank_aware_grad_scale against their references."""

import pytest
import torch
from conftest import DEVICES, DTYPES, requires_cuda_kernels

import lsef_ref
from lsef_ext import ops

# (batch, m, n, r); m = 300 makes the CPU kernel split each matrix into several column tiles.
# r = 9 and r = 20 take the CUDA kernel's narrow path with 16 registers and its wide path.
CASES = [
    ((), 5, 7, 2),
    ((3,), 6, 7, 1),
    ((2, 3), 16, 40, 3),
    ((2,), 300, 50, 4),
    ((4,), 8, 9, 0),
    ((2,), 24, 33, 9),
    ((2,), 40, 33, 20),
]


def orthonormal(batch, m, r, dtype, device):
    return torch.linalg.qr(torch.randn(*batch, m, max(r, 1), dtype=dtype, device=device))[0][
        ..., :r
    ]


def coefficient(kind, batch, dtype, device, low, high):
    if kind == "float":
        return (low + high) / 2
    shape = () if kind == "scalar" else batch
    return torch.empty(shape, dtype=dtype, device=device).uniform_(low, high)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("coef", ["float", "scalar", "per_matrix"])
@pytest.mark.parametrize("shared_U", [False, True])
def test_matches_reference(device, dtype, case, coef, shared_U):
    requires_cuda_kernels(device, "rank_scale")
    batch, m, n, r = case
    G = torch.randn(*batch, m, n, dtype=dtype, device=device)
    U = orthonormal(() if shared_U else batch, m, r, dtype, device)
    alpha = coefficient(coef, batch, dtype, device, 0.1, 0.9)
    beta = coefficient(coef, batch, dtype, device, 1.0, 3.0)
    got = ops.rank_scale(G, U, alpha, beta)
    want = lsef_ref.rank_scale(G, U, alpha, beta)
    torch.testing.assert_close(got, want)  # dtype-default tolerances: a sum of r products


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scales_the_two_subspaces(device, dtype):
    """With orthonormal U: U^T G' = alpha U^T G, and (I - UU^T) G' = beta (I - UU^T) G."""
    requires_cuda_kernels(device, "rank_scale")
    G = torch.randn(5, 12, 30, dtype=dtype, device=device)
    U = orthonormal((5,), 12, 3, dtype, device)
    out = ops.rank_scale(G, U, 0.25, 4.0)
    P = U @ U.mT
    torch.testing.assert_close(U.mT @ out, 0.25 * (U.mT @ G))
    torch.testing.assert_close(out - P @ out, 4.0 * (G - P @ G))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype):
    requires_cuda_kernels(device, "rank_scale")
    G = torch.randn(3, 20, 10, dtype=dtype, device=device).mT  # (3, 10, 20)
    U = orthonormal((3,), 10, 2, dtype, device).mT.contiguous().mT  # column-major U
    alpha = torch.rand(6, dtype=dtype, device=device)[::2]
    assert not (G.is_contiguous() or U.is_contiguous() or alpha.is_contiguous())
    torch.testing.assert_close(
        ops.rank_scale(G, U, alpha, 2.0), lsef_ref.rank_scale(G, U, alpha, 2.0)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    requires_cuda_kernels(device, "rank_scale")
    for G, U in [
        (torch.randn(0, 4, 5), torch.randn(0, 4, 2)),
        (torch.randn(2, 4, 0), torch.randn(2, 4, 2)),
    ]:
        out = ops.rank_scale(G.to(device), U.to(device), 0.5, 2.0)
        assert out.shape == G.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coef", ["scalar", "per_matrix"])
@pytest.mark.parametrize("shared_U", [False, True])
def test_gradcheck(device, coef, shared_U):
    requires_cuda_kernels(device, "rank_scale")
    batch, m, n, r = (2,), 5, 6, 2
    G = torch.randn(*batch, m, n, dtype=torch.float64, device=device, requires_grad=True)
    U = orthonormal(() if shared_U else batch, m, r, torch.float64, device).requires_grad_()
    alpha = coefficient(coef, batch, torch.float64, device, 0.1, 0.9).requires_grad_()
    beta = coefficient(coef, batch, torch.float64, device, 1.0, 3.0).requires_grad_()
    assert torch.autograd.gradcheck(ops.rank_scale, (G, U, alpha, beta))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference(device):
    requires_cuda_kernels(device, "rank_scale")
    G = torch.randn(3, 7, 9, dtype=torch.float64, device=device, requires_grad=True)
    U = orthonormal((3,), 7, 2, torch.float64, device).requires_grad_()
    alpha = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    beta = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)
    grad = torch.randn_like(G)
    got = torch.autograd.grad(ops.rank_scale(G, U, alpha, beta), (G, U, alpha, beta), grad)
    want = torch.autograd.grad(lsef_ref.rank_scale(G, U, alpha, beta), (G, U, alpha, beta), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    requires_cuda_kernels(device, "rank_scale")
    for batch, m, n, r in CASES[:4]:
        for shared_U in (False, True):
            G = torch.randn(*batch, m, n, device=device, requires_grad=requires_grad)
            U = orthonormal(() if shared_U else batch, m, r, torch.float32, device)
            alpha = torch.rand(batch, device=device, requires_grad=requires_grad)
            beta = torch.tensor(2.0, device=device, requires_grad=requires_grad)
            torch.library.opcheck(
                torch.ops.lsef.rank_scale.default, (G, U.requires_grad_(requires_grad), alpha, beta)
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_aware_grad_scale(device, dtype):
    requires_cuda_kernels(device, "rank_scale")
    x = torch.randn(4, 8, 11, dtype=dtype, device=device, requires_grad=True)
    U = orthonormal((4,), 8, 3, dtype, device)
    alpha = torch.rand(4, dtype=dtype, device=device)
    y = ops.rank_aware_grad_scale(x, U, alpha, 2.0)
    assert torch.equal(y, x)
    grad = torch.randn_like(x)
    (got,) = torch.autograd.grad(y, x, grad)
    (want,) = torch.autograd.grad(lsef_ref.rank_aware_grad_scale(x, U, alpha, 2.0), x, grad)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, lsef_ref.rank_scale(grad, U, alpha, 2.0))


# ---- bad input ---------------------------------------------------------------------------


def test_bad_shapes():
    G = torch.randn(3, 6, 7)
    U = orthonormal((3,), 6, 2, torch.float32, "cpu")
    with pytest.raises(
        ValueError,
        match=r"rank_scale: G must have at least 2 dimensions \(\*, m, n\), got shape \[7\]",
    ):
        ops.rank_scale(torch.randn(7), U, 0.5, 2.0)
    with pytest.raises(ValueError, match=r"U must have G.size\(-2\) = 6 rows"):
        ops.rank_scale(G, torch.randn(3, 5, 2), 0.5, 2.0)
    with pytest.raises(ValueError, match="U has 7 columns but only 6 rows"):
        ops.rank_scale(G, torch.randn(3, 6, 7), 0.5, 2.0)
    with pytest.raises(ValueError, match=r"U must have G's batch shape \[3\] or be 2-D"):
        ops.rank_scale(G, torch.randn(2, 6, 2), 0.5, 2.0)
    with pytest.raises(
        ValueError, match=r"alpha must be a scalar or have G's batch shape \[3\], got shape \[4\]"
    ):
        ops.rank_scale(G, U, torch.rand(4), 2.0)
    with pytest.raises(ValueError, match=r"beta must be a scalar or have G's batch shape"):
        ops.rank_scale(G, U, 0.5, torch.rand(3, 1))


def test_bad_dtypes():
    G = torch.randn(3, 6, 7)
    U = orthonormal((3,), 6, 2, torch.float32, "cpu")
    with pytest.raises(
        RuntimeError, match="rank_scale: G must be float32 or float64 on the CPU, got Long"
    ):
        ops.rank_scale(G.long(), U.long(), 1, 2)
    with pytest.raises(RuntimeError, match="U must have the dtype of G"):
        ops.rank_scale(G, U.double(), 0.5, 2.0)
    with pytest.raises(RuntimeError, match="alpha must have the dtype of G"):
        ops.rank_scale(G, U, torch.tensor(0.5, dtype=torch.float64), 2.0)


def test_rank_aware_grad_scale_checks_in_forward():
    """Checked when called, with messages that name rank_aware_grad_scale and its argument x."""
    x = torch.randn(3, 6, 7, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"rank_aware_grad_scale: U must have x.size\(-2\) = 6 rows"
    ):
        ops.rank_aware_grad_scale(x, torch.randn(3, 5, 2), 0.5, 2.0)
    with pytest.raises(RuntimeError, match=r"rank_aware_grad_scale: U must have the dtype of x"):
        ops.rank_aware_grad_scale(x, torch.randn(3, 6, 2, dtype=torch.float64), 0.5, 2.0)
    with pytest.raises(
        ValueError,
        match=r"rank_aware_grad_scale: alpha must be a scalar or have x's batch shape \[3\]",
    ):
        ops.rank_aware_grad_scale(x, torch.randn(3, 6, 2), torch.rand(2), 2.0)
    with pytest.raises(
        TypeError, match="rank_aware_grad_scale: beta must be a number or a tensor, got str"
    ):
        ops.rank_aware_grad_scale(x, torch.randn(3, 6, 2), 0.5, "2.0")


def test_coefficients_that_are_not_numbers():
    G, U = torch.randn(3, 6, 7), torch.randn(3, 6, 2)
    with pytest.raises(
        TypeError, match="rank_scale: alpha must be a number or a tensor, got NoneType"
    ):
        ops.rank_scale(G, U, None, 2.0)
    with pytest.raises(TypeError, match="rank_scale: beta must be a number or a tensor, got bool"):
        ops.rank_scale(G, U, 0.5, True)
    import numpy as np

    torch.testing.assert_close(
        ops.rank_scale(G, U, np.float32(0.5), 2), ops.rank_scale(G, U, 0.5, 2.0)
    )


def test_rank_aware_grad_scale_compiles_fullgraph():
    def fn(x, U):
        return (ops.rank_aware_grad_scale(x, U, 0.5, 2.0) * x).sum()

    x = torch.randn(3, 6, 7, requires_grad=True)
    U = orthonormal((3,), 6, 2, torch.float32, "cpu")
    (eager,) = torch.autograd.grad(fn(x, U), x)
    (compiled,) = torch.autograd.grad(
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x, U), x
    )
    torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices():
    requires_cuda_kernels("cuda", "rank_scale")
    G = torch.randn(3, 6, 7, device="cuda")
    with pytest.raises(RuntimeError, match="U must be on the device of G"):
        ops.rank_scale(G, torch.randn(3, 6, 2), 0.5, 2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_agrees_with_cpu(dtype):
    requires_cuda_kernels("cuda", "rank_scale")
    G = torch.randn(6, 48, 200, dtype=dtype)
    U = orthonormal((6,), 48, 4, dtype, "cpu")
    alpha = torch.rand(6, dtype=dtype)
    got = ops.rank_scale(G.cuda(), U.cuda(), alpha.cuda(), 2.0).cpu()
    torch.testing.assert_close(got, ops.rank_scale(G, U, alpha, 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [4, 8, 13])
@pytest.mark.parametrize("n", [64, 66, 63])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_narrow_column_groups(dtype, r, n, offset):
    """The narrow path reads V adjacent columns as one access where n % V == 0 and G is
    aligned, else one column per thread (offset 1 misaligns G; n = 66 divides by 2 but not 4,
    n = 63 by neither). Every group of columns, and the scalar fallback, gives the same
    numbers: the sums run in the same order, so the two launches agree exactly."""
    requires_cuda_kernels("cuda", "rank_scale")
    batch, m = 5, 24
    flat = torch.randn(batch * m * n + offset, device="cuda").to(dtype)
    G = flat[offset:].view(batch, m, n)
    U = orthonormal((batch,), m, r, torch.float32, "cuda").to(dtype)
    got = ops.rank_scale(G, U, 0.5, 2.0)
    want = lsef_ref.rank_scale(G.double(), U.double(), 0.5, 2.0)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype)
    if tol is None:
        torch.testing.assert_close(got, want.to(dtype))
    else:
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    # The aligned, contiguous copy takes the grouped path where n allows: the same bits.
    assert torch.equal(ops.rank_scale(G.contiguous().clone(), U, 0.5, 2.0), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_cuda_low_precision_against_float32(dtype, tol):
    """Sums run in float32, so the error is the dtype's rounding of inputs and output: a few
    units of its epsilon (2^-10 float16, 2^-7 bfloat16) relative to the output's scale."""
    requires_cuda_kernels("cuda", "rank_scale")
    G = torch.randn(8, 32, 300, device="cuda").to(dtype)
    U = orthonormal((8,), 32, 4, torch.float32, "cuda").to(dtype)
    got = ops.rank_scale(G, U, 0.5, 2.0).float()
    want = lsef_ref.rank_scale(G.float(), U.float(), 0.5, 2.0)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared_U", [False, True])
@pytest.mark.parametrize(
    "alpha_kind,beta_kind",
    [
        ("float", "per_matrix"),
        ("per_matrix", "float"),
        ("scalar", "per_matrix"),
        ("per_matrix", "scalar"),
    ],
)
def test_gradcheck_mixed_coefficients(device, shared_U, alpha_kind, beta_kind):
    """One coefficient a number or 0-d tensor, the other one per matrix: the U gradient once
    failed with "shape '[]' is invalid for input of size 3"."""
    requires_cuda_kernels(device, "rank_scale")
    batch, m, n, r = (3,), 5, 6, 2
    G = torch.randn(*batch, m, n, dtype=torch.float64, device=device, requires_grad=True)
    U = orthonormal(() if shared_U else batch, m, r, torch.float64, device).requires_grad_()
    alpha = coefficient(alpha_kind, batch, torch.float64, device, 0.1, 0.9)
    beta = coefficient(beta_kind, batch, torch.float64, device, 1.0, 3.0)
    inputs = [G, U] + [c.requires_grad_() for c in (alpha, beta) if isinstance(c, torch.Tensor)]

    def fn(G, U, *tensors):  # the tensor coefficients in order, the numbers as they are
        rest = iter(tensors)
        a = next(rest) if isinstance(alpha, torch.Tensor) else alpha
        b = next(rest) if isinstance(beta, torch.Tensor) else beta
        return ops.rank_scale(G, U, a, b)

    assert torch.autograd.gradcheck(fn, inputs)
    # The same gradients as the reference.
    out = ops.rank_scale(G, U, alpha, beta)
    want = lsef_ref.rank_scale(G, U, alpha, beta)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b)


def test_fake_kernel_checks_devices():
    """A meta U with a CPU G: the dispatcher picks the fake kernel, which must refuse rather
    than return an uninitialised CPU tensor."""
    G = torch.randn(3, 6, 7)
    with pytest.raises(RuntimeError, match=r"rank_scale: U must be on the device of G \(cpu\)"):
        ops.rank_scale(G, torch.randn(3, 6, 2, device="meta"), 0.5, 2.0)
    with pytest.raises(RuntimeError, match=r"rank_scale: alpha must be on the device of G \(cpu\)"):
        ops.rank_scale(G, torch.randn(3, 6, 2), torch.rand(3, device="meta"), 2.0)
