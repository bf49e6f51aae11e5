"""The `lsef` command, run as users run it: a subprocess.

Every run uses one thread (OMP_NUM_THREADS=1 in its environment, and --threads 1 where the
command takes it), so a busy machine slows it down without oversubscribing the cores. Each run
has its own time limit, about 20 times what it takes on an idle 2-core machine (demo --quick
18 s, bench --quick 7 s, the train runs 2-4 s each, info 2 s), so that a loaded machine does
not reach it and a hang still ends.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch


# Run outside the source tree, so `python -m` imports the installed package, not ./lsef_ext.
CWD = tempfile.gettempdir()


def lsef(*args, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "lsef_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        cwd=CWD,
        env=env,
    ).stdout


def test_info_reports_build():
    out = lsef("info", timeout=60)
    assert "compiled backends" in out and "CPU" in out
    assert re.search(rf"^torch \(running\) +{re.escape(torch.__version__)}$", out, re.M)
    # one wheel for every torch from the stable ABI's target on (docs/DESIGN.md §15)
    assert re.search(r"^torch \(supported\) +>= 2\.10 \(built with 2\.\d+", out, re.M)
    assert re.search(r"^threads +1$", out, re.M)  # OMP_NUM_THREADS=1


def test_bench_quick_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    out = lsef(
        "bench", "--quick", "--device", "cpu", "--threads", "1", "--json", str(path), timeout=180
    )
    report = json.loads(path.read_text())
    cases = {row["case"] for row in report["rows"]}
    # quick runs label each case with the sizes they use
    assert {
        "soft_threshold fwd, per-channel lam (2048, 512)",
        "rank_scale (32,16,512) r=4",
        "rsvd (2, 16, 128), k = 4",
        "lowrank fwd+bwd (16, 16, 512), k = 4",
        "lowrank_sparse rpca, planted 40 x 40, rank 4",
        "LSEF training, 10 steps (8, 16, 128): fwd+bwd+RAO",
    } <= cases
    assert not any("B=256" in c or "(256, 16, 512)" in c for c in cases)  # full-run sizes
    assert report["machine"]["threads"] == 1
    assert f"wrote {path}" in out and not os.path.exists(str(path) + ".tmp")
    for row in report["rows"]:
        assert row["median_ms"] > 0
        assert row["target"] is None  # quick runs do not judge targets
        if row["variant"] == "lsef_ext":
            assert row["speedup"] == 1.0
    assert report["copy_bandwidth_GBps"]["cpu"] > 0
    assert "soft_threshold fwd, scalar lam (2048, 512) " in out and "memory floor" in out
    # every CPU rsvd case is also timed against its compute floor (flops / sgemm rate)
    rsvd_cases = {r["case"] for r in report["rows"] if r["case"].startswith("rsvd (")}
    floors = {r["case"]: r for r in report["rows"] if r["variant"] == "compute floor"}
    assert rsvd_cases and rsvd_cases <= set(floors)
    rate = report["sgemm_GFLOPs"]["cpu"] * 1e9
    for name, row in floors.items():
        ext = next(r for r in report["rows"] if r["case"] == name and r["variant"] == "lsef_ext")
        assert row["median_ms"] == pytest.approx(row["flops"] / rate * 1e3)
        assert row["floor_ratio"] == pytest.approx(ext["median_ms"] / row["median_ms"])
    assert "compute floor (sgemm rate)" in out and "float32 matrix product cpu:" in out


def test_bench_filter():
    out = lsef(
        "bench",
        "--quick",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--filter",
        "rank_scale",
        timeout=120,
    )
    assert "rank_scale" in out and "soft_threshold fwd" not in out


def test_unknown_command_fails_with_usage():
    r = subprocess.run(
        [sys.executable, "-m", "lsef_cli", "nope"],
        capture_output=True,
        text=True,
        cwd=CWD,
        timeout=60,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 2 and r.stderr == (
        "lsef: error: argument COMMAND: invalid choice: 'nope' (choose from 'demo', 'train', "
        "'eval', 'predict', 'export', 'info', 'bench') (see 'lsef --help')\n"
    )


def test_demo_quick_trains_reports_and_draws(tmp_path):
    out = lsef("demo", "--quick", "--threads", "1", "--out", str(tmp_path / "demo"), timeout=600)
    assert f"figures and results.json go to {tmp_path / 'demo'}" in out
    assert "| LSEF |" in out and "| temporal transformer |" in out and "| mean-pool MLP |" in out
    for condition in ("clean", "frame_drop", "frame_drop_known", "impulse", "gaussian"):
        assert f"{condition} WAR / UAR" in out
    for name in ("decomposition.png", "training.png", "robustness.png"):
        data = (tmp_path / "demo" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    results = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    lsef_war = results["lsef"]["metrics"]["clean"]["war"]
    assert 1 / 7 + 0.2 < lsef_war <= 1.0  # it learned something even in the quick setting
    assert "lsef_ext" in out and "reference" in out  # the op speed table


def test_train_writes_checkpoint_and_resumes(tmp_path):
    run = tmp_path / "run"
    common = [
        "train",
        "--model",
        "lsef",
        "--n-train",
        "128",
        "--n-test",
        "64",
        "--batch-size",
        "32",
        "--out",
        str(run),
        "--no-progress",
        "--threads",
        "1",
    ]
    out = lsef(*common, "--epochs", "1", timeout=120)
    assert "epoch 1" in out and (run / "checkpoint.pt").is_file()
    assert "1 process(es) of 1 thread(s)" in out
    said = f"run folder {run}: checkpoint.pt after every epoch, best.pt at the best val score, "
    assert said + "metrics.csv, metrics.json\n" in out
    out = lsef(*common, "--epochs", "2", "--resume", timeout=120)
    assert said + "metrics.csv, metrics.json (resumed)" in out
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    # one line per test condition, clean first, in the order of CONDITIONS, after the epochs
    tests = [line for line in out.splitlines() if line.startswith("  test under ")]
    assert [line.split(":")[0] for line in tests] == [
        "  test under clean",
        "  test under frame_drop",
        "  test under frame_drop_known",
        "  test under impulse",
        "  test under gaussian",
    ]
    assert all(
        re.fullmatch(r"  test under \w+: WAR \d+\.\d%  UAR \d+\.\d%", line) for line in tests
    )
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,loss") and len(rows) == 3
    assert rows[0].split(",")[-1] == "val_loss"  # the val loss of every epoch
    # the last lines say which epoch best.pt holds and why
    best = json.loads((run / "metrics.json").read_text())["best"]
    assert (
        f"  best val_war {best['score']:.4f} at epoch {best['epoch']} ({best['reason']})\n" in out
    )
    assert re.fullmatch(r"(first|higher|equal) val_war.*", best["reason"])


def test_train_bad_data_folder_fails_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lsef_cli", "train", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=CWD,
        timeout=60,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 2 and r.stderr.startswith(f"lsef: error: --data {tmp_path}: ")
    assert "labels.csv not found" in r.stderr and len(r.stderr.splitlines()) == 1


def test_rsvd_flop_counts_follow_the_path():
    from lsef_ext.bench import _orth_flops, _svd_tall_flops, rsvd_flops

    # fused (the kernel's choice for p = 16, q = 512), wide and tall alike: Gram, sketch, orth
    # after it and after each of the two Gram products, projection, svd_tall(q, l) forming
    # k = 4 columns, U = Q Vw (k cols)
    p, q, l = 16, 512, 12
    one = p * (p + 1) * q + 2 * p * q * l + 3 * _orth_flops(p, l) + 2 * 2 * p * p * l
    one += 2 * p * q * l + _svd_tall_flops(q, l, 4) + 2 * p * l * 4
    assert rsvd_flops((256, 16, 512), 4) == pytest.approx(256 * one)
    assert rsvd_flops((256, 512, 16), 4) == pytest.approx(256 * one)
    # the BLAS path: two products per iteration instead of the Gram matrix
    p, q, l = 100, 130, 12
    blas = 2 * p * q * l + _orth_flops(p, l) + 2 * (4 * p * q * l + _orth_flops(q, l))
    blas += 2 * _orth_flops(p, l) + 2 * p * q * l + _svd_tall_flops(q, l, 4) + 2 * p * l * 4
    assert rsvd_flops((3, 100, 130), 4, path="blas") == pytest.approx(3 * blas)
    assert rsvd_flops((3, 100, 130), 4, path="lapack") == pytest.approx(3 * blas)
    # an exact SVD chosen for a randomized shape counts as one
    assert rsvd_flops((3, 100, 130), 4, path="exact") == pytest.approx(
        3 * _svd_tall_flops(130, 100, 4)
    )
    # exact: l >= p, one factorization of the q x p matrix
    assert rsvd_flops((2, 8, 40), 4) == pytest.approx(2 * _svd_tall_flops(40, 8, 4))
    # the reflectors applied to r columns: 4 r c (rows - c / 2) of the total
    assert _svd_tall_flops(512, 12, 12) - _svd_tall_flops(512, 12, 4) == 4 * 8 * 12 * (512 - 6)
    assert _orth_flops(16, 12) == 4 * 144 * (16 - 4)
