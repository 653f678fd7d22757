// Defined behaviour at the edges (issue 5, item 3), for every path of the layer: the
// bidirectional kernel path (both forms), the short-sequence softmax path, begin_kernel,
// the whole-sequence causal windowed pass and streaming (exact and recurrent).
//
// The behaviour, as these tests pin it down:
// - T = 0: an empty output [B, 0, O]; a streaming call of 0 tokens leaves the state as it was.
// - S = 0 (bidirectional): no keys, so every head is 0 (the kernel paths give 0 / (0 + eps),
//   the short path has nothing to average) and every output row equals the output bias
//   (the softmax part's bias for the rows t < begin_kernel). scale_by_length with S = 0 is
//   an input error (the mask row sums to 0 < 1).
// - B = 0: an empty output [0, T, O].
// - One head, m = 1: ordinary sizes (checked against a float64 reference).
// - Every key of a batch row masked: zero heads, so that row's outputs equal the output bias;
//   the other batch rows are computed as if alone.
// - Mask values other than 0 and 1 multiply the key features (SPEC: phi(k) *= mask). In the
//   kernel paths a key with mask w counts w times: mask 2 on a key equals that key given
//   twice, and mask 2 on every key equals no mask up to the eps of the normaliser,
//   a_t = q'(2 KV) / (q'(2 z) + eps). In the short path the mask scales the scores q'.k' of
//   the keys with mask != 0 (a softmax temperature per key); mask 0 excludes a key.
// - NaN or Inf in the inputs never crashes; NaN reaches the outputs that depend on it:
//   a NaN query row gives a NaN output row; a NaN key or value reaches every output that
//   attends to it (the whole batch row when bidirectional; the positions from its chunk on,
//   within the window, when causal); other batch rows are untouched. A mask does not shield
//   a NaN: masked features are multiplied by 0, and 0 * NaN = NaN (as in the reference).
//   With the exp maps the shift is a maximum over the batch row, so a NaN anywhere in a batch
//   row may reach all of that row (the reference's shift behaves the same).
// - exp / expmod features with logits up to 1e4 in float32: finite outputs, heads bounded by
//   the largest |value| (the max shifts keep exp from overflowing; exp's h(x) underflows to
//   0 there, giving zero features and zero heads).
// - decay 0: a chunk attends to itself only; decay 1: the same as no decay (bit for bit).
// - chunk longer than T: with left or right padding the whole sequence is one chunk
//   (bidirectional attention over it); with padding none it is an input error.
// - window longer than the number of chunks: the same as a window of exactly that many chunks
//   (bit for bit), i.e. plain causal attention over chunks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <kattn/kattn.hpp>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using kattn::Index;
using Tensor1 = kattn::Tensor<float, 1>;
using Tensor2 = kattn::Tensor<float, 2>;
using Tensor3 = kattn::Tensor<float, 3>;
using Tensor4 = kattn::Tensor<float, 4>;
using CMap2 = kattn::ConstTensorMap<float, 2>;
using CMap3 = kattn::ConstTensorMap<float, 3>;
using Any = kattn::AnyKernelAttention<float>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

using Rng = kattn_test::FloatRng;
using kattn_test::randomTensor;

constexpr Index kDim = 6;  // D_q = D_k = D_v = O

kattn::Weights<float> randomWeights(Rng& r, const kattn::LayerConfig& c) {
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

CMap3 view(const Tensor3& t) { return CMap3(t.data(), t.dimensions()); }

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
Problem makeProblem(Rng& r, Index B, Index T, Index S, bool with_mask, float sd = 1.0f) {
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

Tensor3 sliceRows(const Tensor3& t, Index r0, Index L) {
  Tensor3 out(t.dimension(0), L, t.dimension(2));
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index i = 0; i < L; ++i)
      for (Index j = 0; j < t.dimension(2); ++j) out(b, i, j) = t(b, r0 + i, j);
  return out;
}

Tensor3 sliceBatch(const Tensor3& t, Index b0, Index n) {
  Tensor3 out(n, t.dimension(1), t.dimension(2));
  for (Index b = 0; b < n; ++b)
    for (Index i = 0; i < t.dimension(1); ++i)
      for (Index j = 0; j < t.dimension(2); ++j) out(b, i, j) = t(b0 + b, i, j);
  return out;
}

Problem sliceProblemRows(const Problem& p, Index r0, Index L) {
  Problem c{sliceRows(p.query, r0, L), sliceRows(p.value, r0, L), sliceRows(p.key, r0, L), {}};
  if (p.mask) {
    Tensor2 m(p.mask->dimension(0), L);
    for (Index b = 0; b < m.dimension(0); ++b)
      for (Index i = 0; i < L; ++i) m(b, i) = (*p.mask)(b, r0 + i);
    c.mask = m;
  }
  return c;
}

Problem sliceProblemBatch(const Problem& p, Index b0, Index n) {
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

const char* pathName(Path p) {
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

constexpr Path kAllPaths[] = {Path::Kernel,   Path::KernelExplicit, Path::KernelLowRank,
                              Path::Short,    Path::BeginKernel,    Path::Causal,
                              Path::Streaming};
const std::vector<std::string> kMaps = {"elu",    "relu",     "square", "exp",
                                        "expmod", "identity", "expplus"};

bool causal(Path p) { return p == Path::Causal || p == Path::Streaming; }
bool applicable(Path p, const std::string& map) {
  return !(p == Path::Streaming && map == "expplus");
}

kattn::LayerConfig configFor(Path path, const std::string& map) {
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

Any makeLayer(Path path, const kattn::LayerConfig& c, std::uint64_t seed = 7) {
  Any layer(c);
  Rng r(seed);
  layer.setWeights(randomWeights(r, c));
  if (path == Path::KernelExplicit) layer.setCoreForm(kattn::CoreForm::Explicit);
  if (path == Path::KernelLowRank) layer.setCoreForm(kattn::CoreForm::LowRank);
  return layer;
}

/// Runs a problem through `path` (streaming: calls of `chunk` tokens, outputs concatenated).
Tensor3 run(const Any& layer, Path path, const Problem& p, Index chunk = 2) {
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

bool sameBits(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof(float)) == 0;
}

/// Output row (b, t) equals the bias (the softmax part's bias for t < begin_kernel), exactly.
void expectBiasRow(const Tensor3& y, Index b, Index t, const kattn::Weights<float>& w, Index K,
                   const std::string& what) {
  const Tensor1& bias = t < K ? w.output_softmax_bias : w.output_bias;
  for (Index j = 0; j < y.dimension(2); ++j) {
    ASSERT_EQ(y(b, t, j), bias(j)) << what << " b=" << b << " t=" << t << " j=" << j;
  }
}

bool rowAll(const Tensor3& y, Index b, Index t, bool (*pred)(float)) {
  for (Index j = 0; j < y.dimension(2); ++j)
    if (!pred(y(b, t, j))) return false;
  return true;
}
bool isNaN(float x) { return std::isnan(x); }
bool isFinite(float x) { return std::isfinite(x); }

bool rowSameBits(const Tensor3& a, Index ba, const Tensor3& b, Index bb, Index t) {
  for (Index j = 0; j < a.dimension(2); ++j)
    if (!sameBits(a(ba, t, j), b(bb, t, j))) return false;
  return true;
}

double maxAbs(const Tensor3& t) {
  double m = 0;
  for (Index i = 0; i < t.size(); ++i) m = std::max(m, std::abs(double(t.data()[i])));
  return m;
}

/// max |a - b| / max(1, max |b|): both tensors must have the same shape.
double relDiff(const Tensor3& a, const Tensor3& b) {
  EXPECT_EQ(a.dimensions(), b.dimensions());
  double m = 0;
  for (Index i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(double(a.data()[i]) - double(b.data()[i])));
  }
  return m / std::max(1.0, maxAbs(b));
}

// ---- T = 0, S = 0, B = 0 ---------------------------------------------------------------------

TEST(EdgeCases, ZeroLengthQueriesGiveAnEmptyOutput) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(1);
      const Problem p = makeProblem(r, 2, 0, causal(path) ? 0 : 5, true);
      const Tensor3 y = run(layer, path, p);
      EXPECT_EQ(y.dimension(0), 2);
      EXPECT_EQ(y.dimension(1), 0);
      EXPECT_EQ(y.dimension(2), kDim);
    }
}

TEST(EdgeCases, StreamingCallOfZeroTokensChangesNothing) {
  for (const char* map : {"relu", "exp"})
    for (std::optional<double> decay : {std::optional<double>(), std::optional<double>(0.9)}) {
      kattn::LayerConfig c = configFor(Path::Streaming, map);
      c.causal_window_decay = decay;
      const Any layer = makeLayer(Path::Streaming, c);
      Rng r(2);
      const Problem p = makeProblem(r, 2, 6, 6, true);
      const Problem empty = makeProblem(r, 2, 0, 0, true);
      auto plain = layer.makeState(2), with_empty = layer.makeState(2);
      for (Index r0 = 0; r0 < 6; r0 += 2) {
        const Problem c2 = sliceProblemRows(p, r0, 2);
        const Tensor3 e = layer.forward(view(empty.query), view(empty.value), view(empty.key),
                                        empty.maskView(), with_empty);
        EXPECT_EQ(e.dimension(1), 0);
        EXPECT_EQ(with_empty.tokens(), plain.tokens());
        const Tensor3 a =
            layer.forward(view(c2.query), view(c2.value), view(c2.key), c2.maskView(), plain);
        const Tensor3 b =
            layer.forward(view(c2.query), view(c2.value), view(c2.key), c2.maskView(), with_empty);
        for (Index i = 0; i < a.size(); ++i) ASSERT_TRUE(sameBits(a.data()[i], b.data()[i]));
      }
      EXPECT_EQ(with_empty.toBytes(), plain.toBytes());
    }
}

TEST(EdgeCases, ZeroKeysGiveTheOutputBias) {
  for (const std::string& map : kMaps)
    for (Path path : {Path::Kernel, Path::KernelExplicit, Path::KernelLowRank, Path::Short,
                      Path::BeginKernel}) {
      SCOPED_TRACE(map + " " + pathName(path));
      const kattn::LayerConfig c = configFor(path, map);
      const Any layer = makeLayer(path, c);
      Rng r(3);
      for (bool with_mask : {false, true}) {
        const Problem p = makeProblem(r, 2, 5, 0, with_mask);
        const Tensor3 y = run(layer, path, p);
        ASSERT_EQ(y.dimension(1), 5);
        for (Index b = 0; b < 2; ++b)
          for (Index t = 0; t < 5; ++t)
            expectBiasRow(y, b, t, layer.weights(), c.begin_kernel, "S = 0");
      }
    }
}

TEST(EdgeCases, ZeroKeysWithScaleByLengthIsAnInputError) {
  kattn::LayerConfig c = configFor(Path::Kernel, "relu");
  c.scale_by_length = true;
  const Any layer = makeLayer(Path::Kernel, c);
  Rng r(4);
  const Problem p = makeProblem(r, 2, 5, 0, true);
  EXPECT_THROW(run(layer, Path::Kernel, p), std::invalid_argument);
}

TEST(EdgeCases, ZeroBatchGivesAnEmptyOutput) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(5);
      for (Index T : {0, 4}) {
        const Problem p = makeProblem(r, 0, T, causal(path) ? T : 3, true);
        const Tensor3 y = run(layer, path, p);
        EXPECT_EQ(y.dimension(0), 0);
        EXPECT_EQ(y.dimension(1), T);
        EXPECT_EQ(y.dimension(2), kDim);
      }
    }
}

// ---- one head, one random feature -------------------------------------------------------------

/// float64 reference of the kernel paths (SPEC 1, 2, 3.2, 3.3) for relu features with a
/// projection: bidirectional when chunk = 0, else causal windowed (no padding) with decay.
std::vector<double> referenceRelu(const kattn::LayerConfig& c, const kattn::Weights<float>& w,
                                  const kattn::Matrix<float>& P, const Problem& p, Index chunk,
                                  Index window, double gamma) {
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

double relDiff(const Tensor3& a, const std::vector<double>& ref) {
  double m = 0, scale = 1;
  for (Index i = 0; i < a.size(); ++i) {
    m = std::max(m, std::abs(double(a.data()[i]) - ref[std::size_t(i)]));
    scale = std::max(scale, std::abs(ref[std::size_t(i)]));
  }
  return m / scale;
}

TEST(EdgeCases, OneHeadOneRandomFeature) {
  for (Path path : {Path::KernelExplicit, Path::KernelLowRank, Path::Causal, Path::Streaming}) {
    SCOPED_TRACE(pathName(path));
    kattn::LayerConfig c = configFor(path, "relu");
    c.num_heads = 1;
    c.num_random_features = 1;
    if (causal(path)) c.causal_window_length = 3;
    const Any layer = makeLayer(path, c);
    ASSERT_EQ(layer.projection().rows(), 1);
    Rng r(6);
    const Problem p = makeProblem(r, 2, 8, causal(path) ? 8 : 9, true);
    const Tensor3 y = run(layer, path, p);
    const auto ref =
        referenceRelu(c, layer.weights(), layer.projection(), p, causal(path) ? 2 : 0, 3, 1.0);
    EXPECT_LT(relDiff(y, ref), 2e-5);
  }
  // Every feature map with N = 1 and m = 1 (and without a projection) runs and is finite.
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      for (int m : {1, 0}) {
        SCOPED_TRACE(map + " " + pathName(path) + " m=" + std::to_string(m));
        kattn::LayerConfig c = configFor(path, map);
        c.num_heads = 1;
        c.key_dim = 1;
        c.value_dim = 1;
        c.num_random_features = m;
        const Any layer = makeLayer(path, c);
        Rng r(7);
        const Problem p = makeProblem(r, 2, 6, causal(path) ? 6 : 4, true);
        const Tensor3 y = run(layer, path, p);
        // identity features of any sign can make the normaliser vanish: finiteness is not
        // promised there.
        if (map == "identity") continue;
        for (Index i = 0; i < y.size(); ++i) ASSERT_TRUE(std::isfinite(y.data()[i]));
      }
    }
}

// ---- masks -----------------------------------------------------------------------------------

TEST(EdgeCases, AllKeysMaskedGiveTheOutputBiasAndLeaveOtherRowsAlone) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const kattn::LayerConfig c = configFor(path, map);
      const Any layer = makeLayer(path, c);
      Rng r(8);
      Problem p = makeProblem(r, 2, 6, 6, true);
      for (Index s = 0; s < 6; ++s) (*p.mask)(0, s) = 0.0f;
      const Tensor3 y = run(layer, path, p);
      for (Index t = 0; t < 6; ++t)
        expectBiasRow(y, 0, t, layer.weights(), c.begin_kernel, "masked");
      // Batch row 1 as if alone. expplus couples the batch rows through its key stabiliser
      // (the largest logit over the whole key tensor, as in the reference), which moves the
      // result by rounding only.
      const Tensor3 alone = run(layer, path, sliceProblemBatch(p, 1, 1));
      if (map == "expplus") {
        EXPECT_LT(relDiff(sliceBatch(y, 1, 1), alone), 1e-5);
      } else {
        for (Index t = 0; t < 6; ++t) EXPECT_TRUE(rowSameBits(y, 1, alone, 0, t)) << "t=" << t;
      }
    }
}

TEST(EdgeCases, MaskTwoOnEveryKeyScalesKVAndZ) {
  // Kernel paths: a_t = q'(2 KV) / (q'(2 z) + eps), checked against the float64 formula.
  for (Path path : {Path::KernelExplicit, Path::KernelLowRank, Path::Causal, Path::Streaming}) {
    SCOPED_TRACE(pathName(path));
    const kattn::LayerConfig c = configFor(path, "relu");
    const Any layer = makeLayer(path, c);
    Rng r(9);
    Problem p = makeProblem(r, 2, 8, 8, false);
    p.mask = Tensor2(2, 8);
    p.mask->setConstant(2.0f);
    const auto ref =
        referenceRelu(c, layer.weights(), layer.projection(), p,
                      causal(path) ? c.causal_chunk_length : 0, c.causal_window_length, 1.0);
    EXPECT_LT(relDiff(run(layer, path, p), ref), 2e-5);
  }
  // So on inputs where q'z >> eps, mask 2 everywhere is no mask.
  for (const char* map : {"elu", "exp", "expmod"})
    for (Path path : {Path::KernelExplicit, Path::KernelLowRank, Path::Causal, Path::Streaming}) {
      SCOPED_TRACE(std::string(map) + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(9);
      Problem p = makeProblem(r, 2, 8, 8, false, 0.3f);
      const Tensor3 plain = run(layer, path, p);
      p.mask = Tensor2(2, 8);
      p.mask->setConstant(2.0f);
      EXPECT_LT(relDiff(run(layer, path, p), plain), 1e-4);
    }
}

TEST(EdgeCases, MaskTwoOnAKeyCountsItTwiceInTheKernelPath) {
  for (const char* map : {"elu", "relu", "exp", "expmod"})
    for (Path path : {Path::KernelExplicit, Path::KernelLowRank}) {
      SCOPED_TRACE(std::string(map) + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(10);
      Problem p = makeProblem(r, 2, 5, 4, false, 0.3f);
      p.mask = Tensor2(2, 4);
      p.mask->setConstant(1.0f);
      (*p.mask)(0, 2) = 2.0f;
      (*p.mask)(1, 0) = 2.0f;
      // The same keys with the weighted ones given twice (S = 5, mask 1).
      Problem dup = p;
      dup.mask.reset();
      dup.value = Tensor3(2, 5, kDim);
      dup.key = Tensor3(2, 5, kDim);
      for (Index b = 0; b < 2; ++b) {
        const Index twice = b == 0 ? 2 : 0;
        Index s2 = 0;
        for (Index s = 0; s < 4; ++s)
          for (int rep = 0; rep < (s == twice ? 2 : 1); ++rep, ++s2)
            for (Index j = 0; j < kDim; ++j) {
              dup.value(b, s2, j) = p.value(b, s, j);
              dup.key(b, s2, j) = p.key(b, s, j);
            }
      }
      EXPECT_LT(relDiff(run(layer, path, p), run(layer, path, dup)), 1e-5);
    }
}

TEST(EdgeCases, MaskScalesTheScoresInTheShortPath) {
  // identity features without a projection: q' = s q, k' = k, so mask 2 on every key gives
  // the scores (s q).(2 k) = (2 s q).k, i.e. the layer with scale 2 s, bit for bit.
  kattn::LayerConfig c = configFor(Path::Short, "identity");
  c.num_random_features = 0;
  c.scale = 0.375;
  const Any layer = makeLayer(Path::Short, c);
  c.scale = 0.75;
  const Any doubled = makeLayer(Path::Short, c);
  Rng r(11);
  Problem p = makeProblem(r, 2, 5, 7, false);
  const Tensor3 expected = run(doubled, Path::Short, p);
  p.mask = Tensor2(2, 7);
  p.mask->setConstant(2.0f);
  const Tensor3 y = run(layer, Path::Short, p);
  for (Index i = 0; i < y.size(); ++i) ASSERT_TRUE(sameBits(y.data()[i], expected.data()[i])) << i;
}

// ---- NaN and Inf ---------------------------------------------------------------------------

/// The outputs with input `which` ("query", "key", "value") at (b = 0, position pos) set to
/// `x` in every component, and the clean outputs.
struct Poisoned {
  Tensor3 clean, dirty;
};

Poisoned poison(const Any& layer, Path path, const std::string& which, Index pos, float x,
                Index T = 8) {
  Rng r(12);
  Problem p = makeProblem(r, 2, T, T, true);
  Poisoned out;
  out.clean = run(layer, path, p);
  Tensor3& t = which == "query" ? p.query : which == "key" ? p.key : p.value;
  for (Index j = 0; j < kDim; ++j) t(0, pos, j) = x;
  out.dirty = run(layer, path, p);
  return out;
}

TEST(EdgeCases, NaNInAQueryReachesItsOutputRow) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      const Index pos = 3;
      const Poisoned r = poison(layer, path, "query", pos, kNaN);
      EXPECT_TRUE(rowAll(r.dirty, 0, pos, isNaN));
      for (Index t = 0; t < 8; ++t) EXPECT_TRUE(rowSameBits(r.dirty, 1, r.clean, 1, t)) << t;
      // Maps without a batch-row statistic keep the other rows of batch row 0 exact (the
      // streaming call of the NaN row excepted: a call is one block).
      const bool row_statistic = map == "exp" || map == "expmod" || map == "expplus";
      if (row_statistic) continue;
      for (Index t = 0; t < 8; ++t) {
        if (t == pos) continue;
        EXPECT_TRUE(rowSameBits(r.dirty, 0, r.clean, 0, t)) << "t=" << t;
      }
    }
}

TEST(EdgeCases, NaNInAKeyOrValueReachesTheOutputsThatAttendToIt) {
  // Causal: C = 2; W = 2 (a window shorter than the sequence: chunks leave it) and W = 100
  // (a window covering the sequence: prefix sums over groups of chunks).
  for (Index W : {2, 100})
    for (const char* which : {"key", "value"})
      for (const std::string& map : kMaps)
        for (Path path : kAllPaths) {
          if (!applicable(path, map) || (!causal(path) && W != 2)) continue;
          SCOPED_TRACE(std::string(which) + " " + map + " " + pathName(path) +
                       " W=" + std::to_string(W));
          kattn::LayerConfig c = configFor(path, map);
          if (causal(path)) c.causal_window_length = int(W);
          const Any layer = makeLayer(path, c);
          const Index pos = 4;  // chunk 2: rows 4 .. 4 + 2 W - 1 attend to it
          const Index T = 12;
          const Poisoned r = poison(layer, path, which, pos, kNaN, T);
          for (Index t = 0; t < T; ++t) {
            EXPECT_TRUE(rowSameBits(r.dirty, 1, r.clean, 1, t)) << t;
          }
          if (!causal(path)) {
            for (Index t = 0; t < T; ++t) EXPECT_TRUE(rowAll(r.dirty, 0, t, isNaN)) << "t=" << t;
            continue;
          }
          const bool row_statistic = map == "exp" || map == "expmod" || map == "expplus";
          for (Index t = 0; t < T; ++t) {
            if (t >= pos && t < pos + 2 * W) {
              EXPECT_TRUE(rowAll(r.dirty, 0, t, isNaN)) << "t=" << t;
            } else if (t < pos && !(row_statistic && std::string(which) == "key")) {
              // Causality: positions before the NaN's chunk do not see it.
              EXPECT_TRUE(rowSameBits(r.dirty, 0, r.clean, 0, t)) << "t=" << t;
            }
          }
        }
}

TEST(EdgeCases, FutureNonFiniteValueDoesNotReachEarlierRows) {
  for (const char* map : {"relu", "elu", "exp"})
    for (float x : {kNaN, kInf}) {
      SCOPED_TRACE(map);
      kattn::LayerConfig c = configFor(Path::Causal, map);
      c.causal_window_length = 100;
      const Any layer = makeLayer(Path::Causal, c);
      const Index pos = 9;
      const Poisoned r = poison(layer, Path::Causal, "value", pos, x, 12);
      for (Index t = 0; t < 8; ++t) EXPECT_TRUE(rowSameBits(r.dirty, 0, r.clean, 0, t)) << t;
      for (Index t = 8; t < 12; ++t) EXPECT_FALSE(rowAll(r.dirty, 0, t, isFinite)) << t;
    }
}

TEST(EdgeCases, InfInInputsGivesNonFiniteAffectedOutputsOnly) {
  for (const char* map : {"relu", "elu", "exp"})
    for (Path path : kAllPaths)
      for (float x : {kInf, -kInf}) {
        SCOPED_TRACE(std::string(map) + " " + pathName(path) + (x > 0 ? " +inf" : " -inf"));
        const Any layer = makeLayer(path, configFor(path, map));
        const Poisoned q = poison(layer, path, "query", 3, x);
        const Poisoned k = poison(layer, path, "key", 3, x);
        for (Index t = 0; t < 8; ++t) {
          EXPECT_TRUE(rowSameBits(q.dirty, 1, q.clean, 1, t));
          EXPECT_TRUE(rowSameBits(k.dirty, 1, k.clean, 1, t));
        }
        // What the rows of batch row 0 get is whatever IEEE arithmetic gives (Inf - Inf = NaN,
        // exp(-Inf) = 0, relu(-Inf) = 0, ...): only "never a crash, never another batch row"
        // is promised.
      }
}

TEST(EdgeCases, NaNInTheMaskReachesTheOutputsThatAttendToThatKey) {
  for (Path path : {Path::Kernel, Path::Causal, Path::Streaming}) {
    SCOPED_TRACE(pathName(path));
    const Any layer = makeLayer(path, configFor(path, "relu"));
    Rng r(13);
    Problem p = makeProblem(r, 2, 8, 8, true);
    const Tensor3 clean = run(layer, path, p);
    (*p.mask)(0, 5) = kNaN;
    const Tensor3 dirty = run(layer, path, p);
    for (Index t = 0; t < 8; ++t) {
      EXPECT_TRUE(rowSameBits(dirty, 1, clean, 1, t));
      const bool sees = !causal(path) || (t >= 4);
      if (sees) {
        EXPECT_TRUE(rowAll(dirty, 0, t, isNaN)) << t;
      } else {
        EXPECT_TRUE(rowSameBits(dirty, 0, clean, 0, t)) << t;
      }
    }
  }
}

// ---- exp with huge logits ------------------------------------------------------------------

/// Largest |logit| sqrt(s) x.P_i over the rows x [L, N d] (per head blocks of d).
double maxLogit(const Tensor4& x, const kattn::Matrix<float>& P, double s) {
  double m = 0;
  const Index d = x.dimension(3);
  for (Index b = 0; b < x.dimension(0); ++b)
    for (Index t = 0; t < x.dimension(1); ++t)
      for (Index n = 0; n < x.dimension(2); ++n)
        for (Index i = 0; i < P.rows(); ++i) {
          double z = 0;
          for (Index j = 0; j < d; ++j) z += double(x(b, t, n, j)) * P(i, j);
          m = std::max(m, std::abs(std::sqrt(s) * z));
        }
  return m;
}

TEST(EdgeCases, ExpFeaturesWithLogitsUpTo1e4StayFinite) {
  for (const char* map : {"exp", "expmod"})
    for (Path path : kAllPaths)
      for (Index T : {8, 300}) {
        SCOPED_TRACE(std::string(map) + " " + pathName(path) + " T=" + std::to_string(T));
        kattn::LayerConfig c = configFor(path, map);
        c.num_random_features = 16;
        const Any layer = makeLayer(path, c);
        const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim();
        const double s = c.resolvedScale();
        Rng r(14);
        // Heads whose logits spread over [-1e4, 1e4], differently per head and batch row
        // (so the per-block and per-head shifts differ by thousands).
        Tensor4 q = randomTensor<4>(r, 1.0f, Index(2), T, N, d);
        Tensor4 k = randomTensor<4>(r, 1.0f, Index(2), T, N, d);
        Tensor4 v = randomTensor<4>(r, 1.0f, Index(2), T, N, dv);
        for (Index b = 0; b < 2; ++b)
          for (Index t = 0; t < T; ++t)
            for (Index n = 0; n < N; ++n)
              for (Index j = 0; j < d; ++j) {
                q(b, t, n, j) *= float(1 + (t % 7) + 3 * n + 2 * b);
                k(b, t, n, j) *= float(1 + (t % 5) + 2 * n + b);
              }
        const double target = 1e4;
        const float fq = float(target / maxLogit(q, layer.projection(), s));
        const float fk = float(target / maxLogit(k, layer.projection(), s));
        q = q * fq;
        k = k * fk;
        ASSERT_GT(maxLogit(q, layer.projection(), s), 0.9 * target);
        ASSERT_GT(maxLogit(k, layer.projection(), s), 0.9 * target);
        float vmax = 0;
        for (Index i = 0; i < v.size(); ++i) vmax = std::max(vmax, std::abs(v.data()[i]));
        // Weights that pass the heads through: D = N d, the query and key kernels select the
        // head columns, so q and k reach the core as built above; the value kernel passes
        // the first min(d, d_v) columns of v. Every head a = sum_s w_s v_s has w >= 0 and
        // sum_s w_s <= 1 (positive features, normaliser + eps), so |a| <= max |v|.
        kattn::LayerConfig cf = c;
        cf.use_bias = false;
        const Index D = N * d;
        kattn::Weights<float> w;
        w.query_kernel = Tensor3(D, N, d);
        w.query_kernel.setZero();
        for (Index n = 0; n < N; ++n)
          for (Index j = 0; j < d; ++j) w.query_kernel(n * d + j, n, j) = 1.0f;
        w.key_kernel = w.query_kernel;
        w.value_kernel = Tensor3(D, N, dv);
        w.value_kernel.setZero();
        for (Index n = 0; n < N; ++n)
          for (Index j = 0; j < std::min(d, dv); ++j) w.value_kernel(n * d + j, n, j) = 1.0f;
        w.output_kernel = Tensor3(N, dv, D);
        w.output_kernel.setZero();
        for (Index n = 0; n < N; ++n)
          for (Index j = 0; j < dv; ++j) w.output_kernel(n, j, n * d + (j % d)) = 1.0f;
        if (cf.begin_kernel > 0) w.output_softmax_kernel = w.output_kernel;
        Any flat(cf);
        flat.setWeights(w);
        if (path == Path::KernelExplicit) flat.setCoreForm(kattn::CoreForm::Explicit);
        if (path == Path::KernelLowRank) flat.setCoreForm(kattn::CoreForm::LowRank);
        Problem p{Tensor3(2, T, D), Tensor3(2, T, D), Tensor3(2, T, D), {}};
        for (Index b = 0; b < 2; ++b)
          for (Index t = 0; t < T; ++t)
            for (Index n = 0; n < N; ++n)
              for (Index j = 0; j < d; ++j) {
                p.query(b, t, n * d + j) = q(b, t, n, j);
                p.key(b, t, n * d + j) = k(b, t, n, j);
                p.value(b, t, n * d + j) = j < dv ? v(b, t, n, j) : 0.0f;
              }
        flat.setProjection(layer.projection());
        const Tensor3 y = run(flat, path, p);
        // Each output is a sum of at most ceil(d_v / d) heads per column: bounded by
        // (d_v / d + 1) max |v| when the stabilisers hold.
        const float bound = vmax * float(dv / d + 1) * 1.0001f;
        for (Index i = 0; i < y.size(); ++i) {
          ASSERT_TRUE(std::isfinite(y.data()[i])) << i;
          ASSERT_LE(std::abs(y.data()[i]), bound) << i;
        }
      }
}

// ---- decay, chunk and window extremes -------------------------------------------------------

/// A bidirectional relu layer with the weights and projection of a causal one.
Any bidirectionalTwin(const kattn::LayerConfig& causal_config, const Any& causal_layer) {
  kattn::LayerConfig c = causal_config;
  c.use_causal_windowed = false;
  c.causal_window_decay.reset();
  c.causal_padding.reset();
  Any twin(c);
  twin.setWeights(causal_layer.weights());
  twin.setProjection(causal_layer.projection());
  return twin;
}

/// Bidirectional attention on each block [r0, r0 + L) alone, concatenated.
Tensor3 blockwise(const Any& bidi, const Problem& p, const std::vector<Index>& blocks) {
  const Index B = p.query.dimension(0), T = p.query.dimension(1);
  Tensor3 out(B, T, bidi.outputDim());
  Index r0 = 0;
  for (Index L : blocks) {
    const Problem c = sliceProblemRows(p, r0, L);
    const Tensor3 y = bidi.forward(view(c.query), view(c.value), view(c.key), c.maskView());
    for (Index b = 0; b < B; ++b)
      for (Index i = 0; i < L; ++i)
        for (Index j = 0; j < y.dimension(2); ++j) out(b, r0 + i, j) = y(b, i, j);
    r0 += L;
  }
  return out;
}

TEST(EdgeCases, DecayZeroAttendsWithinTheChunkOnly) {
  for (const char* map : {"relu", "exp"}) {
    SCOPED_TRACE(map);
    kattn::LayerConfig c = configFor(Path::Causal, map);
    c.causal_chunk_length = 3;
    c.causal_window_length = 3;
    c.causal_window_decay = 0.0;
    const Any layer = makeLayer(Path::Causal, c);
    const Any bidi = bidirectionalTwin(c, layer);
    Rng r(15);
    const Problem p = makeProblem(r, 2, 12, 12, true, 0.3f);
    const Tensor3 per_chunk = blockwise(bidi, p, {3, 3, 3, 3});
    EXPECT_LT(relDiff(run(layer, Path::Causal, p), per_chunk), 1e-5);
    // Streaming, recurrent (the default with a decay): state <- 0 * state + call, so every
    // call attends to itself only, whatever its length.
    EXPECT_LT(relDiff(run(layer, Path::Streaming, p, 4), blockwise(bidi, p, {4, 4, 4})), 1e-5);
    // Exact streaming reproduces the whole pass.
    auto state = layer.makeState(2, kattn::StreamingMode::Exact);
    const Tensor3 y = layer.forward(view(p.query), view(p.value), view(p.key), p.maskView(), state);
    EXPECT_LT(relDiff(y, per_chunk), 1e-5);
  }
}

TEST(EdgeCases, DecayOneIsNoDecay) {
  for (const char* map : {"relu", "exp"})
    for (int W : {2, 100}) {
      SCOPED_TRACE(std::string(map) + " W=" + std::to_string(W));
      kattn::LayerConfig c = configFor(Path::Causal, map);
      c.causal_window_length = W;
      const Any plain = makeLayer(Path::Causal, c);
      c.causal_window_decay = 1.0;
      const Any one = makeLayer(Path::Causal, c);
      Rng r(16);
      const Problem p = makeProblem(r, 2, 10, 10, true, 0.3f);
      const Tensor3 a = run(plain, Path::Causal, p), b = run(one, Path::Causal, p);
      for (Index i = 0; i < a.size(); ++i) ASSERT_TRUE(sameBits(a.data()[i], b.data()[i])) << i;
      // Exact streaming with decay 1 is exact streaming without decay.
      auto s1 = one.makeState(2, kattn::StreamingMode::Exact);
      const Tensor3 e1 = one.forward(view(p.query), view(p.value), view(p.key), p.maskView(), s1);
      EXPECT_LT(relDiff(e1, a), 1e-5);
      // Recurrent streaming with decay 1 is a plain prefix sum: with calls of C tokens and a
      // window covering the sequence it equals the whole pass.
      if (W == 100) {
        EXPECT_LT(relDiff(run(one, Path::Streaming, p, 2), a), 1e-5);
      }
    }
}

TEST(EdgeCases, ChunkLongerThanTheSequence) {
  for (const char* map : {"relu", "exp"})
    for (const char* padding : {"left", "right"}) {
      SCOPED_TRACE(std::string(map) + " " + padding);
      kattn::LayerConfig c = configFor(Path::Causal, map);
      c.causal_chunk_length = 16;
      c.causal_padding = padding;
      const Any layer = makeLayer(Path::Causal, c);
      const Any bidi = bidirectionalTwin(c, layer);
      Rng r(17);
      const Problem p = makeProblem(r, 2, 5, 5, true, 0.3f);
      const Tensor3 whole = run(bidi, Path::Kernel, p);
      EXPECT_LT(relDiff(run(layer, Path::Causal, p), whole), 1e-5);
      // Recurrent streaming: one call of 5 tokens is one chunk.
      auto rec = layer.makeState(2, kattn::StreamingMode::Recurrent);
      EXPECT_LT(relDiff(layer.forward(view(p.query), view(p.value), view(p.key), p.maskView(), rec),
                        whole),
                1e-5);
      if (std::string(padding) == "right") {
        // Exact streaming accepts a call that ends inside a chunk only with right padding,
        // and then the stream is finished.
        auto exact = layer.makeState(2, kattn::StreamingMode::Exact);
        EXPECT_LT(
            relDiff(layer.forward(view(p.query), view(p.value), view(p.key), p.maskView(), exact),
                    whole),
            1e-5);
        EXPECT_THROW(layer.forward(view(p.query), view(p.value), view(p.key), p.maskView(), exact),
                     std::invalid_argument);
      }
    }
  kattn::LayerConfig c = configFor(Path::Causal, "relu");
  c.causal_chunk_length = 16;
  const Any none = makeLayer(Path::Causal, c);
  Rng r(18);
  const Problem p = makeProblem(r, 2, 5, 5, true);
  try {
    run(none, Path::Causal, p);
    ADD_FAILURE() << "padding none with T = 5 < C = 16 must be an input error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("causal_chunk_length"), std::string::npos) << e.what();
  }
}

TEST(EdgeCases, WindowLongerThanTheNumberOfChunks) {
  for (const char* map : {"relu", "exp"}) {
    SCOPED_TRACE(map);
    kattn::LayerConfig c = configFor(Path::Causal, map);
    c.causal_chunk_length = 3;
    c.causal_window_length = 4;  // exactly the 4 chunks of T = 12
    const Any exact_fit = makeLayer(Path::Causal, c);
    c.causal_window_length = 1000;
    const Any huge = makeLayer(Path::Causal, c);
    Rng r(19);
    const Problem p = makeProblem(r, 2, 12, 12, true, 0.3f);
    const Tensor3 a = run(exact_fit, Path::Causal, p), b = run(huge, Path::Causal, p);
    for (Index i = 0; i < a.size(); ++i) ASSERT_TRUE(sameBits(a.data()[i], b.data()[i])) << i;
    if (std::string(map) == "relu") {
      const auto ref = referenceRelu(c, huge.weights(), huge.projection(), p, 3, 1000, 1.0);
      EXPECT_LT(relDiff(b, ref), 2e-5);
    }
    // Exact streaming with the huge window, in calls of one chunk, equals the whole pass.
    EXPECT_LT(relDiff(run(huge, Path::Streaming, p, 3), b), 1e-5);
  }
}

}  // namespace
