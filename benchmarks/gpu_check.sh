#!/usr/bin/env bash
# The GPU checks of the CUDA backend in one command, for a machine with a CUDA GPU
# and nvcc (no network needed: builds without build isolation).
#   benchmarks/gpu_check.sh [build] [test] [sanitize] [bench]    (default: all four)
# Logs go to $OUT (default /tmp/gpu_check); a short summary is printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench)
summary=()

run_stage() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS rc
  echo "=== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/$name.log"
  if [ $rc -eq 0 ]; then summary+=("PASS  $name ($((SECONDS - t0)) s)")
  else summary+=("FAIL  $name (exit $rc, $((SECONDS - t0)) s, log $OUT/$name.log)"); fi
}

sanitize() {  # tool
  compute-sanitizer --tool "$1" --error-exitcode 1 ${2:-} "$PY" benchmarks/cuda_step_small.py
}

for s in "${stages[@]}"; do
  case $s in
    build)
      run_stage build env MANIFOLD_SGD_CUDA=ON "$PY" -m pip install -v --no-build-isolation --no-deps .
      run_stage info "$PY" -c 'import json, manifold_sgd as m; i = m.native_info(); print(json.dumps(i)); assert i["cuda_compiled"]'
      ;;
    test)
      run_stage test_cuda "$PY" -m pytest -q -m cuda tests/test_cuda.py
      run_stage test_cpu "$PY" -m pytest -q -m "not cuda and not slow" tests
      ;;
    sanitize)
      run_stage memcheck sanitize memcheck
      run_stage racecheck sanitize racecheck "--racecheck-report all"
      run_stage synccheck sanitize synccheck
      run_stage initcheck sanitize initcheck
      ;;
    bench)
      run_stage bench timeout 1200 "$PY" -m manifold_sgd bench
      ;;
    *) echo "unknown stage $s (build, test, sanitize, bench)"; exit 2 ;;
  esac
done

echo
echo "==== gpu_check summary ($(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1))"
for line in "${summary[@]}"; do echo "$line"; done
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log 2>/dev/null | sed 's/^/  /'
tail -n 3 "$OUT/test_cuda.log" 2>/dev/null | sed 's/^/  test_cuda: /'
case "${summary[*]}" in *FAIL*) exit 1 ;; esac
