#pragma once
// Helpers the tests share: temporary folders and whole files; seeded float inputs and slices of
// [B, T, D] tensors; the typed fixtures over scalar x feature map (kattn_test::Combos); random
// causal problems on the float64 reference of reference.hpp and a streaming driver; and the
// every-path harness of the edge-case tests (kattn_test::paths: one AnyKernelAttention<float>
// per path of the layer, a float64 relu reference, row predicates).

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

/// The causal windowed layer of a Combo, and how close streaming comes to the whole pass.
template <typename C>
class CausalTest : public ComboTest<C, kattn::CausalWindowed> {
  using Base = ComboTest<C, kattn::CausalWindowed>;

 protected:
  using State = kattn::StreamingState<typename Base::Scalar>;
  /// Streamed vs whole on well-conditioned inputs: the exp maps' shifts differ (per call /
  /// running maximum against the whole row's), which SPEC 3.5 bounds by 1e-6 in float64.
  static constexpr double kStreamTol =
      Base::kExpType ? std::max(1e-6, Base::kTol) : Base::kTol;
  /// Streamed vs whole on `p`: the declared tolerance, plus for the exp maps the weight of eps
  /// in `p` (kattn_test::epsCheck), which is all their different shifts may change.
  static double streamTolerance(const Problem& p) {
    return Base::kExpType ? Base::kTol + epsCheck(p).bound : Base::kTol;
  }
};

// ---- random causal problems and streaming ---------------------------------------------------

struct CausalOptions {
  Index max_len = 40;
  std::optional<Index> T;        // fixed length
  bool allow_padding = true;     // else padding none and T a multiple of C
  bool allow_mask = true;
  bool allow_scale = true;       // scale_by_length (not with a streaming state)
  double input_scale = 1.0;
  std::optional<Index> chunk, window;
  bool fixed_decay = false;
  std::optional<double> decay;
  Index max_batch = 2;
};

/**
 * A random causal problem for feature map `name`: C in 1..5, W in 1..6 or large, decay none
 * or gamma in {0, 0.5, 0.9, 1}, padding none/left/right. The identity map gets a shared
 * query/key bias offset and m >= d (a normaliser away from zero).
 */
inline Problem randomCausal(Rng& r, const std::string& name, const CausalOptions& o = {}) {
  Problem p;
  auto& c = p.cfg;
  const bool identity = name == "identity";
  c.feature_transform = name;
  c.use_causal_windowed = true;
  c.causal_chunk_length = int(o.chunk ? *o.chunk : r.intIn(1, 5));
  c.causal_window_length = int(o.window ? *o.window : (r.coin(0.25) ? r.intIn(50, 400) : r.intIn(1, 6)));
  if (o.fixed_decay) {
    c.causal_window_decay = o.decay;
  } else {
    const Index k = r.intIn(0, 4);
    if (k > 0) c.causal_window_decay = std::vector<double>{0.0, 0.5, 0.9, 1.0}[std::size_t(k - 1)];
  }
  const Index C = c.causal_chunk_length;
  Index T;
  if (o.allow_padding && r.coin(0.6)) {
    c.causal_padding = r.coin() ? "left" : "right";
    T = o.T ? *o.T : r.intIn(1, o.max_len);
  } else {
    if (r.coin(0.3)) c.causal_padding = "none";
    T = o.T ? *o.T : C * r.intIn(1, std::max<Index>(1, o.max_len / C));
  }
  const Index B = r.intIn(1, o.max_batch);
  c.num_heads = int(r.intIn(1, 3));
  c.key_dim = int(r.intIn(1, 6));
  if (r.coin()) c.value_dim = int(r.intIn(1, 6));
  if (r.coin()) c.output_shape = int(r.intIn(1, 6));
  c.use_bias = identity || r.coin(0.7);
  c.seed = r.intIn(0, 1000);
  if (r.coin(0.35)) {
    c.num_random_features = 0;
  } else {
    c.num_random_features = int(identity ? r.intIn(c.key_dim, 2 * c.key_dim) : r.intIn(1, 16));
    if (r.coin()) {
      p.projection = kattn::randomProjection<double>(c.num_random_features, c.key_dim,
                                                     r.intIn(1000, 2000));
    }
  }
  if (r.coin(0.3)) c.scale = r.uniform(0.1, 1.0);
  const Index Dq = r.intIn(1, 8), Dv = r.intIn(1, 8);
  const bool key_given = r.coin();
  const Index Dk = key_given ? r.intIn(1, 8) : Dv;
  if (o.allow_mask && r.coin(0.6)) {
    c.scale_by_length = o.allow_scale && r.coin(0.3);
    p.mask = kattn_test::randomMask(r, B, T, 0.3, c.scale_by_length ? 1 : 0);
  }
  p.weights = kattn_test::randomWeights(r, c, Dq, Dk, Dv, identity ? 2.0 : 0.0);
  p.query = kattn_test::randomTensor(r, B, T, Dq, o.input_scale);
  p.value = kattn_test::randomTensor(r, B, T, Dv, 1.0);
  if (key_given) p.key = kattn_test::randomTensor(r, B, T, Dk, o.input_scale);
  if (!key_given && o.input_scale != 1.0) {
    // The value is also the key input: keep the key logits as small as asked.
    for (Index i = 0; i < p.value.size(); ++i) p.value.data()[i] *= o.input_scale;
  }
  return p;
}

/// A random split of T = n C tokens into calls of whole chunks (C = 1: any split); with
/// `rest` > 0 the last call also holds `rest` tokens (a partial last chunk).
inline std::vector<Index> randomSplit(Rng& r, Index T, Index C) {
  std::vector<Index> calls;
  Index chunks = T / C;
  const Index rest = T % C;
  while (chunks > 0) {
    const Index k = r.coin(0.3) ? r.intIn(1, chunks) : r.intIn(1, std::min<Index>(chunks, 3));
    calls.push_back(k * C);
    chunks -= k;
  }
  if (rest) {
    if (calls.empty()) calls.push_back(0);
    calls.back() += rest;
  }
  return calls;
}

/// Feeds tokens [t0, t0 + sum(calls)) of `p` through `state`, call by call; returns their
/// outputs [B, sum(calls), O].
template <typename Layer, typename S = kattn_test::ScalarOfT<Layer>>
kattn::Tensor<S, 3> stream(const Layer& layer, const Problem& p, const std::vector<Index>& calls,
                           kattn::StreamingState<S>& state, Index t0 = 0,
                           bool into_caller_memory = false) {
  const kattn::Tensor<S, 3> q = kattn_test::cast<S>(p.query), v = kattn_test::cast<S>(p.value);
  std::optional<kattn::Tensor<S, 3>> k;
  std::optional<kattn::Tensor<S, 2>> m;
  if (p.key) k = kattn_test::cast<S>(*p.key);
  if (p.mask) m = kattn_test::cast<S>(*p.mask);
  Index total = 0;
  for (Index L : calls) total += L;
  kattn::Tensor<S, 3> out(p.B(), total, layer.outputDim());
  Index pos = 0;
  for (Index L : calls) {
    const kattn::Tensor<S, 3> qc = rows(q, t0 + pos, L), vc = rows(v, t0 + pos, L);
    std::optional<kattn::Tensor<S, 3>> kc;
    std::optional<kattn::Tensor<S, 2>> mc;
    std::optional<kattn::ConstTensorMap<S, 3>> kv;
    std::optional<kattn::ConstTensorMap<S, 2>> mv;
    if (k) kv.emplace(kc.emplace(rows(*k, t0 + pos, L)));
    if (m) mv.emplace(mc.emplace(cols(*m, t0 + pos, L)));
    kattn::Tensor<S, 3> y;
    if (into_caller_memory) {
      y.resize(p.B(), L, layer.outputDim());
      y.setConstant(S(-7));  // every element must be written
      layer.forward(qc, vc, kv, mv, state, kattn::TensorMap<S, 3>(y));
    } else {
      y = layer.forward(qc, vc, kv, mv, state);
    }
    out.slice(Eigen::array<Index, 3>{0, pos, 0}, Eigen::array<Index, 3>{p.B(), L, out.dimension(2)}) = y;
    pos += L;
  }
  return out;
}

template <typename V>
std::string show(const V& calls) {
  std::string s = "[";
  for (auto c : calls) s += (s.size() > 1 ? "," : "") + std::to_string(c);
  return s + "]";
}

template <typename S>
bool allFinite(const kattn::Tensor<S, 3>& t) {
  for (Index i = 0; i < t.size(); ++i)
    if (!std::isfinite(t.data()[i])) return false;
  return true;
}

/// The layer of smallCausal's problems.
using EluCausal = kattn::KernelAttention<double, kattn::Elu, kattn::CausalWindowed>;

/// A small causal elu problem (B = 2, T = 6, two heads) for the error and state-bytes tests.
inline Problem smallCausal(Index C = 2, Index W = 3, std::optional<double> decay = std::nullopt) {
  Rng r(5);
  CausalOptions o;
  o.T = 6;
  o.chunk = C;
  o.window = W;
  o.fixed_decay = true;
  o.decay = decay;
  o.allow_padding = false;
  o.allow_mask = false;
  o.allow_scale = false;
  Problem p = randomCausal(r, "elu", o);
  p.cfg.causal_padding.reset();
  p.cfg.num_heads = 2;
  p.cfg.key_dim = 3;
  p.cfg.value_dim = 2;
  p.cfg.num_random_features = 4;
  p.cfg.output_shape.reset();
  p.projection.reset();
  p.key.reset();
  p.query = kattn_test::randomTensor(r, 2, 6, 5, 1.0);
  p.value = kattn_test::randomTensor(r, 2, 6, 4, 1.0);
  p.weights = kattn_test::randomWeights(r, p.cfg, 5, 4, 4);
  return p;
}


// ---- every path of the layer, in float (the edge-case tests) --------------------------------

namespace paths {

using kattn::Index;
using Tensor1 = kattn::Tensor<float, 1>;
using Tensor2 = kattn::Tensor<float, 2>;
using Tensor3 = kattn::Tensor<float, 3>;
using Tensor4 = kattn::Tensor<float, 4>;
using CMap2 = kattn::ConstTensorMap<float, 2>;
using CMap3 = kattn::ConstTensorMap<float, 3>;
using Any = kattn::AnyKernelAttention<float>;

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
inline constexpr float kInf = std::numeric_limits<float>::infinity();

using Rng = FloatRng;
using kattn_test::view;

inline constexpr Index kDim = 6;  // D_q = D_k = D_v = O

inline kattn::Weights<float> randomWeights(Rng& r, const kattn::LayerConfig& c) {
  const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim(), D = kDim;
  kattn::Weights<float> w;
  w.query_kernel = randomTensor<3>(r, 0.5f, D, N, d);
  w.key_kernel = randomTensor<3>(r, 0.5f, D, N, d);
  w.value_kernel = randomTensor<3>(r, 0.5f, D, N, dv);
  w.output_kernel = randomTensor<3>(r, 0.5f, N, dv, D);
  w.output_softmax_kernel = randomTensor<3>(r, 0.5f, N, dv, D);
  if (c.use_bias) {
    w.query_bias = randomTensor<2>(r, 0.1f, N, d);
    w.key_bias = randomTensor<2>(r, 0.1f, N, d);
    w.value_bias = randomTensor<2>(r, 0.1f, N, dv);
    w.output_bias = randomTensor<1>(r, 1.0f, D);
    w.output_softmax_bias = randomTensor<1>(r, 1.0f, D);
  }
  if (c.begin_kernel == 0) {
    w.output_softmax_kernel = Tensor3();
    w.output_softmax_bias = Tensor1();
  }
  return w;
}

/// One forward problem: query [B, T, D], value and key [B, S, D], mask [B, S] or none.
struct Problem {
  Tensor3 query, value, key;
  std::optional<Tensor2> mask;
  std::optional<CMap2> maskView() const {
    if (!mask) return std::nullopt;
    return CMap2(mask->data(), mask->dimensions());
  }
};

/// Inputs ~ N(0, sd^2). The exp maps are compared with sd = 0.3: with larger inputs their
/// features (h(x) exp(z - M), M the largest logit) get so small that the eps of the
/// normaliser moves the result by percents, and the shifts (which differ between a whole
/// pass, a chunk and a streaming call) cancel only up to that eps term (SPEC 2).
inline Problem makeProblem(Rng& r, Index B, Index T, Index S, bool with_mask, float sd = 1.0f) {
  Problem p;
  p.query = randomTensor<3>(r, sd, B, T, kDim);
  p.value = randomTensor<3>(r, 1.0f, B, S, kDim);
  p.key = randomTensor<3>(r, sd, B, S, kDim);
  if (with_mask) {
    Tensor2 m(B, S);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = r.intIn(0, 3) == 0 ? 0.0f : 1.0f;
    for (Index b = 0; b < B && S > 0; ++b) m(b, 0) = 1.0f;  // no row fully masked
    p.mask = m;
  }
  return p;
}

inline Tensor3 sliceBatch(const Tensor3& t, Index b0, Index n) {
  Tensor3 out(n, t.dimension(1), t.dimension(2));
  for (Index b = 0; b < n; ++b)
    for (Index i = 0; i < t.dimension(1); ++i)
      for (Index j = 0; j < t.dimension(2); ++j) out(b, i, j) = t(b0 + b, i, j);
  return out;
}

inline Problem sliceProblemRows(const Problem& p, Index r0, Index L) {
  Problem c{rows(p.query, r0, L), rows(p.value, r0, L), rows(p.key, r0, L), {}};
  if (p.mask) {
    Tensor2 m(p.mask->dimension(0), L);
    for (Index b = 0; b < m.dimension(0); ++b)
      for (Index i = 0; i < L; ++i) m(b, i) = (*p.mask)(b, r0 + i);
    c.mask = m;
  }
  return c;
}

inline Problem sliceProblemBatch(const Problem& p, Index b0, Index n) {
  Problem c{sliceBatch(p.query, b0, n), sliceBatch(p.value, b0, n), sliceBatch(p.key, b0, n), {}};
  if (p.mask) {
    Tensor2 m(n, p.mask->dimension(1));
    for (Index b = 0; b < n; ++b)
      for (Index i = 0; i < m.dimension(1); ++i) m(b, i) = (*p.mask)(b0 + b, i);
    c.mask = m;
  }
  return c;
}

/// The paths of the layer. Streaming feeds the sequence in calls of `chunk` tokens (exact
/// mode without decay, recurrent with one) and concatenates the outputs.
enum class Path { Kernel, KernelExplicit, KernelLowRank, Short, BeginKernel, Causal, Streaming };

inline const char* pathName(Path p) {
  switch (p) {
    case Path::Kernel:
      return "kernel";
    case Path::KernelExplicit:
      return "kernel(explicit)";
    case Path::KernelLowRank:
      return "kernel(low-rank)";
    case Path::Short:
      return "short";
    case Path::BeginKernel:
      return "begin_kernel";
    case Path::Causal:
      return "causal";
    case Path::Streaming:
      return "streaming";
  }
  return "?";
}

inline constexpr Path kAllPaths[] = {Path::Kernel,   Path::KernelExplicit, Path::KernelLowRank,
                              Path::Short,    Path::BeginKernel,    Path::Causal,
                              Path::Streaming};
inline const std::vector<std::string> kMaps = {"elu",    "relu",     "square", "exp",
                                        "expmod", "identity", "expplus"};

inline bool causal(Path p) { return p == Path::Causal || p == Path::Streaming; }
inline bool applicable(Path p, const std::string& map) {
  return !(p == Path::Streaming && map == "expplus");
}

inline kattn::LayerConfig configFor(Path path, const std::string& map) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.value_dim = 3;
  c.feature_transform = map;
  c.num_random_features = 5;
  c.seed = 11;
  c.is_short_seq = path == Path::Short;
  c.begin_kernel = path == Path::BeginKernel ? 2 : 0;
  if (causal(path)) {
    c.use_causal_windowed = true;
    c.causal_chunk_length = 2;
    c.causal_window_length = 2;
  }
  return c;
}

inline Any makeLayer(Path path, const kattn::LayerConfig& c, std::uint64_t seed = 7) {
  Any layer(c);
  Rng r(seed);
  layer.setWeights(randomWeights(r, c));
  if (path == Path::KernelExplicit) layer.setCoreForm(kattn::CoreForm::Explicit);
  if (path == Path::KernelLowRank) layer.setCoreForm(kattn::CoreForm::LowRank);
  return layer;
}

/// Runs a problem through `path` (streaming: calls of `chunk` tokens, outputs concatenated).
inline Tensor3 run(const Any& layer, Path path, const Problem& p, Index chunk = 2) {
  if (path != Path::Streaming) {
    return layer.forward(view(p.query), view(p.value), view(p.key), p.maskView());
  }
  const Index B = p.query.dimension(0), T = p.query.dimension(1);
  Tensor3 out(B, T, layer.outputDim());
  auto state = layer.makeState(B);
  for (Index r0 = 0; r0 < T; r0 += chunk) {
    const Index L = std::min(chunk, T - r0);
    const Problem c = sliceProblemRows(p, r0, L);
    const Tensor3 y = layer.forward(view(c.query), view(c.value), view(c.key), c.maskView(), state);
    for (Index b = 0; b < B; ++b)
      for (Index i = 0; i < L; ++i)
        for (Index j = 0; j < y.dimension(2); ++j) out(b, r0 + i, j) = y(b, i, j);
  }
  return out;
}

inline bool sameBits(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof(float)) == 0;
}

/// Output row (b, t) equals the bias (the softmax part's bias for t < begin_kernel), exactly.
inline void expectBiasRow(const Tensor3& y, Index b, Index t, const kattn::Weights<float>& w,
                          Index K, const std::string& what) {
  const Tensor1& bias = t < K ? w.output_softmax_bias : w.output_bias;
  for (Index j = 0; j < y.dimension(2); ++j) {
    ASSERT_EQ(y(b, t, j), bias(j)) << what << " b=" << b << " t=" << t << " j=" << j;
  }
}

inline bool rowAll(const Tensor3& y, Index b, Index t, bool (*pred)(float)) {
  for (Index j = 0; j < y.dimension(2); ++j)
    if (!pred(y(b, t, j))) return false;
  return true;
}
inline bool isNaN(float x) { return std::isnan(x); }
inline bool isFinite(float x) { return std::isfinite(x); }

inline bool rowSameBits(const Tensor3& a, Index ba, const Tensor3& b, Index bb, Index t) {
  for (Index j = 0; j < a.dimension(2); ++j)
    if (!sameBits(a(ba, t, j), b(bb, t, j))) return false;
  return true;
}

inline double maxAbs(const Tensor3& t) {
  double m = 0;
  for (Index i = 0; i < t.size(); ++i) m = std::max(m, std::abs(double(t.data()[i])));
  return m;
}

/// max |a - b| / max(1, max |b|): both tensors must have the same shape.
inline double relDiff(const Tensor3& a, const Tensor3& b) {
  EXPECT_EQ(a.dimensions(), b.dimensions());
  double m = 0;
  for (Index i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(double(a.data()[i]) - double(b.data()[i])));
  }
  return m / std::max(1.0, maxAbs(b));
}

/// float64 reference of the kernel paths (SPEC 1, 2, 3.2, 3.3) for relu features with a
/// projection: bidirectional when chunk = 0, else causal windowed (no padding) with decay.
inline std::vector<double> referenceRelu(const kattn::LayerConfig& c,
                                         const kattn::Weights<float>& w,
                                         const kattn::Matrix<float>& P, const Problem& p,
                                         Index chunk, Index window, double gamma) {
  const Index B = p.query.dimension(0), T = p.query.dimension(1), S = p.value.dimension(1);
  const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim(), m = P.rows();
  const Index O = w.output_kernel.dimension(2);
  const double r = std::sqrt(c.resolvedScale());
  auto dense = [&](const Tensor3& x, const Tensor3& W, const Tensor2& bias, Index b, Index t,
                   Index n, Index h) {
    std::vector<double> out(std::size_t(h), 0.0);
    for (Index j = 0; j < h; ++j) {
      double s = bias.size() ? bias(n, j) : 0.0;
      for (Index i = 0; i < x.dimension(2); ++i) s += double(x(b, t, i)) * W(i, n, j);
      out[std::size_t(j)] = s;
    }
    return out;
  };
  auto phi = [&](const std::vector<double>& x) {
    std::vector<double> f(static_cast<std::size_t>(m));
    for (Index i = 0; i < m; ++i) {
      double z = 0;
      for (Index j = 0; j < d; ++j) z += r * x[std::size_t(j)] * P(i, j);
      f[std::size_t(i)] = (std::max(z, 0.0) + 1e-3) / std::sqrt(double(m));
    }
    return f;
  };
  std::vector<double> y(std::size_t(B * T * O), 0.0);
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n) {
      std::vector<std::vector<double>> kf(static_cast<std::size_t>(S)), vs(kf.size());
      for (Index s = 0; s < S; ++s) {
        kf[std::size_t(s)] = phi(dense(p.key, w.key_kernel, w.key_bias, b, s, n, d));
        vs[std::size_t(s)] = dense(p.value, w.value_kernel, w.value_bias, b, s, n, dv);
        const double mk = p.mask ? double((*p.mask)(b, s)) : 1.0;
        for (double& f : kf[std::size_t(s)]) f *= mk;
      }
      for (Index t = 0; t < T; ++t) {
        const std::vector<double> qf =
            phi(dense(p.query, w.query_kernel, w.query_bias, b, t, n, d));
        std::vector<double> num(std::size_t(dv), 0.0);
        double den = 1e-6;
        for (Index s = 0; s < S; ++s) {
          double weight = 1.0;
          if (chunk > 0) {
            const Index dc = t / chunk - s / chunk;
            if (dc < 0 || dc >= window) continue;
            weight = std::pow(gamma, double(dc));
          }
          double qk = 0;
          for (Index i = 0; i < m; ++i)
            qk += qf[std::size_t(i)] * kf[std::size_t(s)][std::size_t(i)];
          qk *= weight;
          den += qk;
          for (Index j = 0; j < dv; ++j)
            num[std::size_t(j)] += qk * vs[std::size_t(s)][std::size_t(j)];
        }
        for (Index o = 0; o < O; ++o) {
          double acc = 0;
          for (Index j = 0; j < dv; ++j)
            acc += num[std::size_t(j)] / den * w.output_kernel(n, j, o);
          y[std::size_t((b * T + t) * O + o)] += acc;
        }
      }
    }
  if (w.output_bias.size()) {
    for (Index i = 0; i < B * T; ++i)
      for (Index o = 0; o < O; ++o) y[std::size_t(i * O + o)] += w.output_bias(o);
  }
  return y;
}

inline double relDiff(const Tensor3& a, const std::vector<double>& ref) {
  double m = 0, scale = 1;
  for (Index i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(double(a.data()[i]) - ref[std::size_t(i)]));
    scale = std::max(scale, std::abs(ref[std::size_t(i)]));
  }
  return m / scale;
}

}  // namespace paths

}  // namespace kattn_test
