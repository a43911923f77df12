#!/usr/bin/env bash
# The GPU checks of the CUDA backend in one command, for a machine with a CUDA GPU
# and nvcc (no network needed: builds without build isolation). Sized to finish in
# about 8 minutes on one GPU:
#   benchmarks/gpu_check.sh [build] [test] [sanitize] [bench]    (default: all four)
#   benchmarks/gpu_check.sh --dry-run [stages]   prints every stage's command and runs
#       the GPU scripts' CPU dry runs (no GPU, no build; tests/test_gpu_scripts.py)
# Logs and the benchmark JSON go to $OUT (default /tmp/gpu_check); a summary is printed last.
#   build:    this GPU's architecture only (nvidia-smi compute_cap, else "native"), all cores
#   test:     the CUDA tests, once as they are and once with CUDA_LAUNCH_BLOCKING=1
#   sanitize: compute-sanitizer memcheck, racecheck, synccheck, initcheck on
#             benchmarks/cuda_step_small.py, after a probe (some machines refuse it)
#   bench:    transformer36 resnet50 gpt2-small llm1b many-small, fp32 and bf16, UN PSI FG-SGD PO8,
#             Stiefel kernel (QR and polar: resnet50's conv kernels, the CUDA Stiefel kernel),
#             Adam row and Adam element (timed against AdamW fused), a few repeats each, bounded
#             by a timeout
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench)
for s in "${stages[@]}"; do
  case $s in build|test|sanitize|bench) ;; *) echo "unknown stage $s (build, test, sanitize, bench)"; exit 2 ;; esac
done
summary=()
BENCH_SETS=(transformer36 resnet50 gpt2-small llm1b many-small)
BENCH_METHODS=("UN" "PSI" "FG-SGD PO8" "Stiefel kernel" "Stiefel kernel polar" "Adam row" "Adam element")
BENCH_ARGS=(--repeat 5 --warmup 2 --budget 1 --sets "${BENCH_SETS[@]}" --methods "${BENCH_METHODS[@]}")

run_stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS rc
  echo "=== $name: $*"
  if [ $DRY -eq 1 ]; then summary+=("DRY   $name"); return 0; fi
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/$name.log"
  if [ $rc -eq 0 ]; then summary+=("PASS  $name ($((SECONDS - t0)) s)")
  else summary+=("FAIL  $name (exit $rc, $((SECONDS - t0)) s, log $OUT/$name.log)"); fi
}

skip_stage() {  # name, why
  echo "=== $1: SKIPPED ($2)"
  summary+=("SKIP  $1 ($2)")
}

sanitize() {  # tool [extra options]
  timeout 120 compute-sanitizer --tool "$1" --error-exitcode 1 ${2:-} "$PY" benchmarks/cuda_step_small.py
}

arch() {  # this GPU's compute capability as CMake wants it (9.0 -> 90), else "native"
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  echo "${cap:-native}"
}

if [ $DRY -eq 1 ]; then
  # the Python of every GPU script, as far as it goes without a GPU
  echo "=== dry run: benchmarks/cuda_step_small.py --device cpu"
  "$PY" benchmarks/cuda_step_small.py --device cpu >"$OUT/dry_cuda_step_small.log" 2>&1 \
    || { tail -n 20 "$OUT/dry_cuda_step_small.log"; echo "dry run of cuda_step_small.py failed"; exit 1; }
  tail -n 1 "$OUT/dry_cuda_step_small.log"
  echo "=== dry run: bench argument check"
  "$PY" -c 'import sys; from manifold_sgd.bench import parse_args; parse_args(sys.argv[1:])' \
    "${BENCH_ARGS[@]}" --out "$OUT/bench" || { echo "bench arguments rejected"; exit 1; }
fi

for s in "${stages[@]}"; do
  case $s in
    build)
      run_stage build env MANIFOLD_SGD_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$(arch)" \
        "$PY" -m pip install -v --no-build-isolation --no-deps .
      run_stage info "$PY" -c 'import json, manifold_sgd as m; i = m.native_info(); print(json.dumps(i)); assert i["cuda_compiled"] and i["cuda_usable"], i.get("cuda_reason")'
      ;;
    test)
      run_stage test_cuda "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_cuda_safety.py
      run_stage test_cuda_blocking env CUDA_LAUNCH_BLOCKING=1 "$PY" -m pytest -q -p no:cacheprovider -x -m cuda \
        tests/test_cuda.py tests/test_cuda_safety.py
      ;;
    sanitize)
      if [ $DRY -eq 0 ] && ! command -v compute-sanitizer >/dev/null; then
        skip_stage sanitize "compute-sanitizer not found"
      elif [ $DRY -eq 0 ] && ! timeout 60 compute-sanitizer --tool memcheck "$PY" -c \
          'import torch; torch.ones(1, device="cuda").add_(1); torch.cuda.synchronize()' >"$OUT/sanitize_probe.log" 2>&1; then
        skip_stage sanitize "compute-sanitizer refused on this machine (probe log $OUT/sanitize_probe.log)"
      else
        run_stage memcheck sanitize memcheck
        run_stage racecheck sanitize racecheck "--racecheck-report all"
        run_stage synccheck sanitize synccheck
        run_stage initcheck sanitize initcheck
      fi
      ;;
    bench)
      for dt in float32 bfloat16; do
        run_stage "bench_$dt" timeout 260 "$PY" -m manifold_sgd bench --device cuda --dtype "$dt" \
          "${BENCH_ARGS[@]}" --out "$OUT/bench"
      done
      ;;
  esac
done

echo
echo "==== gpu_check summary ($(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1))"
for line in "${summary[@]}"; do echo "$line"; done
[ $DRY -eq 1 ] && exit 0
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log 2>/dev/null | sed 's/^/  /'
tail -n 3 "$OUT/test_cuda.log" 2>/dev/null | sed 's/^/  test_cuda: /'
case "${summary[*]}" in *FAIL*) exit 1 ;; esac
