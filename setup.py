"""Thin pip front end: configures and builds CMakeLists.txt with Ninja into the package.

All compile logic lives in CMake. Environment variables honoured here:
  MAX_JOBS          parallel compile jobs (default: number of CPUs)
  CMAKE_BUILD_TYPE  Release (default), Debug, RelWithDebInfo
  CMAKE_ARGS        extra arguments for the CMake configure step (space separated)
  LSEF_CUDA         AUTO / 1 / 0, forwarded to CMake (see CMakeLists.txt)
"""

import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

NO_TORCH = """
lsef_ext: cannot import torch in the build environment.
The extension compiles against the torch it will run with, so build it in the environment
that has torch installed, without build isolation:
    pip install torch ninja "setuptools>=77"
    pip install --no-build-isolation .
(With plain `pip install .`, pip builds in a fresh isolated environment without torch.)
"""


def torch_version():
    """The installed torch's version, or None where torch cannot be imported."""
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        # py_limited_api: the modules use CPython's stable ABI (abi3) from 3.10 on.
        super().__init__(name, sources=[], py_limited_api=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        version = torch_version()
        if version is None:
            sys.stderr.write(NO_TORCH)
            raise SystemExit(1)
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        output_dir.mkdir(parents=True, exist_ok=True)
        # Left by builds from before the stable ABI, which pinned a torch series.
        (output_dir / "_build_torch.py").unlink(missing_ok=True)
        for old in output_dir.glob("_C.cpython-*.so"):
            old.unlink()
        # A fixed folder in the source tree (not setuptools' temporary one), so a rebuild after
        # touching one kernel recompiles only that file, editable installs included. One per
        # Python environment: CMake's cache remembers the torch it configured against.
        env = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{env}"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLSEF_OUTPUT_DIR={output_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
        ]
        if "LSEF_CUDA" in os.environ:
            configure.append(f"-DLSEF_CUDA={os.environ['LSEF_CUDA']}")
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        start = time.monotonic()
        say(f"configuring with CMake against torch {version}, in {build_dir}")
        subprocess.run(configure, check=True)
        say(
            f"compiling with {jobs} parallel jobs (MAX_JOBS); Ninja prints a line per file; a "
            "first CPU build takes about 2 minutes on 2 cores, the CUDA kernels several more"
        )
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        say(f"built {ext.name} in {time.monotonic() - start:.0f} s")


def say(line: str) -> None:
    """A stage line of the build (pip shows the build's output with -v)."""
    print(f"lsef_ext build: {line}", flush=True)


setup(
    ext_modules=[CMakeExtension("lsef_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    # One wheel, lsef_ext-<version>-cp310-abi3-<platform>.whl, for every CPython >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
