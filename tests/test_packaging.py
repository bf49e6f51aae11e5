"""Packaging: the torch-series guard at import, the files a wheel must carry."""

import sys
import types
import warnings
from pathlib import Path

import torch

import lsef_ext

ROOT = Path(__file__).resolve().parents[1]


def test_torch_series_guard_warns_naming_both_versions(monkeypatch):
    """A library built for another torch series warns once at import, naming both versions and
    the rebuild command (setup.py records the build's torch in lsef_ext/_build_torch.py)."""
    fake = types.ModuleType("lsef_ext._build_torch")
    fake.TORCH_VERSION = "1.99.0"
    monkeypatch.setitem(sys.modules, "lsef_ext._build_torch", fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lsef_ext._load_library()
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 1
    assert "torch 1.99.0" in messages[0] and f"torch {torch.__version__}" in messages[0]
    assert "pip install --no-build-isolation --force-reinstall" in messages[0]
    fake.TORCH_VERSION = torch.__version__  # the same series: silent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lsef_ext._load_library()
    assert not [w for w in caught if w.category is RuntimeWarning]


def test_package_metadata_files():
    """The files the wheel and the repository promise (CI checks the built wheel too)."""
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (Path(lsef_ext.__file__).parent / "py.typed").exists()
    cff = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in cff and "arXiv:2511.11406" in cff
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def test_unbuilt_source_tree_gives_one_clear_error(tmp_path):
    """A copy of the package's Python files without the compiled library (what `import
    lsef_ext` finds from an unbuilt clone's root) fails with what happened and the two ways out,
    not with a circular-import message."""
    import shutil
    import subprocess

    src = Path(lsef_ext.__file__).parent
    shutil.copytree(src, tmp_path / "lsef_ext", ignore=shutil.ignore_patterns("_C.*", "_build_*"))
    done = subprocess.run(
        [sys.executable, "-c", "import lsef_ext"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: lsef_ext: the compiled library (_C) is not in")
    assert "run from another folder" in last and "pip install --no-build-isolation -e ." in last
