"""Mixed precision training (TrainConfig.amp, lsef train --amp): bf16 autocast on the CPU and
CUDA, fp16 with a GradScaler on CUDA only (issue 31, item 3). Tiny runs: one thread, a few
dozen clips, a narrow model."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from lsef_ext.nn import build_model
from lsef_ext.train import (
    AMP_DTYPES,
    RunError,
    TrainConfig,
    Trainer,
    amp_autocast,
    evaluate_conditions,
    load_data,
    load_test_sets,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (torch.cuda.is_available())")

# LSEF (the default model, SEM's robust PCA included) and the two baselines
MODELS = ("lsef", "meanpool-mlp", "transformer")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> TrainConfig:
    base = dict(n_train=64, n_test=32, batch_size=16, d_model=16, epochs=3, lr=4e-3)
    base.update(kw)
    return TrainConfig(**base)


def trainer(cfg: TrainConfig) -> Trainer:
    return Trainer(cfg, load_data(cfg, "train"), val=load_data(cfg, "val"), progress=False)


def assert_trains(tr: Trainer) -> None:
    history = tr.fit()
    losses = [row["loss"] for row in history]
    assert len(losses) == tr.cfg.epochs and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert all(math.isfinite(row["val_loss"]) for row in history)
    for name, p in tr.net.named_parameters():  # autocast casts copies; the weights stay float32
        assert p.dtype == torch.float32, name
        assert p.grad is None or p.grad.dtype == torch.float32, name
    for state in tr._inner.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if v.dim()), state.keys()


@pytest.mark.parametrize("model", MODELS)
def test_bf16_trains_on_the_cpu(model):
    assert_trains(trainer(tiny(model=model, amp="bf16")))


def test_bf16_regression_and_class_weights_keep_the_loss_in_float32():
    cfg = tiny(model="meanpool-mlp", amp="bf16", task="regression")
    assert_trains(trainer(cfg))
    tr = trainer(tiny(model="meanpool-mlp", amp="bf16", class_weights="balanced", epochs=1))
    pred, t = torch.randn(16, 7).bfloat16(), tr.t[:16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tr.task_loss(pred, t)
    want = torch.nn.functional.cross_entropy(pred.float(), t, weight=tr.loss_weight)
    assert loss.dtype == torch.float32 and torch.equal(loss, want)


def test_bf16_with_rao_trains_on_the_cpu():
    assert_trains(trainer(tiny(model="lsef", amp="bf16", rao=True)))


@pytest.mark.parametrize("model", MODELS)
def test_forward_under_autocast(model):
    torch.manual_seed(0)
    net = build_model(model, 24, 7, d_model=16)
    x = torch.randn(3, 8, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    pred = getattr(out, "pred", out)
    assert pred.shape == (3, 7) and pred.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(pred.float()).all()
    if model == "lsef":  # the lsef ops compute in float32 under autocast
        assert out.L.dtype == out.S.dtype == torch.float32
        # recon and sparsity come from X, L and S; agreement from CIM's (autocast) summaries
        assert out.terms["recon"].dtype == out.terms["sparsity"].dtype == torch.float32
        assert torch.isfinite(out.L).all() and torch.isfinite(out.S).all()
        assert net.regulariser(out).dtype == torch.float32
        with torch.no_grad():
            ref = net(x)
        assert (out.L - ref.L).abs().max() < 1e-3 * (1 + ref.L.abs().max())
    with amp_autocast("cpu", None):  # amp=None: no autocast
        assert getattr(net(x), "pred", net(x)).dtype == torch.float32


def test_evaluation_runs_under_autocast_too():
    cfg = tiny(model="meanpool-mlp", amp="bf16", epochs=1, n_test=16)
    net = build_model("meanpool-mlp", cfg.D, 7, d_model=16)
    sets = load_test_sets(cfg, ("clean",))
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    evaluate_conditions(net, cfg, ("clean",), sets)
    evaluate_conditions(net, dataclasses.replace(cfg, amp=None), ("clean",), sets)
    assert seen == [True, False]


def test_fp16_and_unknown_amp_are_refused_on_the_cpu():
    with pytest.raises(ValueError, match=r"amp='fp16' \(--amp fp16\) needs a CUDA device"):
        trainer(tiny(model="meanpool-mlp", amp="fp16"))
    with pytest.raises(ValueError, match="amp must be None, 'bf16' or 'fp16', got 'fp32'"):
        trainer(tiny(model="meanpool-mlp", amp="fp32"))
    assert set(AMP_DTYPES) == {"bf16", "fp16"}


def test_resume_keeps_amp(tmp_path):
    cfg = tiny(model="meanpool-mlp", amp="bf16", epochs=1, out=str(tmp_path))
    trainer(cfg).fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"]["amp"] == "bf16" and state["scaler"] is None
    more = dataclasses.replace(cfg, epochs=2, resume=True)
    tr = trainer(more)
    assert tr.resumed and tr.epoch == 1 and tr.cfg.amp == "bf16"
    assert len(tr.fit()) == 2
    with pytest.raises(RunError, match=r"amp='bf16'; this run has .*amp=None.*--accept-changes"):
        trainer(dataclasses.replace(more, amp=None, epochs=3))
    tr = trainer(dataclasses.replace(more, amp=None, epochs=3, accept_changes=True))
    assert tr.resumed and len(tr.fit()) == 3
    # A checkpoint written before TrainConfig had amp was trained in float32.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["amp"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match=r"amp=None; this run has amp='bf16'"):
        trainer(dataclasses.replace(more, epochs=4))
    assert trainer(dataclasses.replace(more, amp=None, epochs=4)).resumed


def test_grad_scaler_step_with_rao_skips_an_overflow():
    """The fp16 step path (scale, unscale_ through RAO, step, update), with a CPU GradScaler
    standing in for the CUDA one: a gradient that overflowed skips the whole step, RAO's scaling
    included (no RAO warning, its state untouched), and backs the scale off; the next step
    trains."""
    tr = trainer(tiny(model="lsef", amp="bf16", rao=True, epochs=1))
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    weight = next(p for p in tr.net.parameters() if p.dim() == 2 and min(p.shape) >= 8)
    overflow = weight.register_hook(lambda g: g * float("inf"))  # as an fp16 overflow would
    before = [p.detach().clone() for p in tr.net.parameters()]
    x, t = tr.x[:16], tr.t[:16]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # RAO warns on non-finite gradients
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        assert math.isfinite(tr.train_step(x, t))  # the loss is reported unscaled
    assert all(torch.equal(a, p) for a, p in zip(before, tr.net.parameters()))  # step skipped
    assert tr.opt._step == 0 and tr.opt.nonfinite_skips == 0 and not tr.opt._rao
    assert tr.scaler.get_scale() == 2.0**15
    overflow.remove()
    tr.train_step(x, t)
    assert tr.opt._step == 1 and tr.opt._rao
    assert not all(torch.equal(a, p) for a, p in zip(before, tr.net.parameters()))
    assert tr.scaler.get_scale() == 2.0**15  # growth only after growth_interval good steps


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("model", MODELS)
def test_bf16_trains_on_cuda(model):
    assert_trains(trainer(tiny(model=model, amp="bf16", device="cuda")))


@needs_cuda
@pytest.mark.parametrize("model", MODELS)
def test_fp16_with_grad_scaler_trains_on_cuda(model):
    tr = trainer(tiny(model=model, amp="fp16", device="cuda", rao=model == "lsef"))
    assert isinstance(tr.scaler, torch.amp.GradScaler) and tr.scaler.is_enabled()
    assert_trains(tr)


@needs_cuda
def test_fp16_resume_continues_the_grad_scaler(tmp_path):
    cfg = tiny(model="lsef", amp="fp16", device="cuda", epochs=1, out=str(tmp_path))
    tr = trainer(cfg)
    tr.fit()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert saved["scale"] == tr.scaler.get_scale()
    again = trainer(dataclasses.replace(cfg, epochs=2, resume=True))
    assert again.scaler.get_scale() == saved["scale"]
    assert again.scaler.state_dict()["_growth_tracker"] == saved["_growth_tracker"]
    assert len(again.fit()) == 2
