"""soft_threshold against its reference in python/lsef_ref."""

import pytest
import torch
from conftest import DEVICES, DTYPES, requires_cuda_kernels

import lsef_ref
from lsef_ext import ops

# Shapes cover 1-D, batched, a size-1 channel dim, and tensors spanning several kernel blocks
# (32768 elements each) with a partial last block.
SHAPES = [(7,), (3, 5), (2, 3, 17), (4, 1, 9), (300, 513)]
LAM_KINDS = ["float", "scalar", "channel", "channel_keepdim", "full", "broadcast"]


def make_lam(kind, shape, dtype, device, requires_grad=False):
    D = shape[-1]
    if kind == "float":
        return 0.3
    sizes = {
        "scalar": (),
        "channel": (D,),
        "channel_keepdim": (1,) * (len(shape) - 1) + (D,),
        "full": shape,
        "broadcast": shape[:1] + (1,) * (len(shape) - 2) + (D,) if len(shape) > 1 else (1,),
    }[kind]
    lam = torch.rand(sizes, dtype=dtype, device=device) * 0.6
    return lam.requires_grad_(requires_grad)


def make_inputs(shape, dtype, device, with_L=True, requires_grad=False):
    X = torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
    L = (
        torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
        if with_L
        else None
    )
    return X, L


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("with_L", [True, False])
def test_forward_matches_reference(device, dtype, shape, lam_kind, hard, with_L):
    requires_cuda_kernels(device, "soft_threshold")
    X, L = make_inputs(shape, dtype, device, with_L)
    lam = make_lam(lam_kind, shape, dtype, device)
    # The kernel computes R = X - L and the shrinkage in X's dtype, exactly as the reference.
    torch.testing.assert_close(
        ops.soft_threshold(X, L, lam, hard),
        lsef_ref.soft_threshold(X, L, lam, hard),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(device, dtype):
    requires_cuda_kernels(device, "soft_threshold")
    X = torch.randn(9, 40, dtype=dtype, device=device).mT  # (40, 9), transposed strides
    L = torch.randn(40, 18, dtype=dtype, device=device)[:, ::2]  # sliced columns
    lam = (torch.rand(18, dtype=dtype, device=device) * 0.5)[::2]  # strided per-channel
    assert not (X.is_contiguous() or L.is_contiguous() or lam.is_contiguous())
    torch.testing.assert_close(
        ops.soft_threshold(X, L, lam), lsef_ref.soft_threshold(X, L, lam), rtol=0, atol=0
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_empty(device, shape):
    requires_cuda_kernels(device, "soft_threshold")
    X, L = make_inputs(shape, torch.float32, device, requires_grad=True)
    lam = torch.full(shape[-1:], 0.1, device=device, requires_grad=True)
    S = ops.soft_threshold(X, L, lam)
    assert S.shape == X.shape
    S.sum().backward()
    assert X.grad.shape == X.shape and L.grad.shape == L.shape
    assert torch.equal(lam.grad, torch.zeros_like(lam))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 17), (300, 513)])
@pytest.mark.parametrize("lam_kind", ["scalar", "channel", "channel_keepdim", "full", "broadcast"])
@pytest.mark.parametrize("hard", [False, True])
def test_backward_matches_reference(device, dtype, shape, lam_kind, hard):
    requires_cuda_kernels(device, "soft_threshold")
    X, L = make_inputs(shape, dtype, device, requires_grad=True)
    lam = make_lam(lam_kind, shape, dtype, device, requires_grad=True)
    G = torch.randn(shape, dtype=dtype, device=device)
    got = torch.autograd.grad(ops.soft_threshold(X, L, lam, hard), (X, L, lam), G)
    # The hard reference uses lam only in a comparison: its gradient is an unused zero.
    want = torch.autograd.grad(
        lsef_ref.soft_threshold(X, L, lam, hard), (X, L, lam), G, materialize_grads=True
    )
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # lam's gradient is a sum: the kernel accumulates in float64, the reference in dtype.
    n = X.numel() // lam.numel()
    tol = {torch.float32: 2e-6 * n**0.5, torch.float64: 1e-12 * n**0.5}[dtype]
    torch.testing.assert_close(got[2], want[2], rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_only_requested_gradients(device):
    requires_cuda_kernels(device, "soft_threshold")
    X, L = make_inputs((4, 6), torch.float64, device)
    X.requires_grad_(True)
    lam = torch.full((6,), 0.2, dtype=torch.float64, device=device)
    S = ops.soft_threshold(X, L, lam)
    (gX,) = torch.autograd.grad(S.sum(), X)
    torch.testing.assert_close(gX, (X - L).abs().gt(lam).to(gX.dtype))
    outs = torch.ops.lsef.soft_threshold_backward(
        torch.ones_like(X), X, L, lam, False, [False, True, False]
    )
    assert outs[0] is None and outs[2] is None
    torch.testing.assert_close(outs[1], -gX)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam_kind", ["scalar", "channel", "full", "broadcast"])
@pytest.mark.parametrize("with_L", [True, False])
def test_gradcheck_soft(device, lam_kind, with_L):
    requires_cuda_kernels(device, "soft_threshold")
    shape = (3, 4, 6)
    X, L = make_inputs(shape, torch.float64, device, with_L, requires_grad=True)
    lam = make_lam(lam_kind, shape, torch.float64, device, requires_grad=True)
    inputs = (X, L, lam) if with_L else (X, lam)
    fn = (
        (lambda X, L, lam: ops.soft_threshold(X, L, lam))
        if with_L
        else (lambda X, lam: ops.soft_threshold(X, None, lam))
    )
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_hard(device):
    requires_cuda_kernels(device, "soft_threshold")
    X, L = make_inputs((5, 7), torch.float64, device, requires_grad=True)
    lam = torch.rand(7, dtype=torch.float64, device=device) * 0.5
    assert torch.autograd.gradcheck(lambda X, L: ops.soft_threshold(X, L, lam, True), (X, L))


def sample_inputs(device, requires_grad):
    shape = (3, 5, 8)
    for lam_kind in ["scalar", "channel", "full", "broadcast"]:
        for hard in (False, True):
            for with_L in (True, False):
                X, L = make_inputs(shape, torch.float32, device, with_L, requires_grad)
                lam = make_lam(lam_kind, shape, torch.float32, device, requires_grad)
                yield (X, L, lam, hard)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    requires_cuda_kernels(device, "soft_threshold")
    for args in sample_inputs(device, requires_grad):
        torch.library.opcheck(torch.ops.lsef.soft_threshold.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    requires_cuda_kernels(device, "soft_threshold")
    X, L = make_inputs((4, 6), torch.float32, device)
    lam = torch.full((6,), 0.2, device=device)
    for mask in ([True, True, True], [True, False, False], [False, False, True]):
        torch.library.opcheck(
            torch.ops.lsef.soft_threshold_backward.default,
            (torch.randn_like(X), X, L, lam, False, mask),
        )


def test_threads_do_not_change_lam_gradient_bits():
    X, L = make_inputs((700, 300), torch.float32, "cpu")
    lam = torch.rand(300, requires_grad=True)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            (g,) = torch.autograd.grad(ops.soft_threshold(X, L, lam).sum(), lam)
            grads.append(g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hard", [False, True])
def test_nan_and_inf_follow_reference(device, hard):
    requires_cuda_kernels(device, "soft_threshold")
    X = torch.tensor([[float("nan"), 1.0, float("inf"), -float("inf"), 0.05]], device=device)
    lam = torch.tensor([0.1, float("nan"), float("inf"), 0.1, 0.1], device=device)
    got = ops.soft_threshold(X, None, lam, hard)
    want = lsef_ref.soft_threshold(X, None, lam, hard)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert got[0, 4] == 0  # a finite entry beside NaNs is untouched by them
    # A NaN lam at a finite entry (1.0): NaN when soft; when hard the test |R| > NaN is false,
    # so the entry is dropped (0), as the docstring says.
    assert (got[0, 1] == 0) if hard else bool(got[0, 1].isnan())


def test_torch_compile_fullgraph_matches_eager():
    def fn(X, L, lam, U):
        S = ops.soft_threshold(X, L, lam)
        return ops.rank_scale(S, U, 0.5, 2.0).sum()

    X, L = make_inputs((4, 6, 10), torch.float32, "cpu", requires_grad=True)
    lam = torch.full((10,), 0.3, requires_grad=True)
    U = torch.linalg.qr(torch.randn(4, 6, 2))[0]
    eager = torch.autograd.grad(fn(X, L, lam, U), (X, L, lam))
    compiled_fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_fn(X, L, lam, U), (X, L, lam))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# ---- bad input ---------------------------------------------------------------------------


def test_bad_lam_shape():
    X = torch.randn(4, 6)
    with pytest.raises(
        ValueError, match=r"soft_threshold: lam of shape \[5\] is not broadcastable"
    ):
        ops.soft_threshold(X, None, torch.ones(5))
    with pytest.raises(ValueError, match="is not broadcastable"):
        ops.soft_threshold(X, None, torch.ones(1, 4, 6))


def test_lam_that_is_not_a_number():
    X = torch.randn(4, 6)
    for lam, kind in ((None, "NoneType"), ("0.1", "str"), ([0.1], "list")):
        with pytest.raises(
            TypeError, match=f"soft_threshold: lam must be a number or a tensor, got {kind}"
        ):
            ops.soft_threshold(X, None, lam)


def test_bad_L():
    X = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"L must have the shape of X \[4, 6\], got \[4, 5\]"):
        ops.soft_threshold(X, torch.randn(4, 5), 0.1)
    with pytest.raises(RuntimeError, match="L must have the dtype of X"):
        ops.soft_threshold(X, torch.randn(4, 6, dtype=torch.float64), 0.1)


def test_bad_dtypes():
    with pytest.raises(RuntimeError, match="X must be a floating-point tensor, got Long"):
        ops.soft_threshold(torch.ones(3, dtype=torch.long), None, torch.tensor(1))
    with pytest.raises(RuntimeError, match="lam must have the dtype of X"):
        ops.soft_threshold(torch.randn(3), None, torch.tensor(0.1, dtype=torch.float64))
    # The CPU kernel itself is float32/float64 ...
    with pytest.raises(RuntimeError, match="must be float32 or float64 on the CPU, got Half"):
        torch.ops.lsef.soft_threshold.default(
            torch.randn(3).half(), None, torch.tensor(0.1).half(), False
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_cpu_computes_in_float32(dtype):
    """... and the Python API takes float16 / bfloat16 on the CPU (autocast produces them):
    computed in float32 and rounded once, with gradients in the inputs' dtype (issue 31)."""
    X, L = torch.randn(4, 6).to(dtype), torch.randn(4, 6).to(dtype)
    lam = torch.rand(6).to(dtype)
    want = ops.soft_threshold(X.float(), L.float(), lam.float()).to(dtype)
    got = ops.soft_threshold(X, L, lam)
    assert got.dtype == dtype and torch.equal(got, want)
    Xg = X.clone().requires_grad_()
    ops.soft_threshold(Xg, L, lam).sum().backward()
    assert Xg.grad.dtype == dtype


@pytest.mark.parametrize("lam", [-0.1, torch.tensor([0.1, -0.2, 0.3]), torch.full((2, 3), 0.1)])
def test_negative_lam(lam):
    if isinstance(lam, torch.Tensor) and lam.dim() == 2:
        lam = lam.clone()
        lam[1, 2] = -1e-3  # one negative entry in a full-shape lam
    with pytest.raises(ValueError, match="soft_threshold: lam must be non-negative"):
        ops.soft_threshold(torch.randn(2, 3), None, lam)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices():
    requires_cuda_kernels("cuda", "soft_threshold")
    X = torch.randn(4, 6, device="cuda")
    with pytest.raises(RuntimeError, match="L must be on the device of X"):
        ops.soft_threshold(X, torch.randn(4, 6), 0.1)
    with pytest.raises(RuntimeError, match="lam must be on the device of X"):
        ops.soft_threshold(X, None, torch.ones(6))


# ---- CUDA against CPU, and the low-precision dtypes ---------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam_kind", ["scalar", "channel", "full", "broadcast"])
def test_cuda_agrees_with_cpu(dtype, lam_kind):
    requires_cuda_kernels("cuda", "soft_threshold")
    shape = (300, 513)
    X, L = make_inputs(shape, dtype, "cpu", requires_grad=True)
    lam = make_lam(lam_kind, shape, dtype, "cpu", requires_grad=True)
    G = torch.randn(shape, dtype=dtype)
    cpu = (X, L, lam)
    cuda = tuple(t.detach().cuda().requires_grad_() for t in cpu)
    S_cpu, S_cuda = ops.soft_threshold(*cpu), ops.soft_threshold(*cuda)
    torch.testing.assert_close(S_cuda.cpu(), S_cpu, rtol=0, atol=0)  # same per-element math
    got = torch.autograd.grad(S_cuda, cuda, G.cuda())
    want = torch.autograd.grad(S_cpu, cpu, G)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)
    n = X.numel() // lam.numel()  # lam's gradient: both sum in float64, in different orders
    tol = {torch.float32: 2e-6 * n**0.5, torch.float64: 1e-12 * n**0.5}[dtype]
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_low_precision_is_float32_rounded_once(dtype, hard):
    """float16/bfloat16 are computed in float32: the result is the float32 computation on the
    same (rounded) inputs, rounded once to the dtype, exactly."""
    requires_cuda_kernels("cuda", "soft_threshold")
    shape = (64, 257)
    X, L = (t.to(dtype) for t in make_inputs(shape, torch.float32, "cuda"))
    lam = make_lam("channel", shape, torch.float32, "cuda").to(dtype)
    got = ops.soft_threshold(X, L, lam, hard)
    want = lsef_ref.soft_threshold(X.float(), L.float(), lam.float(), hard).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_nan_lam_is_nan_when_soft_and_zero_when_hard(device, dtype):
    """A NaN lam given as a number (the scalar kernel path; the test above has a per-channel
    one): soft gives NaN everywhere; hard drops every entry (|R| > NaN is false), so a finite
    R gives 0 and an infinite one NaN (R times the mask: inf * 0), as DESIGN §3 says and as
    the reference does."""
    requires_cuda_kernels(device, "soft_threshold")
    X = torch.tensor([[1.0, -2.0, 0.0], [float("inf"), 3.5, -0.25]], device=device, dtype=dtype)
    lam = torch.tensor(float("nan"), device=device, dtype=dtype)
    for L in (None, 0.5 * X.nan_to_num(posinf=4.0)):
        soft = ops.soft_threshold(X, L, float("nan"))
        hard = ops.soft_threshold(X, L, float("nan"), hard=True)
        assert bool(soft.isnan().all()), soft
        finite = X.isfinite()
        assert bool((hard[finite] == 0).all()) and bool(hard[~finite].isnan().all()), hard
        for h, got in ((False, soft), (True, hard)):
            want = lsef_ref.soft_threshold(X, L, lam, h)
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
