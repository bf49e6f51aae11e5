#!/usr/bin/env bash
# Style, in seconds: ruff (lint and format, pyproject.toml's [tool.ruff]) over the Python files
# and clang-format (.clang-format) over the C++/CUDA files, every tracked file. The tool
# versions are pinned here so that a new release cannot fail CI on unchanged code.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "ruff==0.17.6" "clang-format==23.1.3"
ruff check .
ruff format --check .
git ls-files -z '*.cpp' '*.h' '*.cu' '*.cuh' | xargs -0 clang-format --dry-run --Werror
# The kernels reach torch only through its stable ABI (csrc/common/stable.h); the build proves it
# too (with TORCH_TARGET_VERSION set, ATen's and c10's headers #error), this names the line.
if git grep -nE '#include [<"](ATen|c10|torch/library\.h|torch/extension\.h|torch/torch\.h|torch/all\.h)' -- csrc tests; then
  echo "lint: the lines above include ATen, c10 or torch/library.h: use the stable ABI" >&2
  exit 1
fi
echo "lint: ok"
