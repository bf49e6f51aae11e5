"""Frame-validity masks (issue 33, "Through LSEF"): ``model(X, mask=...)`` for LSEF and the
baselines, FeatureFolder's ``missing_frames="nan"``, the mask through data loading, training and
evaluation, and the ``frame_drop_known`` test condition.

A mask ``(B, T)`` (True = valid frame) cuts the masked frames out of each clip: LSEF gives what
the clip of its valid frames alone gives; what the masked frames hold (NaN included) changes no
output and gets no gradient; a mask with every frame valid is no mask at all.
"""

import json

import numpy as np
import pytest
import torch

import lsef_cli as cli
from lsef_ext import nn as lnn
from lsef_ext.data import (
    CONDITIONS,
    CORRUPTIONS,
    FeatureFolder,
    SyntheticAffect,
    channel_stats,
    corrupt,
    standardise,
    told_mask,
)
from lsef_ext.nn import LSEFOutput, MeanPoolMLP, TemporalTransformer, build_model
from lsef_ext.train import (
    TrainConfig,
    Trainer,
    corrupted_average,
    evaluate,
    evaluate_conditions,
    load_data,
    load_test_sets,
    prepare_data,
)

B, T, D, DM, K, C = 5, 8, 12, 16, 3, 5
NAMES = ("lsef", "lsef-no-sem", "lsef-no-ddm", "lsef-no-cim", "meanpool-mlp", "transformer")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
# L and S (entries of size ~5) in float32: rounding of the rank-k fit moves the small entries
# of S = X - L beyond the threshold by ~1e-5 (the predictions stay within TOL)
TOL_LS = {**TOL, torch.float32: dict(rtol=1e-4, atol=5e-5)}
CLASSES = {"LSEF": "lsef", "MeanPoolMLP": "meanpool-mlp", "TemporalTransformer": "transformer"}


def make(name, dtype=torch.float64, **kw):
    """A small model by name, in eval mode (dropout off), in ``dtype``."""
    torch.manual_seed(0)
    if name == "meanpool-mlp":
        model = MeanPoolMLP(D, C, hidden=32, **kw)
    elif name == "transformer":
        model = TemporalTransformer(D, C, d_model=DM, layers=2, heads=4, max_T=T, **kw)
    elif name == "lsef-ref":
        model = build_model("lsef", D, C, ops="ref", d_model=DM, rank=K, **kw)
    else:
        model = build_model(name, D, C, d_model=DM, rank=K, **kw)
    return model.to(dtype).eval()


def clips(b=B, dtype=torch.float64, seed=0):
    """Low-rank + a few spikes + noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, T, 2, generator=g) @ torch.randn(b, 2, D, generator=g) * 2
    X = X + (torch.rand(b, T, D, generator=g) < 0.05) * 4.0 + 0.1 * torch.randn(b, T, D)
    return X.to(dtype)


def mask_of(rows):
    """A (len(rows), T) mask from strings of '1' (valid) and '0' (masked)."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


# every clip keeps a frame; gaps in the middle, at either end, one frame only, a whole clip
MASK = mask_of(["11011011", "01111110", "00010000", "11111111", "10101010"])


def pred_of(out):
    return out.pred if isinstance(out, LSEFOutput) else out


@pytest.fixture
def one_frame_alone(monkeypatch):
    """Lets a model run on a one-frame clip alone (its forward asks for T >= 2), the reference
    for a clip with one valid frame."""
    check = lnn._check_input

    def relaxed(module, X, D, name="X"):
        check(module, X.expand(-1, 2, -1) if X.dim() == 3 and X.shape[1] == 1 else X, D, name)

    monkeypatch.setattr(lnn, "_check_input", relaxed)


# ---------------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES[:5] + ("lsef-ref",))
def test_masked_clip_equals_its_valid_frames_alone(name, dtype, one_frame_alone):
    """LSEF (and the mean-pool baseline) on a masked batch: each clip is the clip of its valid
    frames alone, in order; L and S are its own at the valid frames and 0 at the masked ones;
    recon and sparsity are means over the valid entries, agreement a mean over clips."""
    model = make(name, dtype)
    X = clips(dtype=dtype)
    with torch.no_grad():
        out = model(X, mask=MASK)
        alone = [model(X[i : i + 1, MASK[i]]) for i in range(B)]
    for i in range(B):
        torch.testing.assert_close(pred_of(out)[i : i + 1], pred_of(alone[i]), **TOL[dtype])
    if not isinstance(out, LSEFOutput):
        return
    for i in range(B):
        torch.testing.assert_close(out.L[i : i + 1, MASK[i]], alone[i].L, **TOL_LS[dtype])
        torch.testing.assert_close(out.S[i : i + 1, MASK[i]], alone[i].S, **TOL_LS[dtype])
        assert not out.L[i, ~MASK[i]].any() and not out.S[i, ~MASK[i]].any()
    w = MASK.sum(1).to(dtype) / MASK.sum()
    for key in ("recon", "sparsity"):
        expect = sum(wi * a.terms[key] for wi, a in zip(w, alone))
        torch.testing.assert_close(out.terms[key], expect, **TOL_LS[dtype])
    assert set(out.terms) == set(alone[0].terms)
    if "agreement" in out.terms:
        expect = sum(a.terms["agreement"] for a in alone) / B
        torch.testing.assert_close(out.terms["agreement"], expect, **TOL[dtype])


def test_transformer_keeps_masked_frames_in_time():
    """The transformer masks keys and the mean but keeps positions: a clip's valid frames keep
    their own position embeddings, so a mask of leading frames is exactly ``lengths``."""
    model = make("transformer")
    X = clips()
    lens = torch.tensor([8, 3, 5, 1, 6])
    prefix = torch.arange(T) < lens[:, None]
    assert torch.equal(model(X, mask=prefix), model(X, lens))
    out = model(X, mask=MASK)
    assert torch.isfinite(out).all() and out.shape == (B, C)


@pytest.mark.parametrize("name", NAMES)
def test_a_mask_of_leading_frames_is_lengths(name):
    """The same frames marked by lengths (LSEF: grouped by length) and by a mask (one masked
    pass): the same outputs, to rounding (the baselines: bit for bit)."""
    model = make(name)
    X = clips()
    lens = torch.tensor([8, 3, 5, 2, 6])
    prefix = torch.arange(T) < lens[:, None]
    out, ref = model(X, mask=prefix), model(X, lens)
    if isinstance(out, LSEFOutput):
        torch.testing.assert_close(out.pred, ref.pred, **TOL[torch.float64])
        torch.testing.assert_close(out.L, ref.L, **TOL[torch.float64])
        torch.testing.assert_close(out.S, ref.S, **TOL[torch.float64])
        for key in ref.terms:
            torch.testing.assert_close(out.terms[key], ref.terms[key], **TOL[torch.float64])
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("fill", ["random", 1e6, float("nan"), float("inf")])
@pytest.mark.parametrize("name", NAMES)
def test_what_masked_frames_hold_changes_nothing(name, fill):
    """NaN (or anything) in the masked frames: finite outputs, equal bit for bit to those with
    zeros there."""
    model = make(name)
    X = clips()
    X[~MASK] = 0.0
    Y = X.clone()
    Y[~MASK] = torch.randn(int((~MASK).sum()), D, dtype=X.dtype) * 1e3 if fill == "random" else fill
    out, out2 = model(X, mask=MASK), model(Y, mask=MASK)
    assert torch.isfinite(pred_of(out2)).all()
    assert torch.equal(pred_of(out), pred_of(out2))
    if isinstance(out, LSEFOutput):
        assert torch.equal(out.L, out2.L) and torch.equal(out.S, out2.S)
        assert all(torch.equal(out.terms[k], out2.terms[k]) for k in out.terms)
        assert all(torch.isfinite(v).all() for v in (out2.L, out2.S, *out2.terms.values()))


@pytest.mark.parametrize("name", NAMES)
def test_a_mask_of_all_valid_frames_is_no_mask(name):
    model = make(name, torch.float32)
    X = clips(dtype=torch.float32)
    lens = torch.tensor([8, 3, 5, 2, 6])
    full = torch.ones(B, T, dtype=torch.bool)
    for mask in (full, full[..., None]):
        out, ref = model(X, mask=mask), model(X)
        assert torch.equal(pred_of(out), pred_of(ref))
        if isinstance(out, LSEFOutput):
            assert torch.equal(out.L, ref.L) and torch.equal(out.S, ref.S)
            assert all(torch.equal(out.terms[k], ref.terms[k]) for k in ref.terms)
    # with lengths: a mask that marks only padded frames invalid changes nothing either
    pad_only = torch.arange(T) < lens[:, None]
    assert torch.equal(pred_of(model(X, lens, mask=pad_only)), pred_of(model(X, lens)))
    assert torch.equal(pred_of(model(X, lens, mask=full)), pred_of(model(X, lens)))


@pytest.mark.parametrize("name", NAMES)
def test_mask_and_lengths_combine(name):
    """A frame is valid where both lengths and mask say so: the same as the mask of both."""
    model = make(name)
    X = clips()
    lens = torch.tensor([8, 3, 5, 4, 6])
    both = MASK & (torch.arange(T) < lens[:, None])
    out, ref = model(X, lens, mask=MASK), model(X, mask=both)
    torch.testing.assert_close(pred_of(out), pred_of(ref), **TOL[torch.float64])


@pytest.mark.parametrize("name", NAMES)
def test_mask_shapes_b_t_and_b_t_1_agree(name):
    model = make(name)
    X = clips()
    assert torch.equal(pred_of(model(X, mask=MASK)), pred_of(model(X, mask=MASK[..., None])))


@pytest.mark.parametrize("fill", [0.0, float("nan")])
@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_reaches_masked_frames(name, fill):
    model = make(name, torch.float32).train()
    X = clips(dtype=torch.float32)
    X[~MASK] = fill
    X.requires_grad_()
    out = model(X, mask=MASK)
    loss = torch.nn.functional.cross_entropy(pred_of(out), torch.arange(B) % C)
    if isinstance(out, LSEFOutput):
        loss = loss + model.regulariser(out) + out.S.square().mean()
    loss.backward()
    assert torch.isfinite(X.grad).all()
    assert not X.grad[~MASK].any()
    for i in range(B):
        assert X.grad[i, MASK[i]].abs().sum() > 0, i
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_sem_robust_pca_is_told_the_missing_frames(monkeypatch):
    """SEM's robust PCA gets a (B, T, 1) mask on the clip matrices (valid frames first, the
    masked ones after them, 0) and the lam of the clip of its valid frames alone."""
    model = make("lsef")
    seen = []
    solver = model.sem.ops.lowrank_sparse

    def spy(X, k, lam=None, n_steps=None, *args, mask=None, **kw):
        seen.append((X.clone(), k, lam, mask))
        return solver(X, k, lam, n_steps, *args, mask=mask, **kw)

    monkeypatch.setattr(model.sem.ops, "lowrank_sparse", spy)
    X = clips()
    valid = MASK.clone()
    valid[2, 2] = True  # every clip with >= 2 valid frames; clip 2 still short of the rank
    model(X, mask=valid)
    n = valid.sum(1)
    rows = []
    for Xs, k, lam, mask in seen:
        assert mask.dtype == torch.bool and mask.shape == (Xs.shape[0], T, 1)
        assert (mask[:, :, 0] == (torch.arange(T) < mask.sum(1))).all()  # valid frames lead
        assert not Xs[~mask.expand_as(Xs)].any()
        nk = mask.sum((1, 2))
        assert k == min(K, int(nk.min()))
        assert lam == 2 / D**0.5  # 2 / sqrt(max(n, D)): here every n < D
        rows += nk.tolist()
    assert sorted(rows) == sorted(n.tolist())
    # the clips with at least `rank` valid frames in one call; clip 2 (2 frames) apart
    assert sorted(Xs.shape[0] for Xs, *_ in seen) == [1, B - 1]


@pytest.mark.parametrize("ops", ["ext", "ref"])
def test_more_valid_frames_than_channels(ops):
    """T > D: SEM's lam, 2 / sqrt(max(n, D)), differs between clips of different valid counts
    (they are solved apart); each clip is still the clip of its valid frames alone."""
    torch.manual_seed(0)
    model = build_model("lsef", 3, C, ops=ops, d_model=DM, rank=2).double().eval()
    X = clips()[..., :3]
    valid = mask_of(["11011011", "01111110", "11111111", "10101010", "11110111"])
    with torch.no_grad():
        out = model(X, mask=valid)
        for i in range(B):
            alone = model(X[i : i + 1, valid[i]])
            torch.testing.assert_close(out.pred[i : i + 1], alone.pred, **TOL[torch.float64])
            torch.testing.assert_close(out.S[i : i + 1, valid[i]], alone.S, **TOL[torch.float64])


def test_one_masked_pass_when_every_clip_has_rank_frames(monkeypatch):
    model = make("lsef")
    calls = []
    full = model._forward_full

    def counted(X, *args):
        calls.append(tuple(X.shape))
        return full(X, *args)

    monkeypatch.setattr(model, "_forward_full", counted)
    many = mask_of(["11011011", "01111110", "00011100", "11111111", "10101010"])
    model(clips(), mask=many)
    assert calls == [(B, T, D)]
    calls.clear()
    model(clips(), mask=MASK)  # clip 2 has one valid frame, fewer than the rank
    assert sorted(calls) == [(1, T, D), (B - 1, T, D)]


def test_robust_scale_of_leading_frames_is_the_clip_alone():
    """DDM's masked noise scale: each clip's robust_scale on its valid frames, bit for bit, in
    the subsampled regime (n·D > 2048 entries) and below it."""
    g = torch.Generator().manual_seed(1)
    R = torch.randn(4, 16, 200, generator=g, dtype=torch.float64)
    n = torch.tensor([16, 11, 3, 1])
    m = (torch.arange(16) < n[:, None])[..., None]
    got = lnn._robust_scale_leading(R * m, m)
    for i in range(4):
        assert torch.equal(got[i], lnn.robust_scale(R[i : i + 1, : n[i]])[0])


def test_empty_batch_with_mask():
    model = make("lsef")
    out = model(torch.zeros(0, T, D, dtype=torch.float64), mask=torch.zeros(0, T, dtype=torch.bool))
    assert out.pred.shape == (0, C) and all(out.terms[k] == 0 for k in out.terms)


def test_lsef_masked_under_bf16_autocast_is_finite():
    model = make("lsef", torch.float32)
    X = clips(dtype=torch.float32)
    X[~MASK] = float("nan")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(X, mask=MASK)
    assert torch.isfinite(out.pred.float()).all()


BAD = [
    (MASK.tolist(), TypeError, r"mask must be a bool tensor of shape \(B, T\) \(True = valid "
     r"frame\), got list"),
    (MASK.float(), TypeError, r"mask must be a bool tensor \(True = valid frame\), got "
     r"torch.float32"),
    (MASK.long(), TypeError, r"mask must be a bool tensor \(True = valid frame\), got torch.int64"),
    (MASK[..., None].expand(B, T, D), ValueError, r"mask must have shape \(B, T\) = \(5, 8\) or "
     r"\(B, T, 1\), got \(5, 8, 12\)"),
    (MASK[:-1], ValueError, r"mask must have shape \(B, T\) = \(5, 8\) or \(B, T, 1\), got "
     r"\(4, 8\)"),
    (MASK[:, :-1], ValueError, r"mask must have shape \(B, T\) = \(5, 8\) or \(B, T, 1\), got "
     r"\(5, 7\)"),
    (mask_of(["11111111", "00000000"] + ["1" * T] * 3), ValueError,
     r"mask leaves clip 1 no valid frame; every clip needs one"),
]  # fmt: skip


@pytest.mark.parametrize("mask, exc, msg", BAD)
@pytest.mark.parametrize("cls", list(CLASSES))
def test_bad_masks(cls, mask, exc, msg):
    model = make(CLASSES[cls])
    with pytest.raises(exc, match=f"^{cls}: {msg}$"):
        model(clips(), mask=mask)


@pytest.mark.parametrize("cls", list(CLASSES))
def test_a_mask_that_leaves_a_clip_nothing_within_its_length(cls):
    model = make(CLASSES[cls])
    lens = torch.tensor([8, 2, 8, 8, 8])
    mask = mask_of(["1" * T, "00111111"] + ["1" * T] * 3)
    msg = r"mask leaves clip 1 no valid frame within its lengths\[1\] = 2 frames; every clip"
    with pytest.raises(ValueError, match=f"^{cls}: {msg}"):
        model(clips(), lens, mask=mask)


# ---------------------------------------------------------------------------------------------
# corruptions and conditions
# ---------------------------------------------------------------------------------------------


def test_corrupt_returns_the_mask_of_the_dropped_frames():
    x = SyntheticAffect(32, T=T, D=24, seed=2).x
    for kind in CORRUPTIONS:
        plain = corrupt(x, kind, 1.0, torch.Generator().manual_seed(3))
        y, kept = corrupt(x, kind, 1.0, torch.Generator().manual_seed(3), return_mask=True)
        assert torch.equal(y, plain) and kept.shape == (32, T) and kept.dtype == torch.bool
        if kind == "frame_drop":
            assert torch.equal(kept, (y != 0).any(-1)) and not kept.all()
        else:
            assert kept.all()
    y, kept = corrupt(x, None, return_mask=True)
    assert torch.equal(y, x) and kept.all()


def test_frame_drop_known_drops_the_same_frames_and_tells_which():
    drop = SyntheticAffect(64, "test", T=T, D=24, seed=1, corruption="frame_drop")
    known = SyntheticAffect(64, "test", T=T, D=24, seed=1, corruption="frame_drop_known")
    assert torch.equal(drop.x, known.x) and torch.equal(drop.y, known.y)
    assert drop.mask is None and SyntheticAffect(8, T=T, D=24).mask is None
    assert torch.equal(known.mask, (known.x != 0).any(-1)) and not known.mask.all()


def test_told_mask_keeps_a_clip_that_lost_every_frame():
    kept = mask_of(["11001100", "00000000", "01111111"])
    base = mask_of(["11111111", "11111111", "10111111"])
    told = told_mask(kept, base)
    assert torch.equal(told[0], kept[0]) and torch.equal(told[1], base[1])
    assert torch.equal(told[2], kept[2] & base[2])
    assert torch.equal(told_mask(kept)[1], torch.ones(T, dtype=torch.bool))


def test_the_corrupted_average_leaves_frame_drop_known_out():
    metrics = {c: {"war": float(i)} for i, c in enumerate(CONDITIONS)}
    assert "frame_drop_known" in CONDITIONS and "frame_drop_known" not in CORRUPTIONS
    assert corrupted_average(metrics) == pytest.approx(
        sum(metrics[c]["war"] for c in CORRUPTIONS) / 3
    )


def test_evaluation_gives_the_mask_under_frame_drop_known_only(monkeypatch):
    cfg = TrainConfig(n_train=16, n_test=24, T=T, D=24)
    sets = load_test_sets(cfg)
    assert tuple(sets) == CONDITIONS
    assert torch.equal(sets["frame_drop"].x, sets["frame_drop_known"].x)
    assert sets["frame_drop_known"].mask is not None
    assert all(sets[c].mask is None for c in CONDITIONS if c != "frame_drop_known")
    torch.manual_seed(0)
    model = MeanPoolMLP(24, 7).eval()
    told = []
    forward = model.forward

    def spy(X, lengths=None, mask=None):
        told.append(mask is not None)
        return forward(X, lengths, mask)

    monkeypatch.setattr(model, "forward", spy)
    m = evaluate_conditions(model, cfg, CONDITIONS, sets)
    assert told == [c == "frame_drop_known" for c in CONDITIONS]
    known = sets["frame_drop_known"]
    assert m["frame_drop_known"] == evaluate(model, known.x, known.t, mask=known.mask)


# ---------------------------------------------------------------------------------------------
# FeatureFolder: missing frames
# ---------------------------------------------------------------------------------------------


def write_folder(root, arrays, labels=None, splits=None):
    """A labelled folder of ``arrays`` (a list of (T, D) arrays, clips c0, c1, ...)."""
    (root / "features").mkdir(parents=True)
    rows = ["clip,label,split"]
    for i, a in enumerate(arrays):
        np.save(root / "features" / f"c{i}.npy", a)
        label = labels[i] if labels else "ab"[i % 2]
        rows.append(f"c{i},{label},{splits[i] if splits else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(root)


def arrays_with_gaps(n=4, Tc=6, Dc=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(Tc, Dc)).astype(np.float32) + 5 for _ in range(n)]
    arrays[1][2] = np.nan  # one missing frame
    arrays[2][[0, 5]] = np.nan  # missing at both ends
    return arrays


def test_missing_frames_nan_marks_all_nan_frames(tmp_path):
    arrays = arrays_with_gaps()
    ds = FeatureFolder(write_folder(tmp_path, arrays), missing_frames="nan")
    expect = torch.ones(4, 6, dtype=torch.bool)
    expect[1, 2] = expect[2, 0] = expect[2, 5] = False
    assert torch.equal(ds.mask, expect)
    assert torch.isfinite(ds.x).all() and not ds.x[~expect].any()
    assert torch.equal(ds.x[expect], torch.from_numpy(np.stack(arrays))[expect])
    # without missing frames there is no mask, with the option or without
    clean = FeatureFolder(write_folder(tmp_path / "clean", [arrays[0], arrays[3]]))
    assert clean.mask is None
    assert FeatureFolder(str(tmp_path / "clean"), missing_frames="nan").mask is None


def test_missing_frames_with_padding_and_cropping(tmp_path):
    a = np.arange(8 * 2, dtype=np.float32).reshape(8, 2) + 1
    a[[0, 3]] = np.nan  # frame 0 is cropped away by frames=6 (start 1); frame 3 stays
    b = np.ones((4, 2), np.float32)
    b[1] = np.nan
    ds = FeatureFolder(write_folder(tmp_path, [a, b]), frames=6, missing_frames="nan")
    assert ds.lengths.tolist() == [6, 4]
    assert ds.mask.tolist() == [[True, True, False, True, True, True], [True, False] + [True] * 2
                                + [False] * 2]  # fmt: skip
    # the only missing frame cropped away: no mask
    a2 = a.copy()
    a2[3] = 0
    only = FeatureFolder(write_folder(tmp_path / "crop", [a2]), frames=6, missing_frames="nan")
    assert only.mask is None


def test_nan_stays_an_error_without_the_option_and_outside_whole_frames(tmp_path):
    arrays = arrays_with_gaps()
    root = write_folder(tmp_path / "a", arrays)
    with pytest.raises(
        ValueError,
        match=r"c1\.npy has 3 non-finite value\(s\) .*first at frame 2, channel 0 \(value nan\); "
        r"clean or drop the clip; its 1 frame\(s\) that are NaN in every channel can be read as "
        r"missing frames with missing_frames='nan' \(--missing-frames nan\)$",
    ):
        FeatureFolder(root)
    part = [a.copy() for a in arrays]
    part[3][4, 1] = np.nan  # a NaN in a frame that is not all NaN
    root = write_folder(tmp_path / "b", part)
    with pytest.raises(
        ValueError,
        match=r"c3\.npy has 1 non-finite value\(s\) outside its missing \(all-NaN\) frames "
        r"\(NaN, Inf, or beyond float32's range\), the first at frame 4, channel 1 \(value nan\); "
        r"clean or drop the clip; only a frame that is NaN in every channel is a missing frame$",
    ):
        FeatureFolder(root, missing_frames="nan")
    inf = [a.copy() for a in arrays]
    inf[0][1] = np.inf  # a frame of Inf is no missing frame
    with pytest.raises(ValueError, match=r"c0\.npy has 3 non-finite value\(s\) outside"):
        FeatureFolder(write_folder(tmp_path / "c", inf), missing_frames="nan")
    gone = [a.copy() for a in arrays]
    gone[0][:] = np.nan
    with pytest.raises(
        ValueError,
        match=r"c0\.npy: all 6 of its frames \(after cropping to 6\) are missing \(all NaN\); a "
        r"clip needs one frame that is not: drop the clip$",
    ):
        FeatureFolder(write_folder(tmp_path / "d", gone), missing_frames="nan")
    for bad in ("NaN", "zero", True):
        with pytest.raises(ValueError, match=r"missing_frames must be None .* or 'nan'"):
            FeatureFolder(root, missing_frames=bad)


def test_channel_stats_and_standardise_leave_missing_frames_out():
    x = torch.randn(3, 6, 4) * 2 + 3
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 1] = mask[2, 4] = False
    x[~mask] = 1e3  # would move the statistics if it counted
    mean, std = channel_stats(x, None, mask)
    torch.testing.assert_close(mean, x[mask].double().mean(0).float())
    torch.testing.assert_close(std, x[mask].double().std(0, unbiased=False).float())
    z = standardise(x, mean, std, torch.tensor([6, 5, 6]), mask)
    assert not z[~mask].any() and not z[1, 5].any() and z[mask & (torch.arange(6) < 5)].any()


# ---------------------------------------------------------------------------------------------
# training and the CLI
# ---------------------------------------------------------------------------------------------


def folder_for_training(root, n=30, Tc=8, Dc=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays, labels, splits = [], [], []
    for i in range(n):
        c = i % 2
        a = rng.normal(size=(Tc, Dc)).astype(np.float32)
        a[:, c] += 3
        a[rng.random(Tc) < 0.25] = np.nan  # missing frames
        a[i % Tc] = np.nan_to_num(a[i % Tc], nan=1.0)  # at least one frame is not missing
        arrays.append(a)
        labels.append("ab"[c])
        splits.append("test" if i % 5 == 0 else "train")
    return write_folder(root, arrays, labels, splits)


def test_training_passes_the_mask_to_the_model(tmp_path, monkeypatch):
    root = folder_for_training(tmp_path / "f")
    cfg = TrainConfig(
        model="meanpool-mlp", data=root, T="auto", epochs=1, batch_size=8, missing_frames="nan"
    )
    train, val, meta, _ = prepare_data(cfg)
    assert train.mask is not None and val.mask is not None
    assert torch.isfinite(train.x).all() and not train.x[~train.mask].any()
    told = []
    forward = MeanPoolMLP.forward

    def spy(self, X, lengths=None, mask=None):
        told.append(mask is not None and not torch.isnan(X).any())
        return forward(self, X, lengths, mask)

    monkeypatch.setattr(MeanPoolMLP, "forward", spy)
    trainer = Trainer(cfg, train, val=val, progress=False, meta=meta)
    history = trainer.fit()
    assert told and all(told)  # every training and val batch
    assert np.isfinite(history[-1]["loss"]) and np.isfinite(history[-1]["val_loss"])
    test = load_data(cfg, "test", meta=meta)
    assert test.mask is not None
    known = load_data(cfg, "test", "frame_drop_known", meta=meta)
    dropped = load_data(cfg, "test", "frame_drop", meta=meta)
    assert torch.equal(known.x, dropped.x) and torch.equal(dropped.mask, test.mask)
    assert (known.mask <= test.mask).all() and known.mask.sum() < test.mask.sum()
    assert known.mask.any(1).all()
    with pytest.raises(ValueError, match="missing_frames must be None or 'nan'"):
        Trainer(TrainConfig(missing_frames="yes"), train)


def test_cli_train_and_eval_with_missing_frames(tmp_path, capsys):
    root = folder_for_training(tmp_path / "f")
    run = tmp_path / "run"
    argv = ["train", "--data", root, "--out", str(run), "--epochs", "1", "--d-model", "8",
            "--rank", "2", "--threads", "1", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--missing-frames nan" in capsys.readouterr().err
    assert cli.main(argv + ["--missing-frames", "nan"]) == 0
    out = capsys.readouterr().out
    assert "missing frame(s) (all NaN) in " in out and "--missing-frames nan" in out
    assert cli.main(["eval", str(run / "best.pt"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for c in CONDITIONS:
        assert f"  {c:<16} " in out
    report = json.loads((run / "eval.json").read_text())
    assert list(report["conditions"]) == list(CONDITIONS)
    assert cli.main(["eval", str(run / "best.pt"), "--missing-frames", "error"]) == 2
    assert "non-finite" in capsys.readouterr().err
    pred = tmp_path / "p.csv"
    assert cli.main(["predict", str(run / "best.pt"), "--data", root, "--out", str(pred)]) == 0
    assert len(pred.read_text().splitlines()) == 31
    capsys.readouterr()
    assert cli.main(["train", "--missing-frames", "nan", "--epochs", "1"]) == 2
    assert "--missing-frames applies to a FeatureFolder" in capsys.readouterr().err
