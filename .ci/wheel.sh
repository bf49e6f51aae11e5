#!/usr/bin/env bash
# One wheel for every torch >= 2.10 and every CPython >= 3.10 (docs/DESIGN.md §15), proven on a
# machine with nvcc and no GPU:
#   1. builds the wheel once, in a virtual environment with a CUDA build of torch ($BUILD_TORCH),
#      with the CUDA kernels required (LSEF_CUDA=1) for every architecture of cmake/cuda.cmake;
#   2. checks the file: its cp310-abi3 name and contents; for each module, no RUNPATH or RPATH
#      holding an absolute path, and no undefined symbol but the C shim's (aoti_torch_*, torch_*),
#      CPython's stable ABI and the C/C++ runtime (no mangled at::, c10:: or torch:: symbol);
#      abi3audit; auditwheel's verdict (the glibc floor), recorded;
#   3. installs that same file (same sha256) into two fresh virtual environments, torch
#      $CPU_TORCH (CPU) and torch $BUILD_TORCH (CUDA, no GPU here), checks there that every
#      undefined symbol resolves in the running libtorch, and runs the op test files in both: in
#      the second, the CUDA module loads, `lsef info` lists its architectures, CUDA cases skip.
# WHEEL_OUT, if set, is a folder the wheel is copied to (for the GPU machine's check).
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"
BUILD_TORCH=2.14.1
CPU_TORCH=2.13.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "wheel check: FAILED: $*" >&2; exit 1; }

# Built from a copy of the work tree: pip builds in the source tree's build/cmake-<python tag>/,
# which a CPU build with the same Python uses too, and whose CMake cache would keep its torch.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C "$work/src"

echo "::: wheel: build environment (torch $BUILD_TORCH, CUDA)"
python3 -m venv "$work/build-venv"
bpy="$work/build-venv/bin/python"
"$bpy" -m pip install -q "torch==$BUILD_TORCH" ninja "setuptools>=77" wheel abi3audit auditwheel
"$bpy" -c "
import sys, torch
sys.exit(0 if torch.version.cuda else 'torch ' + torch.__version__ + ' has no CUDA')"

echo "::: wheel: build (CPU and CUDA kernels, MAX_JOBS=$MAX_JOBS)"
start=$SECONDS
(cd "$work/src" && LSEF_CUDA=1 "$bpy" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheels" .)
echo "built in $((SECONDS - start)) s"
wheels=("$work"/wheels/*.whl)
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel, got ${wheels[*]}"
wheel=${wheels[0]}
name=$(basename "$wheel")
[[ "$name" =~ ^lsef_ext-[0-9.]+-cp310-abi3-linux_x86_64\.whl$ ]] || fail "wheel name $name is not <version>-cp310-abi3-linux_x86_64"
sha=$(sha256sum "$wheel" | cut -d' ' -f1)
echo "$name sha256 $sha"

unzip -q "$wheel" -d "$work/unpacked"
for f in lsef_ext/_C.abi3.so lsef_ext/_C_cuda.abi3.so lsef_cli.py lsef_ref/__init__.py lsef_ext/py.typed; do
  [ -f "$work/unpacked/$f" ] || fail "the wheel lacks $f"
done
ls "$work"/unpacked/*.dist-info/licenses/LICENSE >/dev/null || fail "the wheel lacks its LICENSE"
grep -q "^Requires-Dist: torch>=2.10$" "$work"/unpacked/*.dist-info/METADATA || fail "METADATA does not ask for torch>=2.10"

echo "::: wheel: the modules' dynamic sections and symbols"
for so in "$work"/unpacked/lsef_ext/_C*.abi3.so; do
  dyn=$(readelf -d "$so")
  echo "$(basename "$so"): $(grep -o 'Shared library: \[[^]]*\]' <<<"$dyn" | tr '\n' ' ')"
  for entry in $(grep -E "\((RPATH|RUNPATH)\)" <<<"$dyn" | sed 's/.*\[\(.*\)\]/\1/' | tr ':' ' '); do
    case "$entry" in
      '$ORIGIN'*) ;;
      *) fail "$(basename "$so") has the RPATH/RUNPATH entry $entry (only \$ORIGIN-relative ones may be)" ;;
    esac
  done
  nm -D --undefined-only "$so" | awk '{print $NF}' | sed 's/@.*//' | sort -u >"$so.undefined"
  if c++filt <"$so.undefined" | grep -E "(^|[^a-z_])(at|c10|torch)::"; then
    fail "$(basename "$so") needs mangled ATen/c10/torch symbols (above)"
  fi
  # Anything else must be the C shim, CPython's API, or the C, C++ and CUDA-driver runtimes: C
  # symbols, or C++ ones of the standard library only (std::, operator new/delete, their
  # vtables and type information).
  c++filt <"$so.undefined" | grep -vE '^[A-Za-z_][A-Za-z_0-9]*$' |
    grep -vE '^((std|__cxxabiv1|__gnu_cxx)::|operator (new|delete)|((VTT|vtable|typeinfo|typeinfo name|construction vtable) for (std|__cxxabiv1)::))' \
    >"$so.other" || true
  if [ -s "$so.other" ]; then
    echo "unexpected undefined symbols in $(basename "$so"):"; cat "$so.other"
    fail "$(basename "$so") needs symbols outside the C shim and the runtimes"
  fi
  grep -vE '^(aoti_torch_|torch_|Py|_Py|_Z|__)' "$so.undefined" | tr '\n' ' ' >"$so.c"
  echo "  C symbols besides the shim and Python: $(cat "$so.c")"
done

echo "::: wheel: abi3audit"
"$work/build-venv/bin/abi3audit" --strict --report "$wheel"
echo "::: wheel: auditwheel show (the glibc floor; libtorch is the host's, never bundled)"
"$work/build-venv/bin/auditwheel" show "$wheel" || true

if [ -n "${WHEEL_OUT:-}" ]; then
  mkdir -p "$WHEEL_OUT" && cp "$wheel" "$WHEEL_OUT/"
fi

# The op test files, run from a folder outside the source tree (whose lsef_ext/ has no modules).
mkdir "$work/tests"
cp -r "$work/src/tests" "$work/src/README.md" "$work/tests/"  # test_transforms reads the README's table
op_tests=(tests/test_soft_threshold.py tests/test_rank_scale.py tests/test_rsvd.py
  tests/test_lowrank_sparse.py tests/test_bad_input.py tests/test_transforms.py)

check_env() {  # <label> <torch requirement> [index options...]
  local label=$1 req=$2
  shift 2
  echo "::: wheel: install into a fresh environment with $req ($label)"
  python3 -m venv "$work/venv-$label"
  local py="$work/venv-$label/bin/python"
  "$py" -m pip install -q "$req" "$@"
  "$py" -m pip install -q "$wheel" pytest expecttest hypothesis
  [ "$(sha256sum "$wheel" | cut -d' ' -f1)" = "$sha" ] || fail "the wheel changed"
  (cd "$work/tests" && "$py" - <<'EOF'
import glob, os, subprocess, sys, torch, lsef_ext
here = os.path.dirname(lsef_ext.__file__)
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
defined = set()
for name in ("libtorch_cpu.so", "libtorch_cuda.so"):
    path = os.path.join(lib, name)
    if os.path.exists(path):
        out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True)
        defined |= {line.split()[-1] for line in out.stdout.splitlines()}
for so in sorted(glob.glob(os.path.join(here, "_C*.abi3.so"))):
    if "_C_cuda" in so and torch.version.cuda is None:
        continue
    out = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True, check=True)
    shim = {l.split()[-1] for l in out.stdout.splitlines() if l.split()[-1].startswith(("aoti_torch_", "torch_"))}
    missing = sorted(shim - defined)
    assert not missing, f"{os.path.basename(so)}: not in torch {torch.__version__}'s libtorch: {missing}"
    print(f"{os.path.basename(so)}: its {len(shim)} C-shim symbols all resolve in torch {torch.__version__}")
info = lsef_ext.build_info()
print("build_info:", info)
want = ["CPU", "CUDA"] if torch.version.cuda else ["CPU"]
assert info["backends"] == want, (info["backends"], want)
EOF
  )
  if [ "$label" = cuda ]; then
    local archs
    archs=$(cd "$work/tests" && "$work/venv-$label/bin/lsef" info | grep "CUDA architectures")
    echo "$archs"
    for a in sm_80 sm_90 sm_100 sm_120 compute_120; do
      grep -qw "$a" <<<"$archs" || fail "lsef info lists no $a"
    done
    local cuobjdump
    cuobjdump=$(command -v cuobjdump || "$py" -c "
import os, triton
print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))")
    # Captured first: `grep -q` stopping early would fail cuobjdump with SIGPIPE under pipefail.
    local elves
    elves=$("$cuobjdump" --list-elf "$work/unpacked/lsef_ext/_C_cuda.abi3.so")
    for a in sm_80 sm_90 sm_100 sm_120; do
      grep -q "$a\.cubin" <<<"$elves" || fail "cuobjdump finds no $a code"
    done
  fi
  echo "::: wheel: op tests under torch $req ($label)"
  (cd "$work/tests" && OMP_NUM_THREADS=1 "$work/venv-$label/bin/pytest" -q -p no:cacheprovider "${op_tests[@]}")
}

check_env cpu "torch==$CPU_TORCH"
check_env cuda "torch==$BUILD_TORCH"
echo "wheel check: PASSED ($name, sha256 $sha, under torch $CPU_TORCH CPU and $BUILD_TORCH CUDA)"
