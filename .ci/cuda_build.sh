#!/usr/bin/env bash
# Proves that the CUDA kernels build, on a machine with nvcc and no GPU: in a fresh virtual
# environment with a CUDA build of torch, installs the project with LSEF_CUDA=1 (which stops
# rather than fall back to a CPU-only library), checks that the installed library holds sm_90
# machine code and imports, then runs the tests against that install (the CUDA cases skip
# without a GPU). torch's nvidia/* wheels supply what a compiler-only CUDA toolkit lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"
torch_version=2.14.1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Built from a copy of the work tree: pip builds in the source tree's build/cmake-<python tag>/,
# which a CPU build with the same Python uses too, and whose CMake cache would keep its torch.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C "$work/src"

python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q "torch==$torch_version" numpy ninja "setuptools>=70" wheel
"$py" -c "
import sys, torch
sys.exit(0 if torch.version.cuda else 'torch ' + torch.__version__ + ' has no CUDA')"

echo "::: CUDA build (MAX_JOBS=$MAX_JOBS)"
(cd "$work/src" && LSEF_CUDA=1 "$py" -m pip install -q --no-build-isolation ".[test]")

# Outside the source tree, whose lsef_ext/ (without the compiled library) would shadow the install.
archs=$(cd "$work" && "$py" -c "
import lsef_ext
info = lsef_ext.build_info()
assert 'CUDA' in info['backends'], info
print(info['cuda_archs'])")
case " $archs " in
  *" sm_90 "*) ;;
  *) echo "CUDA build: FAILED: build_info() lists no sm_90 code: $archs" >&2; exit 1 ;;
esac
library=$(cd "$work" && "$py" -c "import lsef_ext._C as c; print(c.__file__)")

# cuobjdump: on PATH, else the copy that torch's triton dependency ships.
cuobjdump=$(command -v cuobjdump || "$py" -c "
import os, triton
print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
elves=$("$cuobjdump" --list-elf "$library")
echo "$elves"
if ! grep -q "sm_90\.cubin" <<<"$elves"; then
  echo "CUDA build: FAILED: cuobjdump finds no sm_90 code" >&2
  exit 1
fi

echo "::: tests against the CUDA build"
# The pytest script, not `python -m pytest`, which would put the source folder first on sys.path.
(cd "$work/src" && "$work/venv/bin/pytest" -q tests)

echo "CUDA build: PASSED (archs $archs)"
