#!/usr/bin/env bash
# Installs what kattn's build, tests, benchmarks and demo need from Debian's packages.
# Does nothing when everything is there already.
set -euo pipefail
pkgs=(cmake g++ clang libclang-rt-dev libeigen3-dev nlohmann-json3-dev libgtest-dev libbenchmark-dev
      python3-dev python3-numpy python3-pybind11 pybind11-dev doxygen libopenmpi-dev openmpi-bin)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
