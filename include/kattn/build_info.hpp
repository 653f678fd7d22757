#pragma once
/// \file
/// kattn::buildInfo(): the instruction sets the program's kattn code runs with, against what
/// the CPU offers.

#include <string>

#include <Eigen/Core>

namespace kattn {

/// What buildInfo() reports.
struct BuildInfo {
  /// The SIMD level kattn's kernels were compiled for: "AVX-512", "AVX2+FMA", "AVX", "SSE4.2",
  /// "SSE2", or "none"; Eigen's kernels (every matrix product) are compiled for it too.
  std::string simd;
  /// Eigen's own list of the instruction sets in use (Eigen::SimdInstructionSetsInUse()).
  std::string eigen;
  /// The best of those levels this CPU runs ("unknown" off x86 or without GCC/Clang builtins).
  std::string cpu;
  /// Whether the layers' heavy members come from kattn_compiled (KATTN_EXTERN_TEMPLATES).
  bool compiled_library = false;
  /// Empty when the code uses what the CPU offers; else how to get it (kattn::native).
  std::string advice;
  /// All of the above on one line.
  std::string toString() const {
    std::string s = "kattn: SIMD " + simd + " (Eigen: " + eigen + "), CPU offers " + cpu +
                    (compiled_library ? ", layers from kattn_compiled" : ", header-only");
    return advice.empty() ? s : s + ". " + advice;
  }
};

namespace detail {

/// Levels by rank, for comparing what the code uses with what the CPU offers.
inline int simdRank(const std::string& level) {
  const char* const order[] = {"none", "SSE2", "SSE4.2", "AVX", "AVX2+FMA", "AVX-512"};
  for (int i = 0; i < 6; ++i) {
    if (level == order[i]) return i;
  }
  return -1;
}

}  // namespace detail

/// The instruction sets this translation unit's kattn code is compiled for (with
/// kattn_compiled, the library's: a link-time check keeps the two alike), and the CPU's.
inline BuildInfo buildInfo() {
  BuildInfo info;
#if defined(EIGEN_VECTORIZE_AVX512)
  info.simd = "AVX-512";
#elif defined(EIGEN_VECTORIZE_AVX2) && defined(EIGEN_VECTORIZE_FMA)
  info.simd = "AVX2+FMA";
#elif defined(EIGEN_VECTORIZE_AVX)
  info.simd = "AVX";
#elif defined(EIGEN_VECTORIZE_SSE4_2)
  info.simd = "SSE4.2";
#elif defined(EIGEN_VECTORIZE_SSE2)
  info.simd = "SSE2";
#else
  info.simd = "none";
#endif
  info.eigen = Eigen::SimdInstructionSetsInUse();
#if defined(KATTN_EXTERN_TEMPLATES)
  info.compiled_library = true;
#endif
  info.cpu = "unknown";
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    info.cpu = "AVX-512";
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    info.cpu = "AVX2+FMA";
  } else if (__builtin_cpu_supports("avx")) {
    info.cpu = "AVX";
  } else if (__builtin_cpu_supports("sse4.2")) {
    info.cpu = "SSE4.2";
  } else {
    info.cpu = "SSE2";
  }
  if (detail::simdRank(info.cpu) > detail::simdRank(info.simd)) {
    info.advice = "This CPU offers " + info.cpu + ", which kattn's compiled code does not use: " +
                  std::string(info.compiled_library
                                  ? "build kattn_compiled with -DKATTN_COMPILED_NATIVE=ON"
                                  : "link kattn::native, or compile with -march=native") +
                  " (docs/performance.md)";
  }
#endif
  return info;
}

}  // namespace kattn
