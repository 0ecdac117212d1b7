#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (made for the H200: torch 2.11, triton 3.6,
# python 3.12, no network). Builds with all cores, runs the test suite on the GPU (recording
# which kernels passed), compute-sanitizer memcheck on one small case, the GPU benchmarks, and
# prints a short table last. Everything lands in OUTDIR. Must finish in < 8 minutes: each step
# has a time limit (SIGINT, so pytest still writes what it has; an interrupted test run records
# no verified kernels).
#   bash benchmarks/gpu_check.sh OUTDIR
# CUTLASS headers: the nvidia-cutlass wheel, or DSV3_KERNELS_CUTLASS_DIR, or ./.cutlass (made by
# scripts/stage_cutlass.sh here and carried to a machine without network).
set -uo pipefail
OUT=$(mkdir -p "${1:?usage: gpu_check.sh OUTDIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} DSV3_KERNELS_BUILD_CUDA=1
[ -z "${DSV3_KERNELS_CUTLASS_DIR:-}" ] && [ -d .cutlass/include ] && export DSV3_KERNELS_CUTLASS_DIR=$PWD/.cutlass
step() { echo "== $(date +%T) $*"; }

step build
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
start=$SECONDS
if ! $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"; exit 1
fi
echo "built in $((SECONDS - start)) s: $(grep -m1 "dsv3_kernels build" "$OUT/build.log")"

step "tests on the GPU"
timeout -s INT 200 $PY -m pytest tests -q -rs --ignore tests/test_triton_sm90.py --record-verified "$OUT/verified_run.json" \
  --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "pytest exit $?: $(tail -n 1 "$OUT/tests.log")"
if [ -f "$OUT/verified_run.json" ]; then
  $PY -m dsv3_kernels.verified record "$OUT/verified_run.json" && cp dsv3_kernels/verified.json "$OUT/"
fi

step "compute-sanitizer memcheck"
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize_case.py \
  > "$OUT/memcheck.log" 2>&1
echo "memcheck exit $?: $(grep -c "Invalid" "$OUT/memcheck.log") invalid accesses; $(tail -n 1 "$OUT/memcheck.log")"

step benchmarks
mkdir -p "$OUT/bench"
# model: the 4-layer DeepSeek-V3 slice, decode at B=1 and 64 over 4k contexts. SUITES picks a subset
# where a device session has less time than the whole script needs.
for suite in ${SUITES:-fp8 mla moe model}; do
  timeout -s INT 100 $PY -m pytest benchmarks/bench_$suite.py -q --device cuda --results-dir "$OUT/bench" \
    --benchmark-json "$OUT/bench/pytest-benchmark-$suite.json" > "$OUT/bench_$suite.log" 2>&1
  echo "benchmarks $suite exit $?"
done
step done
[ -f "$OUT/bench_fp8.log" ] && sed -n '/ceilings:/,$p' "$OUT/bench_fp8.log" | grep -E "ceilings|^op|fp8_linear .*(M=64 N=2112|M=4096 N=7168 K=16384|M=64 N=7168 K=16384)|act_quant"
sed -n '/ceilings:/,$p' "$OUT/bench_mla.log" | grep -E "^mla_decode .*(cuda|triton)"
sed -n '/ceilings:/,$p' "$OUT/bench_moe.log" | grep -E "^(moe_permute .*T=16384|grouped_gemm .*T=8192 .*fp8|fused_moe .*T=(1|64) )"
sed -n '/ceilings:/,$p' "$OUT/bench_model.log" | grep -E "^decode .*V3x4L"
