#!/usr/bin/env bash
# Builds kattn's libFuzzer targets with clang and runs each for DURATION seconds, all at once
# (each is one process; its log goes to $BUILD/logs/<target>.log, whose final statistics are
# printed at the end, and the whole of it when the fuzzer fails).
#
#   fuzz/run.sh DURATION [CASES_DIR]
#   fuzz/run.sh --build-only           builds the targets only
#   fuzz/run.sh --no-build DURATION [CASES_DIR]
#                                      runs the targets an earlier --build-only built
#
# CASES_DIR (default: $KATTN_CASES_DIR, else ../shared/cases beside the repository) holds
# the golden *.safetensors files used as seeds, together with the committed regression
# corpus fuzz/corpus/<target>/ (target name without the fuzz_ prefix). New inputs found
# during the run go to a scratch corpus in the build folder, not into the repository; crash
# reproducers go to $BUILD/artifacts/. Exits non-zero when a fuzzer finds a crash, a leak,
# a timeout or an out-of-memory, or when the build fails.
#
# Environment: KATTN_FUZZ_BUILD_DIR (default: <repo>/build-fuzz), CXX (default: clang++),
# KATTN_FUZZ_JOBS (build parallelism, default 2), KATTN_FUZZ_MAX_LEN (largest input tried,
# default 65536: the golden seeds reach 1.1 MB, mostly tensor data, and mutating the whole
# of such inputs costs about 40% of the executions per second for less coverage; bigger
# seeds are truncated, which still exercises the header and the smaller files' data),
# KATTN_FUZZ_ARGS (extra libFuzzer flags), KATTN_FUZZ_CXXFLAGS (optimisation, default
# "-O1 -DNDEBUG"; "-O2 -DNDEBUG" fuzzes faster once built).
set -euo pipefail

usage() {
  echo "usage: $0 [--no-build] DURATION_SECONDS [CASES_DIR] | $0 --build-only" >&2
  exit 2
}
build_step=1 run_step=1
case ${1:-} in
  --build-only) run_step=0; shift; [[ $# -eq 0 ]] || usage ;;
  --no-build) build_step=0; shift ;;
esac
if [[ $run_step -eq 1 ]] && [[ $# -lt 1 || $# -gt 2 || ! $1 =~ ^[0-9]+$ ]]; then
  usage
fi
duration=${1:-0}
fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$fuzz_dir")
cases=${2:-${KATTN_CASES_DIR:-$repo/../shared/cases}}
build=${KATTN_FUZZ_BUILD_DIR:-$repo/build-fuzz}
cxx=${CXX:-clang++}

# -O1 by default, for CI, which builds the fuzzers on every submission and runs each for 20 s:
# fuzz_forward (the layers for every map) compiles in 196 s at -O1 against 247 s at -O2 -g on
# a 2-core machine, for 17-30% fewer executions per second. Long runs: KATTN_FUZZ_CXXFLAGS.
if [[ $build_step -eq 1 ]]; then
  cmake -S "$fuzz_dir" -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=None \
        "-DCMAKE_CXX_FLAGS=${KATTN_FUZZ_CXXFLAGS:--O1 -DNDEBUG}"
  cmake --build "$build" -j "${KATTN_FUZZ_JOBS:-2}"
fi
[[ $run_step -eq 1 ]] || exit 0

mkdir -p "$build/logs"
pids=() targets=()
for src in "$fuzz_dir"/fuzz_*.cpp; do
  target=$(basename "$src" .cpp)
  topic=${target#fuzz_}
  binary="$build/$target"
  [[ -x $binary ]] || { echo "run.sh: $binary was not built" >&2; exit 1; }

  # Scratch corpus: committed regression inputs plus the golden files as seeds.
  work="$build/corpus/$topic"
  mkdir -p "$work" "$build/artifacts"
  if [[ -d $fuzz_dir/corpus/$topic ]]; then
    cp -f "$fuzz_dir/corpus/$topic"/* "$work"/ 2>/dev/null || true
  fi
  if [[ $topic == safetensors ]]; then
    if compgen -G "$cases/*.safetensors" >/dev/null; then
      cp -f "$cases"/*.safetensors "$work"/
    else
      echo "run.sh: no seeds in $cases (pass CASES_DIR); using the committed corpus only" >&2
    fi
  fi
  if [[ $topic == config ]] && command -v python3 >/dev/null && compgen -G "$cases/*.json" >/dev/null; then
    # Seeds for fuzz_config: the "config" object of every golden case.
    python3 -c 'import json, pathlib, sys
for p in pathlib.Path(sys.argv[1]).glob("*.json"):
    c = json.loads(p.read_text())
    if isinstance(c, dict) and "config" in c:
        (pathlib.Path(sys.argv[2]) / ("golden_" + p.stem + ".json")).write_text(json.dumps(c["config"]))
' "$cases" "$work"
  fi
  dict=()
  [[ -f $fuzz_dir/$topic.dict ]] && dict=(-dict="$fuzz_dir/$topic.dict")

  echo "== $target for ${duration}s, corpus $work, log $build/logs/$target.log"
  # shellcheck disable=SC2086
  "$binary" "$work" "${dict[@]}" -max_total_time="$duration" -timeout=10 \
      -max_len="${KATTN_FUZZ_MAX_LEN:-65536}" -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$build/artifacts/$target-" ${KATTN_FUZZ_ARGS:-} \
      > "$build/logs/$target.log" 2>&1 &
  pids+=($!)
  targets+=("$target")
done

status=0
for i in "${!pids[@]}"; do
  target=${targets[$i]}
  if wait "${pids[$i]}"; then
    echo "== $target: no finding"
    grep -E '^(Done|stat::)' "$build/logs/$target.log" || true
  else
    echo "run.sh: $target FAILED; reproducers in $build/artifacts/; its log:" >&2
    cat "$build/logs/$target.log" >&2
    status=1
  fi
done
exit $status
