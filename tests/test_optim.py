"""RAO (lsef_ext.optim): the rank-aware gradient scaling rule, its state, and its use as an
optimizer."""

import copy
import math

import pytest
import torch

from lsef_ext.optim import RAO

M, N, R_TRUE = 32, 24, 3


def toy_problem(seed=0, dtype=torch.float64):
    """Least squares ``min_W ||A W - B||^2`` with a rank-3 solution, sampled in minibatches."""
    g = torch.Generator().manual_seed(seed)
    W_true = torch.randn(M, R_TRUE, generator=g, dtype=dtype) @ torch.randn(
        R_TRUE, N, generator=g, dtype=dtype
    )
    A = torch.randn(512, M, generator=g, dtype=dtype)
    Bm = A @ W_true + 0.1 * torch.randn(512, N, generator=g, dtype=dtype)
    return A, Bm


def full_loss(W, A, Bm):
    with torch.no_grad():
        return float((A @ W - Bm).pow(2).mean())


def run(opt_factory, steps=150, seed=0, wrap=None, dtype=torch.float64, batch=16):
    A, Bm = toy_problem(dtype=dtype)
    W = torch.nn.Parameter(torch.zeros(M, N, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(N, dtype=dtype))  # a vector: RAO leaves it alone
    opt = opt_factory([W, b])
    if wrap is not None:
        opt = wrap(opt)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, A.shape[0], (batch,), generator=g)
        loss = (A[idx] @ W + b - Bm[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(full_loss(W, A, Bm))
    return W.detach(), losses, opt


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.5)


def test_rao_converges_like_plain_optimizer():
    _, plain, _ = run(sgd)
    _, rao, opt = run(sgd, wrap=lambda o: RAO(o, rank=4, update_every=5))
    A, Bm = toy_problem()
    start = full_loss(torch.zeros(M, N, dtype=torch.float64), A, Bm)
    assert rao[-1] < 0.05 * start  # it optimises
    assert rao[-1] < 3 * plain[-1]  # and is not much worse than the plain one
    assert sum(rao[-20:]) / 20 < sum(rao[20:40]) / 20  # still decreasing late on average
    # the stable subspace of this rank-3 problem explains most of the gradient, so RAO is active
    st = [s for s in opt.stats() if s["shape"] == (M, N)][0]
    assert st["rho"] > 0.3 and st["beta"] < 1 and st["alpha"] > 1


def test_strength_zero_is_the_plain_optimizer():
    W0, plain, _ = run(sgd, steps=40)
    W1, rao, opt = run(sgd, steps=40, wrap=lambda o: RAO(o, rank=4, update_every=3, strength=0.0))
    torch.testing.assert_close(W1, W0, rtol=0, atol=1e-12)
    assert max(abs(a - b) for a, b in zip(plain, rao)) < 1e-12
    for s in opt.stats():
        assert s["beta"] == 1.0 and s["alpha"] == pytest.approx(1.0, abs=1e-12)


def test_vectors_and_small_matrices_pass_through():
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(16, 12, dtype=torch.float64))
    small = torch.nn.Parameter(torch.randn(4, 12, dtype=torch.float64))  # min side 4 < min_size 8
    vec = torch.nn.Parameter(torch.randn(16, dtype=torch.float64))
    opt = RAO(torch.optim.SGD([big, small, vec], lr=0.1), rank=2, update_every=1)
    for p in (big, small, vec):
        p.grad = torch.randn_like(p)
    grads = {id(p): p.grad.clone() for p in (big, small, vec)}
    opt.scale_gradients()
    assert torch.equal(small.grad, grads[id(small)])
    assert torch.equal(vec.grad, grads[id(vec)])
    assert [s["shape"] for s in opt.stats()] == [(16, 12)]


def test_scale_gradients_rule_against_direct_computation():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(M, N, dtype=torch.float64))
    conv = torch.nn.Parameter(torch.randn(10, 4, 3, dtype=torch.float64))  # read as (10, 12)
    opt = RAO(
        torch.optim.SGD([W, conv], lr=0.1), rank=3, update_every=2, momentum=0.8, strength=0.6
    )
    basis = torch.linalg.qr(torch.randn(M, 3, dtype=torch.float64))[0]
    for step in range(5):
        # gradients mostly in a fixed 3-D subspace, so rho is large and the rule is visible
        G = basis @ torch.randn(3, N, dtype=torch.float64) + 0.3 * torch.randn(
            M, N, dtype=torch.float64
        )
        Gc = torch.randn(10, 4, 3, dtype=torch.float64)
        W.grad, conv.grad = G.clone(), Gc.clone()
        rho_before = {p: opt._rao[p]["rho"] if p in opt._rao else 0.0 for p in (W, conv)}
        opt.scale_gradients()
        for p, G0 in ((W, G), (conv, Gc.reshape(10, 12))):
            st = opt._rao[p]
            U, alpha, beta = st["U"], st["alpha"], st["beta"]
            assert U.shape == (p.shape[0], 3)
            torch.testing.assert_close(
                U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0
            )
            expect = beta * G0 + (alpha - beta) * U @ (U.T @ G0)
            torch.testing.assert_close(
                p.grad.reshape(p.shape[0], -1), expect, rtol=1e-12, atol=1e-12
            )
            # the statistics follow the documented formulas
            rho = float((U.T @ G0).pow(2).sum() / G0.pow(2).sum())
            r_bar = 0.8 * rho_before[p] + 0.2 * rho
            assert st["rho"] == pytest.approx(r_bar, rel=1e-12)
            assert beta == pytest.approx(1 - 0.6 * r_bar, rel=1e-12)
            assert alpha == pytest.approx(
                min(math.sqrt((1 - beta**2 * (1 - r_bar)) / r_bar), 2.0), rel=1e-12
            )
        opt._step += 1  # what step() does between two scalings
    # U spans the planted subspace (it is the top subspace of the gradient average)
    U = opt._rao[W]["U"]
    assert torch.linalg.svdvals(basis.T @ U).min() > 0.9


def test_u_refreshed_every_update_every_steps():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(M, N, dtype=torch.float64))
    opt = RAO(torch.optim.SGD([W], lr=0.01), rank=2, update_every=3)
    Us = []
    for _ in range(7):
        W.grad = torch.randn(M, N, dtype=torch.float64)
        opt.step()
        Us.append(opt._rao[W]["U"].clone())
    changed = [not torch.equal(Us[i], Us[i - 1]) for i in range(1, 7)]
    # recomputed at steps 0, 3, 6
    assert changed == [False, False, True, False, False, True]


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.9])
def test_alpha_beta_bounds(strength):
    alpha_max = 1.7
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(M, N, dtype=torch.float64))
    opt = RAO(
        torch.optim.SGD([W], lr=0.01),
        rank=3,
        update_every=1,
        strength=strength,
        alpha_max=alpha_max,
    )
    basis = torch.linalg.qr(torch.randn(M, 2, dtype=torch.float64))[0]
    for i in range(30):
        # alternate nearly-rank-2 and pure-noise gradients to sweep rho
        G = (
            basis @ torch.randn(2, N, dtype=torch.float64)
            if i < 15
            else torch.randn(M, N, dtype=torch.float64)
        )
        W.grad = G
        opt.step()
        for s in opt.stats():
            assert 1 - strength - 1e-12 <= s["beta"] <= 1.0
            assert 1.0 - 1e-12 <= s["alpha"] <= alpha_max
            assert 0.0 <= s["rho"] <= 1.0 + 1e-12


def test_state_dict_round_trip_gives_identical_steps():
    A, Bm = toy_problem()

    def make():
        W = torch.nn.Parameter(torch.zeros(M, N, dtype=torch.float64))
        return W, RAO(torch.optim.Adam([W], lr=0.01), rank=3, update_every=4)

    def steps(W, opt, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            idx = torch.randint(0, 512, (16,), generator=g)
            loss = (A[idx] @ W - Bm[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    W1, o1 = make()
    steps(W1, o1, 10, seed=1)
    sd = copy.deepcopy(o1.state_dict())
    assert sd["step"] == 10 and set(sd) == {"optimizer", "rao", "step"}
    W2, o2 = make()
    with torch.no_grad():
        W2.copy_(W1)
    o2.load_state_dict(sd)
    W2_start = W2.detach().clone()
    steps(W1, o1, 7, seed=2)
    steps(W2, o2, 7, seed=2)
    assert torch.equal(W1, W2)
    assert o1.stats() == o2.stats()
    # a fresh RAO without the RAO state (inner state only) takes different steps
    W3, o3 = make()
    with torch.no_grad():
        W3.copy_(W2_start)
    o3.optimizer.load_state_dict(sd["optimizer"])
    steps(W3, o3, 7, seed=2)
    assert not torch.equal(W3, W1)
    with pytest.raises(ValueError, match="expected a state dict saved by RAO.state_dict"):
        o3.load_state_dict(o3.optimizer.state_dict())


def test_state_dict_survives_torch_save(tmp_path):
    W = torch.nn.Parameter(torch.randn(M, N, dtype=torch.float64))
    opt = RAO(torch.optim.SGD([W], lr=0.01), rank=2, update_every=1)
    W.grad = torch.randn_like(W)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "rao.pt")
    sd = torch.load(tmp_path / "rao.pt", weights_only=False)
    opt2 = RAO(torch.optim.SGD([W], lr=0.01), rank=2, update_every=1)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2._rao[W]["U"], opt._rao[W]["U"])
    assert opt2._step == 1


def test_lr_scheduler_on_rao_changes_inner_lr():
    W = torch.nn.Parameter(torch.randn(M, N))
    inner = torch.optim.SGD([W], lr=0.1)
    opt = RAO(inner, rank=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        W.grad = torch.randn_like(W)
        opt.step()
        sched.step()
        lrs.append(inner.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])
    # the step taken uses the scheduled lr: with strength 0 the update is exactly -lr * grad
    opt0 = RAO(torch.optim.SGD([W], lr=0.1), rank=2, strength=0.0)
    sched0 = torch.optim.lr_scheduler.StepLR(opt0, step_size=1, gamma=0.1)
    W.grad = torch.zeros_like(W)
    opt0.step()
    sched0.step()
    before = W.detach().clone()
    W.grad = torch.ones_like(W)
    opt0.step()
    torch.testing.assert_close(W.detach(), before - 0.01, rtol=0, atol=1e-6)


def test_ext_and_ref_updates_close():
    W_ext, l_ext, _ = run(sgd, steps=30, wrap=lambda o: RAO(o, rank=4, update_every=5, ops="ext"))
    W_ref, l_ref, _ = run(sgd, steps=30, wrap=lambda o: RAO(o, rank=4, update_every=5, ops="ref"))
    torch.testing.assert_close(W_ext, W_ref, rtol=1e-8, atol=1e-8)


def test_float32_training_with_adamw():
    def adamw(p):
        return torch.optim.AdamW(p, lr=0.05)

    _, plain, _ = run(adamw, steps=300, dtype=torch.float32)
    _, losses, _ = run(
        adamw, steps=300, dtype=torch.float32, wrap=lambda o: RAO(o, rank=4, update_every=5)
    )
    assert losses[-1] < 0.01 * losses[0]
    assert losses[-1] < 2 * plain[-1]


def test_closure_and_zero_grad():
    W = torch.nn.Parameter(torch.ones(M, N))
    opt = RAO(torch.optim.SGD([W], lr=0.1), rank=2)

    def closure():
        opt.zero_grad()
        loss = W.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == M * N
    assert float(W.detach().abs().max()) < 1.0
    opt.zero_grad()
    assert W.grad is None


def test_bad_arguments():
    W = torch.nn.Parameter(torch.randn(M, N))
    inner = torch.optim.SGD([W], lr=0.1)
    with pytest.raises(TypeError, match="RAO: optimizer must be a torch.optim.Optimizer, got list"):
        RAO([W])
    for kw, msg in [
        ({"rank": 0}, "rank must be >= 1, got 0"),
        ({"update_every": 0}, "update_every must be >= 1, got 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\), got -0.1"),
        ({"strength": 1.0}, r"strength must be in \[0, 1\), got 1.0"),
        ({"alpha_max": 0.5}, "alpha_max must be >= 1, got 0.5"),
        ({"ops": "gpu"}, "ops must be 'ext' or 'ref'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            RAO(inner, **kw)


def test_sparse_gradient_rejected():
    W = torch.nn.Parameter(torch.randn(M, N))
    opt = RAO(torch.optim.SGD([W], lr=0.1), rank=2)
    W.grad = torch.randn(M, N).to_sparse()
    with pytest.raises(RuntimeError, match="RAO: sparse gradients are not supported"):
        opt.step()


def test_scheduler_on_rao_still_works_after_load_state_dict():
    W = torch.nn.Parameter(torch.randn(M, N))
    inner = torch.optim.SGD([W], lr=0.1)
    opt = RAO(inner, rank=2)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    W.grad = torch.randn_like(W)
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)


def test_nonfinite_gradient_leaves_state_untouched_and_warns():
    """A NaN or Inf gradient is passed on unscaled, RAO's moving average and statistics stay as
    they were, and a warning says so; the next finite gradient is scaled as if it had not
    happened."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(M, N, dtype=torch.float64))
    opt = RAO(torch.optim.SGD([W], lr=0.0), update_every=2)
    grads = [torch.randn(M, N, dtype=torch.float64) for _ in range(3)]
    for G in grads[:2]:
        W.grad = G.clone()
        opt.step()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt._rao[W].items()}
    for bad in (float("nan"), float("inf")):
        W.grad = grads[2].clone()
        W.grad[3, 4] = bad
        with pytest.warns(
            RuntimeWarning, match=r"RAO: non-finite gradient for a parameter of shape \(32, 24\)"
        ):
            opt.scale_gradients()
        for k, v in opt._rao[W].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before[k]), k
            else:
                assert v == before[k], k
    assert opt.nonfinite_skips == 2
    # The same finite gradient now gives what an optimizer that never saw the bad ones gives.
    W2 = torch.nn.Parameter(W.detach().clone())
    clean = RAO(torch.optim.SGD([W2], lr=0.0), update_every=2)
    for G in grads[:2]:
        W2.grad = G.clone()
        clean.step()
    W.grad, W2.grad = grads[2].clone(), grads[2].clone()
    opt.scale_gradients()
    clean.scale_gradients()
    assert torch.isfinite(W.grad).all()
    assert torch.equal(W.grad, W2.grad)


def test_huge_finite_gradient_is_not_called_non_finite():
    """A finite gradient whose squared norm overflows float32 is not reported as non-finite:
    the moving average takes it, and the gradient passes through unscaled."""
    W = torch.nn.Parameter(torch.zeros(M, N))
    opt = RAO(torch.optim.SGD([W], lr=0.0), update_every=1)
    W.grad = torch.full((M, N), 1e20)
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        opt.scale_gradients()
    assert opt.nonfinite_skips == 0
    assert torch.equal(W.grad, torch.full((M, N), 1e20))
    assert torch.isfinite(opt._rao[W]["M"]).all() and opt._rao[W]["M"].abs().max() > 0


def test_complex_matrix_parameters_are_refused_by_name():
    """A complex matrix failed at the first step ("value cannot be converted to type double
    without overflow"); RAO refuses it when built, naming it and its dtype."""
    W = torch.nn.Parameter(torch.randn(M, N))
    Z = torch.nn.Parameter(torch.randn(M, N, dtype=torch.complex64))
    with pytest.raises(
        TypeError,
        match=r"RAO: parameter param_groups\[0\]\['params'\]\[1\] of shape \(32, 24\) is "
        r"complex \(torch\.complex64\): RAO scales real matrices only",
    ):
        RAO(torch.optim.AdamW([W, Z]))
    # named parameters: the name too
    named = [("w", W), ("z", Z)]
    with pytest.raises(TypeError, match=r"\['params'\]\[1\] \('z'\) of shape .*complex64"):
        RAO(torch.optim.AdamW(named))
    # a group added later is refused as well, and left out of the inner optimizer
    opt = RAO(torch.optim.AdamW([W]))
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] .*complex64"):
        opt.add_param_group({"params": [Z]})
    assert len(opt.param_groups) == 1 and len(opt.optimizer.param_groups) == 1
    # a complex vector passes through unscaled, as every vector does
    v = torch.nn.Parameter(torch.randn(N, dtype=torch.complex128))
    opt = RAO(torch.optim.AdamW([W, v]), rank=2)
    (W.sum() + v.abs().pow(2).sum()).backward()
    opt.step()
