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
echo "lint: ok"
