// Feature maps on the causal layer: a user-defined map against the reference, the exp maps'
// shift (streamed within SPEC 3.5 of the whole pass; the largest logit of every head and row in
// a state's key sum), large exp logits in float32, and expplus's whole pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>

#include "test_support.hpp"

namespace {

using namespace kattn_test;

TYPED_TEST_SUITE(CausalTest, Combos, ComboNames);

/// softplus, a user-defined map written against the contract of feature_maps.hpp.
struct Softplus {
  static constexpr const char* name = "softplus";
  template <typename S>
  void operator()(const kattn::FeatureInput<S>& in, kattn::FeatureBlock<S> out) const {
    if (in.projection) {
      out.noalias() = in.x * in.projection->transpose();
    } else {
      out = in.x;
    }
    const S norm = in.projection ? S(1) / std::sqrt(S(in.projection->rows())) : S(1);
    for (Index i = 0; i < out.rows(); ++i)
      for (Index j = 0; j < out.cols(); ++j) {
        const S z = out(i, j);
        out(i, j) = norm * (std::max(z, S(0)) + std::log1p(std::exp(-std::abs(z))));
      }
  }
};

TYPED_TEST(CausalTest, UserDefinedMapMatchesReference) {
  if (TestFixture::mapName() != "elu") GTEST_SKIP() << "once per scalar type is enough";
  using Layer = kattn::KernelAttention<typename TestFixture::Scalar, Softplus, kattn::CausalWindowed>;
  const kattn_ref::ElementwiseF softplus = [](double z) { return std::log1p(std::exp(z)); };
  for (int seed = 0; seed < 15; ++seed) {
    Rng r(std::uint64_t(seed) + 777);
    const Problem p = randomCausal(r, "elu", {});
    if (!kattn_test::wellConditioned<typename TestFixture::Scalar>(p, &softplus)) continue;
    EXPECT_LE(kattn_test::errorAgainstReference<Layer>(p, &softplus), TestFixture::kTol)
        << "seed " << seed << ": softplus " << p.describe();
  }
}

/// SPEC 3.5, numbers: exp and expmod streamed agree with the whole pass within 1e-6 (float64)
/// on well-conditioned inputs, for calls of any size, with logits that keep growing along the
/// sequence (every call raises the running maximum: the state is rescaled again and again).
TYPED_TEST(CausalTest, ExpStreamingAgreesWithWholePassWithinSpec) {
  if (!TestFixture::kExpType) GTEST_SKIP() << "exp and expmod only";
  using Layer = typename TestFixture::Layer;
  int run = 0;
  for (int seed = 0; seed < 30 && run < 12; ++seed) {
    Rng r(std::uint64_t(seed) + 5150);
    CausalOptions o;
    o.allow_padding = false;
    o.allow_scale = false;
    o.allow_mask = false;
    o.input_scale = 0.1;
    o.chunk = 8 + 2 * (seed % 3);  // the first chunk's normaliser sums C keys
    o.window = 1000;
    o.fixed_decay = true;
    o.decay = seed % 2 ? std::optional<double>(0.9) : std::nullopt;
    o.max_len = 60;
    Problem p = randomCausal(r, TestFixture::mapName(), o);
    // Well-conditioned (normalisers far above eps): one small head (expmod's h is
    // exp(-sqrt(d)/2)), small logits (the max over the row shifts every feature down by the
    // spread), no biases, large first chunks. Logits still grow along the sequence, so calls
    // keep raising the running maximum.
    p.cfg.num_heads = 1;
    p.cfg.key_dim = 1 + seed % 2;
    p.cfg.num_random_features = 16;
    p.cfg.use_bias = false;
    p.projection.reset();
    p.weights = kattn_test::randomWeights(r, p.cfg, p.query.dimension(2),
                                          p.key ? p.key->dimension(2) : p.value.dimension(2),
                                          p.value.dimension(2));
    for (Tensor3* x : {&p.query, p.key ? &*p.key : &p.value})
      for (Index b = 0; b < p.B(); ++b)
        for (Index t = 0; t < p.T(); ++t)
          for (Index j = 0; j < x->dimension(2); ++j) (*x)(b, t, j) *= 0.8 + 0.4 * double(t) / double(p.T());
    if (kattn_test::epsCheck(p).bound > 1e-6) continue;  // not well-conditioned enough
    ++run;
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    const auto whole = kattn_test::runLayer(layer, p);
    const Index C = p.cfg.causal_chunk_length;
    std::vector<Index> chunks(std::size_t(p.T() / C), C);
    for (auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
      auto state = layer.makeState(p.B(), mode);
      EXPECT_LE(kattn_ref::relativeError(stream(layer, p, chunks, state), whole), TestFixture::kStreamTol)
          << "seed " << seed << (mode == kattn::StreamingMode::Exact ? " exact: " : " recurrent: ")
          << p.describe();
    }
    auto exact = layer.makeState(p.B(), kattn::StreamingMode::Exact);
    const auto calls = randomSplit(r, p.T(), C);
    EXPECT_LE(kattn_ref::relativeError(stream(layer, p, calls, exact), whole), TestFixture::kStreamTol)
        << "seed " << seed << " calls " << show(calls) << ": " << p.describe();
  }
  EXPECT_GE(run, 8) << "too few well-conditioned problems";
}

// ---- exp with large logits, expplus ------------------------------------------------------------

TYPED_TEST(CausalTest, LargeExpLogitsInFloat32StayFinite) {
  if (!TestFixture::kExpType || !std::is_same_v<typename TestFixture::Scalar, float>) {
    GTEST_SKIP() << "exp and expmod in float32";
  }
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  for (int seed = 0; seed < 6; ++seed) {
    Rng r(std::uint64_t(seed) + 60);
    CausalOptions o;
    o.allow_padding = false;
    o.allow_scale = false;
    o.input_scale = 1.0;
    Problem p = randomCausal(r, TestFixture::mapName(), o);
    p.cfg.num_random_features = 16;
    p.projection.reset();
    // Logits up to about 1e4: inputs of about 1e3 (and growing along the sequence).
    for (auto* t : {&p.query, &p.value})
      for (Index i = 0; i < t->size(); ++i) t->data()[i] *= 2e3 * (1.0 + double(i % 7));
    if (p.key)
      for (Index i = 0; i < p.key->size(); ++i) p.key->data()[i] *= 2e3;
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    // How large the logits are: z = sqrt(s) q P^T.
    const auto whole = kattn_test::runLayer(layer, p);
    EXPECT_TRUE(allFinite(whole)) << "whole pass: " << p.describe();
    const auto calls = randomSplit(r, p.T(), p.cfg.causal_chunk_length);
    for (auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
      auto state = layer.makeState(p.B(), mode);
      EXPECT_TRUE(allFinite(stream(layer, p, calls, state))) << show(calls) << ": " << p.describe();
    }
    // The bidirectional layer too.
    Problem bi = p;
    bi.cfg.use_causal_windowed = false;
    const auto bl = kattn_test::makeLayer<kattn::KernelAttention<Scalar, typename TestFixture::Map>>(bi);
    EXPECT_TRUE(allFinite(kattn_test::runLayer(bl, bi))) << "bidirectional: " << bi.describe();
  }
}

/// The exp maps' shift (SPEC 2: the largest logit of the batch row, over its positions, heads
/// and features) as a streaming state keeps it: after one call long enough to run on the
/// layer's pool and to span many of the layer's pieces of rows for the largest logit, k_sum
/// is the reference's key features summed over the call. One head's last keys have the
/// largest logits: a shift taken over some heads or rows only would scale k_sum by the
/// exponential of the difference.
TEST(CausalExpShift, StreamingKeySumUsesLargestLogitOfEveryHeadAndRow) {
  constexpr Index T = 2000, N = 3, d = 4, dv = 2;
  kattn::LayerConfig cfg;
  cfg.num_heads = int(N);
  cfg.key_dim = int(d);
  cfg.value_dim = int(dv);
  cfg.feature_transform = "exp";
  cfg.num_random_features = 8;
  cfg.use_causal_windowed = true;
  cfg.causal_chunk_length = 1;
  cfg.causal_window_length = 4096;
  cfg.seed = 11;
  kattn::KernelAttention<double, kattn::Exp, kattn::CausalWindowed> layer(cfg);
  layer.setThreads(2);
  Rng r(5);
  kattn::Tensor<double, 4> q(1, T, N, d), k(1, T, N, d), v(1, T, N, dv);
  for (auto* t : {&q, &k, &v})
    for (Index i = 0; i < t->size(); ++i) t->data()[i] = r.uniform(-1.0, 1.0);
  for (Index t = T - 37; t < T; ++t)
    for (Index j = 0; j < d; ++j) k(0, t, 1, j) *= 3.0;
  auto state = layer.makeState(1, kattn::StreamingMode::Recurrent);
  (void)layer.attend(q, k, v, std::nullopt, state);
  // The layer scales queries and keys by sqrt(scale), scale = 1 / sqrt(d) by default.
  const double rs = std::pow(double(d), -0.25);
  kattn_ref::Heads keys(1, T, N, d);
  for (Index t = 0; t < T; ++t)
    for (Index n = 0; n < N; ++n)
      for (Index j = 0; j < d; ++j) keys.at(0, t, n, j) = rs * k(0, t, n, j);
  const kattn_ref::Heads phi =
      kattn_ref::featureMap("exp", keys, kattn_test::projectionOf(layer.projection()));
  const kattn::Tensor<double, 3> got = state.kSum();
  double err = 0, scale = 0;
  for (Index n = 0; n < N; ++n)
    for (Index f = 0; f < phi.H; ++f) {
      double want = 0;
      for (Index t = 0; t < T; ++t) want += phi.at(0, t, n, f);
      err = std::max(err, std::abs(got(0, n, f) - want));
      scale = std::max(scale, std::abs(want));
    }
  EXPECT_GT(scale, 0.0);
  EXPECT_LE(err / scale, 1e-10);
}

TEST(CausalExpPlus, WholePassRunsAndIsFinite) {
  for (int seed = 0; seed < 12; ++seed) {
    Rng r(std::uint64_t(seed) + 31);
    Problem p = randomCausal(r, "expplus");
    if (seed % 4 == 0) p.cfg.num_random_features = 0;  // expplus without P: the identity
    if (seed % 4 == 0) p.projection.reset();
    if (seed % 4 == 0) p.cfg.use_bias = true;
    if (seed % 4 == 0)
      p.weights = kattn_test::randomWeights(r, p.cfg, p.query.dimension(2),
                                            p.key ? p.key->dimension(2) : p.value.dimension(2),
                                            p.value.dimension(2), 2.0);
    const auto d = kattn_test::makeLayer<kattn::KernelAttention<double, kattn::ExpPlus, kattn::CausalWindowed>>(p);
    const auto f = kattn_test::makeLayer<kattn::KernelAttention<float, kattn::ExpPlus, kattn::CausalWindowed>>(p);
    const auto yd = kattn_test::runLayer(d, p);
    const auto yf = kattn_test::runLayer(f, p);
    EXPECT_TRUE(allFinite(yd)) << p.describe();
    EXPECT_TRUE(allFinite(yf)) << p.describe();
    const auto any = kattn_test::makeLayer<kattn::AnyKernelAttention<double>>(p);
    EXPECT_TRUE(kattn_ref::bitIdentical(kattn_test::runLayer(any, p), yd));
  }
}

}  // namespace
