"""The `lsef` command, run as users run it: a subprocess."""
import json
import subprocess
import sys
import tempfile

import torch


# Run outside the source tree, so `python -m` imports the installed package, not ./lsef_ext.
CWD = tempfile.gettempdir()


def lsef(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lsef_ext.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=True, cwd=CWD).stdout


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
    assert {"soft_threshold fwd, per-channel lam", "rank_scale (B,16,512) r=4, B=256 cpu/4096 gpu"} <= cases
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
    r = subprocess.run([sys.executable, "-m", "lsef_ext.cli", "nope"], capture_output=True, text=True,
                       cwd=CWD)
    assert r.returncode == 2 and "invalid choice" in r.stderr
