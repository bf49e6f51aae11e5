"""Variable-length clips and regression targets in lsef_ext.nn.

``model(X, lengths)``: padded frames change no output. Each clip's prediction in a padded batch
equals its prediction alone, unpadded (eval mode); what the padded frames hold changes nothing;
the gradient never reaches them. Also ``num_targets``, the number of regression outputs.
"""

import pytest
import torch

from lsef_ext import nn as lnn
from lsef_ext.nn import LSEF, LSEFOutput, MeanPoolMLP, TemporalTransformer, build_model

B, T, D, DM, K, C = 5, 8, 12, 16, 3, 5
NAMES = ("lsef", "lsef-no-sem", "lsef-no-ddm", "lsef-no-cim", "meanpool-mlp", "transformer")
PATTERNS = {
    "all-full": [T] * B,
    "all-short": [5] * B,  # one group, every clip padded
    "mixed": [T, 3, 5, 3, T],  # groups of several clips, the full length among them
    "one-frame": [1, T, 6, 2, 6],
    "none-full": [7, 2, 4, 7, 5],
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
CLASSES = {"LSEF": LSEF, "MeanPoolMLP": MeanPoolMLP, "TemporalTransformer": TemporalTransformer}


def make(name, dtype=torch.float64, task="classification", ops="ext", **kw):
    """A small model by name, in eval mode (dropout off), in ``dtype``."""
    torch.manual_seed(0)
    if name == "meanpool-mlp":
        model = MeanPoolMLP(D, C, hidden=32, task=task, **kw)
    elif name == "transformer":
        model = TemporalTransformer(D, C, d_model=DM, layers=2, heads=4, max_T=T, task=task, **kw)
    elif name == "lsef-ref":  # the pure-PyTorch reference ops
        model = build_model("lsef", D, C, task=task, ops="ref", d_model=DM, rank=K, **kw)
    else:
        model = build_model(name, D, C, task=task, ops=ops, d_model=DM, rank=K, **kw)
    return model.to(dtype).eval()


def clips(lens, dtype=torch.float64, fill=0.0, seed=0):
    """Low-rank + a few spikes + noise, padded after ``lens[i]`` frames with ``fill``."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    X = torch.randn(b, T, 2, generator=g) @ torch.randn(b, 2, D, generator=g) * 2
    X = (
        X
        + (torch.rand(b, T, D, generator=g) < 0.05) * 4.0
        + 0.1 * torch.randn(b, T, D, generator=g)
    )
    X = X.to(dtype)
    for i, n in enumerate(lens):
        X[i, n:] = fill
    return X


def pred_of(out):
    return out.pred if isinstance(out, LSEFOutput) else out


@pytest.fixture
def one_frame_alone(monkeypatch):
    """Lets a model run on a one-frame clip alone (its forward asks for T >= 2; a length of 1
    inside a longer batch is allowed), the reference for a clip of length 1."""
    check = lnn._check_input

    def relaxed(module, X, D, name="X"):
        check(module, X.expand(-1, 2, -1) if X.dim() == 3 and X.shape[1] == 1 else X, D, name)

    monkeypatch.setattr(lnn, "_check_input", relaxed)


# ---------------------------------------------------------------------------------------------
# padded frames change no output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES + ("lsef-ref",))
def test_padded_batch_equals_each_clip_alone(name, dtype, pattern, one_frame_alone):
    lens = PATTERNS[pattern]
    model = make(name, dtype)
    X = clips(lens, dtype)
    with torch.no_grad():
        out = model(X, torch.tensor(lens))
        alone = [model(X[i : i + 1, :n]) for i, n in enumerate(lens)]
    pred = pred_of(out)
    assert pred.shape == (B, C)
    for i, n in enumerate(lens):
        torch.testing.assert_close(pred[i : i + 1], pred_of(alone[i]), **TOL[dtype])
    if not isinstance(out, LSEFOutput):
        return
    # L and S: each clip's own on its valid frames, exactly 0 in the padded ones
    for i, n in enumerate(lens):
        torch.testing.assert_close(out.L[i : i + 1, :n], alone[i].L, **TOL[dtype])
        torch.testing.assert_close(out.S[i : i + 1, :n], alone[i].S, **TOL[dtype])
        assert not out.L[i, n:].any() and not out.S[i, n:].any()
    # the terms: recon and sparsity are means over the valid entries (each clip weighs its
    # length), agreement a mean over clips (each has n_scales x d_model summaries)
    w = torch.tensor(lens, dtype=dtype) / sum(lens)
    for key in ("recon", "sparsity"):
        expect = sum(wi * a.terms[key] for wi, a in zip(w, alone))
        torch.testing.assert_close(out.terms[key], expect, **TOL[dtype])
    assert set(out.terms) == set(alone[0].terms)
    if "agreement" in out.terms:
        expect = sum(a.terms["agreement"] for a in alone) / B
        torch.testing.assert_close(out.terms["agreement"], expect, **TOL[dtype])


@pytest.mark.parametrize("name", NAMES)
def test_equal_lengths_match_the_cropped_batch(name):
    """Every clip padded by the same amount: the model on the cropped batch, terms included."""
    model = make(name)
    X = clips([5] * B)
    out, crop = model(X, torch.full((B,), 5)), model(X[:, :5])
    if isinstance(out, LSEFOutput):
        for key in crop.terms:
            torch.testing.assert_close(out.terms[key], crop.terms[key], **TOL[torch.float64])
        torch.testing.assert_close(out.L[:, :5], crop.L, **TOL[torch.float64])
    torch.testing.assert_close(pred_of(out), pred_of(crop), **TOL[torch.float64])


@pytest.mark.parametrize("name", NAMES)
def test_all_full_lengths_are_bit_identical_to_none(name):
    model = make(name, torch.float32)
    X = clips([T] * B, torch.float32)
    for lengths in (torch.full((B,), T), torch.full((B,), T, dtype=torch.int32)):
        out, ref = model(X, lengths), model(X)
        if isinstance(out, LSEFOutput):
            assert torch.equal(out.L, ref.L) and torch.equal(out.S, ref.S)
            assert out.terms.keys() == ref.terms.keys()
            assert all(torch.equal(out.terms[k], ref.terms[k]) for k in ref.terms)
        assert torch.equal(pred_of(out), pred_of(ref))


def test_lsef_one_pass_per_distinct_length(monkeypatch):
    model = make("lsef")
    calls = []
    full = model._forward_full

    def counted(X):
        calls.append(tuple(X.shape))
        return full(X)

    monkeypatch.setattr(model, "_forward_full", counted)
    model(clips(PATTERNS["mixed"]), torch.tensor(PATTERNS["mixed"]))
    assert sorted(calls) == [(1, 5, D), (2, 3, D), (2, T, D)]
    calls.clear()
    model(clips([T] * B), torch.full((B,), T))
    assert calls == [(B, T, D)]


@pytest.mark.parametrize("fill", ["random", 1e6, float("nan"), float("inf")])
@pytest.mark.parametrize("name", NAMES)
def test_what_padded_frames_hold_changes_nothing(name, fill):
    lens = PATTERNS["one-frame"]
    model = make(name)
    X = clips(lens)
    Y = X.clone()
    for i, n in enumerate(lens):
        Y[i, n:] = torch.randn(T - n, D) * 1e3 if fill == "random" else fill
    lengths = torch.tensor(lens)
    out, out2 = model(X, lengths), model(Y, lengths)
    assert torch.equal(pred_of(out), pred_of(out2))
    if isinstance(out, LSEFOutput):
        assert torch.equal(out.L, out2.L) and torch.equal(out.S, out2.S)
        assert all(torch.equal(out.terms[k], out2.terms[k]) for k in out.terms)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [0.0, 1e6, float("nan")])
@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_reaches_padded_frames(name, fill):
    lens = PATTERNS["mixed"]
    model = make(name, torch.float32).train()
    X = clips(lens, torch.float32, fill=fill).requires_grad_()
    out = model(X, torch.tensor(lens))
    loss = torch.nn.functional.cross_entropy(pred_of(out), torch.arange(B) % C)
    if isinstance(out, LSEFOutput):
        loss = loss + model.regulariser(out) + out.S.square().mean()
    loss.backward()
    assert torch.isfinite(X.grad).all()
    for i, n in enumerate(lens):
        assert not X.grad[i, n:].any(), i
        assert X.grad[i, :n].abs().sum() > 0, i
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


# ---------------------------------------------------------------------------------------------
# edge cases and bad lengths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_with_lengths(name):
    model = make(name)
    X = torch.zeros(0, T, D, dtype=torch.float64)
    out, ref = model(X, torch.zeros(0, dtype=torch.long)), model(X)
    assert pred_of(out).shape == pred_of(ref).shape == (0, C)
    if isinstance(out, LSEFOutput):
        assert out.terms.keys() == ref.terms.keys()
        assert all(out.terms[k] == 0 for k in out.terms)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype(dtype):
    model = make("meanpool-mlp")
    lens = PATTERNS["mixed"]
    X = clips(lens)
    ref = model(X, torch.tensor(lens))
    assert torch.equal(model(X, torch.tensor(lens, dtype=dtype)), ref)


BAD = [
    ([T] * B, TypeError, r"lengths must be an integer tensor of shape \(B,\), got list"),
    (
        torch.full((B,), float(T)),
        TypeError,
        r"lengths must be an integer tensor, got torch.float32",
    ),
    (
        torch.ones(B, dtype=torch.bool),
        TypeError,
        r"lengths must be an integer tensor, got torch.bool",
    ),
    (torch.full((B, 1), T), ValueError, r"lengths must have shape \(B,\) = \(5,\), got \(5, 1\)"),
    (torch.full((B - 1,), T), ValueError, r"lengths must have shape \(B,\) = \(5,\), got \(4,\)"),
    (torch.tensor(T), ValueError, r"lengths must have shape \(B,\) = \(5,\), got \(\)"),
    (torch.tensor([T, 3, 0, 3, T]), ValueError, r"lengths must be in \[1, T\] = \[1, 8\], got 0"),
    (torch.tensor([T, 3, -2, 3, T]), ValueError, r"lengths must be in \[1, T\] = \[1, 8\], got -2"),
    (
        torch.tensor([T, 3, T + 1, 3, 1]),
        ValueError,
        r"lengths must be in \[1, T\] = \[1, 8\], got 9",
    ),
]


@pytest.mark.parametrize("lengths, exc, msg", BAD)
@pytest.mark.parametrize("cls", list(CLASSES))
def test_bad_lengths(cls, lengths, exc, msg):
    model = make({"LSEF": "lsef", "MeanPoolMLP": "meanpool-mlp"}.get(cls, "transformer"))
    with pytest.raises(exc, match=f"^{cls}: {msg}$"):
        model(clips([T] * B), lengths)


# ---------------------------------------------------------------------------------------------
# num_targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_num_targets(name):
    X = clips(PATTERNS["mixed"])
    lengths = torch.tensor(PATTERNS["mixed"])
    for n in (1, 3):
        model = make(name, task="regression", num_targets=n)
        for pred in (pred_of(model(X)), pred_of(model(X, lengths))):
            assert pred.shape == (B, n) and pred.abs().max() <= 1.0
    # the default is 2 (valence, arousal); classification ignores num_targets
    assert pred_of(make(name, task="regression")(X)).shape == (B, 2)
    assert pred_of(make(name, num_targets=3)(X)).shape == (B, C)


@pytest.mark.parametrize(
    "value, exc, msg",
    [
        (0, ValueError, "num_targets must be >= 1, got 0"),
        (2.5, TypeError, "num_targets must be an integer, got float 2.5"),
        (True, TypeError, "num_targets must be an integer, got bool True"),
    ],
)
@pytest.mark.parametrize("cls", list(CLASSES))
def test_bad_num_targets(cls, value, exc, msg):
    with pytest.raises(exc, match=f"^{cls}: {msg}$"):
        CLASSES[cls](D, task="regression", num_targets=value)
    name = {"LSEF": "lsef", "MeanPoolMLP": "meanpool-mlp"}.get(cls, "transformer")
    with pytest.raises(exc, match=f"^{cls}: {msg}$"):
        build_model(name, D, C, task="regression", num_targets=value)
