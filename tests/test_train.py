"""lsef_ext.train: metrics, the Trainer (loss goes down, files, resume), and DDP with gloo."""

import json
import csv
import math
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from lsef_ext.data import CONDITIONS, CORRUPTIONS
from lsef_ext.nn import LSEF
from lsef_ext.train import (
    RunError,
    TrainConfig,
    Trainer,
    ccc,
    check_run_folder,
    corrupted_average,
    distributed_env,
    evaluate,
    evaluate_conditions,
    load_data,
    load_test_sets,
    predict,
    uar,
    war,
)

# rao: the trainer's tests run with RAO (opt-in) so that its state is checkpointed and resumed
SMALL = dict(
    n_train=256, n_test=64, T=8, D=24, d_model=16, rank=3, batch_size=32, lr=3e-3, rao=True
)


def config(**kw):
    return TrainConfig(**{**SMALL, **kw})


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_war_and_uar_hand_computed():
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    pred = torch.tensor([0, 0, 0, 0, 0, 0, 0, 2])  # class 1 never recalled
    assert war(pred, y) == pytest.approx(7 / 8)
    assert uar(pred, y) == pytest.approx((1 + 0 + 1) / 3)
    # always predicting the majority class: high WAR, UAR = 1/3
    maj = torch.zeros(8, dtype=torch.long)
    assert war(maj, y) == pytest.approx(6 / 8) and uar(maj, y) == pytest.approx(1 / 3)
    # logits are argmaxed; classes absent from y do not count in UAR
    logits = torch.nn.functional.one_hot(pred, 5).float()
    assert war(logits, y) == pytest.approx(7 / 8)
    assert uar(logits, y) == pytest.approx(2 / 3)
    assert uar(pred, y, num_classes=5) == pytest.approx(2 / 3)
    # balanced and perfect
    assert war(y, y) == 1.0 and uar(y, y) == 1.0
    assert math.isnan(war(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))


def test_ccc_hand_computed():
    x = torch.tensor([[1.0, 2.0], [2.0, 0.0], [3.0, 1.0], [4.0, 5.0]])
    torch.testing.assert_close(ccc(x, x), torch.ones(2))
    torch.testing.assert_close(ccc(-x + 2 * x.mean(0), x), -torch.ones(2))  # negated about the mean
    neg = ccc(-x, x)
    assert (neg < 0).all() and (neg >= -1).all()
    shifted = ccc(x + 1.0, x)
    assert (shifted < 1).all() and (shifted > 0.5).all()
    # column 0: mean 2.5, population var 1.25; shifted by 1: 2*1.25 / (2*1.25 + 1) = 2.5 / 3.5
    assert float(shifted[0]) == pytest.approx(2.5 / 3.5, rel=1e-6)
    # scaling hurts CCC (unlike Pearson correlation)
    assert float(ccc(2 * x, x)[0]) == pytest.approx(
        2 * 2 * 1.25 / (4 * 1.25 + 1.25 + 2.5**2), rel=1e-6
    )


def test_predict_and_evaluate():
    torch.manual_seed(0)
    model = LSEF(24, 7, d_model=16, rank=3)
    model.train()
    x, y = load_data(config(n_test=40), "test")[:2]
    p = predict(model, x, batch_size=16)
    assert p.shape == (40, 7) and model.training  # mode restored
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(p, model(x).pred, rtol=1e-5, atol=1e-5)
    m = evaluate(model, x, y)
    assert set(m) == {"war", "uar"}
    assert m["war"] == pytest.approx(war(p, y))
    reg = LSEF(24, 7, d_model=16, rank=3, task="regression")
    xr, va = load_data(config(task="regression", n_test=40), "test")[:2]
    mr = evaluate(reg, xr, va, task="regression")
    assert set(mr) == {"ccc_valence", "ccc_arousal", "ccc_mean"} and all(
        -1 <= v <= 1 for v in mr.values()
    )


def test_evaluate_conditions():
    torch.manual_seed(0)
    model = LSEF(24, 7, d_model=16, rank=3)
    cfg = config(n_test=40)
    sets = load_test_sets(cfg)
    assert tuple(sets) == CONDITIONS
    for c, (x, y, *_) in sets.items():
        ref_x, ref_y = load_data(cfg, "test", None if c == "clean" else c)[:2]
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    m = evaluate_conditions(model, cfg)
    assert tuple(m) == CONDITIONS
    for c, (x, y, *_) in sets.items():  # the mask is given under frame_drop_known only
        assert (sets[c].mask is not None) == (c == "frame_drop_known")
        assert m[c] == evaluate(model, x, y, mask=sets[c].mask)
    # given test sets are used as they are; missing conditions are loaded
    assert evaluate_conditions(model, cfg, test_sets=sets) == m
    assert evaluate_conditions(model, cfg, ("impulse", "clean"), {"clean": sets["clean"]}) == {
        "impulse": m["impulse"],
        "clean": m["clean"],
    }
    assert evaluate_conditions(
        model, cfg, ("clean",), {"clean": (sets["clean"][0][:8], sets["clean"][1][:8])}
    ) == {"clean": evaluate(model, sets["clean"][0][:8], sets["clean"][1][:8])}
    # corruptions only (what `lsef train` prints) and the corrupted average
    only = evaluate_conditions(model, cfg, CORRUPTIONS)
    assert only == {c: m[c] for c in CORRUPTIONS}
    assert corrupted_average(m) == pytest.approx(sum(m[c]["war"] for c in CORRUPTIONS) / 3)
    assert corrupted_average(only, "uar") == pytest.approx(
        sum(m[c]["uar"] for c in CORRUPTIONS) / 3
    )
    # cfg.task picks the metrics
    reg = LSEF(24, 7, d_model=16, rank=3, task="regression")
    mr = evaluate_conditions(reg, config(task="regression", n_test=40), ("clean", "gaussian"))
    assert list(mr) == ["clean", "gaussian"] and all(
        set(v) == {"ccc_valence", "ccc_arousal", "ccc_mean"} for v in mr.values()
    )


def test_demo_reexports_conditions_and_corrupted_average():
    from lsef_ext import demo

    assert demo.CONDITIONS is CONDITIONS
    assert demo.corrupted_average is corrupted_average


def test_distributed_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == (3, 4, 1)


def test_load_data_feature_folder(tmp_path):
    import numpy as np

    (tmp_path / "features").mkdir()
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("clip,label,split\n")
        for i in range(6):
            f.write(f"c{i},{'ab'[i % 2]},{'train' if i < 4 else 'test'}\n")
            np.save(tmp_path / "features" / f"c{i}.npy", np.random.rand(10 + i, 5))
    x, y, nc = load_data(config(data=str(tmp_path), T=8), "train")[:3]
    assert x.shape == (4, 8, 5) and y.tolist() == [0, 1, 0, 1] and nc == 2


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def test_trainer_lowers_loss_and_writes_files(tmp_path):
    cfg = config(epochs=3, out=str(tmp_path / "run"), lr=5e-3)
    tr = Trainer(cfg, load_data(cfg, "train"), val=load_data(cfg, "test")[:2], progress=False)
    before = state(tr.net)
    hist = tr.fit()
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert all(math.isfinite(r["loss"]) for r in hist)
    assert {"val_war", "val_uar", "seconds"} <= set(hist[0])
    assert any(not torch.equal(before[k], v) for k, v in tr.net.state_dict().items())
    out = tmp_path / "run"
    assert (out / "checkpoint.pt").is_file() and not (out / "checkpoint.pt.tmp").exists()
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["config"]["epochs"] == 3 and len(meta["history"]) == 3
    assert meta["history"][-1]["loss"] == pytest.approx(hist[-1]["loss"])
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[2]["loss"]) == pytest.approx(hist[2]["loss"])
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # plain data: no code to unpickle
    assert ck["epoch"] == 3 and set(ck) >= {"model", "optimizer", "scheduler", "rng", "history"}
    for k, v in tr.net.state_dict().items():
        assert torch.equal(ck["model"][k], v)


def test_trainer_regression_and_baseline_no_rao():
    cfg = config(epochs=2, task="regression", n_train=128)
    tr = Trainer(cfg, load_data(cfg, "train"), val=load_data(cfg, "test")[:2], progress=False)
    hist = tr.fit()
    assert {"val_ccc_valence", "val_ccc_arousal"} <= set(hist[-1])
    cfg = config(epochs=3, model="meanpool-mlp", rao=False, lr=1e-2)
    tr = Trainer(cfg, load_data(cfg, "train"), progress=False)
    assert isinstance(tr.opt, torch.optim.AdamW)
    hist = tr.fit()
    assert hist[-1]["loss"] < hist[0]["loss"]


class _Crash(Exception):
    pass


def _crash_after(tr, epoch):
    save = tr.save

    def crashing_save():
        save()
        if tr.epoch == epoch:
            raise _Crash

    tr.save = crashing_save


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    cfg = config(epochs=3, out=str(tmp_path / "full"))
    data = load_data(cfg, "train")
    full = Trainer(cfg, data, progress=False)
    full.fit()

    cut = config(epochs=3, out=str(tmp_path / "cut"))
    tr = Trainer(cut, data, progress=False)
    _crash_after(tr, 2)
    with pytest.raises(_Crash):
        tr.fit()
    torch.manual_seed(12345)  # the resumed run must not depend on global RNG
    again = Trainer(config(epochs=3, out=str(tmp_path / "cut"), resume=True), data, progress=False)
    assert again.epoch == 2 and len(again.history) == 2
    hist = again.fit()
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    for k, v in full.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[k], v), k
    assert hist[2]["loss"] == full.history[2]["loss"]


def test_resume_extends_a_finished_run(tmp_path):
    # "train 2 epochs, then resume with epochs=3": continues at epoch 3 with 3 history rows.
    # Its weights are NOT those of an uninterrupted 3-epoch run, by construction: the cosine
    # schedule spans cfg.epochs, so the first run annealed to lr 0 over 2 epochs and the resumed
    # one jumps back to lr·0.25 for the third (asserted below, so a change is noticed).
    data = load_data(config(), "train")
    full = Trainer(config(epochs=3), data, progress=False)
    full.fit()
    first = Trainer(config(epochs=2, out=str(tmp_path)), data, progress=False)
    first.fit()
    more = Trainer(config(epochs=3, out=str(tmp_path), resume=True), data, progress=False)
    assert more.epoch == 2
    lrs = []
    step = more.train_step
    more.train_step = lambda xb, tb, lb=None: (
        lrs.append(more.opt.optimizer.param_groups[0]["lr"]),
        step(xb, tb, lb),
    )[1]
    hist = more.fit()
    # the first step uses the lr the first run ended with (0), the rest the 3-epoch cosine
    spe = more.steps_per_epoch
    assert len(lrs) == spe and lrs[0] == pytest.approx(0.0, abs=1e-12)
    expect = [
        SMALL["lr"] * 0.5 * (1 + math.cos(math.pi * s / (3 * spe)))
        for s in range(2 * spe + 1, 3 * spe)
    ]
    assert lrs[1:] == pytest.approx(expect)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[:2] == first.history
    assert len(json.loads((tmp_path / "metrics.json").read_text())["history"]) == 3
    diff = max(
        float((v - full.net.state_dict()[k]).abs().max()) for k, v in more.net.state_dict().items()
    )
    assert diff > 0
    # a finished run resumed with the same epochs does nothing more
    done = Trainer(config(epochs=3, out=str(tmp_path), resume=True), data, progress=False)
    assert done.fit() == hist


def test_resume_errors(tmp_path):
    data = load_data(config(), "train")
    with pytest.raises(FileNotFoundError, match="resume: no checkpoint at"):
        Trainer(config(out=str(tmp_path / "none"), resume=True), data, progress=False)
    with pytest.raises(FileNotFoundError, match=r"resume: no run folder .*set out \(--out DIR\)"):
        Trainer(config(resume=True), data, progress=False)
    Trainer(config(epochs=1, n_train=64, out=str(tmp_path)), data, progress=False).fit()
    with pytest.raises(ValueError, match=r"resume: checkpoint .* has rank=3, this run has rank=2"):
        Trainer(config(rank=2, out=str(tmp_path), resume=True), data, progress=False)
    with pytest.raises(ValueError, match="has model='lsef', this run has model='lsef-no-cim'"):
        Trainer(config(model="lsef-no-cim", out=str(tmp_path), resume=True), data, progress=False)
    with pytest.raises(ValueError, match="has rao=True, this run has rao=False"):
        Trainer(config(rao=False, out=str(tmp_path), resume=True), data, progress=False)


def test_out_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    data = load_data(config(n_train=64), "train")
    first = Trainer(config(epochs=1, n_train=64, out=str(tmp_path)), data, progress=False)
    first.fit()
    ckpt = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(
        RunError,
        match=rf"out folder {tmp_path} already holds a run \(checkpoint\.pt, metrics\.json, "
        r"metrics\.csv\): continue it with --resume, or replace it with --overwrite",
    ):
        Trainer(config(epochs=1, n_train=64, out=str(tmp_path), lr=1e-3), data, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == ckpt  # untouched
    # metrics alone (the checkpoint deleted) still mark a run
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(RunError, match=r"holds a run \(metrics\.json, metrics\.csv\)"):
        Trainer(config(epochs=1, n_train=64, out=str(tmp_path)), data, progress=False)
    # overwrite: a new run, whose files replace the old ones
    new = Trainer(
        config(epochs=1, n_train=64, out=str(tmp_path), seed=5, overwrite=True),
        data,
        progress=False,
    )
    assert new.epoch == 0
    new.fit()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["config"]["seed"] == 5 and saved["epoch"] == 1
    with pytest.raises(RunError, match="resume and overwrite exclude each other"):
        Trainer(
            config(out=str(tmp_path), resume=True, overwrite=True, seed=5), data, progress=False
        )
    # an empty folder, or one with other files, is free to use
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    Trainer(config(epochs=1, n_train=64, out=str(tmp_path / "other")), data, progress=False)


def test_unwritable_out_is_refused_before_training(tmp_path):
    data = load_data(config(n_train=64), "train")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RunError, match=f"out folder {blocker} exists and is not a folder"):
        Trainer(config(out=str(blocker)), data, progress=False)
    below = blocker / "run"
    with pytest.raises(
        RunError, match=f"cannot create the out folder {below}: {blocker} is not a folder"
    ):
        Trainer(config(out=str(below)), data, progress=False)
    # checked without leaving anything behind; created when the first epoch is saved
    new = tmp_path / "new" / "run"
    check_run_folder(config(out=str(new)))
    assert not (tmp_path / "new").exists()
    Trainer(config(out=str(new), epochs=1, n_train=64), data, progress=False).fit()
    assert (new / "checkpoint.pt").is_file()
    assert sorted(p.name for p in new.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json"]


def test_trainer_refuses_counts_and_rates_that_make_no_sense():
    data = load_data(config(n_train=64), "train")
    for kw, message in [
        (dict(batch_size=0), "TrainConfig: batch_size must be >= 1, got 0"),
        (dict(batch_size=-8), "TrainConfig: batch_size must be >= 1, got -8"),
        (dict(epochs=-1), "TrainConfig: epochs must be >= 0, got -1"),
        (dict(lr=0.0), "TrainConfig: lr must be a finite number > 0, got 0.0"),
        (dict(lr=float("nan")), "TrainConfig: lr must be a finite number > 0, got nan"),
        (dict(weight_decay=-1.0), "TrainConfig: weight_decay must be a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Trainer(config(**kw), data, progress=False)
    with pytest.raises(TypeError, match="TrainConfig: batch_size must be an integer, got float"):
        Trainer(config(batch_size=32.0), data, progress=False)


def test_resume_refuses_changed_settings_unless_accepted(tmp_path):
    data = load_data(config(n_train=64), "train")
    base = dict(epochs=1, n_train=64, out=str(tmp_path))
    Trainer(config(**base), data, progress=False).fit()
    for kw, said in [
        (dict(lr=1e-3), "lr=0.003; this run has lr=0.001"),
        (dict(ops="ref"), "ops='ext'; this run has ops='ref'"),
        (dict(data=str(tmp_path)), f"data=None; this run has data='{tmp_path}'"),
        (dict(batch_size=16), "batch_size=32; this run has batch_size=16"),
        (dict(lr=1e-3, seed=4), "lr=0.003, seed=0; this run has lr=0.001, seed=4"),
    ]:
        with pytest.raises(RunError, match=re.escape(said) + ".*--accept-changes"):
            Trainer(config(**{**base, "epochs": 2, **kw}, resume=True), data, progress=False)
    # accepted: the new learning rate and weight decay apply from the next step
    tr = Trainer(
        config(
            **{**base, "epochs": 2}, lr=1e-3, weight_decay=0.5, resume=True, accept_changes=True
        ),
        data,
        progress=False,
    )
    steps = tr.steps_per_epoch
    factor = 0.5 * (1 + math.cos(math.pi * steps / (2 * steps)))
    for group in tr._inner.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * factor)
        assert group["weight_decay"] == 0.5
    lrs = []
    step = tr.train_step
    tr.train_step = lambda xb, tb, lb=None: (
        lrs.append(tr._inner.param_groups[0]["lr"]),
        step(xb, tb, lb),
    )[1]
    tr.fit()
    expect = [
        1e-3 * 0.5 * (1 + math.cos(math.pi * s / (2 * steps))) for s in range(steps, 2 * steps)
    ]
    assert lrs == pytest.approx(expect)


def test_resume_same_data_folder_spelled_differently(tmp_path):
    import numpy as np

    root = tmp_path / "feats"
    (root / "features").mkdir(parents=True)
    with open(root / "labels.csv", "w") as f:
        f.write("clip,label,split\n")
        for i in range(8):
            f.write(f"c{i},{'ab'[i % 2]},train\n")
            np.save(root / "features" / f"c{i}.npy", np.random.rand(8, 6).astype("float32"))
    cfg = config(data=str(root), epochs=1, out=str(tmp_path / "run"), rank=2)
    data = load_data(cfg, "train")
    Trainer(cfg, data, progress=False).fit()
    again = config(
        data=str(tmp_path / "feats" / ".." / "feats"),
        epochs=2,
        out=str(tmp_path / "run"),
        rank=2,
        resume=True,
    )
    assert Trainer(again, data, progress=False).epoch == 1


def test_resume_names_a_checkpoint_that_does_not_fit(tmp_path):
    data = load_data(config(n_train=64), "train")
    Trainer(config(epochs=1, n_train=64, out=str(tmp_path)), data, progress=False).fit()
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    # another feature width: the model's tensors have other shapes
    wide = load_data(config(n_train=64, D=48), "train")
    with pytest.raises(
        RunError, match=r"D=24; this run has D=48\. Resume with the checkpoint's values"
    ):
        Trainer(config(n_train=64, D=48, out=str(tmp_path), resume=True), wide, progress=False)
    with pytest.raises(
        RunError, match=rf"resume: checkpoint {path} does not fit this run \(.*size mismatch"
    ):
        Trainer(
            config(n_train=64, D=48, out=str(tmp_path), resume=True, accept_changes=True),
            wide,
            progress=False,
        )
    for key, value in [("epoch", "three"), ("epoch", -1), ("history", {}), ("config", [])]:
        torch.save({**state, key: value}, path)
        with pytest.raises(
            RunError, match=rf"resume: {path} is not a checkpoint of lsef train \(its config"
        ):
            Trainer(config(n_train=64, out=str(tmp_path), resume=True), data, progress=False)
    torch.save({**state, "optimizer": {"state": {}, "param_groups": []}}, path)
    with pytest.raises(RunError, match=rf"checkpoint {path} does not fit this run \(ValueError"):
        Trainer(config(n_train=64, out=str(tmp_path), resume=True), data, progress=False)


class _OpensAFile:
    """Unpickled by a permissive loader, this calls open(path, "w"): code run from the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_runs_no_code_from_the_checkpoint(tmp_path):
    data = load_data(config(), "train")
    marker = tmp_path / "code-ran"
    torch.save({"config": _OpensAFile(str(marker)), "epoch": 0}, tmp_path / "checkpoint.pt")
    with pytest.raises(
        ValueError, match=r"resume: cannot read checkpoint .*checkpoint\.pt \(UnpicklingError"
    ):
        Trainer(config(out=str(tmp_path), resume=True), data, progress=False)
    assert not marker.exists()


def test_resume_names_a_damaged_or_foreign_checkpoint(tmp_path):
    data = load_data(config(), "train")
    Trainer(config(epochs=1, n_train=64, out=str(tmp_path)), data, progress=False).fit()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])  # cut off, as by a full disk
    with pytest.raises(
        ValueError, match=r"resume: cannot read checkpoint .*checkpoint\.pt .*damaged"
    ):
        Trainer(config(out=str(tmp_path), resume=True), data, progress=False)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(
        ValueError,
        match=r"checkpoint\.pt was written by an older lsef_ext \(no format number\); this "
        r"lsef_ext reads checkpoint format 2",
    ):
        Trainer(config(out=str(tmp_path), resume=True), data, progress=False)
    torch.save({"format": 2, "weights": torch.zeros(2)}, path)
    with pytest.raises(
        ValueError, match=r"checkpoint\.pt is not a checkpoint of lsef train \(missing config, "
    ):
        Trainer(config(out=str(tmp_path), resume=True), data, progress=False)


def test_metrics_files_are_replaced_whole(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous metrics files complete."""
    cfg = config(epochs=1, n_train=64, out=str(tmp_path))
    tr = Trainer(cfg, load_data(cfg, "train"), progress=False)
    tr.fit()
    json_before = (tmp_path / "metrics.json").read_text()
    csv_before = (tmp_path / "metrics.csv").read_text()
    tr.history.append(dict(tr.history[0], epoch=2))

    def dies(obj, f, **kw):
        f.write('{"config": ')
        raise OSError("disk full")

    monkeypatch.setattr("lsef_ext.train.json.dump", dies)
    with pytest.raises(OSError, match="disk full"):
        tr.write_metrics()
    assert (tmp_path / "metrics.json").read_text() == json_before
    monkeypatch.undo()

    def dies_too(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr("lsef_ext.train.csv.DictWriter.writerows", dies_too)
    with pytest.raises(OSError, match="disk full"):
        tr.write_metrics()
    assert (tmp_path / "metrics.csv").read_text() == csv_before
    json.loads((tmp_path / "metrics.json").read_text())  # the new one, complete


# ---------------------------------------------------------------------------------------------
# best.pt: ties in the val score (issue 30)
# ---------------------------------------------------------------------------------------------


def test_select_best_rule():
    from lsef_ext.train import select_best

    first = select_best(None, 1, "val_war", 0.5, 0.9)
    assert first == {
        "epoch": 1,
        "metric": "val_war",
        "score": 0.5,
        "val_loss": 0.9,
        "reason": "first val_war",
        "gained": 1,
    }
    assert select_best(None, 1, "val_war", math.nan, 0.9) is None  # a NaN score never wins
    assert select_best(first, 2, "val_war", math.nan, 0.1) is first
    assert select_best(first, 2, "val_war", 0.4, 0.1) is first  # lower score, lower loss: no
    higher = select_best(first, 2, "val_war", 0.75, 2.0)
    assert higher["epoch"] == 2 and higher["reason"] == "higher val_war" and higher["gained"] == 2
    assert select_best(first, 2, "val_war", 0.5, 0.95) is first  # equal score, higher loss
    lower = select_best(first, 2, "val_war", 0.5, 0.8)
    assert lower["reason"] == "equal val_war, lower val loss" and lower["gained"] == 2
    same = select_best(lower, 3, "val_war", 0.5, 0.8)
    assert same["epoch"] == 3 and same["reason"] == "equal val_war and val loss, later epoch"
    assert same["gained"] == 2  # a full tie moves best.pt but is no gain for patience
    assert select_best(lower, 3, "val_war", 0.5, math.nan) is lower  # NaN loses to a number
    nan_loss = select_best(None, 1, "val_war", 0.5, math.nan)
    assert select_best(nan_loss, 2, "val_war", 0.5, 3.0)["reason"].endswith("lower val loss")
    old = {"epoch": 1, "metric": "val_war", "score": 0.5}  # an older checkpoint's record
    assert select_best(old, 2, "val_war", 0.5, 3.0)["reason"] == "equal val_war, lower val loss"


def _easy_clips(n, seed):
    """Three well separated classes (the same class means for every seed): val WAR is 100 %
    from the first epoch on."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    t = torch.arange(n) % 3
    return means[t][:, None, :] + 0.8 * torch.randn(n, 6, 8, generator=g), t


def test_saturated_val_score_keeps_the_epoch_with_the_lowest_val_loss(tmp_path):
    """Val WAR 100 % in every epoch (as on a real set with a small val split): best.pt is the
    epoch with the lowest val loss, not the first, undertrained one. The val loss is the real
    one, computed in the same val pass."""
    x, t = _easy_clips(96, 1)
    vx, vt = _easy_clips(48, 2)
    cfg = config(epochs=4, out=str(tmp_path), lr=1e-2, batch_size=16, rao=False)
    tr = Trainer(cfg, (x, t, 3), val=(vx, vt), progress=False)
    hist = tr.fit()
    assert [row["val_war"] for row in hist] == [1.0] * 4  # saturated from epoch 1
    losses = [row["val_loss"] for row in hist]
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 4
    want = min(range(4), key=lambda i: (losses[i], -i)) + 1
    assert want > 1  # training lowers the val loss: the first epoch is not the best one
    assert tr.best["epoch"] == want and tr.best["val_loss"] == losses[want - 1]
    assert tr.best["score"] == 1.0 and tr.best["reason"] == "equal val_war, lower val loss"
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == want and saved["best"] == tr.best
    assert json.loads((tmp_path / "metrics.json").read_text())["best"] == tr.best
    with open(tmp_path / "metrics.csv") as f:
        assert [float(r["val_loss"]) for r in csv.DictReader(f)] == pytest.approx(losses)
    # val_loss is the task loss (cross-entropy) of best.pt's model on the val clips
    from lsef_ext.train import load_checkpoint

    model = load_checkpoint(str(tmp_path / "best.pt")).model
    ce = torch.nn.functional.cross_entropy(predict(model, vx), vt)
    assert float(ce) == pytest.approx(tr.best["val_loss"], rel=1e-6)


def test_ties_in_score_and_loss_keep_the_later_epoch_and_patience_follows_the_rule(
    tmp_path, monkeypatch, capsys
):
    import lsef_ext.train as train_mod

    losses = iter([0.9, 0.5, 0.7, 0.5, 0.6, 0.4])
    real = train_mod.evaluate
    monkeypatch.setattr(
        train_mod, "evaluate", lambda *a, **k: {**real(*a, **k), "war": 1.0, "loss": next(losses)}
    )
    cfg = config(epochs=6, n_train=64, out=str(tmp_path), patience=3, model="meanpool-mlp")
    tr = Trainer(cfg, load_data(cfg, "train"), val=load_data(cfg, "val"), progress=True)
    tr.fit()
    # epoch 2 lowers the loss; epoch 4 ties it (the later epoch is kept) but gains nothing, so
    # patience counts from epoch 2 and stops after epoch 5
    assert tr.stopped_early and len(tr.history) == 5
    assert tr.best["epoch"] == 4 and tr.best["gained"] == 2
    assert tr.best["reason"] == "equal val_war and val loss, later epoch"
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 4
    out = capsys.readouterr().out
    assert "early stop after epoch 5: no better val_war (nor an equal one with a lower val " in out
    assert "val loss 0.5000" in out


# ---------------------------------------------------------------------------------------------
# resume: nothing to resume, and the metrics files mended (issue 30)
# ---------------------------------------------------------------------------------------------


def test_resume_with_only_a_leftover_tmp_starts_from_epoch_0(tmp_path):
    """Killed before the first checkpoint: only checkpoint.pt.tmp (cut short) is there."""
    data = load_data(config(n_train=64), "train")
    done = tmp_path / "done"
    Trainer(config(epochs=1, n_train=64, out=str(done)), data, progress=False).fit()
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt.tmp").write_bytes((done / "checkpoint.pt").read_bytes()[:1000])
    tr = Trainer(config(epochs=1, n_train=64, out=str(run), resume=True), data, progress=False)
    assert tr.resume_note == (
        f"resume: nothing to resume in {run} (no checkpoint.pt; the earlier run stopped before "
        "its first epoch ended): starting from epoch 0"
    )
    assert tr.epoch == 0 and not tr.resumed and tr.history == []
    tr.fit()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (run / "checkpoint.pt.tmp").exists()
    # and now it resumes for real
    again = Trainer(config(epochs=2, n_train=64, out=str(run), resume=True), data, progress=False)
    assert again.resumed and again.resume_note is None and again.epoch == 1
    # a plain run takes a folder whose only run files are *.tmp leftovers as empty
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("checkpoint.pt.tmp", "best.pt.tmp", "metrics.json.tmp"):
        (stale / name).write_bytes(b"")
    assert check_run_folder(config(out=str(stale))) is None
    Trainer(config(epochs=1, n_train=64, out=str(stale)), data, progress=False).fit()
    assert torch.load(stale / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # an empty folder has nothing to resume either
    (tmp_path / "empty").mkdir()
    assert "nothing to resume" in check_run_folder(config(out=str(tmp_path / "empty"), resume=True))


def test_resume_without_checkpoint_but_other_run_files_says_what_to_do(tmp_path):
    data = load_data(config(n_train=64), "train")
    Trainer(config(epochs=1, n_train=64, out=str(tmp_path)), data, progress=False).fit()
    (tmp_path / "checkpoint.pt").rename(tmp_path / "checkpoint.pt.tmp")
    with pytest.raises(
        RunError,
        match=rf"resume: no checkpoint at {tmp_path / 'checkpoint.pt'}, but {tmp_path} holds "
        r"metrics\.json, metrics\.csv: there is no state to continue from; start the run "
        r"again with --overwrite",
    ):
        Trainer(config(epochs=1, n_train=64, out=str(tmp_path), resume=True), data, progress=False)
    # what the message says works
    new = Trainer(
        config(epochs=1, n_train=64, out=str(tmp_path), overwrite=True), data, progress=False
    )
    new.fit()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_resume_rewrites_damaged_metrics_from_the_checkpoint(tmp_path):
    """The last epoch's metrics.json write was cut (an empty file) and metrics.csv is stale:
    a resume with no epoch left to train writes both again from the checkpoint's history."""
    cfg = config(epochs=2, n_train=64, out=str(tmp_path))
    data = load_data(cfg, "train")
    tr = Trainer(cfg, data, val=load_data(cfg, "val"), progress=False)
    tr.fit()
    (tmp_path / "metrics.json").write_text("")
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("\n".join(csv_path.read_text().splitlines()[:2]) + "\n")  # epoch 1 only
    again = Trainer(config(epochs=2, n_train=64, out=str(tmp_path), resume=True), data)
    assert again.fit() == tr.history  # nothing trained
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["history"] == tr.history and saved["best"] == tr.best
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["val_loss"]) == pytest.approx(tr.history[1]["val_loss"])


def test_metrics_csv_takes_every_rows_keys(tmp_path):
    """A history resumed from a run whose rows lacked val_loss still writes metrics.csv."""
    cfg = config(epochs=1, n_train=64, out=str(tmp_path))
    tr = Trainer(cfg, load_data(cfg, "train"), progress=False)
    tr.history = [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5, "val_loss": 0.7}]
    tr.write_metrics()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"epoch": "1", "loss": "1.0", "val_loss": ""},
        {"epoch": "2", "loss": "0.5", "val_loss": "0.7"},
    ]


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, 2 CPU processes under torchrun)
# ---------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from lsef_ext.train import TrainConfig, Trainer, load_data
    out, n_train = sys.argv[1], int(sys.argv[2])
    cfg = TrainConfig(n_train=n_train, n_test=32, T=8, D=24, d_model=16, rank=3, batch_size=32,
                      epochs=2, lr=3e-3, out=os.path.join(out, "run"))
    tr = Trainer(cfg, load_data(cfg, "train"), progress=False)
    init = {k: v.clone() for k, v in tr.net.state_dict().items()}
    hist = tr.fit()
    rank = int(os.environ["RANK"])
    torch.save(tr.net.state_dict(), os.path.join(out, f"params{rank}.pt"))
    changed = any(not torch.equal(init[k], v) for k, v in tr.net.state_dict().items())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": tr.world, "distributed": tr.distributed, "ddp": type(tr.model).__name__,
                   "steps_per_epoch": tr.steps_per_epoch, "changed": changed, "history": hist}, f)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, n_train, timeout):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        str(tmp_path),
        str(n_train),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_two_cpu_processes_agree(tmp_path):
    proc = _torchrun(tmp_path, 256, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for i in info:
        assert i["world"] == 2 and i["distributed"] and i["ddp"] == "DistributedDataParallel"
        assert i["steps_per_epoch"] == 4  # 256 clips / (32 per batch * 2 ranks)
        assert i["changed"] and len(i["history"]) == 2
    p0 = torch.load(tmp_path / "params0.pt")
    p1 = torch.load(tmp_path / "params1.pt")
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    # rank 0 wrote the checkpoint (of the unwrapped model) and the metrics; rank 1 wrote nothing
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2
    for k in p0:
        assert torch.equal(ck["model"][k], p0[k])
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_ddp_uneven_shards(tmp_path):
    proc = _torchrun(tmp_path, 200, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    p0 = torch.load(tmp_path / "params0.pt")
    p1 = torch.load(tmp_path / "params1.pt")
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
