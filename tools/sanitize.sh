#!/usr/bin/env bash
# Build the native extension with AddressSanitizer + UndefinedBehaviorSanitizer
# (CMake option MANIFOLD_SGD_SANITIZE, fed from the environment through pyproject)
# into its own venv and build dir, then run the test suite under it (all but the
# distributed and torch.compile tests). Exits non-zero on any sanitizer report or
# test failure. About 1.5 minutes on 2 cores once the venv exists (the first run
# installs torch into it and takes several minutes more).
#
#   tools/sanitize.sh [extra pytest args]
#
# Environment: MSGD_SANITIZE_VENV, MSGD_SANITIZE_BUILD (defaults under $TMPDIR or /tmp;
# both are reused between runs, so a second run only recompiles what changed).
set -euo pipefail
cd "$(dirname "$0")/.."

tmp="${TMPDIR:-/tmp}"
venv="${MSGD_SANITIZE_VENV:-$tmp/manifold_sgd-sanitize-venv}"
build="${MSGD_SANITIZE_BUILD:-$tmp/manifold_sgd-sanitize-build}"
logs="$(mktemp -d "$tmp/manifold_sgd-sanitize-logs.XXXXXX")"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# A regular (not editable) install: the sanitized module lives only in this venv.
MANIFOLD_SGD_SANITIZE=ON MANIFOLD_SGD_CUDA=OFF python -m pip install -q -c constraints.txt ".[test]" \
  --config-settings=build-dir="$build" --config-settings=cmake.build-type=RelWithDebInfo

# locate the module without importing it (loading it before the ASan runtime aborts)
so="$(python - <<'EOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("manifold_sgd")
found = [str(p) for d in (spec.submodule_search_locations or []) for p in pathlib.Path(d).glob("_C*.so")]
print(found[0] if found else "")
EOF
)"
# ldd's output is captured before grep: with pipefail, `ldd | grep -q` fails at random
# when grep exits on its first match and ldd dies of SIGPIPE on its next line
deps="$( [ -n "$so" ] && ldd "$so" || true)"
if [ -z "$so" ] || ! grep -q libasan <<<"$deps"; then
  echo "sanitize.sh: the installed extension ($so) is not linked against libasan" >&2
  exit 2
fi

# The interpreter is not instrumented, so the ASan runtime must be loaded first.
libasan="$(${CXX:-c++} -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
  libasan="$(awk '/libasan/ {print $3}' <<<"$deps")"
fi

# libstdc++ too: python does not link it, and ASan must see it at start-up to intercept
# __cxa_throw (else the first C++ exception -> ValueError aborts with a CHECK failure)
libstdcxx="$(${CXX:-c++} -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$libasan${libstdcxx:+ $libstdcxx}"
# detect_leaks=0: CPython and torch keep allocations alive at exit by design.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:log_path=$logs/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$logs/ubsan"
export OMP_NUM_THREADS=1

status=0
# every test but the two that start other programs under the preload (2-process gloo runs,
# and inductor's C++ compiler); they exercise no native path the others miss
# (and the CUDA emulator: a separate program switching stacks for its fibers, which ASan
# warns about; it does not load the extension)
python -m pytest -q -p no:cacheprovider tests \
  --ignore=tests/test_distributed.py --ignore=tests/test_compile.py \
  --ignore=tests/test_cuda_emulated.py "$@" || status=$?

unset LD_PRELOAD
# reports are the logs holding an error; ASan's stack-switch warnings are not
reports="$(grep -lE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:" -r "$logs" 2>/dev/null | sort || true)"
if [ -n "$reports" ]; then
  echo "sanitize.sh: sanitizer reports:" >&2
  for f in $reports; do echo "== $f" >&2; cat "$f" >&2; done
  [ "$status" -eq 0 ] && status=1
fi
if [ "$status" -eq 0 ]; then
  echo "sanitize.sh: clean (ASan + UBSan): no error reports in $logs"
fi
exit "$status"
