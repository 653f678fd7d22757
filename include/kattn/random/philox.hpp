#pragma once
/// \file
/// Philox4x32-10 and a stateless generator that reproduces TensorFlow's stateless random ops
/// (`tf.random.stateless_*`, CPU, `alg="auto_select"`/Philox) bit for bit.
///
/// Why a TF clone and not `<random>`: the reference layer rebuilds its random projection
/// from its `seed` every time it is constructed and never stores it in checkpoints, so a
/// C++ model that loads trained weights must draw the very same numbers TF drew.
///
/// This header is public and usable on its own (namespace `kattn::random`); it depends on
/// the standard library only.
///
/// What TF does, and so what this header does:
/// - A seed is a shape-[2] int32 or int64 tensor. `GenerateKey` sign-extends each element to
///   64 bits, uses the four 32-bit halves (low, high of seed[0], low, high of seed[1]) as a
///   Philox counter, and hashes it once under the fixed key (0x3EC8F720, 0x02461E29): the
///   output (m0, m1, m2, m3) is the key (m0, m1) and the starting counter (0, 0, m2, m3).
/// - An output tensor is filled in row-major order, one Philox block per group of outputs;
///   group g uses the starting counter plus g (128-bit add, carry from word 0 up), and the
///   leftovers of the last block are dropped.
/// - Full-range int32 uniform: one 32-bit word per element, reinterpreted.
/// - float32 normal: Box–Muller on pairs of words, four samples per block (see boxMullerFloat).

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kattn {
namespace random {

/// The 128-bit Philox counter, word 0 least significant.
using PhiloxCounter = std::array<std::uint32_t, 4>;
/// The 64-bit Philox key, word 0 first.
using PhiloxKey = std::array<std::uint32_t, 2>;

/// The values of a TF seed tensor (shape [2]). An int32 seed is stored sign-extended, which
/// is exactly what TF's key derivation does with it, so int32 and int64 seed tensors holding
/// the same values give the same streams.
using SeedPair = std::array<std::int64_t, 2>;

/**
 * \brief The Philox4x32-10 block function (Salmon et al., "Parallel random numbers: as easy
 * as 1, 2, 3", SC 2011), as in Random123 and TF's `random::PhiloxRandom`.
 *
 * Ten rounds of two 32x32->64 multiplications, the key bumped by the Weyl constants between
 * rounds. For a fixed key it is a bijection of the 128-bit counter, which is why distinct
 * seed pairs can never share a key and counter (see StatelessPhilox).
 */
constexpr PhiloxCounter philox4x32x10(PhiloxCounter ctr, PhiloxKey key) noexcept {
  constexpr std::uint32_t kMul0 = 0xD2511F53u;
  constexpr std::uint32_t kMul1 = 0xCD9E8D57u;
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr std::uint32_t kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += kWeyl0;
      key[1] += kWeyl1;
    }
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * ctr[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * ctr[2];
    const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32);
    const std::uint32_t lo0 = static_cast<std::uint32_t>(p0);
    const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32);
    const std::uint32_t lo1 = static_cast<std::uint32_t>(p1);
    ctr = PhiloxCounter{hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0};
  }
  return ctr;
}

/// `c + n` as 128-bit unsigned integers (wrapping), word 0 least significant: the counter of
/// the n-th block after `c`.
constexpr PhiloxCounter addToCounter(PhiloxCounter c, std::uint64_t n) noexcept {
  std::uint64_t carry = n;
  for (std::size_t i = 0; i < 4 && carry != 0; ++i) {
    const std::uint64_t sum = static_cast<std::uint64_t>(c[i]) + (carry & 0xFFFFFFFFu);
    c[i] = static_cast<std::uint32_t>(sum);
    carry = (carry >> 32) + (sum >> 32);
  }
  return c;
}

/**
 * \brief A uniform float in [0, 1) from the low 23 bits of `x`, as TF's `Uint32ToFloat`.
 *
 * The bits become the mantissa of a float in [1, 2) and 1 is subtracted; the subtraction is
 * exact, so the result is k * 2^-23 for k = x & 0x7FFFFF, whatever the rounding mode.
 */
inline float uint32ToFloat(std::uint32_t x) noexcept {
  const std::uint32_t bits = (127u << 23) | (x & 0x7FFFFFu);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f - 1.0f;
}

/**
 * \brief Two float32 standard normals from two 32-bit words, bit-identical to TF's
 * `BoxMullerFloat` on Linux.
 *
 * Formula (in this order, each step rounded to float unless said):
 * - u1 = uint32ToFloat(x0), raised to 1e-7f if smaller (so log never sees 0; |output| <= 5.68);
 * - v1 = float(2*pi * double(uint32ToFloat(x1))), the product in double as TF writes
 *   `2.0f * M_PI * u` with a double `M_PI`;
 * - r = sqrtf(-2.0f * logf(u1));
 * - (s, c) = sincosf(v1); f0 = s * r, f1 = c * r.
 *
 * \note Exactness depends on the math library: TF on Linux calls glibc's `logf` and
 * `sincosf`, and so does this function when built against glibc. Another libm (or a
 * correctly rounded one) differs by an ulp in roughly 1.5% of samples. `-ffast-math` voids
 * the guarantee (it may substitute vectorised approximations).
 * \note No multiplication here feeds an addition, so floating-point contraction into FMA
 * (`-ffp-contract=fast`, `-march=native`) has nothing to fuse; every step is a separate
 * statement to keep it that way. The code assumes `FLT_EVAL_METHOD == 0` (SSE/NEON, not x87).
 */
inline void boxMullerFloat(std::uint32_t x0, std::uint32_t x1, float& f0, float& f1) noexcept {
  // 2*pi in double: the same double as TF's `2.0f * M_PI` (doubling is exact).
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  constexpr float kEpsilon = 1.0e-7f;
  float u1 = uint32ToFloat(x0);
  if (u1 < kEpsilon) {
    u1 = kEpsilon;
  }
  const double angle = kTwoPi * static_cast<double>(uint32ToFloat(x1));
  const float v1 = static_cast<float>(angle);
  const float logU1 = std::log(u1);  // float overload: logf
  const float minusTwoLog = -2.0f * logU1;
  const float r = std::sqrt(minusTwoLog);
  float s;
  float c;
#if defined(__GLIBC__) && defined(__USE_GNU)
  ::sincosf(v1, &s, &c);
#else
  s = std::sin(v1);
  c = std::cos(v1);
#endif
  f0 = s * r;
  f1 = c * r;
}

/**
 * \brief TF's stateless Philox stream for one seed: key and starting counter derived from the
 * seed as TF's `GenerateKey` does, and the samplers TF's stateless ops use on top of it.
 *
 * Every method is a pure function of the seed and its arguments (no state advances), like the
 * TF op it mirrors: `normalFloat(out, n)` equals `tf.random.stateless_normal([n], seed)`.
 */
class StatelessPhilox {
 public:
  /// The fixed key TF uses to scramble a seed into a key and counter.
  static constexpr PhiloxKey kScrambleKey{0x3EC8F720u, 0x02461E29u};

  /// The stream of TF seed tensor `seed` (int32 or int64 values).
  explicit StatelessPhilox(const SeedPair& seed) noexcept {
    const std::uint64_t s0 = static_cast<std::uint64_t>(seed[0]);
    const std::uint64_t s1 = static_cast<std::uint64_t>(seed[1]);
    const PhiloxCounter mix = philox4x32x10(
        PhiloxCounter{static_cast<std::uint32_t>(s0), static_cast<std::uint32_t>(s0 >> 32),
                      static_cast<std::uint32_t>(s1), static_cast<std::uint32_t>(s1 >> 32)},
        kScrambleKey);
    m_key = PhiloxKey{mix[0], mix[1]};
    m_counter = PhiloxCounter{0u, 0u, mix[2], mix[3]};
  }

  /// The Philox key derived from the seed.
  const PhiloxKey& key() const noexcept { return m_key; }
  /// The counter of block 0.
  const PhiloxCounter& counter() const noexcept { return m_counter; }

  /// The four words of block g (block 0 feeds the first outputs of every op).
  PhiloxCounter block(std::uint64_t g) const noexcept {
    return philox4x32x10(addToCounter(m_counter, g), m_key);
  }

  /// `tf.random.stateless_uniform([n], seed, minval=None, maxval=None, dtype=tf.int32)`:
  /// full-range int32, one word per element.
  void uniformFullInt32(std::int32_t* out, std::size_t n) const noexcept {
    for (std::size_t i = 0; i < n; i += 4) {
      const PhiloxCounter w = block(i / 4);
      for (std::size_t j = 0; j < 4 && i + j < n; ++j) {
        out[i + j] = static_cast<std::int32_t>(w[j]);  // two's complement reinterpretation
      }
    }
  }

  /// `tf.random.stateless_normal([n], seed, dtype=tf.float32)`: four samples per block,
  /// Box–Muller on words (0, 1) and (2, 3).
  void normalFloat(float* out, std::size_t n) const noexcept {
    for (std::size_t i = 0; i < n; i += 4) {
      const PhiloxCounter w = block(i / 4);
      float f[4];
      boxMullerFloat(w[0], w[1], f[0], f[1]);
      boxMullerFloat(w[2], w[3], f[2], f[3]);
      for (std::size_t j = 0; j < 4 && i + j < n; ++j) {
        out[i + j] = f[j];
      }
    }
  }

  /// Convenience overload of normalFloat returning a vector.
  std::vector<float> normalFloat(std::size_t n) const {
    std::vector<float> v(n);
    normalFloat(v.data(), n);
    return v;
  }

 private:
  PhiloxKey m_key{};
  PhiloxCounter m_counter{};
};

/// `tf.random.stateless_normal([n], seed)` in float32.
inline std::vector<float> statelessNormalFloat(const SeedPair& seed, std::size_t n) {
  return StatelessPhilox(seed).normalFloat(n);
}

/// The next seed of a chain, `tf.random.stateless_uniform([2], seed, minval=None,
/// dtype=tf.int32)`: the first two words of block 0, as int32. The reference layer advances
/// its projection seed this way after each draw.
inline SeedPair nextSeed(const SeedPair& seed) noexcept {
  const PhiloxCounter w = StatelessPhilox(seed).block(0);
  return SeedPair{static_cast<std::int32_t>(w[0]), static_cast<std::int32_t>(w[1])};
}

/// `tf.random.experimental.stateless_split(seed, num)` for an int32 seed tensor: `num` new
/// int32 seeds, the rows of a full-range int32 uniform of shape [num, 2].
inline std::vector<SeedPair> statelessSplit(const SeedPair& seed, std::size_t num = 2) {
  std::vector<std::int32_t> words(2 * num);
  StatelessPhilox(seed).uniformFullInt32(words.data(), words.size());
  std::vector<SeedPair> out(num);
  for (std::size_t i = 0; i < num; ++i) {
    out[i] = SeedPair{words[2 * i], words[2 * i + 1]};
  }
  return out;
}

/// `tf.random.experimental.stateless_fold_in(seed, data)` for int32 `data`: the pair
/// [first full-range int32 of `seed`, data]. Distinct data give distinct seeds by construction.
inline SeedPair statelessFoldIn(const SeedPair& seed, std::int32_t data) noexcept {
  const PhiloxCounter w = StatelessPhilox(seed).block(0);
  return SeedPair{static_cast<std::int32_t>(w[0]), data};
}

}  // namespace random
}  // namespace kattn
