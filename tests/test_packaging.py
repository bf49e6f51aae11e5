"""Packaging: the torch-version guard at import, the abi3 modules, the files a wheel must carry."""

import sys
from pathlib import Path

import pytest
import torch

import lsef_ext

ROOT = Path(__file__).resolve().parents[1]


def test_too_old_torch_gives_one_clear_import_error(monkeypatch):
    """Under a torch older than the stable ABI the kernels use, importing fails with one
    ImportError naming both versions (the wheel's metadata asks for torch >= 2.10 too)."""
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    pattern = r"^lsef_ext needs torch >= 2\.10 .* torch 2\.9\.1\+cu128 is installed"
    with pytest.raises(ImportError, match=pattern):
        lsef_ext._load_library()


def test_modules_are_abi3_and_name_no_torch_series():
    """The compiled modules carry CPython's stable-ABI suffix (one file for every Python >= 3.10)
    and record the oldest torch they run under, not the series they were built with."""
    here = Path(lsef_ext.__file__).parent
    assert [p.name for p in here.glob("_C.*so")] == ["_C.abi3.so"]
    info = lsef_ext.build_info()
    assert info["torch_target"] == "%d.%d" % lsef_ext.MIN_TORCH
    assert not (here / "_build_torch.py").exists()


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
