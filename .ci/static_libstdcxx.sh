#!/usr/bin/env bash
# Regression check for C++ toolchains that link libstdc++ statically into the module, as the GPU
# machine's /opt/gcc 13.3 did (2026-11-26): there every error message holding a shape crashed
# the process, because the module's exported copy of libstdc++ interposed with the shared one
# that Python and torch load (CMakeLists.txt links with --exclude-libs,ALL since).
# Builds the CPU kernels with -static-libstdc++ in a temporary folder, against the torch of
# $PYTHON (default python3), checks that the static copy is really inside, and runs the op
# tests' bad-input cases, whose messages print shapes, against that build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
py=$(command -v "${PYTHON:-python3}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/pkg"
cp -r lsef_ext tests pyproject.toml "$work/pkg/"
rm -f "$work/pkg/lsef_ext/"_C*.so
if ! cmake -S . -B "$work/build" -G Ninja -DPython_EXECUTABLE="$py" -DLSEF_CUDA=OFF \
    -DLSEF_OUTPUT_DIR="$work/pkg/lsef_ext" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_MODULE_LINKER_FLAGS=-static-libstdc++ >"$work/configure.log" 2>&1; then
  cat "$work/configure.log" >&2
  exit 1
fi
cmake --build "$work/build" -j "${MAX_JOBS:-2}" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
library=$(ls "$work/pkg/lsef_ext/"_C*.so)
# Without a private libstdc++ in the module this check would prove nothing.
nm -C "$library" >"$work/symbols.txt"
if ! grep -q "std::codecvt<char16_t, char, __mbstate_t>::do_unshift" "$work/symbols.txt"; then
  echo "static libstdc++ check: FAILED: the module holds no static libstdc++ (-static-libstdc++ ignored?)" >&2
  exit 1
fi
# Run from the copy, so that `import lsef_ext` finds the module built here.
(cd "$work/pkg" && PYTHONPATH="$work/pkg:$root/python" "$py" -m pytest -q -p no:cacheprovider \
  tests/test_soft_threshold.py tests/test_rank_scale.py tests/test_rsvd.py tests/test_lowrank_sparse.py \
  -k "bad or mixed_devices or negative")
echo "static libstdc++ check: PASSED"
