#pragma once
/// \file
/// Keras weight initializers (glorot_uniform, he_normal, ...) for layers built without loaded
/// weights: Keras's distributions and fan rules, drawn from kattn's own counter-based stream.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "config.hpp"
#include "detail/random_bits.hpp"
#include "tensor.hpp"

namespace kattn {

/// Keras's (fan_in, fan_out) of a kernel shape: rank 1 gives (n, n), rank 2 (rows, cols), and a
/// higher rank multiplies both by the product of the leading dims (the receptive field). So
/// the attention's query kernel [D, N, d] has fans (D N, D d), as Keras computes them.
inline std::pair<double, double> kerasFans(const std::vector<Index>& shape) {
  if (shape.empty()) return {1.0, 1.0};
  if (shape.size() == 1) return {double(shape[0]), double(shape[0])};
  double receptive = 1.0;
  for (std::size_t i = 0; i + 2 < shape.size(); ++i) receptive *= double(shape[i]);
  return {double(shape[shape.size() - 2]) * receptive, double(shape.back()) * receptive};
}

namespace detail {

/// Uniform in [0, 1) and standard normal draws of element `i`, try `attempt`, of one stream.
struct InitStream {
  std::uint64_t key;
  double uniform(std::uint64_t i, std::uint64_t attempt = 0) const {
    return uniformFromBits(mixBits(key, i, attempt, 0));
  }
  double normal(std::uint64_t i, std::uint64_t attempt) const {
    // Box-Muller on two uniforms; 1 - u keeps the log argument in (0, 1].
    const double u1 = 1.0 - uniformFromBits(mixBits(key, i, attempt, 1));
    const double u2 = uniformFromBits(mixBits(key, i, attempt, 2));
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  /// Normal redrawn until within two standard deviations (Keras's truncated normal).
  double truncatedNormal(std::uint64_t i) const {
    for (std::uint64_t attempt = 0;; ++attempt) {
      const double z = normal(i, attempt);
      if (std::abs(z) <= 2.0) return z;
    }
  }
};

}  // namespace detail

/**
 * \brief Fills `t` from initializer `init` (validated by LayerConfig), like Keras would for a
 * weight of this shape. The values are a pure function of (seed, stream, element): the same
 * seed gives the same weights on every run and platform; they are not TensorFlow's draws.
 */
template <typename Scalar, int Rank>
void initialize(const Initializer& init, Tensor<Scalar, Rank>& t, std::int64_t seed,
                std::uint64_t stream) {
  const std::string& n = init.name;
  const detail::InitStream rng{
      detail::mixBits(std::uint64_t(seed), 0x6b65726173696e69ull /* "kerasini" */, stream, 0)};
  Scalar* out = t.data();
  const auto count = std::uint64_t(t.size());
  auto fill = [&](auto draw) {
    for (std::uint64_t i = 0; i < count; ++i) out[i] = Scalar(draw(i));
  };
  if (n == "zeros" || n == "ones" || n == "constant") {
    const double v = n == "zeros" ? 0.0 : n == "ones" ? 1.0 : init.value;
    fill([&](std::uint64_t) { return v; });
    return;
  }
  if (n == "random_normal") {
    fill([&](std::uint64_t i) { return init.mean + init.stddev * rng.normal(i, 0); });
    return;
  }
  if (n == "truncated_normal") {
    fill([&](std::uint64_t i) { return init.mean + init.stddev * rng.truncatedNormal(i); });
    return;
  }
  if (n == "random_uniform") {
    fill([&](std::uint64_t i) { return init.minval + (init.maxval - init.minval) * rng.uniform(i); });
    return;
  }
  // Variance scaling: glorot (scale 1, fan_avg), he (scale 2, fan_in), lecun (scale 1, fan_in).
  std::vector<Index> shape;
  for (int i = 0; i < Rank; ++i) shape.push_back(t.dimension(i));
  const auto [fan_in, fan_out] = kerasFans(shape);
  const bool glorot = n.rfind("glorot", 0) == 0, he = n.rfind("he_", 0) == 0;
  const double fan = glorot ? std::max(1.0, (fan_in + fan_out) / 2) : std::max(1.0, fan_in);
  const double variance = (he ? 2.0 : 1.0) / fan;
  if (n.find("uniform") != std::string::npos) {
    const double limit = std::sqrt(3.0 * variance);
    fill([&](std::uint64_t i) { return limit * (2.0 * rng.uniform(i) - 1.0); });
  } else {
    // The standard deviation of a unit normal truncated at +-2, as Keras corrects for it.
    const double stddev = std::sqrt(variance) / 0.87962566103423978;
    fill([&](std::uint64_t i) { return stddev * rng.truncatedNormal(i); });
  }
}

}  // namespace kattn
