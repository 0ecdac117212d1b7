#!/usr/bin/env bash
# Copies the CUTLASS headers of the installed nvidia-cutlass wheel into ./.cutlass (28 MB,
# git-ignored), so they can travel with the tree to a GPU machine that has no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SRC=$("$PY" -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('cutlass_library').submodule_search_locations[0], 'source'))")
rm -rf .cutlass && mkdir -p .cutlass/tools/util
cp -r "$SRC/include" .cutlass/include
cp -r "$SRC/tools/util/include" .cutlass/tools/util/include
du -sh .cutlass
