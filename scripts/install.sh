#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned toolchain, builds dsv3_kernels._C in place (only what
# changed since the last run) and installs the packages into .venv in editable mode.
#   torch 2.14.1 (CUDA 13.0 build: nvcc compiles the CUDA kernels even without a GPU),
#   CUTLASS headers from PyPI (nvidia-cutlass, headers only: --no-deps), test/bench tools.
# Env: VENV (default .venv), DSV3_KERNELS_BUILD_CUDA=0 for a CPU-only build, MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q "torch==2.14.1" numpy pytest pytest-benchmark ninja "setuptools>=64" wheel
# the model layer (dsv3): checkpoints, tokenizer, progress bars; transformers is the tests' peer model
"${PIP[@]}" install -q safetensors tokenizers tqdm "transformers==5.24.*"
"${PIP[@]}" install -q --no-deps "nvidia-cutlass==4.2.0.0"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
LOG=$(mktemp)
# The extension is built in place, incrementally: ninja keeps build/ between runs, so a second run
# (the README's second command) compiles nothing. The editable install then only registers the
# packages (DSV3_KERNELS_NO_EXT=1: pip's own build would start from an empty directory every time).
if ! "$VENV/bin/python" setup.py build_ext --inplace >"$LOG" 2>&1; then
  tail -n 80 "$LOG"
  echo "build failed; full log: $LOG" >&2
  exit 1
fi
grep "\[dsv3_kernels build\]" "$LOG" || true
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('dsv3-kernels')" 2>/dev/null; then
  DSV3_KERNELS_NO_EXT=1 "${PIP[@]}" install -q --no-build-isolation --no-deps -e .
fi
"$VENV/bin/python" -c "import dsv3_kernels; print('dsv3_kernels:', dsv3_kernels._native.status())"
