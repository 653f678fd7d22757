#!/usr/bin/env bash
# Builds tests/concurrency_test (only) with clang++ and ThreadSanitizer in build-tsan/ and
# runs it; exits non-zero on a build failure, a failing test or any ThreadSanitizer report.
#
#   scripts/tsan.sh            # from anywhere; about 2-3 minutes on 2 cores
#
# Environment: KATTN_TSAN_BUILD_DIR (default <repo>/build-tsan), CXX (default clang++),
# KATTN_TSAN_JOBS (build parallelism, default 2), KATTN_SHARED_DIR (golden data folder, only
# passed through to CMake).
#
# tests/tsan.supp suppresses reports inside Eigen's own thread pool only (see the reasons
# there); a report with a kattn frame is never suppressed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${KATTN_TSAN_BUILD_DIR:-$repo/build-tsan}
cxx=${CXX:-clang++}
shared=${KATTN_SHARED_DIR:-$(cd "$repo/.." && pwd)/shared}

cmake -S "$repo" -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DKATTN_SANITIZE=OFF -DKATTN_WERROR=ON \
      -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
      -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread \
      -DKATTN_BUILD_BENCHMARKS=OFF -DKATTN_BUILD_EXAMPLES=OFF -DKATTN_SHARED_DIR="$shared"
cmake --build "$build" --target concurrency_test -j "${KATTN_TSAN_JOBS:-2}"

# halt_on_error: the first report ends the run with exitcode 66; the log keeps it for CI.
log="$build/tsan.log"
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 suppressions=$repo/tests/tsan.supp ${TSAN_OPTIONS:-}"
status=0
"$build/tests/concurrency_test" 2>&1 | tee "$log" || status=$?
if grep -q "WARNING: ThreadSanitizer" "$log"; then
  echo "tsan.sh: ThreadSanitizer reported a problem (see $log)" >&2
  [[ $status -ne 0 ]] || status=1
fi
if [[ $status -ne 0 ]]; then
  echo "tsan.sh: FAILED (exit $status)" >&2
  exit "$status"
fi
echo "tsan.sh: concurrency_test passed under ThreadSanitizer"
