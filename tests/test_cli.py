"""The `lsef` command, run as users run it: a subprocess."""

import json
import re
import subprocess
import sys
import tempfile

import torch


# Run outside the source tree, so `python -m` imports the installed package, not ./lsef_ext.
CWD = tempfile.gettempdir()


def lsef(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "lsef_ext.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        cwd=CWD,
    ).stdout


def test_info_reports_build():
    out = lsef("info")
    assert "compiled backends" in out and "CPU" in out
    assert f"torch (running)        {torch.__version__}" in out
    assert f"threads                {torch.get_num_threads()}" in out


def test_bench_quick_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    out = lsef("bench", "--quick", "--device", "cpu", "--json", str(path))
    report = json.loads(path.read_text())
    cases = {row["case"] for row in report["rows"]}
    assert {
        "soft_threshold fwd, per-channel lam",
        "rank_scale (B,16,512) r=4, B=256 cpu/4096 gpu",
    } <= cases
    for row in report["rows"]:
        assert row["median_ms"] > 0
        assert row["target"] is None  # quick runs do not judge targets
        if row["variant"] == "lsef_ext":
            assert row["speedup"] == 1.0
    assert report["copy_bandwidth_GBps"]["cpu"] > 0
    assert "soft_threshold fwd, scalar lam" in out and "memory floor" in out


def test_bench_filter():
    out = lsef("bench", "--quick", "--device", "cpu", "--filter", "rank_scale")
    assert "rank_scale" in out and "soft_threshold fwd" not in out


def test_unknown_command_fails_with_usage():
    r = subprocess.run(
        [sys.executable, "-m", "lsef_ext.cli", "nope"], capture_output=True, text=True, cwd=CWD
    )
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_demo_quick_trains_reports_and_draws(tmp_path):
    out = lsef("demo", "--quick", "--out", str(tmp_path / "demo"))
    assert (
        "| LSEF (+RAO) |" in out
        and "| temporal transformer |" in out
        and "| mean-pool MLP |" in out
    )
    for condition in ("clean", "frame_drop", "impulse", "gaussian"):
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
    ]
    out = lsef(*common, "--epochs", "1")
    assert "epoch 1" in out and (run / "checkpoint.pt").is_file()
    out = lsef(*common, "--epochs", "2", "--resume")
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    # one line per corruption, in the order of CORRUPTIONS, after the epoch rows
    tests = [line for line in out.splitlines() if line.startswith("  test under ")]
    assert [line.split(":")[0] for line in tests] == [
        "  test under frame_drop",
        "  test under impulse",
        "  test under gaussian",
    ]
    assert all(
        re.fullmatch(r"  test under \w+: WAR \d+\.\d%  UAR \d+\.\d%", line) for line in tests
    )
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,loss") and len(rows) == 3


def test_train_bad_data_folder_fails_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "lsef_ext.cli", "train", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=CWD,
    )
    assert r.returncode != 0 and "labels.csv not found" in r.stderr
