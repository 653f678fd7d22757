#!/usr/bin/env bash
# The test command of the README (and of .ci/run): installs what is missing, builds the API
# reference (doxygen over the public headers: any doxygen warning, such as an undocumented
# public member or a \param naming no parameter, fails it), then builds and runs the suite in
# three builds:
#   1. g++, warnings as errors, AddressSanitizer + UndefinedBehaviorSanitizer, Eigen's
#      internal assertions on, plus the installed-package consumer test;
#   2. clang++, warnings as errors, NDEBUG, ThreadSanitizer, plus every public header
#      compiled on its own. Not the whole suite (CI must stay under 30 minutes): the tests
#      that run the threaded paths, concurrency_test (one layer shared between threads,
#      streaming and training calls, results across thread counts), golden_test (every golden
#      case on one and two threads) and the edge cases of every path (sizes_test, masks_test,
#      non_finite_test, causal_extremes_test).
#   3. the Python module (python/), g++ -O1 without sanitizers (an extension cannot load their
#      runtime), and its unittest suite: every golden case through the Python API.
# The suite is compile-bound (Eigen templates under the sanitizers), so both builds optimise
# little: -O2 would double the build. g++ at -Og: on a 2-core AVX2 machine an instance unit
# of the layers compiles in 130 s at -Og against 201 s at -O1, and the heaviest tests run
# 10-25% longer (layer_test 71 s against 63 s). clang++ at -O1 (its -Og is -O1).
# KATTN_TEST_JOBS sets the build parallelism (default: number of cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install-deps.sh
jobs=${KATTN_TEST_JOBS:-$(nproc)}
shared=${KATTN_SHARED_DIR:-$(cd .. && pwd)/shared}

# Configures nothing to compile (no tests, examples, benchmarks): doxygen only.
cmake -S . -B build-test-docs -DKATTN_BUILD_TESTS=OFF -DKATTN_BUILD_EXAMPLES=OFF \
      -DKATTN_BUILD_BENCHMARKS=OFF -DKATTN_INSTALL=OFF
cmake --build build-test-docs --target kattn_docs

run_suite() {  # name compiler extra-cmake-args...
  local dir=build-test-$1 cxx=$2
  shift 2
  cmake -S . -B "$dir" -DCMAKE_CXX_COMPILER="$cxx" -DKATTN_WERROR=ON \
        -DKATTN_BUILD_BENCHMARKS=OFF -DKATTN_PRECOMPILE_LAYERS=ON -DKATTN_SHARED_DIR="$shared" "$@"
  cmake --build "$dir" -j "$jobs"
  ctest --test-dir "$dir" --output-on-failure -j "$jobs"
}

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# Any report fails its test; tests/tsan.supp is empty of entries (see why there).
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp"
run_suite gcc-sanitize g++ -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-Og -DKATTN_SANITIZE=ON \
          -DKATTN_CHECK_HEADERS=OFF
run_suite clang-tsan clang++ -DCMAKE_BUILD_TYPE=None "-DCMAKE_CXX_FLAGS=-O1 -DNDEBUG" \
          -DKATTN_SANITIZE=thread -DKATTN_PACKAGE_TEST=OFF -DKATTN_BUILD_EXAMPLES=OFF \
          "-DKATTN_TESTS=concurrency_test;golden_test;sizes_test;masks_test;non_finite_test;causal_extremes_test;gradients_training_test;saved_features_test"

# Debian's interpreter: the packages install-deps.sh adds (numpy, pybind11) are its, and a
# python3 earlier in PATH (pyenv, a venv) may lack them.
python=/usr/bin/python3
cmake -S . -B build-test-python -DCMAKE_CXX_COMPILER=g++ -DKATTN_WERROR=ON \
      -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_FLAGS=-O1 -DKATTN_BUILD_TESTS=OFF \
      -DKATTN_BUILD_EXAMPLES=OFF -DKATTN_BUILD_BENCHMARKS=OFF -DKATTN_BUILD_PYTHON=ON \
      -DPython3_EXECUTABLE="$python"
cmake --build build-test-python -j "$jobs" --target kattn_python
PYTHONPATH="$PWD/build-test-python/python" KATTN_SHARED_DIR="$shared" \
  "$python" -m unittest discover -s python/tests -v
