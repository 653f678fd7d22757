#pragma once
// Test support: seeded normal float tensors (the concurrency and edge-case tests).

#include <cstdint>
#include <random>

#include <kattn/tensor.hpp>

namespace kattn_test {

/// A seeded generator of normal floats and integers in a range.
class FloatRng {
 public:
  explicit FloatRng(std::uint64_t seed) : m_gen(seed) {}
  float normal(float sd) { return std::normal_distribution<float>(0.0f, sd)(m_gen); }
  kattn::Index intIn(kattn::Index lo, kattn::Index hi) {
    return std::uniform_int_distribution<kattn::Index>(lo, hi)(m_gen);
  }

 private:
  std::mt19937_64 m_gen;
};

/// A tensor of the given dims with N(0, sd^2) entries.
template <int R, typename... Dims>
kattn::Tensor<float, R> randomTensor(FloatRng& r, float sd, Dims... dims) {
  kattn::Tensor<float, R> t(dims...);
  for (kattn::Index i = 0; i < t.size(); ++i) t.data()[i] = r.normal(sd);
  return t;
}

}  // namespace kattn_test
