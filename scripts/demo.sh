#!/usr/bin/env bash
# The README demo from a fresh Debian 12 machine: installs what is missing, configures a
# Release build in build-demo/, builds kattn_demo and runs it (about a minute on 2 cores).
# Idempotent: installs nothing that is already there and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pkgs=(cmake g++ libeigen3-dev nlohmann-json3-dev libgtest-dev libbenchmark-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

# Only the demo is built: tests and benchmarks stay off so that nothing else is compiled.
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=Release \
      -DKATTN_BUILD_TESTS=OFF -DKATTN_BUILD_BENCHMARKS=OFF -DKATTN_BUILD_EXAMPLES=ON
cmake --build build-demo --target kattn_demo -j "$(nproc)"
./build-demo/examples/kattn_demo
