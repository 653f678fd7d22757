#pragma once
/// \file
/// \private Counter-based random bits for dropout: a value is a pure function of its
/// coordinates, so threads never share a generator and results do not depend on scheduling.

#include <cstdint>

namespace kattn {
namespace detail {

/// SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mixer.
inline std::uint64_t splitMix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Mixes four words into one.
inline std::uint64_t mixBits(std::uint64_t a, std::uint64_t b, std::uint64_t c, std::uint64_t d) {
  return splitMix(splitMix(splitMix(splitMix(a) ^ b) ^ c) ^ d);
}

/// A double in [0, 1) from the top 53 bits.
inline double uniformFromBits(std::uint64_t x) { return double(x >> 11) * 0x1.0p-53; }

}  // namespace detail
}  // namespace kattn
