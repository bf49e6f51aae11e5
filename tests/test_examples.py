"""The scripts in examples/ run as a user runs them (a subprocess, one thread) and do what they
say: the toy model learns its task, the feature-folder pipeline trains a model that beats chance
by far on its test split."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # Generous for a busy 2-core machine: each takes under 10 s on a quiet one.
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=str(ROOT / "examples"),  # not the clone's root: import the installed package
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_ops_in_your_model():
    out = run_example("ops_in_your_model.py")
    acc = float(re.search(r"training accuracy (\d+)%", out).group(1))
    assert acc >= 90, out


@pytest.mark.parametrize("given_folder", [False, True])
def test_feature_folder_end_to_end(tmp_path, given_folder):
    args = []
    if given_folder:  # a folder the user already has, in the documented layout
        sys.path.insert(0, str(ROOT / "examples"))
        try:
            from feature_folder_end_to_end import write_example_folder
        finally:
            sys.path.pop(0)
        write_example_folder(str(tmp_path))
        args = [str(tmp_path), "--epochs", "6"]
    out = run_example("feature_folder_end_to_end.py", *args)
    war = float(re.search(r"test WAR ([\d.]+)%", out).group(1))
    assert war >= 50, out  # 7 classes: chance is about 14 %
