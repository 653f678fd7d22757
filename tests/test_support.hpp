#pragma once
// Helpers the tests share: temporary folders and whole files; seeded float inputs and slices of
// [B, T, D] tensors; the typed fixtures over scalar x feature map (kattn_test::Combos).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>

#include "reference.hpp"

namespace kattn_test {

// ---- files ----------------------------------------------------------------------------------

/// A temporary folder removed at the end of the test. Its name starts with `prefix`, the name
/// of the test binary, so that a folder left behind (or named in an error) says who made it.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix) {
    std::random_device rd;
    m_path = std::filesystem::temp_directory_path() /
             (prefix + "_" + std::to_string(rd()) + "_" + std::to_string(rd()));
    std::filesystem::create_directories(m_path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(m_path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (m_path / name).string(); }

 private:
  std::filesystem::path m_path;
};

inline std::string readAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

inline void writeAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline void writeAll(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  writeAll(path, std::string(bytes.begin(), bytes.end()));
}

// ---- float inputs ---------------------------------------------------------------------------

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

// ---- slices and views -----------------------------------------------------------------------

/// Positions [t0, t0 + L) of a [B, T, D] tensor.
template <typename S>
kattn::Tensor<S, 3> rows(const kattn::Tensor<S, 3>& t, Index t0, Index L) {
  const Eigen::array<Index, 3> off{0, t0, 0}, ext{t.dimension(0), L, t.dimension(2)};
  return t.slice(off, ext);
}

/// Positions [t0, t0 + L) of a [B, S] mask.
template <typename S>
kattn::Tensor<S, 2> cols(const kattn::Tensor<S, 2>& t, Index t0, Index L) {
  const Eigen::array<Index, 2> off{0, t0}, ext{t.dimension(0), L};
  return t.slice(off, ext);
}

template <typename S>
kattn::ConstTensorMap<S, 3> view(const kattn::Tensor<S, 3>& t) {
  return kattn::ConstTensorMap<S, 3>(t.data(), t.dimensions());
}

// ---- typed fixtures: float/double x feature maps --------------------------------------------

/// What every typed fixture over a Combo knows: the layer type and the tolerances.
template <typename C, typename Masking>
class ComboTest : public ::testing::Test {
 protected:
  using Scalar = typename C::Scalar;
  using Map = typename C::Map;
  using Layer = kattn::KernelAttention<Scalar, Map, Masking>;
  static constexpr double kTol = kattn_ref::tolerance<Scalar>();
  static constexpr bool kExpType = kattn::feature_map_traits<Map>::max_shifted;
  static std::string mapName() { return Map::name; }
};

}  // namespace kattn_test
