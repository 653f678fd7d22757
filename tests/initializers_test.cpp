// Keras initializers (initializers.hpp) and the layer's lazy build: Keras's fan rules and
// distributions, reproducible draws from the layer's seed, and "construct with a seed, call
// forward" giving the same numbers as initializeWeights then forward.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>

#include "reference.hpp"

namespace {

using kattn::Index;
using kattn::Initializer;
using Tensor3 = kattn::Tensor<double, 3>;

Initializer named(const std::string& name) { return Initializer{name}; }

struct Stats {
  double mean = 0, var = 0, max_abs = 0;
};

Stats stats(const Tensor3& t) {
  Stats s;
  const Index n = t.size();
  for (Index i = 0; i < n; ++i) s.mean += t.data()[i] / double(n);
  for (Index i = 0; i < n; ++i) {
    const double x = t.data()[i] - s.mean;
    s.var += x * x / double(n);
    s.max_abs = std::max(s.max_abs, std::abs(t.data()[i]));
  }
  return s;
}

Tensor3 drawn(const Initializer& init, std::int64_t seed = 5, std::uint64_t stream = 0) {
  Tensor3 t(64, 8, 32);  // Keras fans of [D, N, d]: fan_in = 8 * 64, fan_out = 32 * 64
  kattn::initialize(init, t, seed, stream);
  return t;
}

TEST(Initializers, KerasFans) {
  EXPECT_EQ(kattn::kerasFans({}), std::make_pair(1.0, 1.0));
  EXPECT_EQ(kattn::kerasFans({7}), std::make_pair(7.0, 7.0));
  EXPECT_EQ(kattn::kerasFans({3, 5}), std::make_pair(3.0, 5.0));
  EXPECT_EQ(kattn::kerasFans({64, 8, 32}), std::make_pair(512.0, 2048.0));
  EXPECT_EQ(kattn::kerasFans({2, 3, 4, 5}), std::make_pair(24.0, 30.0));
}

TEST(Initializers, VarianceScalingFamiliesHaveKerasVariances) {
  const double fan_in = 512, fan_avg = (512.0 + 2048.0) / 2;
  struct Case {
    const char* name;
    double variance;
    bool uniform;
  };
  for (const Case& c : {Case{"glorot_uniform", 1 / fan_avg, true},
                        Case{"glorot_normal", 1 / fan_avg, false},
                        Case{"he_uniform", 2 / fan_in, true}, Case{"he_normal", 2 / fan_in, false},
                        Case{"lecun_uniform", 1 / fan_in, true},
                        Case{"lecun_normal", 1 / fan_in, false}}) {
    SCOPED_TRACE(c.name);
    const Stats s = stats(drawn(named(c.name)));
    EXPECT_NEAR(s.mean, 0.0, 0.02 * std::sqrt(c.variance));
    EXPECT_NEAR(s.var / c.variance, 1.0, 0.03);
    // Uniform: within the limit sqrt(3 var); normal: truncated at two of its own stddevs.
    const double bound = c.uniform ? std::sqrt(3 * c.variance)
                                   : 2 * std::sqrt(c.variance) / 0.87962566103423978;
    EXPECT_LE(s.max_abs, bound);
    EXPECT_GE(s.max_abs, 0.97 * bound);
  }
}

TEST(Initializers, ParameterisedAndConstantOnes) {
  Initializer rn = named("random_normal");
  rn.mean = 2.0;
  rn.stddev = 0.5;
  Stats s = stats(drawn(rn));
  EXPECT_NEAR(s.mean, 2.0, 0.01);
  EXPECT_NEAR(std::sqrt(s.var), 0.5, 0.01);
  EXPECT_GT(s.max_abs, 2.0 + 3 * 0.5);  // not truncated: 65536 draws reach 3.5 sigma

  Initializer tn = named("truncated_normal");
  tn.stddev = 0.5;
  s = stats(drawn(tn));
  EXPECT_LE(s.max_abs, 1.0);
  EXPECT_NEAR(std::sqrt(s.var), 0.5 * 0.87962566103423978, 0.01);

  Initializer ru = named("random_uniform");
  ru.minval = 1.0;
  ru.maxval = 3.0;
  const Tensor3 u = drawn(ru);
  s = stats(u);
  EXPECT_NEAR(s.mean, 2.0, 0.01);
  for (Index i = 0; i < u.size(); ++i) {
    ASSERT_GE(u.data()[i], 1.0);
    ASSERT_LT(u.data()[i], 3.0);
  }

  Initializer k = named("constant");
  k.value = -0.25;
  for (const auto& [init, v] : {std::pair{named("zeros"), 0.0}, std::pair{named("ones"), 1.0},
                                std::pair{k, -0.25}}) {
    const Tensor3 t = drawn(init);
    for (Index i = 0; i < t.size(); ++i) ASSERT_EQ(t.data()[i], v) << init.name;
  }
}

TEST(Initializers, DrawsArePureFunctionsOfSeedAndStream) {
  const Initializer g = named("glorot_uniform");
  EXPECT_EQ(kattn_ref::relativeError(drawn(g, 5, 0), drawn(g, 5, 0)), 0.0);
  EXPECT_GT(kattn_ref::relativeError(drawn(g, 6, 0), drawn(g, 5, 0)), 0.5);
  EXPECT_GT(kattn_ref::relativeError(drawn(g, 5, 1), drawn(g, 5, 0)), 0.5);
  // float draws are the double draws rounded.
  kattn::Tensor<float, 3> f(64, 8, 32);
  kattn::initialize(g, f, 5, 0);
  const Tensor3 d = drawn(g, 5, 0);
  for (Index i = 0; i < f.size(); ++i) ASSERT_EQ(f.data()[i], float(d.data()[i]));
}

kattn::LayerConfig layerConfig(bool causal) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.value_dim = 3;
  c.num_random_features = 8;
  c.feature_transform = "relu";
  c.seed = 42;
  c.bias_initializer = named("random_normal");  // non-zero biases reach the output
  c.use_causal_windowed = causal;
  c.causal_chunk_length = 2;
  return c;
}

Tensor3 input(Index B, Index T, Index D, double phase) {
  Tensor3 x(B, T, D);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = std::sin(0.37 * double(i) + phase);
  return x;
}

TEST(LazyBuild, FirstForwardDrawsTheWeightsInitializeWeightsWould) {
  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "bidirectional");
    const kattn::LayerConfig c = layerConfig(causal);
    const Tensor3 q = input(2, 6, 5, 0.0), v = input(2, 6, 7, 1.0), k = input(2, 6, 3, 2.0);
    const kattn::AnyKernelAttention<double> lazy(c);  // const: built by its first forward
    EXPECT_FALSE(lazy.hasWeights());
    const Tensor3 y = lazy.forward(q, v, k);
    EXPECT_TRUE(lazy.hasWeights());
    EXPECT_EQ(lazy.weights().query_kernel.dimension(0), 5);
    EXPECT_EQ(lazy.weights().key_kernel.dimension(0), 3);
    EXPECT_EQ(lazy.weights().value_kernel.dimension(0), 7);
    EXPECT_EQ(lazy.outputDim(), 5);

    kattn::AnyKernelAttention<double> eager(c);
    eager.initializeWeights(5, 7, 3);
    EXPECT_EQ(kattn_ref::relativeError(eager.forward(q, v, k), y), 0.0);
    // Reproducible from the seed alone, and a different seed gives another layer.
    EXPECT_EQ(kattn_ref::relativeError(kattn::AnyKernelAttention<double>(c).forward(q, v, k), y),
              0.0);
    kattn::LayerConfig other = c;
    other.seed = 43;
    EXPECT_GT(kattn_ref::relativeError(kattn::AnyKernelAttention<double>(other).forward(q, v, k), y),
              1e-3);
    // Built: inputs of other dims are shape errors, as after setWeights.
    EXPECT_TRUE(kattn_test::throwsWith<std::invalid_argument>(
        [&] { (void)lazy.forward(input(2, 6, 4, 0.0), v, k); }, "query"));
  }
}

TEST(LazyBuild, BiasesFollowUseBiasAndBeginKernelGetsItsOwnKernel) {
  kattn::LayerConfig c = layerConfig(false);
  c.use_bias = false;
  c.begin_kernel = 2;
  kattn::AnyKernelAttention<float> layer(c);
  layer.initializeWeights(5, 5);
  const kattn::Weights<float>& w = layer.weights();
  EXPECT_EQ(w.query_bias.size(), 0);
  EXPECT_EQ(w.output_bias.size(), 0);
  EXPECT_EQ(w.output_softmax_kernel.dimension(2), 5);
  EXPECT_EQ(w.key_kernel.dimension(0), 5);  // key dim defaults to the value's
}

TEST(LazyBuild, ConfigRejectsUnknownInitializersAndBadParameters) {
  kattn::LayerConfig c = layerConfig(false);
  c.kernel_initializer = named("orthogonal");
  EXPECT_TRUE(kattn_test::throwsWith<std::invalid_argument>(
      [&] { kattn::AnyKernelAttention<float> layer(c); },
      "kernel_initializer: unknown initializer \"orthogonal\"; valid: glorot_uniform"));
  c = layerConfig(false);
  c.bias_initializer = named("random_uniform");
  c.bias_initializer.minval = 1;
  c.bias_initializer.maxval = 0;
  EXPECT_TRUE(kattn_test::throwsWith<std::invalid_argument>(
      [&] { kattn::AnyKernelAttention<float> layer(c); }, "bias_initializer: invalid parameters"));
  kattn::AnyKernelAttention<float> layer(layerConfig(false));
  EXPECT_TRUE(kattn_test::throwsWith<std::invalid_argument>(
      [&] { layer.initializeWeights(-1, 4); }, "initializeWeights: input dims must be >= 0"));
}

}  // namespace
