#!/usr/bin/env bash
# Old against new in one run: builds kattn_bench at two revisions (Release, in git worktrees
# under build-compare/), runs them in turn ROUNDS times on the benchmarks FILTER selects, and
# prints each benchmark's median time at both revisions and their ratio new / old. On a shared,
# noisy machine a single pass says little: alternation spreads the drift over both sides.
#
#   benchmarks/compare.sh OLD_REV [NEW_REV] [-f FILTER] [-r ROUNDS] [-t MIN_TIME]
#   benchmarks/compare.sh --arch [REV] [-f FILTER] [-r ROUNDS] [-t MIN_TIME]
#
# --arch: one revision built twice, "old" without any instruction-set flag (what a consumer of
# kattn::kattn gets) and "new" with -march=native (kattn::native): new/old below 1 is what the
# flags buy.
#
# NEW_REV defaults to HEAD, FILTER to W1, W3, W5 and W6 at two lengths each, ROUNDS to 5,
# MIN_TIME (seconds per benchmark and run) to 0.5. Needs python3 for the table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
old=${1:?usage: benchmarks/compare.sh OLD_REV|--arch [NEW_REV] [-f FILTER] [-r ROUNDS] [-t MIN_TIME]}
shift
new=HEAD
if [[ $# -gt 0 && $1 != -* ]]; then new=$1; shift; fi
old_flags=()
if [[ $old == --arch ]]; then
  old=$new
  old_flags=(-DKATTN_BENCH_NATIVE=OFF)
fi
filter='^W(1/kattn/(1024|16384)|3/kattn/(4096|16384)|5/|6/kattn/(1024|16384))'
rounds=5
min_time=0.5
while getopts "f:r:t:" opt; do
  case $opt in
    f) filter=$OPTARG ;;
    r) rounds=$OPTARG ;;
    t) min_time=$OPTARG ;;
    *) exit 2 ;;
  esac
done
work=build-compare
mkdir -p "$work"
build() {  # rev name cmake-args...
  local tree=$work/$2
  git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
  git worktree add --force --detach "$tree" "$1" >/dev/null
  cmake -S "$tree" -B "$tree/build" -DCMAKE_BUILD_TYPE=Release -DKATTN_BUILD_TESTS=OFF \
        -DKATTN_BUILD_EXAMPLES=OFF "${@:3}" >/dev/null
  cmake --build "$tree/build" --target kattn_bench -j "$(nproc)" >/dev/null
}
build "$old" old "${old_flags[@]}"
build "$new" new
rm -rf "$work/json" && mkdir -p "$work/json"
for ((i = 1; i <= rounds; i++)); do
  for side in old new; do
    "$work/$side/build/benchmarks/kattn_bench" --benchmark_filter="$filter" \
      --benchmark_min_time="$min_time" --benchmark_format=json \
      --benchmark_out="$work/json/$side-$i.json" >/dev/null
  done
done
python3 - "$work/json" "$(git rev-parse --short "$old")" "$(git rev-parse --short "$new")" <<'PY'
import collections, glob, json, os, statistics, sys
folder, old_rev, new_rev = sys.argv[1:]
times = collections.defaultdict(lambda: {"old": [], "new": []})
for path in glob.glob(os.path.join(folder, "*.json")):
    side = os.path.basename(path).split("-")[0]
    for b in json.load(open(path))["benchmarks"]:
        if not b.get("error_occurred"):
            times[b["name"]][side].append(b["real_time"])
print(f"{'benchmark (medians, ' + old_rev + ' -> ' + new_rev + ')':58s} {'old':>10s} {'new':>10s} {'new/old':>8s}")
worst = 0.0
for name in sorted(times):
    o, n = times[name]["old"], times[name]["new"]
    if o and n:
        ratio = statistics.median(n) / statistics.median(o)
        worst = max(worst, ratio)
        print(f"{name:58s} {statistics.median(o):10.4g} {statistics.median(n):10.4g} {ratio:8.3f}")
print(f"largest new/old: {worst:.3f}")
PY
