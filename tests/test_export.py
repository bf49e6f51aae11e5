"""Deployment (docs/DESIGN.md §13): every model of ``lsef_ext.nn`` under ``torch.export`` gives
what it gives eagerly, and ``lsef export`` writes a file that a fresh process, importing only
``torch`` and ``lsef_ext``, runs to the predictions of the checkpoint's model (what
``lsef predict`` gives on the raw features).

The subprocesses run on one thread, with time limits far above what they take on an idle 2-core
machine (the AOTInductor compile about 30 s), so that a loaded CI machine does not reach them.
"""

import ast
import csv
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.utils._pytree import tree_flatten

import lsef_cli as cli
from test_eval_predict import CLASSES, make_folder
from lsef_ext import export as lx
from lsef_ext.data import FeatureFolder, standardise
from lsef_ext.nn import CIM, DDM, LSEF, SEM, LSEFOutput, MeanPoolMLP, TemporalTransformer
from lsef_ext.nn import build_model
from lsef_ext.train import TrainConfig, Trainer, load_checkpoint, predict, prepare_data

CWD = tempfile.gettempdir()  # outside the source tree, as users run it
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TIMEOUT = 600


@pytest.fixture(autouse=True)
def _keep_threads():
    """In-process runs of the CLI set torch's thread count: restore it for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


B, T, D, K, W = 3, 10, 12, 5, 16  # clips, frames, channels, classes, d_model


def lsef_kw(**kw):
    return dict(d_model=W, **kw)


def _x():
    return (torch.randn(B, T, D),)


def _x_l():
    x = torch.randn(B, T, D)
    return x, 0.8 * x + 0.1 * torch.randn(B, T, D)


def _z():
    return torch.randn(B, T, W), torch.randn(B, T, W)


# (name, module factory, inputs factory): every model of lsef_ext.nn, each --model of the CLI
# (the LSEF ones also without SEM's robust PCA, rpca_steps=0), and SEM, DDM, CIM alone
CASES = [
    pytest.param("lsef", lambda: LSEF(D, K, **lsef_kw()), _x, id="lsef"),
    pytest.param(
        "lsef(rpca_steps=0)", lambda: LSEF(D, K, **lsef_kw(rpca_steps=0)), _x, id="lsef-rpca0"
    ),
    pytest.param(
        "lsef regression (rpca_steps=0)",
        lambda: LSEF(D, K, task="regression", num_targets=3, **lsef_kw(rpca_steps=0)),
        _x,
        id="lsef-regression-rpca0",
    ),
    pytest.param(
        "lsef-no-sem", lambda: build_model("lsef-no-sem", D, K, **lsef_kw()), _x, id="lsef-no-sem"
    ),
    pytest.param(
        "lsef-no-ddm",
        lambda: build_model("lsef-no-ddm", D, K, **lsef_kw()),
        _x,
        id="lsef-no-ddm",
    ),
    pytest.param(
        "lsef-no-ddm (rpca_steps=0)",
        lambda: build_model("lsef-no-ddm", D, K, **lsef_kw(rpca_steps=0)),
        _x,
        id="lsef-no-ddm-rpca0",
    ),
    pytest.param(
        "lsef-no-cim",
        lambda: build_model("lsef-no-cim", D, K, **lsef_kw()),
        _x,
        id="lsef-no-cim",
    ),
    pytest.param(
        "lsef-no-cim (rpca_steps=0)",
        lambda: build_model("lsef-no-cim", D, K, **lsef_kw(rpca_steps=0)),
        _x,
        id="lsef-no-cim-rpca0",
    ),
    pytest.param("meanpool-mlp", lambda: MeanPoolMLP(D, K), _x, id="meanpool-mlp"),
    pytest.param(
        "meanpool-mlp regression",
        lambda: MeanPoolMLP(D, K, task="regression"),
        _x,
        id="meanpool-mlp-regression",
    ),
    pytest.param("transformer", lambda: TemporalTransformer(D, K), _x, id="transformer"),
    pytest.param("SEM", lambda: SEM(D, W), _x, id="SEM"),
    pytest.param("SEM(rpca_steps=0)", lambda: SEM(D, W, rpca_steps=0), _x, id="SEM-rpca0"),
    pytest.param("DDM", lambda: DDM(D, W), _x_l, id="DDM"),
    pytest.param("CIM", lambda: CIM(W), _z, id="CIM"),
]


def assert_same_outputs(got, want):
    """Same pytree structure (an LSEFOutput with the same terms, a tuple, a tensor) and the
    same tensors, to float32 rounding."""
    g, gspec = tree_flatten(got)
    w, wspec = tree_flatten(want)
    assert gspec == wspec
    assert type(got) is type(want)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lsef_output_is_a_pytree_and_keeps_its_attributes():
    out = LSEF(D, K, **lsef_kw(rpca_steps=0)).eval()(torch.randn(B, T, D))
    leaves, spec = tree_flatten(out)
    assert len(leaves) == 3 + 3  # pred, L, S and the three terms of the dict
    assert [tuple(t.shape) for t in leaves[:3]] == [(B, K), (B, T, D), (B, T, D)]
    back = spec.unflatten(leaves)
    assert isinstance(back, LSEFOutput) and back.terms.keys() == out.terms.keys()
    assert back.pred is out.pred and back.terms["recon"] is out.terms["recon"]


@pytest.mark.parametrize("name, make, inputs", CASES)
def test_every_model_exports_and_equals_eager(name, make, inputs):
    """torch.export on a batch of 3 with the batch size dynamic; the exported program at
    batch sizes 3, 1 and 5 equals eager."""
    model = make().eval()
    args = inputs()
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in args)
    ep = torch.export.export(model, args, dynamic_shapes=shapes)
    run = ep.module()
    for n in (B, 1, 5):
        xs = tuple(a[:n] if n <= B else torch.cat([a, a[: n - B]]) for a in args)
        with torch.no_grad():
            assert_same_outputs(run(*xs), model(*xs))


def test_an_exported_lsef_saves_and_loads_with_its_output_type(tmp_path):
    """torch.export.save / load of a program that returns an LSEFOutput (the pytree node has
    a serialized type name)."""
    model = LSEF(D, K, **lsef_kw(rpca_steps=0)).eval()
    x = torch.randn(B, T, D)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "lsef.pt2")
    out = torch.export.load(tmp_path / "lsef.pt2").module()(x)
    with torch.no_grad():
        assert_same_outputs(out, model(x))


def test_predictor_bakes_in_the_normalisation():
    model = MeanPoolMLP(D, K).eval()
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    x = torch.randn(B, T, D) * 3 + 2
    p = lx.Predictor(model, mean, std).eval()
    torch.testing.assert_close(p(x), model((x - mean) / std))
    lsef = LSEF(D, K, **lsef_kw(rpca_steps=0)).eval()
    assert torch.equal(lx.Predictor(lsef)(x), lsef(x).pred)  # the prediction of an LSEFOutput
    with pytest.raises(ValueError, match="both mean and std"):
        lx.Predictor(model, mean)


# --------------------------------------------------------------------------------------------
# lsef export, and the file in a fresh process
# --------------------------------------------------------------------------------------------


def train_checkpoint(root, out, model, task="classification", **extra):
    cfg = TrainConfig(
        model=model,
        task=task,
        data=str(root),
        T="auto",
        epochs=2,
        batch_size=16,
        d_model=8,
        rank=2,
        out=str(out),
        extra=extra,
    )
    train, val, meta, _ = prepare_data(cfg)
    assert meta["norm"] is not None  # standardised: the export must carry it
    Trainer(cfg, train, val=val, progress=False, meta=meta).fit()
    return out / "best.pt"


FRESH = """
import sys
import torch, lsef_ext
path, kind, clips, out = sys.argv[1:]
if kind == "aoti":
    run = torch._inductor.aoti_load_package(path)
else:
    run = torch.export.load(path).module()
with torch.no_grad():
    torch.save(run(torch.load(clips)), out)
print(sorted(m for m in sys.modules if m.startswith("lsef")))
"""


def lsef_export(*args):
    return subprocess.run(
        [sys.executable, "-m", "lsef_cli", "export", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=CWD,
        env=ENV,
    )


EXPORTS = [
    pytest.param("lsef", "classification", "auto", id="lsef-aoti"),
    pytest.param("transformer", "regression", "program", id="transformer-regression-program"),
]


@pytest.mark.parametrize("model, task, fmt", EXPORTS)
def test_lsef_export_runs_in_a_fresh_process_to_the_eager_predictions(
    tmp_path, capsys, model, task, fmt
):
    targets = ["valence", "arousal"] if task == "regression" else None
    root = make_folder(tmp_path / "data", targets=targets)
    ckpt = train_checkpoint(root, tmp_path / "run", model, task)
    pt2 = tmp_path / "model.pt2"
    r = lsef_export(str(ckpt), "--out", str(pt2), "--format", fmt, "--threads", "1")
    assert r.returncode == 0, r.stderr
    kind = "aoti" if fmt == "auto" else "program"
    said = "an AOTInductor package" if kind == "aoti" else "an ExportedProgram"
    assert f"-> {pt2}, {said}" in r.stdout, r.stdout
    assert "standardised inside with the checkpoint's mean and std" in r.stdout
    assert lx.file_kind(str(pt2)) == kind

    # the raw clips of the folder (every clip has all 12 frames), and what eager gives
    ds = FeatureFolder(str(root), split=None, frames=12, labelled=False)
    assert ds.lengths is None or bool((ds.lengths == 12).all())
    clips = tmp_path / "clips.pt"
    torch.save(ds.x, clips)
    ck = load_checkpoint(str(ckpt))
    norm = ck.meta["norm"]
    want = predict(
        ck.model, standardise(ds.x, torch.tensor(norm["mean"]), torch.tensor(norm["std"]))
    )

    got_path = tmp_path / "got.pt"
    fresh = subprocess.run(
        [sys.executable, "-c", FRESH, str(pt2), kind, str(clips), str(got_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=CWD,
        env=ENV,
    )
    assert fresh.returncode == 0, fresh.stderr
    # the file needs the compiled ops (lsef_ext and its ops), not the model code
    loaded = set(ast.literal_eval(fresh.stdout.strip().splitlines()[-1]))
    assert "lsef_ext.ops" in loaded and not loaded & {"lsef_ext.nn", "lsef_ext.train"}, loaded
    got = torch.load(got_path)
    assert got.shape == want.shape == (len(ds.clips), 3 if task == "classification" else 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # and what `lsef predict` writes for the same raw clips
    csv_path = tmp_path / "predictions.csv"
    rc = cli.main(
        ["predict", str(ckpt), "--data", str(root), "--out", str(csv_path), "--threads", "1"]
    )
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(csv_path)))
    if task == "classification":
        probs = got.softmax(-1)
        cols = [f"p_{c}" for c in CLASSES]
        assert [row["predicted"] for row in rows] == [CLASSES[int(i)] for i in probs.argmax(-1)]
    else:
        probs, cols = got, targets
    table = torch.tensor([[float(row[c]) for c in cols] for row in rows])
    torch.testing.assert_close(table, probs, rtol=1e-5, atol=1e-5)


def test_export_falls_back_to_an_exported_program_and_says_why(tmp_path, capsys, monkeypatch):
    """Where AOTInductor fails (here: made to), --format auto writes an ExportedProgram and the
    output line says so and why; --format aoti refuses instead."""
    root = make_folder(tmp_path / "data", n=24)
    ckpt = train_checkpoint(root, tmp_path / "run", "meanpool-mlp")

    def no_compiler(*a, **k):
        raise RuntimeError("no C++ compiler here\nmore detail")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    pt2 = tmp_path / "model.pt2"
    rc = cli.main(["export", str(ckpt), "--out", str(pt2), "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert (
        f"-> {pt2}, an ExportedProgram (torch.export.save), not an AOTInductor package: "
        "AOTInductor failed: RuntimeError: no C++ compiler here\n" in out
    ), out
    assert lx.file_kind(str(pt2)) == "program"
    x = torch.randn(2, 12, 6) * 3 + 5
    ck = load_checkpoint(str(ckpt))
    torch.testing.assert_close(lx.load(str(pt2))(x), lx.predictor(ck)(x))
    rc = cli.main(["export", str(ckpt), "--out", str(pt2), "--format", "aoti", "--threads", "1"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("lsef: error: AOTInductor cannot compile the model: ")
    assert len(err.splitlines()) == 1, err
    assert lx.file_kind(str(pt2)) == "program"  # the earlier file is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.pt2", "run"]
