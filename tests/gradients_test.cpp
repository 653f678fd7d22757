// Gradients of the bidirectional layer in inference mode (gradients.hpp): the analytic
// gradients against central finite differences of the layer's own forward in float64, for
// every map, with and without projection, key mask and separate key, in both forms of the
// kernel path, the short-sequence softmax, begin_kernel and scale_by_length; low-rank against
// explicit; float against double; the core-level attendBackward against finite differences of
// attend(); named(); the error paths; and an SGD loop that fits a layer to a target layer.
// Errors are the project's measure: the largest absolute error over the largest absolute
// reference entry, per tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <kattn/gradients.hpp>
#include <kattn/kattn.hpp>

#include "gradient_support.hpp"

namespace {

using kattn::Index;
using kattn_test::randomTensor;
using kattn_test::centralDifferences;
using kattn_test::relError;
using kattn_test::weightData;
template <typename S, int R>
using Tensor = kattn::Tensor<S, R>;
template <typename S, int R>
using CMap = kattn::ConstTensorMap<S, R>;

constexpr Index kB = 2, kT = 5, kS = 5, kN = 2, kd = 3, kdv = 2, kDq = 4, kDv = 3, kDk = 4,
                kO = 3;
constexpr double kFdTol = 1e-6;

using kattn_test::forEachMap;
using kattn_test::FrozenExpPlus;
using kattn_test::LossMap;
using kattn_test::Tag;
using kattn_test::toFloat;

/// Below this largest |entry| a finite-difference gradient is rounding noise: the function is
/// flat in that tensor (the short path's softmax ignores a shift shared by all keys, so with
/// the identity map and no mask the key bias has gradient 0).
constexpr double kFlat = 1e-8;

/// The finite-difference check of one tensor: relative error at most kFdTol, or, where the
/// function is flat, an analytic gradient as flat.
void expectMatches(const std::string& what, const double* analytic, const std::vector<double>& fd) {
  double scale = 0, got = 0;
  for (std::size_t i = 0; i < fd.size(); ++i) {
    scale = std::max(scale, std::abs(fd[i]));
    got = std::max(got, std::abs(analytic[i]));
  }
  if (scale < kFlat) {
    EXPECT_LT(got, kFlat) << what << ": flat, by finite differences";
    return;
  }
  double err = 0;
  for (std::size_t i = 0; i < fd.size(); ++i) err = std::max(err, std::abs(analytic[i] - fd[i]));
  EXPECT_LE(err / scale, kFdTol) << what;
}

/// The inputs of one backward, and the upstream gradient.
struct Problem {
  Tensor<double, 3> query, value, grad;
  std::optional<Tensor<double, 3>> key;
  std::optional<Tensor<double, 2>> mask;
};

struct Shape {
  Index B = kB, T = kT, S = kS;
  bool separate_key = true, masked = false;
};

Problem makeProblem(std::mt19937_64& gen, const Shape& s) {
  Problem p;
  p.query = randomTensor<3>(gen, 1.0, {s.B, s.T, kDq});
  p.value = randomTensor<3>(gen, 1.0, {s.B, s.S, kDv});
  if (s.separate_key) p.key = randomTensor<3>(gen, 1.0, {s.B, s.S, kDk});
  p.grad = randomTensor<3>(gen, 1.0, {s.B, s.T, kO});
  if (s.masked) {
    // Zeros, ones and a fractional weight (the forward multiplies the key features by it);
    // every row sums to at least 1 (scale_by_length).
    Tensor<double, 2> m(s.B, s.S);
    for (Index b = 0; b < s.B; ++b)
      for (Index j = 0; j < s.S; ++j) m(b, j) = (j + b) % 3 == 1 ? 0.0 : (j == 0 ? 0.5 : 1.0);
    p.mask = m;
  }
  return p;
}

kattn::LayerConfig baseConfig(const char* map, int m) {
  kattn::LayerConfig c;
  c.feature_transform = map;
  c.num_heads = int(kN);
  c.key_dim = int(kd);
  c.value_dim = int(kdv);
  c.output_shape = int(kO);
  c.num_random_features = m;
  c.seed = 7;
  return c;
}

/// Random weights for `c` (inputs of widths kDq, kDv, and kDk or kDv). The identity map,
/// whose features have any sign, gets a bias offset shared by queries and keys (and m >= d),
/// so that its normaliser stays away from zero.
kattn::Weights<double> makeWeights(std::mt19937_64& gen, const kattn::LayerConfig& c,
                                   bool separate_key, bool identity) {
  const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim(), O = *c.output_shape;
  const Index Dk = separate_key ? kDk : kDv;
  kattn::Weights<double> w;
  w.query_kernel = randomTensor<3>(gen, 0.5, {kDq, N, d});
  w.key_kernel = randomTensor<3>(gen, 0.5, {Dk, N, d});
  w.value_kernel = randomTensor<3>(gen, 0.5, {kDv, N, dv});
  w.output_kernel = randomTensor<3>(gen, 0.5, {N, dv, O});
  if (c.use_bias) {
    w.query_bias = randomTensor<2>(gen, 0.3, {N, d}, identity ? 2.0 : 0.0);
    w.key_bias = identity ? w.query_bias : randomTensor<2>(gen, 0.3, {N, d});
    w.value_bias = randomTensor<2>(gen, 0.3, {N, dv});
    w.output_bias = randomTensor<1>(gen, 0.3, {O});
  }
  if (c.begin_kernel > 0) {
    w.output_softmax_kernel = randomTensor<3>(gen, 0.5, {N, dv, O});
    if (c.use_bias) w.output_softmax_bias = randomTensor<1>(gen, 0.3, {O});
  }
  return w;
}

template <typename Layer, typename Scalar>
Tensor<Scalar, 3> forwardOf(const Layer& layer, const Tensor<Scalar, 3>& query,
                            const Tensor<Scalar, 3>& value,
                            const std::optional<Tensor<Scalar, 3>>& key,
                            const std::optional<Tensor<Scalar, 2>>& mask) {
  std::optional<CMap<Scalar, 3>> k;
  std::optional<CMap<Scalar, 2>> m;
  if (key) k.emplace(key->data(), key->dimensions());
  if (mask) m.emplace(mask->data(), mask->dimensions());
  return layer.forward(query, value, k, m);
}

template <typename Layer, typename Scalar>
kattn::Gradients<Scalar> backwardOf(const Layer& layer, const Tensor<Scalar, 3>& query,
                                    const Tensor<Scalar, 3>& value,
                                    const std::optional<Tensor<Scalar, 3>>& key,
                                    const std::optional<Tensor<Scalar, 2>>& mask,
                                    const Tensor<Scalar, 3>& grad) {
  std::optional<CMap<Scalar, 3>> k;
  std::optional<CMap<Scalar, 2>> m;
  if (key) k.emplace(key->data(), key->dimensions());
  if (mask) m.emplace(mask->data(), mask->dimensions());
  return kattn::backward(layer, query, value, k, m, grad);
}

/// sum(grad * forward): its gradient is what backward computes for upstream gradient `grad`.
template <typename Layer>
double lossOf(const Layer& layer, const Problem& p) {
  const Tensor<double, 3> y = forwardOf(layer, p.query, p.value, p.key, p.mask);
  double l = 0;
  for (Index i = 0; i < y.size(); ++i) l += y.data()[i] * p.grad.data()[i];
  return l;
}

/// The smallest |logit| of the layer's query and key features (relu's kink is at 0).
template <typename Layer>
double smallestLogit(const Layer& layer, const Problem& p) {
  const auto& w = layer.weights();
  const kattn::LayerConfig& c = layer.config();
  const double r = std::sqrt(c.resolvedScale());
  double smallest = std::numeric_limits<double>::infinity();
  auto side = [&](const Tensor<double, 3>& x, const Tensor<double, 3>& kernel,
                  const Tensor<double, 2>& bias) {
    for (Index b = 0; b < x.dimension(0); ++b)
      for (Index t = 0; t < x.dimension(1); ++t)
        for (Index n = 0; n < kernel.dimension(1); ++n) {
          Eigen::VectorXd h(kernel.dimension(2));
          for (Index j = 0; j < h.size(); ++j) {
            double s = bias.size() ? bias(n, j) : 0.0;
            for (Index i = 0; i < x.dimension(2); ++i) s += x(b, t, i) * kernel(i, n, j);
            h(j) = r * s;
          }
          const Eigen::VectorXd z = c.hasProjection() ? Eigen::VectorXd(layer.projection() * h) : h;
          smallest = std::min(smallest, z.cwiseAbs().minCoeff());
        }
  };
  side(p.query, w.query_kernel, w.query_bias);
  side(p.key ? *p.key : p.value, w.key_kernel, w.key_bias);
  return smallest;
}

/// The smallest |logit| x.P_j (x_j without P) of heads x [B, L, N, d], whatever the factor
/// on x (a positive factor keeps a logit's distance from 0 in proportion).
template <typename Layer>
double smallestHeadLogit(const Layer& layer, const Tensor<double, 4>& x) {
  double smallest = std::numeric_limits<double>::infinity();
  const Index d = x.dimension(3);
  for (Index r = 0; r < x.size() / d; ++r) {
    const Eigen::Map<const Eigen::VectorXd> h(x.data() + r * d, d);
    const Eigen::VectorXd z =
        layer.config().hasProjection() ? Eigen::VectorXd(layer.projection() * h) : h;
    smallest = std::min(smallest, z.cwiseAbs().minCoeff());
  }
  return smallest;
}

/// One finite-difference check of the whole layer: every entry of every input and weight.
struct FdCase {
  kattn::LayerConfig config;
  Shape shape;
  kattn::CoreForm form = kattn::CoreForm::Auto;
};

template <typename Map>
void checkLayerGradients(const FdCase& fc, std::uint64_t seed) {
  using Layer = kattn::KernelAttention<double, Map>;
  using Frozen = kattn::KernelAttention<double, typename LossMap<Map>::type>;
  const bool identity = std::string(Map::name) == "identity" ||
                        (std::string(Map::name) == "expplus" && !fc.config.hasProjection());
  Layer layer(fc.config);
  Frozen frozen(fc.config);
  layer.setCoreForm(fc.form);
  frozen.setCoreForm(fc.form);
  std::mt19937_64 gen(seed);
  Problem p;
  kattn::Weights<double> w;
  // Draw until every relu logit is clear of the kink by far more than the step.
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 50) << "no problem clear of the relu kink";
    p = makeProblem(gen, fc.shape);
    w = makeWeights(gen, fc.config, fc.shape.separate_key, identity);
    layer.setWeights(w);
    if (smallestLogit(layer, p) > 1e-3) break;
  }
  frozen.setWeights(w);
  FrozenExpPlus::table() = {};
  (void)lossOf(frozen, p);  // records expplus's coefficients at this point
  FrozenExpPlus::table().replay = true;
  const kattn::Gradients<double> g =
      backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
  auto loss = [&] { return lossOf(frozen, p); };
  auto check = [&](const std::string& what, double* x, const double* analytic, Index n) {
    SCOPED_TRACE(what);
    ASSERT_TRUE(analytic != nullptr);
    const std::vector<double> fd = centralDifferences(x, n, loss);
    double scale = 0;
    for (double v : fd) scale = std::max(scale, std::abs(v));
    EXPECT_GT(scale, kFlat) << what << ": a gradient that is zero everywhere checks nothing";
    expectMatches(what, analytic, fd);
  };
  check("query", p.query.data(), g.query.data(), p.query.size());
  check("value", p.value.data(), g.value.data(), p.value.size());
  if (p.key) {
    check("key", p.key->data(), g.key.data(), p.key->size());
  } else {
    EXPECT_EQ(g.key.size(), 0);
  }
  for (const kattn::NamedTensor<double>& t : g.named()) {
    kattn::Weights<double> perturbed = w;
    double* x = weightData(perturbed, t.name);
    const Index n = t.values.size();
    SCOPED_TRACE(t.name);
    const std::vector<double> fd = centralDifferences(x, n, [&] {
      frozen.setWeights(perturbed);
      return loss();
    });
    frozen.setWeights(w);
    expectMatches(t.name, t.values.data(), fd);
  }
  FrozenExpPlus::table() = {};
}

std::string label(const char* map, const FdCase& c) {
  return std::string(map) + " m=" + std::to_string(c.config.num_random_features) +
         (c.shape.masked ? " masked" : "") + (c.shape.separate_key ? " key" : " no-key") +
         (c.form == kattn::CoreForm::LowRank ? " low-rank" : " explicit") +
         (c.config.is_short_seq ? " short" : "") +
         (c.config.begin_kernel ? " begin_kernel=" + std::to_string(c.config.begin_kernel) : "") +
         (c.config.scale_by_length ? " scale_by_length" : "");
}

// ---- the kernel path ------------------------------------------------------------------------

TEST(Gradients, KernelPathMatchesFiniteDifferencesForEveryMap) {
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    std::uint64_t seed = 100;
    for (int m : {0, 4})
      for (bool masked : {false, true})
        for (bool separate_key : {true, false})
          for (kattn::CoreForm form : {kattn::CoreForm::LowRank, kattn::CoreForm::Explicit}) {
            FdCase c{baseConfig(Map::name, m), Shape{}, form};
            c.shape.masked = masked;
            c.shape.separate_key = separate_key;
            SCOPED_TRACE(label(Map::name, c));
            checkLayerGradients<Map>(c, ++seed);
          }
  });
}


// ---- the short-sequence softmax, begin_kernel, scale_by_length -------------------------------

TEST(Gradients, ShortPathBeginKernelAndScaleByLengthMatchFiniteDifferences) {
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    std::uint64_t seed = 500;
    for (int m : {0, 4})
      for (int variant = 0; variant < 4; ++variant) {
        FdCase c{baseConfig(Map::name, m), Shape{}, kattn::CoreForm::Auto};
        c.shape.masked = variant != 1;
        c.shape.separate_key = variant % 2 == 0;
        if (variant == 0 || variant == 1) c.config.is_short_seq = true;
        if (variant == 2) c.config.begin_kernel = 2;
        if (variant == 3) {
          c.config.scale_by_length = true;
          c.form = kattn::CoreForm::LowRank;
        }
        SCOPED_TRACE(label(Map::name, c));
        checkLayerGradients<Map>(c, ++seed);
      }
  });
}

// ---- low-rank against explicit ----------------------------------------------------------------

/// max over every input and weight gradient of the error of `a` against `b`.
double gradientError(const kattn::Gradients<double>& a, const kattn::Gradients<double>& b) {
  double err = std::max(relError(a.query.data(), b.query.data(), a.query.size()),
                        relError(a.value.data(), b.value.data(), a.value.size()));
  if (b.key.size()) err = std::max(err, relError(a.key.data(), b.key.data(), a.key.size()));
  const auto na = a.named(), nb = b.named();
  EXPECT_EQ(na.size(), nb.size());
  for (std::size_t i = 0; i < std::min(na.size(), nb.size()); ++i) {
    err = std::max(err, relError(na[i].values.data(), nb[i].values.data(), na[i].values.size()));
  }
  return err;
}

TEST(Gradients, LowRankEqualsExplicitOverSeveralBlocks) {
  // T and S past the low-rank form's blocks of 256 rows (two blocks each), with a mask.
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    for (int m : {0, 4}) {
      SCOPED_TRACE(std::string(Map::name) + " m=" + std::to_string(m));
      const kattn::LayerConfig c = baseConfig(Map::name, m);
      kattn::KernelAttention<double, Map> layer(c);
      std::mt19937_64 gen(900 + std::uint64_t(m));
      Shape shape{2, 270, 300, true, true};
      const Problem p = makeProblem(gen, shape);
      const bool identity = std::string(Map::name) == "identity" ||
                            (std::string(Map::name) == "expplus" && m == 0);
      layer.setWeights(makeWeights(gen, c, true, identity));
      layer.setCoreForm(kattn::CoreForm::LowRank);
      const auto low = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
      layer.setCoreForm(kattn::CoreForm::Explicit);
      const auto expl = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
      EXPECT_LE(gradientError(low, expl), 1e-10);
    }
  });
}

// ---- float against double ----------------------------------------------------------------------

TEST(Gradients, FloatIsWithin1e4OfDouble) {
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    for (int m : {0, 4})
      for (bool short_seq : {false, true}) {
        SCOPED_TRACE(std::string(Map::name) + " m=" + std::to_string(m) +
                     (short_seq ? " short" : ""));
        kattn::LayerConfig c = baseConfig(Map::name, m);
        c.is_short_seq = short_seq;
        kattn::KernelAttention<double, Map> d64(c);
        kattn::KernelAttention<float, Map> f32(c);
        if (m > 0) f32.setProjection(d64.projection().template cast<float>());
        std::mt19937_64 gen(1300 + std::uint64_t(m) + (short_seq ? 7 : 0));
        const Problem p = makeProblem(gen, Shape{2, 20, 30, true, true});
        const bool identity = std::string(Map::name) == "identity" ||
                              (std::string(Map::name) == "expplus" && m == 0);
        const kattn::Weights<double> w = makeWeights(gen, c, true, identity);
        d64.setWeights(w);
        f32.setWeights(kattn::castWeights<float>(w));
        const auto want = backwardOf(d64, p.query, p.value, p.key, p.mask, p.grad);
        std::optional<Tensor<float, 3>> key = toFloat(*p.key);
        std::optional<Tensor<float, 2>> mask = toFloat(*p.mask);
        const auto got =
            backwardOf(f32, toFloat(p.query), toFloat(p.value), key, mask, toFloat(p.grad));
        EXPECT_LE(relError(got.query.data(), want.query.data(), want.query.size()), 1e-4);
        EXPECT_LE(relError(got.value.data(), want.value.data(), want.value.size()), 1e-4);
        EXPECT_LE(relError(got.key.data(), want.key.data(), want.key.size()), 1e-4);
        const auto ng = got.named();
        const auto nw = want.named();
        ASSERT_EQ(ng.size(), nw.size());
        for (std::size_t i = 0; i < ng.size(); ++i) {
          EXPECT_LE(relError(ng[i].values.data(), nw[i].values.data(), nw[i].values.size()), 1e-4)
              << nw[i].name;
        }
      }
  });
}

// ---- attendBackward ------------------------------------------------------------------------

TEST(Gradients, AttendBackwardMatchesFiniteDifferencesOfAttend) {
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    for (int m : {0, 4})
      for (bool short_seq : {false, true}) {
        SCOPED_TRACE(std::string(Map::name) + " m=" + std::to_string(m) +
                     (short_seq ? " short" : ""));
        kattn::LayerConfig c = baseConfig(Map::name, m);
        c.is_short_seq = short_seq;
        kattn::KernelAttention<double, Map> layer(c);
        kattn::KernelAttention<double, typename LossMap<Map>::type> frozen(c);
        std::mt19937_64 gen(1700 + std::uint64_t(m) + (short_seq ? 7 : 0));
        // Heads with an offset shared by q and k: the identity map's normaliser stays positive.
        // Drawn until every logit is clear of relu's kink by far more than the step.
        Tensor<double, 4> q, k;
        for (int attempt = 0;; ++attempt) {
          ASSERT_LT(attempt, 50) << "no heads clear of the relu kink";
          q = randomTensor<4>(gen, 0.6, {kB, kT, kN, kd}, 0.8);
          k = randomTensor<4>(gen, 0.6, {kB, kS, kN, kd}, 0.8);
          if (smallestHeadLogit(layer, q) > 1e-3 && smallestHeadLogit(layer, k) > 1e-3) break;
        }
        Tensor<double, 4> v = randomTensor<4>(gen, 1.0, {kB, kS, kN, kdv});
        const Tensor<double, 4> g = randomTensor<4>(gen, 1.0, {kB, kT, kN, kdv});
        const Problem masks = makeProblem(gen, Shape{kB, kT, kS, false, true});
        const Tensor<double, 2>& mask = *masks.mask;
        auto loss = [&] {
          const Tensor<double, 4> a = frozen.attend(q, k, v, mask);
          double l = 0;
          for (Index i = 0; i < a.size(); ++i) l += a.data()[i] * g.data()[i];
          return l;
        };
        FrozenExpPlus::table() = {};
        (void)loss();
        FrozenExpPlus::table().replay = true;
        const kattn::HeadGradients<double> hg = kattn::attendBackward(layer, q, k, v, mask, g);
        for (auto [name, x, an] : {std::make_tuple("q", &q, &hg.q), std::make_tuple("k", &k, &hg.k),
                                   std::make_tuple("v", &v, &hg.v)}) {
          const std::vector<double> fd = centralDifferences(x->data(), x->size(), loss);
          expectMatches(name, an->data(), fd);
        }
        FrozenExpPlus::table() = {};
      }
  });
}

// ---- threads ---------------------------------------------------------------------------------

/// Whether two gradients are bit for bit the same.
bool sameBits(const kattn::Gradients<double>& a, const kattn::Gradients<double>& b) {
  auto same = [](const double* x, const double* y, Index n) {
    return std::equal(x, x + n, y, [](double u, double v) {
      return std::memcmp(&u, &v, sizeof u) == 0;
    });
  };
  bool ok = same(a.query.data(), b.query.data(), a.query.size()) &&
            same(a.value.data(), b.value.data(), a.value.size()) &&
            same(a.key.data(), b.key.data(), a.key.size());
  const auto na = a.named(), nb = b.named();
  for (std::size_t i = 0; i < na.size(); ++i) {
    ok = ok && same(na[i].values.data(), nb[i].values.data(), na[i].values.size());
  }
  return ok;
}

TEST(Gradients, ResultsDoNotDependOnTheThreadCount) {
  // Large enough for the pool to take the head tasks (kParallelMinFlops).
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    SCOPED_TRACE(Map::name);
    const kattn::LayerConfig c = baseConfig(Map::name, 32);
    kattn::KernelAttention<double, Map> layer(c);
    std::mt19937_64 gen(21);
    const Problem p = makeProblem(gen, Shape{3, 300, 280, true, true});
    const bool identity = std::string(Map::name) == "identity";
    layer.setWeights(makeWeights(gen, c, true, identity));
    layer.setThreads(1);
    const auto one = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
    for (int threads : {2, 3}) {
      layer.setThreads(threads);
      EXPECT_TRUE(sameBits(one, backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad)))
          << threads << " threads";
    }
  });
}

// ---- named() and the error paths ------------------------------------------------------------

TEST(Gradients, NamedListsTheLayersWeightsUnderKerasNames) {
  for (bool use_bias : {true, false})
    for (int begin_kernel : {0, 2}) {
      kattn::LayerConfig c = baseConfig("relu", 4);
      c.use_bias = use_bias;
      c.begin_kernel = begin_kernel;
      kattn::KernelAttention<double, kattn::Relu> layer(c);
      std::mt19937_64 gen(5);
      const Problem p = makeProblem(gen, Shape{});
      const kattn::Weights<double> w = makeWeights(gen, c, true, false);
      layer.setWeights(w);
      const auto g = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
      std::vector<std::string> want = {"query/kernel", "key/kernel", "value/kernel",
                                       "attention_output/kernel"};
      if (use_bias) {
        want = {"query/kernel", "query/bias", "key/kernel", "key/bias", "value/kernel",
                "value/bias", "attention_output/kernel", "attention_output/bias"};
      }
      if (begin_kernel > 0) {
        want.push_back("attention_output_softmax/kernel");
        if (use_bias) want.push_back("attention_output_softmax/bias");
      }
      std::vector<std::string> got;
      for (const auto& t : g.named()) {
        got.push_back(t.name);
        kattn::Weights<double> copy = w;
        Index size = 1;
        for (Index e : t.shape) size *= e;
        EXPECT_EQ(size, t.values.size()) << t.name;
        // The shape is the weight's own.
        EXPECT_NE(weightData(copy, t.name), nullptr);
      }
      EXPECT_EQ(got, want);
      // The gradient tensors have the weights' shapes.
      EXPECT_EQ(g.weights.query_kernel.dimensions(), w.query_kernel.dimensions());
      EXPECT_EQ(g.weights.output_kernel.dimensions(), w.output_kernel.dimensions());
      EXPECT_EQ(g.weights.key_bias.dimensions(), w.key_bias.dimensions());
      EXPECT_EQ(g.weights.output_softmax_kernel.dimensions(), w.output_softmax_kernel.dimensions());
    }
}

/// Runs f, expecting std::invalid_argument whose message starts with `name`.
template <typename F>
void expectInvalid(const std::string& name, const F& f) {
  try {
    f();
    ADD_FAILURE() << "no exception for " << name;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(name, 0), 0u) << e.what();
  }
}

TEST(Gradients, ErrorsNameTheArgument) {
  kattn::LayerConfig c = baseConfig("elu", 4);
  kattn::KernelAttention<double, kattn::Elu> layer(c);
  std::mt19937_64 gen(11);
  const Problem p = makeProblem(gen, Shape{kB, kT, kS, true, true});
  EXPECT_THROW(backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad), std::logic_error);
  layer.setWeights(makeWeights(gen, c, true, false));
  const Tensor<double, 3> wrong(kB, kT + 1, kO);
  expectInvalid("grad_output", [&] { backwardOf(layer, p.query, p.value, p.key, p.mask, wrong); });
  for (double bad : {std::nan(""), std::numeric_limits<double>::infinity()}) {
    Tensor<double, 3> g = p.grad;
    g(1, 2, 0) = bad;
    expectInvalid("grad_output", [&] { backwardOf(layer, p.query, p.value, p.key, p.mask, g); });
  }
  const Tensor<double, 3> narrow(kB, kT, kDq - 1);
  expectInvalid("query", [&] { backwardOf(layer, narrow, p.value, p.key, p.mask, p.grad); });
  const std::optional<Tensor<double, 3>> short_key = Tensor<double, 3>(kB, kS - 1, kDk);
  expectInvalid("key", [&] { backwardOf(layer, p.query, p.value, short_key, p.mask, p.grad); });
  const std::optional<Tensor<double, 2>> bad_mask = Tensor<double, 2>(kB, kS + 1);
  expectInvalid("attention_mask",
                [&] { backwardOf(layer, p.query, p.value, p.key, bad_mask, p.grad); });
  // scale_by_length needs a mask, as in forward.
  kattn::LayerConfig cs = c;
  cs.scale_by_length = true;
  kattn::KernelAttention<double, kattn::Elu> scaled(cs);
  scaled.setWeights(layer.weights());
  expectInvalid("attention_mask", [&] {
    backwardOf(scaled, p.query, p.value, p.key, std::optional<Tensor<double, 2>>(), p.grad);
  });
  // The core level.
  const Tensor<double, 4> q(kB, kT, kN, kd), k(kB, kS, kN, kd), v(kB, kS, kN, kdv);
  const Tensor<double, 4> gh(kB, kT, kN, kdv + 1);
  expectInvalid("grad_heads", [&] { kattn::attendBackward(layer, q, k, v, std::nullopt, gh); });
  Tensor<double, 4> nan_heads(kB, kT, kN, kdv);
  nan_heads.setZero();
  nan_heads(0, 0, 0, 0) = std::nan("");
  expectInvalid("grad_heads",
                [&] { kattn::attendBackward(layer, q, k, v, std::nullopt, nan_heads); });
  const Tensor<double, 4> kv_short(kB, kS - 1, kN, kdv);
  expectInvalid("v", [&] { kattn::attendBackward(layer, q, k, kv_short, std::nullopt, nan_heads); });
}

TEST(Gradients, NonFiniteInputsReachTheGradientsWithoutAnError) {
  // As forward: NaN in an input is not an error; it reaches what depends on it.
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    SCOPED_TRACE(Map::name);
    kattn::LayerConfig c = baseConfig(Map::name, 4);
    kattn::KernelAttention<double, Map> layer(c);
    std::mt19937_64 gen(13);
    Problem p = makeProblem(gen, Shape{kB, kT, kS, true, true});
    layer.setWeights(makeWeights(gen, c, true, false));
    p.value(0, 1, 0) = std::nan("");
    const auto g = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
    bool any_nan = false;
    for (Index i = 0; i < g.query.size(); ++i) any_nan = any_nan || std::isnan(g.query.data()[i]);
    EXPECT_TRUE(any_nan);
  });
}

// ---- an SGD step, as docs/training.md writes it ----------------------------------------------

/// w -= lr * g for every weight (an empty tensor, a bias of a layer without biases, stays).
template <typename Scalar>
void sgdStep(kattn::Weights<Scalar>& w, const kattn::Weights<Scalar>& g, Scalar lr) {
  auto step = [lr](auto& p, const auto& dp) {
    if (p.size()) p -= dp * lr;
  };
  step(w.query_kernel, g.query_kernel);
  step(w.query_bias, g.query_bias);
  step(w.key_kernel, g.key_kernel);
  step(w.key_bias, g.key_bias);
  step(w.value_kernel, g.value_kernel);
  step(w.value_bias, g.value_bias);
  step(w.output_kernel, g.output_kernel);
  step(w.output_bias, g.output_bias);
  step(w.output_softmax_kernel, g.output_softmax_kernel);
  step(w.output_softmax_bias, g.output_softmax_bias);
}

TEST(Gradients, SgdFitsATargetLayer) {
  // Self-attention: a layer learns to reproduce a target layer's outputs (mean squared error).
  kattn::LayerConfig c = baseConfig("elu", 0);
  c.output_shape = int(kDq);
  kattn::LayerConfig other = c;
  other.seed = 8;
  other.kernel_initializer.name = "random_normal";
  other.kernel_initializer.stddev = 0.5;
  kattn::KernelAttention<double, kattn::Elu> target(other), layer(c);
  target.initializeWeights(kDq, kDq);  // the weights to find
  layer.initializeWeights(kDq, kDq);   // where the search starts
  std::mt19937_64 gen(17);
  const Tensor<double, 3> x = randomTensor<3>(gen, 1.0, {4, 8, kDq});
  const Tensor<double, 3> y = target.forward(x, x);
  auto lossAndGrad = [&](Tensor<double, 3>* grad) {
    const Tensor<double, 3> out = layer.forward(x, x);
    double l = 0;
    if (grad) *grad = Tensor<double, 3>(out.dimensions());
    for (Index i = 0; i < out.size(); ++i) {
      const double e = out.data()[i] - y.data()[i];
      l += e * e / double(out.size());
      if (grad) grad->data()[i] = 2 * e / double(out.size());
    }
    return l;
  };
  const double first = lossAndGrad(nullptr);
  double last = first;
  for (int it = 0; it < 3000; ++it) {
    Tensor<double, 3> dy;
    last = lossAndGrad(&dy);
    const kattn::Gradients<double> g =
        kattn::backward(layer, x, x, std::nullopt, std::nullopt, dy);
    kattn::Weights<double> w = layer.weights();
    sgdStep(w, g.weights, 0.5);
    layer.setWeights(std::move(w));
  }
  EXPECT_LT(last, first / 100) << "loss " << first << " -> " << last;
}

}  // namespace
