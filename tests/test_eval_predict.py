"""From a feature folder to a tested model: self-describing checkpoints, the val carve-out,
best.pt and early stopping, standardisation, --frames and the padding mask, any number of
regression targets, class weights, and the ``lsef eval`` / ``lsef predict`` commands."""

import csv
import json
import os

import numpy as np
import pytest
import torch

import lsef_cli as cli
from lsef_ext.data import (
    AUTO_FRAMES_CAP,
    FeatureFolder,
    channel_stats,
    standardise,
    stratified_split,
)
from lsef_ext.train import (
    CHECKPOINT_FORMAT,
    RunError,
    TrainConfig,
    Trainer,
    _class_weights,
    load_checkpoint,
    load_data,
    predict,
    prepare_data,
)

CLASSES = ("ang", "hap", "sad")


def make_folder(root, n=60, D=6, lengths=(12,), splits=("train", "test"), targets=None, seed=0):
    """A labelled folder: class c adds +4 to channel c; features on an offset, scaled range so
    that standardisation matters. ``targets``: regression column names instead of a label."""
    rng = np.random.default_rng(seed)
    (root / "features").mkdir(parents=True)
    header = ["clip"] + (list(targets) if targets else ["label"]) + ["split"]
    rows = [",".join(header)]
    for i in range(n):
        c = i % len(CLASSES)
        T = lengths[i % len(lengths)]
        x = rng.normal(size=(T, D)).astype(np.float32) * 3 + 5
        x[:, c] += 4
        np.save(root / "features" / f"c{i}.npy", x)
        split = splits[0] if i % 5 else splits[-1]
        if targets:
            vals = [f"{float(x[:, j].mean() / 10):.4f}" for j in range(len(targets))]
            rows.append(",".join([f"c{i}", *vals, split]))
        else:
            rows.append(f"c{i},{CLASSES[c]},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def cfg_for(root, out=None, **kw):
    base = dict(
        data=str(root),
        T="auto",
        epochs=3,
        batch_size=16,
        d_model=8,
        rank=2,
        out=str(out) if out else None,
    )
    base.update(kw)
    return TrainConfig(**base)


def train_run(root, out, **kw):
    cfg = cfg_for(root, out, **kw)
    train, val, meta, notes = prepare_data(cfg)
    tr = Trainer(cfg, train, val=val, progress=False, meta=meta)
    tr.fit()
    return tr, train, val, meta, notes


# --------------------------------------------------------------------------------------------
# the pieces
# --------------------------------------------------------------------------------------------


def test_stratified_split_holds_out_a_share_of_every_class():
    y = torch.tensor([0] * 20 + [1] * 10 + [2] * 2 + [3] * 1)
    keep, held = stratified_split(y.numel(), y, 0.1, seed=3)
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(y.numel()))
    counts = torch.bincount(y[held], minlength=4).tolist()
    assert counts == [2, 1, 1, 0]  # round(0.1 n_c), >= 1 where n_c >= 2, never all of a class
    again = stratified_split(y.numel(), y, 0.1, seed=3)
    assert torch.equal(again[1], held)
    other = stratified_split(y.numel(), y, 0.1, seed=4)
    assert not torch.equal(other[1], held)
    _, plain = stratified_split(50, None, 0.2, seed=0)
    assert plain.numel() == 10
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got 1"):
        stratified_split(5, None, 1, 0)


def test_standardisation_round_trip_and_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=g) * torch.tensor([1.0, 10.0, 0.1]) + 4
    lengths = torch.tensor([7, 3, 5, 7, 1])
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 0
    mean, std = channel_stats(x, lengths)
    valid = torch.cat([x[i, :n] for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(mean, valid.double().mean(0).float())
    torch.testing.assert_close(std, valid.double().std(0, unbiased=False).float())
    z = standardise(x, mean, std, lengths)
    zv = torch.cat([z[i, :n] for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(zv.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(zv.std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    for i, n in enumerate(lengths.tolist()):
        assert (z[i, n:] == 0).all()
    torch.testing.assert_close(zv * std + mean, valid)  # the round trip
    const = torch.full((2, 4, 2), 3.0)
    m, s = channel_stats(const)
    assert s.tolist() == [1.0, 1.0] and m.tolist() == [3.0, 3.0]


def test_frames_policy(tmp_path):
    root = make_folder(tmp_path / "f", n=9, lengths=(5, 9, 12))
    ds = FeatureFolder(str(root), "train", frames="auto")
    assert ds.frames == 12 and ds.T == 12 and ds.cropped == 0
    assert sorted(set(ds.lengths.tolist())) == [5, 9, 12]
    for i, n in enumerate(ds.lengths.tolist()):
        assert (ds.x[i, n:] == 0).all()
    ds8 = FeatureFolder(str(root), "train", frames=8)
    assert ds8.T == 8 and ds8.cropped == sum(n > 8 for n in ds.lengths.tolist())
    assert ds8.lengths.max() == 8
    i = ds.lengths.tolist().index(12)
    raw = np.load(root / "features" / f"{ds.clips[i]}.npy")  # 12 frames, centre-cropped to 8
    torch.testing.assert_close(ds8.x[i], torch.from_numpy(raw[2:10]))
    with pytest.raises(ValueError, match=r"different lengths \[5, 9, 12\]; pass frames=T"):
        FeatureFolder(str(root), "train")
    long = make_folder(tmp_path / "long", n=2, lengths=(AUTO_FRAMES_CAP + 5,))
    assert FeatureFolder(str(long), "train", frames="auto").cropped == 1


# --------------------------------------------------------------------------------------------
# training on a folder
# --------------------------------------------------------------------------------------------


def test_prepare_data_carves_val_and_standardises(tmp_path):
    root = make_folder(tmp_path / "f", n=60, lengths=(8, 12))
    train, val, meta, notes = prepare_data(cfg_for(root))
    assert train.x.shape[0] + val.x.shape[0] == 48  # the train split, nothing from test
    assert torch.bincount(val.t).tolist() == [2, 2, 2]  # round(0.1 n_c), n_c = 16 per class
    assert any("no val split" in n for n in notes)
    assert meta["class_names"] == list(CLASSES) and meta["frames"] == 12
    assert train.lengths is not None and val.lengths is not None
    assert all(m > 1 for m in meta["norm"]["mean"])  # the raw features sit near 5
    assert all(s > 1 for s in meta["norm"]["std"])  # ... with a spread near 3
    valid = torch.cat([train.x[i, :n] for i, n in enumerate(train.lengths.tolist())])
    torch.testing.assert_close(valid.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    _, _, meta_raw, _ = prepare_data(cfg_for(root, normalise=False))
    assert meta_raw["norm"] is None
    with_val = make_folder(tmp_path / "v", n=30, splits=("train", "val"))
    train, val, meta, notes = prepare_data(cfg_for(with_val))
    assert val.x.shape[0] == 6 and meta["val"] == "the folder's val split" and not notes


def test_checkpoint_rebuilds_the_model_from_the_file_alone(tmp_path):
    root = make_folder(tmp_path / "f", n=45, lengths=(7, 10))
    tr, train, val, meta, _ = train_run(root, tmp_path / "run", epochs=2)
    ck = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT
    assert state["versions"]["torch"] == str(torch.__version__)
    assert ck.meta["class_names"] == list(CLASSES) and ck.meta["frames"] == 10
    assert ck.meta["norm"] == meta["norm"] and ck.epoch == 2
    assert not ck.model.training
    # the same predictions as the trained model, on inputs rebuilt from the checkpoint's meta
    test = load_data(cfg_for(root), "test", meta=ck.meta)
    p_ck = predict(ck.model, test.x, lengths=test.lengths)
    p_tr = predict(tr.net, test.x, lengths=test.lengths)
    torch.testing.assert_close(p_ck, p_tr, rtol=0, atol=0)
    # a baseline and regression rebuild too
    reg = make_folder(tmp_path / "r", n=30, targets=("valence", "arousal", "dominance"))
    tr2, *_ = train_run(reg, tmp_path / "rr", model="meanpool-mlp", task="regression", epochs=1)
    ck2 = load_checkpoint(str(tmp_path / "rr" / "best.pt"))
    assert ck2.meta["target_names"] == ["valence", "arousal", "dominance"]
    x = load_data(cfg_for(reg, task="regression"), "test", meta=ck2.meta).x
    assert predict(ck2.model, x).shape == (x.shape[0], 3)


def test_load_checkpoint_refuses_old_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pt not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    path = tmp_path / "old.pt"
    torch.save({"config": {}, "model": {}, "epoch": 1}, path)
    with pytest.raises(RunError, match=r"old\.pt was written by an older lsef_ext"):
        load_checkpoint(str(path))
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, path)
    with pytest.raises(RunError, match=r"old\.pt is not a checkpoint of lsef train \(missing"):
        load_checkpoint(str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(RunError, match=r"cannot read checkpoint .*old\.pt"):
        load_checkpoint(str(path))


def test_best_checkpoint_is_the_best_val_epoch_and_patience_stops(tmp_path):
    root = make_folder(tmp_path / "f", n=45)
    tr, *_ = train_run(root, tmp_path / "run", epochs=6, select="uar")
    scores = [row["val_uar"] for row in tr.history]
    # the best score; a tie goes to the lower val loss, then to the later epoch
    losses = [row["val_loss"] for row in tr.history]
    best = max(range(len(scores)), key=lambda i: (scores[i], -losses[i], i))
    assert tr.best["epoch"] == best + 1 and tr.best["metric"] == "val_uar"
    assert load_checkpoint(str(tmp_path / "run" / "best.pt")).epoch == best + 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best"]["epoch"] == best + 1
    # patience: a run whose val score cannot improve stops after `patience` more epochs
    cfg = cfg_for(root, tmp_path / "p", epochs=10, patience=2, lr=1e-12)
    train, val, meta, _ = prepare_data(cfg)
    stuck = Trainer(cfg, train, val=val, progress=False, meta=meta)
    stuck.fit()
    # (epochs equal in score and val loss move best.pt to the later one, but patience counts
    # from the last gain)
    assert stuck.stopped_early and len(stuck.history) == stuck.best["gained"] + 2


def test_class_weights_balanced():
    t = torch.tensor([0, 0, 0, 1, 2, 2])
    w = _class_weights(TrainConfig(class_weights="balanced"), t, 4)
    torch.testing.assert_close(w, torch.tensor([6 / 12, 6 / 4, 6 / 8, 0.0]))
    assert _class_weights(TrainConfig(), t, 4) is None
    with pytest.raises(ValueError, match="class_weights must be None or 'balanced'"):
        Trainer(TrainConfig(class_weights="inverse"), (torch.zeros(4, 8, 5), t[:4], 3))


def test_padded_frames_change_no_training_step(tmp_path):
    # the same clips, once at their own lengths and once padded with garbage, train alike
    root = make_folder(tmp_path / "f", n=20, lengths=(6, 9))
    cfg = cfg_for(root, epochs=1, rao=False)
    train, val, meta, _ = prepare_data(cfg)
    noisy = train.x.clone()
    for i, n in enumerate(train.lengths.tolist()):
        noisy[i, n:] = 1e3
    a = Trainer(cfg, train, progress=False, meta=meta)  # seeds torch: dropout draws alike
    a.fit()
    b = Trainer(cfg, train._replace(x=noisy), progress=False, meta=meta)
    b.fit()
    for (name, p), q in zip(a.net.named_parameters(), b.net.parameters()):
        torch.testing.assert_close(p, q, msg=name)


# --------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------


def run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_eval_predict_on_a_folder_without_val_and_with_variable_lengths(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n=45, lengths=(7, 10, 12))
    runs = tmp_path / "run"
    rc, out, err = run(
        capsys,
        ["train", "--data", str(root), "--out", str(runs), "--epochs", "2", "--d-model", "8",
         "--rank", "12", "--threads", "1", "--class-weights", "balanced"],
    )  # fmt: skip
    assert rc == 0, err
    assert "labels.csv has no val split: validating on" in out
    assert "--rank 12 exceeds min(frames, channels) = min(7, 6)" in out
    assert "clips have 7 to 12 frames: the shorter ones are zero-padded to 12 and masked" in out
    assert (runs / "best.pt").is_file() and f"lsef eval {runs / 'best.pt'}" in out

    rc, out, err = run(capsys, ["eval", str(runs / "best.pt"), "--data", str(root)])
    assert rc == 0, err
    conditions = ["clean", "frame_drop", "frame_drop_known", "impulse", "gaussian"]
    for c in conditions:
        assert f"  {c:<16} " in out
    assert "clean recall per class: ang " in out
    report = json.loads((runs / "eval.json").read_text())
    assert list(report["conditions"]) == conditions
    clean = report["conditions"]["clean"]
    assert clean["n"] == 9 and sum(map(sum, clean["confusion"])) == 9
    assert set(clean["recall"]) == set(CLASSES)
    assert (runs / "confusion.png").stat().st_size > 1000

    rc, out, err = run(
        capsys,
        ["eval", str(runs / "best.pt"), "--corruptions", "impulse", "--out", str(tmp_path / "e")],
    )  # the checkpoint's own data folder, two conditions
    assert rc == 0, err
    assert list(json.loads((tmp_path / "e" / "eval.json").read_text())["conditions"]) == [
        "clean",
        "impulse",
    ]

    # predict on an unlabelled copy: a clip column only
    bare = tmp_path / "bare"
    (bare / "features").mkdir(parents=True)
    names = [f"c{i}" for i in range(0, 45, 4)]
    for n in names:
        os.link(root / "features" / f"{n}.npy", bare / "features" / f"{n}.npy")
    (bare / "labels.csv").write_text("clip\n" + "\n".join(names) + "\n")
    pred_csv = tmp_path / "p.csv"
    rc, out, err = run(
        capsys, ["predict", str(runs / "best.pt"), "--data", str(bare), "--out", str(pred_csv)]
    )
    assert rc == 0, err
    assert f"{len(names)} clips of {bare}" in out and str(pred_csv) in out
    rows = list(csv.DictReader(pred_csv.open()))
    assert [r["clip"] for r in rows] == names
    assert list(rows[0]) == ["clip", "predicted", "p_ang", "p_hap", "p_sad"]
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in CLASSES]
        assert abs(sum(probs) - 1) < 1e-4 and r["predicted"] == CLASSES[int(np.argmax(probs))]
    # the same numbers as eval's route: the model on the checkpoint's standardised inputs
    ck = load_checkpoint(str(runs / "best.pt"))
    ds = FeatureFolder(str(bare), split=None, frames=ck.meta["frames"], labelled=False)
    norm = ck.meta["norm"]
    x = standardise(ds.x, torch.tensor(norm["mean"]), torch.tensor(norm["std"]), ds.lengths)
    want = predict(ck.model, x, lengths=ds.lengths).softmax(-1)
    got = torch.tensor([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_regression_with_three_targets_end_to_end(tmp_path, capsys):
    root = make_folder(tmp_path / "r", n=30, targets=("valence", "arousal", "dominance"))
    runs = tmp_path / "run"
    rc, out, err = run(
        capsys,
        ["train", "--data", str(root), "--task", "regression", "--model", "meanpool-mlp",
         "--out", str(runs), "--epochs", "1", "--threads", "1"],
    )  # fmt: skip
    assert rc == 0, err
    rc, out, err = run(capsys, ["eval", str(runs / "best.pt"), "--corruptions", "none"])
    assert rc == 0, err
    assert "ccc_valence" in out and "ccc_dominance" in out and "ccc_mean" in out
    assert not (runs / "confusion.png").exists()
    rc, out, err = run(
        capsys, ["predict", str(runs / "best.pt"), "--data", str(root), "--split", "test",
                 "--out", str(tmp_path / "p.csv")]
    )  # fmt: skip
    assert rc == 0, err
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 6 and list(rows[0]) == ["clip", "valence", "arousal", "dominance"]


def test_eval_and_predict_user_errors(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n=15)
    other = make_folder(tmp_path / "wide", n=15, D=9)
    runs = tmp_path / "run"
    rc, _, err = run(
        capsys,
        ["train", "--data", str(root), "--out", str(runs), "--epochs", "1", "--threads", "1",
         "--model", "meanpool-mlp"],
    )  # fmt: skip
    assert rc == 0, err
    best = str(runs / "best.pt")
    old = tmp_path / "old.pt"
    torch.save({"config": {}, "model": {}}, old)
    cases = [
        (["eval", str(tmp_path / "none.pt")], f"checkpoint {tmp_path / 'none.pt'} not found"),
        (["eval", str(old)], f"{old} was written by an older lsef_ext"),
        (["eval", best, "--corruptions", "blur"], "--corruptions 'blur': expected all, none"),
        (["eval", best, "--data", str(tmp_path / "x")], f"--data {tmp_path / 'x'}: no such folder"),
        (
            ["eval", best, "--data", str(other)],
            "has D = 9 feature channels; the model was trained on D = 6",
        ),
        (["predict", best, "--data", str(other)], "clips have D = 9; the model of"),
        (["predict", str(old), "--data", str(root)], f"{old} was written by an older lsef_ext"),
        (["train", "--frames", "auto"], "--frames auto applies to a FeatureFolder"),
    ]
    if not torch.cuda.is_available():
        cases += [
            (["eval", best, "--device", "cuda"], "--device cuda: no CUDA device is available"),
            (["predict", best, "--data", str(root), "--device", "cuda:1"], "no CUDA device"),
        ]
    for argv, said in cases:
        rc, out, err = run(capsys, argv)
        assert rc == 2 and err.startswith("lsef: error: ") and said in err, (argv, err)
        assert err.count("\n") == 1


def test_train_flags_reach_the_run(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n=50, lengths=(6, 11))
    runs = tmp_path / "run"
    rc, out, err = run(
        capsys,
        ["train", "--data", str(root), "--out", str(runs), "--epochs", "3", "--threads", "1",
         "--model", "meanpool-mlp", "--no-normalise", "--select", "uar", "--patience", "1",
         "--val-fraction", "0.3", "--frames", "8"],
    )  # fmt: skip
    assert rc == 0, err
    config = json.loads((runs / "metrics.json").read_text())["config"]
    assert config["normalise"] is False and config["select"] == "uar"
    assert config["patience"] == 1 and config["val_fraction"] == 0.3 and config["T"] == 8
    assert "validating on 12 training clips held out (30 %" in out  # round(0.3 n_c) of 40
    assert "20 of 40 training clips are longer than 8 frames and were centre-cropped" in out
    ck = load_checkpoint(str(runs / "best.pt"))
    assert ck.meta["norm"] is None and ck.meta["frames"] == 8 and ck.best["metric"] == "val_uar"
    for flag, value, said in [
        ("--val-fraction", "1.5", "argument --val-fraction: expected a number in (0, 1), got 1.5"),
        ("--frames", "1", "argument --frames: expected an integer >= 2, got 1"),
        ("--patience", "0", "argument --patience: expected an integer >= 1, got 0"),
        ("--class-weights", "inverse", "argument --class-weights: invalid choice: 'inverse'"),
    ]:
        rc, out, err = run(capsys, ["train", flag, value])
        assert rc == 2 and said in err, err


def test_eval_on_a_carved_val_split_reproduces_the_best_val_score(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n=60, lengths=(8, 12))
    tr, *_ = train_run(root, tmp_path / "run", epochs=3)
    ck = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert len(ck.meta["val_clips"]) == 6
    val = load_data(cfg_for(root), "val", meta=ck.meta)
    assert val.x.shape[0] == 6
    from lsef_ext.train import evaluate

    assert evaluate(ck.model, val.x, val.t, lengths=val.lengths)["war"] == ck.best["score"]
    rc, out, err = run(capsys, ["eval", str(tmp_path / "run" / "best.pt"), "--split", "val"])
    assert rc == 0, err
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["conditions"]["clean"]["war"] == ck.best["score"]


def test_a_nan_val_score_never_becomes_the_best(tmp_path, monkeypatch):
    import lsef_ext.train as train_mod

    root = make_folder(tmp_path / "f", n=30)
    scores = iter([float("nan"), 0.5, float("nan"), 0.25])
    real = train_mod.evaluate
    monkeypatch.setattr(
        train_mod, "evaluate", lambda *a, **k: {**real(*a, **k), "war": next(scores)}
    )
    tr, *_ = train_run(root, tmp_path / "run", epochs=4)
    assert tr.best["epoch"] == 2 and tr.best["score"] == 0.5


def test_eval_with_the_reference_ops_gives_the_same_numbers(tmp_path, capsys):
    root = make_folder(tmp_path / "f", n=30)
    runs = tmp_path / "run"
    rc, _, err = run(
        capsys,
        ["train", "--data", str(root), "--out", str(runs), "--epochs", "1", "--threads", "1",
         "--d-model", "8"],
    )  # fmt: skip
    assert rc == 0, err
    reports = {}
    for ops_name in ("ext", "ref"):
        out = tmp_path / ops_name
        rc, _, err = run(
            capsys,
            ["eval", str(runs / "best.pt"), "--ops", ops_name, "--corruptions", "none",
             "--out", str(out)],
        )  # fmt: skip
        assert rc == 0, err
        reports[ops_name] = json.loads((out / "eval.json").read_text())["conditions"]["clean"]
    assert reports["ext"]["confusion"] == reports["ref"]["confusion"]
