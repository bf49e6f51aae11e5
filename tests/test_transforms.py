"""Every public op under every PyTorch transform: one table of ops, one test per transform.

Each :class:`Entry` holds an op written as a function of float64 tensors, the same function on
the ``lsef_ref`` reference, sample inputs in the regime where the derivatives are exact (rank
<= k on the exact path for the factorisations, entries away from the kinks |R| = lam for the
thresholds; batched, non-contiguous), and what the op supports (``SUPPORT``). Each transform is
checked against central finite differences (``gradcheck``, ``gradgradcheck``: of the forward,
or of the first derivative) and against the same transform applied to the reference. Where an
op does not support a transform the test asserts that it *raises*, with a message naming the
op. Adding an op is one entry; adding a transform is one test and one column of ``SUPPORT``.

The README's "Works with" table is made from ``SUPPORT`` (``works_with_table``) and a test
checks that it is the one printed there.
"""

import dataclasses
import pathlib
from typing import Callable, Dict

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten

import lsef_ref
from lsef_ext import ops

D = torch.float64
ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-7, atol=1e-9)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rank_k(shape, k, seed, noncontiguous=False):
    """A batch of matrices of rank exactly k with well-separated singular values."""
    g = gen(seed)
    *b, m, n = shape
    sigma = torch.tensor([3.0, 2.0, 1.3, 0.8, 0.5][:k], dtype=D)
    Q1 = torch.linalg.qr(torch.randn(*b, m, k, generator=g, dtype=D))[0]
    Q2 = torch.linalg.qr(torch.randn(*b, n, k, generator=g, dtype=D))[0]
    A = (Q1 * sigma) @ Q2.mT
    return A.mT.contiguous().mT if noncontiguous else A


def away_from_kinks(shape, lam, seed):
    """X, L with every |X - L| at least 0.2 away from lam (finite differences never cross)."""
    g = gen(seed)
    L = torch.randn(shape, generator=g, dtype=D)
    mag = lam + 0.2 + torch.rand(shape, generator=g, dtype=D)
    mag = torch.where(
        torch.rand(shape, generator=g, dtype=D) < 0.4,
        lam * torch.rand(shape, generator=g, dtype=D) * 0.5,
        mag,
    )
    sign = torch.where(torch.rand(shape, generator=g, dtype=D) < 0.5, -1.0, 1.0).to(D)
    return L + sign * mag, L


def st_samples():
    lam = torch.tensor([0.3, 0.5, 0.7, 0.4], dtype=D)
    X, L = away_from_kinks((2, 3, 4), lam, 0)
    yield (X, L, lam)
    lam0 = torch.tensor(0.5, dtype=D)
    X, L = away_from_kinks((3, 4), lam0, 1)
    yield (X.mT.contiguous().mT, L, lam0)  # X non-contiguous... of the same shape
    Xt, Lt = away_from_kinks((4, 3), lam0, 2)
    yield (Xt.mT, Lt.mT, lam0)  # transposed views


def rs_samples():
    g = gen(3)
    G = torch.randn(2, 5, 4, generator=g, dtype=D)
    U = torch.linalg.qr(torch.randn(2, 5, 2, generator=g, dtype=D))[0]
    yield (G, U, torch.rand(2, generator=g, dtype=D), torch.tensor(1.7, dtype=D))
    Us = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=D))[0]
    yield (
        G.mT.contiguous().mT,
        Us,
        torch.tensor(0.4, dtype=D),
        torch.rand(2, generator=g, dtype=D),
    )


def svd_samples():
    yield (rank_k((2, 5, 7), 3, 4),)
    yield (rank_k((6, 4), 2, 5, noncontiguous=True),)


def square_samples():  # k == min(m, n): lowrank is the identity, every derivative exact
    yield (torch.randn(2, 3, 4, generator=gen(6), dtype=D),)


@dataclasses.dataclass
class Entry:
    fn: Callable  # tensors -> tensor or tuple of tensors
    ref: Callable
    samples: Callable
    # whether finite differences of the forward give the derivative (False for
    # rank_aware_grad_scale, whose derivative is defined to be rank_scale)
    fd: bool = True
    second: Callable = None  # the function whose second derivatives are exact (default fn)
    second_samples: Callable = None


U_FIXED = torch.linalg.qr(torch.randn(5, 2, generator=gen(7), dtype=D))[0]

ENTRIES: Dict[str, Entry] = {
    "soft_threshold": Entry(
        lambda X, L, lam: ops.soft_threshold(X, L, lam),
        lambda X, L, lam: lsef_ref.soft_threshold(X, L, lam),
        st_samples,
    ),
    "soft_threshold (hard)": Entry(
        lambda X, L, lam: ops.soft_threshold(X, L, lam, hard=True),
        lambda X, L, lam: lsef_ref.soft_threshold(X, L, lam, hard=True),
        st_samples,
    ),
    "rank_scale": Entry(
        lambda G, U, a, b: ops.rank_scale(G, U, a, b),
        lambda G, U, a, b: lsef_ref.rank_scale(G, U, a, b),
        rs_samples,
    ),
    "rank_aware_grad_scale": Entry(
        lambda x: ops.rank_aware_grad_scale(x, U_FIXED.to(x), 0.5, 2.0),
        lambda x: lsef_ref.rank_aware_grad_scale(
            x, U_FIXED.to(x), torch.tensor(0.5).to(x), torch.tensor(2.0).to(x)
        ),
        lambda: iter([(torch.randn(2, 5, 3, generator=gen(8), dtype=D),)]),
        fd=False,
    ),
    "rsvd": Entry(
        lambda A: ops.rsvd(A, 3 if A.shape[-1] == 7 else 2, 8),
        lambda A: lsef_ref.rsvd(A, 3 if A.shape[-1] == 7 else 2, 8),
        svd_samples,
        # S's second derivatives exist; U's and V's raise (test_second_derivative_refusals)
        second=lambda A: ops.rsvd(A, 3 if A.shape[-1] == 7 else 2, 8)[1],
    ),
    "lowrank": Entry(
        lambda A: ops.lowrank(A, 3 if A.shape[-1] == 7 else 2, 8),
        lambda A: lsef_ref.lowrank(A, 3 if A.shape[-1] == 7 else 2, 8),
        svd_samples,
        # exact second derivatives where k == min(m, n) (DESIGN.md §14)
        second=lambda A: ops.lowrank(A, 3, 8),
        second_samples=square_samples,
    ),
    "lowrank_sparse (unrolled)": Entry(
        lambda X, lam: ops.lowrank_sparse(X, 3, lam, method="unrolled")[1],
        lambda X, lam: lsef_ref.lowrank_sparse(X, 3, lam, method="unrolled")[1],
        lambda: iter([(away_from_kinks((2, 3, 4), 0.3, 9)[0], torch.tensor(0.3, dtype=D))]),
    ),
}
ENTRY_IDS = list(ENTRIES)


CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def cases(attr="samples"):
    """(op, sample) for every sample of every entry, on the CPU and (where present) CUDA."""
    out = []
    for name, e in ENTRIES.items():
        for i, s in enumerate((getattr(e, attr) or e.samples)()):
            out.append(pytest.param(name, s, id=f"{name}-{i}"))
            cuda = tuple(a.cuda() for a in s) if CUDA else s
            out.append(pytest.param(name, cuda, id=f"{name}-{i}-cuda", marks=NEEDS_CUDA))
    return out


def req(args):
    return tuple(a.detach().clone().requires_grad_() for a in args)


def weights(out, seed=11):
    """Fixed cotangents for every output (a scalar loss that sees each of them): a cosine
    pattern, deterministic and free of random calls, so it also runs inside vmap."""
    flat, _ = tree_flatten(out)
    return [
        torch.cos(torch.arange(o.numel(), dtype=D, device=o.device) * 0.7 + seed + i).reshape(
            o.shape
        )
        for i, o in enumerate(flat)
    ]


def scalar(fn, seed=11):
    def loss(*args):
        out = fn(*args)
        flat, _ = tree_flatten(out)
        w = weights(out, seed)
        return sum(((o * wi).sum()) ** 2 for o, wi in zip(flat, w))  # not linear: a Hessian

    return loss


def close(a, b, **tol):
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x, y, **(tol or TOL))


# --- the table -------------------------------------------------------------------------------

TRANSFORMS = [
    "autograd",
    "double backward",
    "forward AD",
    "torch.func.jvp / jacfwd",
    "torch.func.grad / vjp / jacrev",
    "torch.func.hessian",
    "jacfwd(jacfwd)",
    "vmap",
    "vmap(grad)",
    "torch.compile(fullgraph)",
    "torch.export",
    "autocast",
]
PUBLIC = [
    "soft_threshold",
    "rank_scale",
    "rank_aware_grad_scale",
    "rsvd",
    "lowrank",
    "lowrank_sparse (unrolled)",
    "lowrank_sparse (rpca)",
]
DERIVATIVES = TRANSFORMS[:7] + ["vmap(grad)"]
SUPPORT = {op: {t: "yes" for t in TRANSFORMS} for op in PUBLIC}
SUPPORT["rsvd"]["double backward"] = "S only; U, V raise"
SUPPORT["rsvd"]["torch.func.hessian"] = "S only; U, V raise"
SUPPORT["lowrank"]["double backward"] = "yes (of its documented first derivative)"
SUPPORT["lowrank"]["torch.func.hessian"] = "yes (of its documented first derivative)"
# pytorch#197867: a custom jvp gets its saved inputs without the outer tangent; where that
# matters the op raises (soft_threshold's jvp uses its inputs only through the mask: exact)
for op in ("rank_scale", "rank_aware_grad_scale", "rsvd", "lowrank", "lowrank_sparse (unrolled)"):
    SUPPORT[op]["jacfwd(jacfwd)"] = "raises (pytorch#197867)"
for t in DERIVATIVES:
    SUPPORT["lowrank_sparse (rpca)"][t] = "raises (not differentiable)"
SUPPORT["rank_aware_grad_scale"]["autocast"] = "yes; CPU: x float32/64 only"
SUPPORT["lowrank_sparse (rpca)"]["vmap"] = "yes"


def works_with_table() -> str:
    head = "| op | " + " | ".join(TRANSFORMS) + " |"
    rule = "|---" * (len(TRANSFORMS) + 1) + "|"
    rows = [f"| `{op}` | " + " | ".join(SUPPORT[op][t] for t in TRANSFORMS) + " |" for op in PUBLIC]
    return "\n".join([head, rule, *rows])


def test_readme_works_with_table_is_this_one():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- works-with:begin -->")[1].split("<!-- works-with:end -->")[0]
    assert block.strip() == works_with_table()


# --- reverse mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,args", cases())
def test_autograd(name, args):
    e = ENTRIES[name]
    args = req(args)
    if e.fd:
        assert torch.autograd.gradcheck(e.fn, args)
    out = e.fn(*args)
    w = weights(out)
    got = torch.autograd.grad(tree_flatten(out)[0], args, w, allow_unused=True)
    ref_args = req(args)
    ref_out = e.ref(*ref_args)
    want = torch.autograd.grad(tree_flatten(ref_out)[0], ref_args, w, allow_unused=True)
    for g, r in zip(got, want):
        if r is None:
            assert g is None or not g.abs().max() > 0
        else:
            close(g, r)


@pytest.mark.parametrize("name,args", cases("second_samples"))
def test_double_backward(name, args):
    e = ENTRIES[name]
    fn = e.second or e.fn
    args = req(args)
    if e.fd:
        assert torch.autograd.gradgradcheck(fn, args)
    # Hessian-vector product of a scalar loss against the reference's
    loss, ref_loss = scalar(fn), scalar(e.ref if e.second is None else _second_ref(name))
    v = weights(args, 12)
    _, got = torch.autograd.functional.hvp(loss, tuple(a.detach() for a in args), tuple(v))
    _, want = torch.autograd.functional.hvp(ref_loss, tuple(a.detach() for a in args), tuple(v))
    close(got, want, rtol=1e-6, atol=1e-8)


def _second_ref(name):
    if name == "rsvd":
        return lambda A: lsef_ref.rsvd(A, 3 if A.shape[-1] == 7 else 2, 8)[1]
    return lambda A: lsef_ref.lowrank(A, 3, 8)


@pytest.mark.parametrize("name,args", cases())
def test_func_grad_vjp_jacrev(name, args):
    e = ENTRIES[name]
    loss, ref_loss = scalar(e.fn), scalar(e.ref)
    argnums = tuple(range(len(args)))
    close(grad(loss, argnums)(*args), grad(ref_loss, argnums)(*args))
    out, pull = vjp(e.fn, *args)
    ref_out, ref_pull = vjp(e.ref, *args)
    w = weights(out)
    close(
        pull(type(out)(w) if isinstance(out, tuple) else w[0]),
        ref_pull(type(ref_out)(w) if isinstance(ref_out, tuple) else w[0]),
    )
    close(jacrev(e.fn, argnums)(*args), jacrev(e.ref, argnums)(*args))


# --- forward mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,args", cases())
def test_forward_ad(name, args):
    e = ENTRIES[name]
    if e.fd:
        assert torch.autograd.gradcheck(
            e.fn,
            req(args),
            check_forward_ad=True,
            check_backward_ad=False,
            check_undefined_grad=False,
        )
    tangents = weights(args, 13)
    with fwAD.dual_level():
        out = e.fn(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)))
        got = [fwAD.unpack_dual(o).tangent for o in tree_flatten(out)[0]]
    _, want = jvp(e.ref, tuple(args), tuple(tangents))
    close(got, tree_flatten(want)[0])


@pytest.mark.parametrize("name,args", cases())
def test_func_jvp_jacfwd(name, args):
    e = ENTRIES[name]
    tangents = tuple(weights(args, 14))
    close(jvp(e.fn, tuple(args), tangents)[1], jvp(e.ref, tuple(args), tangents)[1])
    argnums = tuple(range(len(args)))
    fwd = jacfwd(e.fn, argnums)(*args)
    close(fwd, jacrev(e.fn, argnums)(*args))
    close(fwd, jacfwd(e.ref, argnums)(*args))


@pytest.mark.parametrize("name,args", cases("second_samples"))
def test_func_hessian(name, args):
    """torch.func.hessian (forward over reverse) and jacfwd(jacfwd) (forward over forward,
    pytorch#197867's nesting) against the reference."""
    e = ENTRIES[name]
    fn = e.second or e.fn
    ref = e.ref if e.second is None else _second_ref(name)
    loss, ref_loss = scalar(fn), scalar(ref)
    x = tuple(a.detach() for a in args)
    argnums = tuple(range(len(x)))
    want = hessian(ref_loss, argnums)(*x)
    close(hessian(loss, argnums)(*x), want, rtol=1e-6, atol=1e-8)
    close(jacrev(jacfwd(loss, argnums), argnums)(*x), want, rtol=1e-6, atol=1e-8)
    if SUPPORT[name.split(" (hard)")[0]]["jacfwd(jacfwd)"] == "yes":
        close(jacfwd(jacfwd(loss, argnums), argnums)(*x), want, rtol=1e-6, atol=1e-8)
    else:
        with pytest.raises(RuntimeError, match="forward mode over forward mode"):
            jacfwd(jacfwd(loss, argnums), argnums)(*x)


def test_second_derivative_refusals():
    """rsvd's U and V have no second derivative: every way of asking raises, naming the op."""
    A = rank_k((2, 5, 7), 3, 4)
    loss = lambda A: ops.rsvd(A, 3, 8)[0].pow(3).sum() + ops.rsvd(A, 3, 8)[2].pow(3).sum()  # noqa: E731
    match = r"rsvd: no second derivative through the singular vectors U, V"
    with pytest.raises(RuntimeError, match=match):
        hessian(loss)(A)
    with pytest.raises(RuntimeError, match=match):
        jacrev(jacrev(loss))(A)
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.functional.hvp(loss, A, torch.ones_like(A))
    Ar = A.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(Ar), Ar, create_graph=True)  # the first derivative is fine
    with pytest.raises(RuntimeError, match=match):
        g.sum().backward()


def test_rpca_refuses_every_derivative():
    X = rank_k((2, 6, 7), 2, 10) + 0.01
    match = r"lowrank_sparse\(method='rpca'\) is not differentiable, but X asks for"
    f = lambda X: ops.lowrank_sparse(X, 2)[0].sum()  # noqa: E731
    for transform in (grad, jacrev, jacfwd, hessian, lambda f: vmap(grad(f))):
        with pytest.raises(RuntimeError, match=match):
            transform(f)(X)
    with pytest.raises(RuntimeError, match=match):
        jvp(f, (X,), (X,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=match):
        f(fwAD.make_dual(X, X))
    with pytest.raises(RuntimeError, match=match):
        f(X.clone().requires_grad_())


def test_raw_ops_refuse_forward_mode():
    """torch.ops.lsef.* called directly cannot reach their Function under forward mode or
    torch.func (pytorch#168393): they raise, naming the Python function that works."""
    X = torch.randn(3, 4, dtype=D)
    lam = torch.tensor(0.1, dtype=D)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=r"call lsef_ext.ops.soft_threshold"):
        torch.ops.lsef.soft_threshold.default(fwAD.make_dual(X, X), None, lam, False)
    with pytest.raises(RuntimeError, match=r"call lsef_ext.ops.rsvd"):
        grad(lambda A: torch.ops.lsef.rsvd.default(A, 2, 8, 2, 0)[1].sum())(X)


# --- vmap ------------------------------------------------------------------------------------


def _stack(args, n=3):
    """Each argument stacked n times, scaled a little differently so that samples differ."""
    return [torch.stack([a * (1 + 0.01 * i) for i in range(n)]) for a in args]


@pytest.mark.parametrize("name,args", cases())
def test_vmap(name, args):
    e = ENTRIES[name]
    batched = _stack(args)
    got = vmap(e.fn)(*batched)
    loop = [e.fn(*(b[i] for b in batched)) for i in range(3)]
    flat = tree_flatten(got)[0]
    for j, g in enumerate(flat):
        close(g, torch.stack([tree_flatten(o)[0][j] for o in loop]))
    close(got, vmap(e.ref)(*batched))
    if len(args) > 1:  # one argument batched, the others shared
        got = vmap(e.fn, in_dims=(0,) + (None,) * (len(args) - 1))(batched[0], *args[1:])
        want = [e.fn(batched[0][i], *args[1:]) for i in range(3)]
        for j, g in enumerate(tree_flatten(got)[0]):
            close(g, torch.stack([tree_flatten(o)[0][j] for o in want]))


@pytest.mark.parametrize("per_sample", [(), (1,), (2,)], ids=["scalar", "one", "per-matrix"])
def test_vmap_rank_scale_coefficients(per_sample):
    """rank_scale's batching rule for a vmapped alpha of each allowed per-sample shape, with a
    shared 2-D U over per-sample batches of matrices."""
    g = gen(16)
    G = torch.randn(3, 2, 5, 4, generator=g, dtype=D)
    U = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=D))[0]
    alpha = torch.rand(3, *per_sample, generator=g, dtype=D)
    got = vmap(lambda Gi, ai: ops.rank_scale(Gi, U, ai, 0.5))(G, alpha)
    beta = torch.tensor(0.5, dtype=D)
    coef = [alpha[i] if per_sample == (2,) else alpha[i].reshape(()) for i in range(3)]
    want = torch.stack([lsef_ref.rank_scale(G[i], U, coef[i], beta) for i in range(3)])
    close(got, want)


def test_vmap_rpca():
    X = torch.stack([rank_k((6, 7), 2, s) for s in range(3)])
    X[:, 1, 2] += 5.0
    got = vmap(lambda x: ops.lowrank_sparse(x, 2))(X)
    want = ops.lowrank_sparse(X, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,args", cases())
def test_vmap_grad(name, args):
    """Per-sample gradients: vmap(grad) over a batch equals grad of each sample."""
    e = ENTRIES[name]
    loss = scalar(e.fn)
    batched = _stack(args)
    argnums = tuple(range(len(args)))
    got = vmap(grad(loss, argnums))(*batched)
    for i in range(3):
        close(tuple(g[i] for g in got), grad(loss, argnums)(*(b[i] for b in batched)))


# --- compile and export ----------------------------------------------------------------------


COMPILE_CASES = [pytest.param(n, next(iter(ENTRIES[n].samples())), id=n) for n in ENTRY_IDS]


@pytest.mark.parametrize("name,args", COMPILE_CASES)
def test_compile_fullgraph(name, args):
    """torch.compile(fullgraph=True) with inductor: the forward and the gradients equal eager."""
    torch._dynamo.reset()
    e = ENTRIES[name]
    compiled = torch.compile(e.fn, fullgraph=True, backend="inductor")
    close(compiled(*args), e.fn(*args), rtol=1e-6, atol=1e-9)
    a1, a2 = req(args), req(args)
    w = weights(e.fn(*args))
    g1 = torch.autograd.grad(tree_flatten(compiled(*a1))[0], a1, w, allow_unused=True)
    g2 = torch.autograd.grad(tree_flatten(e.fn(*a2))[0], a2, w, allow_unused=True)
    for x, y in zip(g1, g2):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    # Forward mode through the compiled function raises: Dynamo would drop the custom jvp
    # (pytorch#192985) and give wrong tangents in silence. torch 2.13 reaches the op's own
    # refusal; torch >= 2.14's Dynamo refuses a dual input itself, first.
    refusal = "forward-mode AD inside torch.compile|carry a forward-mode AD tangent"
    with fwAD.dual_level(), pytest.raises(Exception, match=refusal):
        compiled(*(fwAD.make_dual(a, t) for a, t in zip(args, weights(args, 15))))


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize(
    "name,args",
    COMPILE_CASES + [pytest.param("rpca", (rank_k((2, 6, 7), 2, 10),), id="lowrank_sparse (rpca)")],
)
def test_export(name, args):
    fn = (lambda X: ops.lowrank_sparse(X, 2)) if name == "rpca" else ENTRIES[name].fn
    ep = torch.export.export(_Wrap(fn), tuple(args))
    close(ep.module()(*args), fn(*args), rtol=0, atol=0)


def test_compile_rpca_fullgraph():
    X = rank_k((2, 6, 7), 2, 10)
    fn = lambda X: ops.lowrank_sparse(X, 2, n_steps=5)  # noqa: E731
    close(torch.compile(fn, fullgraph=True, backend="aot_eager")(X), fn(X), rtol=0, atol=1e-12)


# --- autocast --------------------------------------------------------------------------------

AUTOCAST_DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
@pytest.mark.parametrize("name", ENTRY_IDS)
def test_autocast_computes_in_float32(device, name):
    """Under autocast (bfloat16) every op takes the dtype mix autocast produces (here: the
    first input in bfloat16, the others float32) and computes in float32: the result equals the
    float32 call on the same (rounded) inputs, and gradients reach the inputs in their dtypes."""
    e = ENTRIES[name]
    args = [a.float().to(device) for a in next(iter(e.samples()))]
    args[0] = args[0].to(torch.bfloat16)
    if name == "rank_aware_grad_scale" and device == "cpu":
        # Its gradient would reach rank_scale in bfloat16, which the CPU kernel lacks: refused
        # at the call (it is the identity in value; nothing in lsef_ext.nn calls it).
        with (
            torch.autocast(device, dtype=torch.bfloat16),
            pytest.raises(RuntimeError, match="x must be float32 or float64 on the CPU"),
        ):
            e.fn(*args)
        return
    want = e.fn(*[a.float() for a in args])
    leaves = [a.detach().clone().requires_grad_() for a in args]
    with torch.autocast(device, dtype=torch.bfloat16):
        got = e.fn(*leaves)
    for g, w in zip(tree_flatten(got)[0], tree_flatten(want)[0]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    loss = sum(o.float().sum() for o in tree_flatten(got)[0])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for leaf, g in zip(leaves, grads):
        assert g is None or g.dtype == leaf.dtype


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
def test_autocast_rpca_and_the_lsef_model(device):
    from lsef_ext.nn import LSEF

    X = torch.randn(4, 16, 24, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        L, S = ops.lowrank_sparse(X.to(torch.bfloat16), 3)
        assert L.dtype == S.dtype == torch.float32
        model = LSEF(d_in=24, num_classes=3).to(device)
        out = model(X)
        loss = torch.nn.functional.cross_entropy(
            out.pred.float(), torch.tensor([0, 1, 2, 0], device=device)
        )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
