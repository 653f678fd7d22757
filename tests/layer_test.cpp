// The bidirectional layer (layer.hpp, any_layer.hpp): numbers against the float64 reference
// of tests/reference.hpp on random problems, explicit = low-rank, bit-exact invariants
// (views, repeats, threads, the run-time layer), user-defined feature maps, the default
// projection, dropout, redraw, and every shape error at forward / setWeights.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>

#include "test_support.hpp"

namespace {

using kattn::Index;
using kattn_test::Problem;
using kattn_test::Rng;
using kattn_ref::Tensor2;
using kattn_ref::Tensor3;

// ---- typed fixtures: float/double x feature maps --------------------------------------------

using kattn_test::Combo;
using kattn_test::ComboNames;
using kattn_test::Combos;

template <typename C>
class LayerTest : public kattn_test::ComboTest<C, kattn::Bidirectional> {};
TYPED_TEST_SUITE(LayerTest, Combos, ComboNames);

/// Options of a random bidirectional problem.
struct Options {
  Index min_len = 1, max_len = 40;  // T and S
  bool allow_short = true;
  bool allow_begin_kernel = true;
};

/**
 * A random bidirectional problem for feature map `name`. The identity map, whose features
 * have any sign, gets a bias offset shared by queries and keys and m >= d, so that its
 * normaliser stays away from zero (a well-conditioned problem; the others have positive
 * features).
 */
Problem randomProblem(Rng& r, const std::string& name, const Options& o = {}) {
  Problem p;
  auto& c = p.cfg;
  const bool identity = name == "identity";
  c.feature_transform = name;
  const Index B = r.intIn(1, 3), T = r.intIn(o.min_len, o.max_len),
              S = r.intIn(o.min_len, o.max_len);
  c.num_heads = int(r.intIn(1, 3));
  c.key_dim = int(r.intIn(1, 8));
  if (r.coin()) c.value_dim = int(r.intIn(1, 8));
  if (r.coin()) c.output_shape = int(r.intIn(1, 8));
  c.use_bias = identity || r.coin(0.7);
  c.seed = r.intIn(0, 1000);
  if (r.coin(0.35)) {
    c.num_random_features = 0;
  } else {
    c.num_random_features = int(identity ? r.intIn(c.key_dim, 2 * c.key_dim) : r.intIn(1, 24));
    if (r.coin()) {
      p.projection = kattn::randomProjection<double>(c.num_random_features, c.key_dim,
                                                     r.intIn(1000, 2000));
    }
  }
  if (r.coin(0.3)) c.scale = r.uniform(0.1, 1.0);
  c.is_short_seq = o.allow_short && r.coin(0.25);
  const double u = r.uniform(0, 1);
  if (o.allow_begin_kernel && u > 0.6) {
    c.begin_kernel = int(u > 0.8 ? r.intIn(T, T + 5) : r.intIn(1, std::max<Index>(1, T - 1)));
  }
  const Index Dq = r.intIn(1, 10), Dv = r.intIn(1, 10);
  const bool key_given = r.coin();
  const Index Dk = key_given ? r.intIn(1, 10) : Dv;
  if (r.coin(0.6)) {
    c.scale_by_length = r.coin(0.4);
    p.mask = kattn_test::randomMask(r, B, S, 0.3, c.scale_by_length ? 1 : 0);
  }
  p.weights = kattn_test::randomWeights(r, c, Dq, Dk, Dv, identity ? 2.0 : 0.0);
  p.query = kattn_test::randomTensor(r, B, T, Dq, 1.0);
  p.value = kattn_test::randomTensor(r, B, S, Dv, 1.0);
  if (key_given) p.key = kattn_test::randomTensor(r, B, S, Dk, 1.0);
  return p;
}

// ---- numbers against the reference ----------------------------------------------------------

/// Runs `count` random problems against the reference; in float32 the ill-conditioned ones
/// (kattn_test::wellConditioned) are left out, and they must stay a minority.
template <typename Layer>
void randomAgainstReference(const std::string& map, std::uint64_t count, std::uint64_t salt,
                            const Options& o = {}, const kattn_ref::ElementwiseF* custom = nullptr) {
  using Scalar = typename Layer::scalar_type;
  std::uint64_t run = 0;
  for (std::uint64_t seed = 0; seed < count; ++seed) {
    Rng r(seed * 7919 + salt);
    const Problem p = randomProblem(r, map, o);
    if (!kattn_test::wellConditioned<Scalar>(p, custom)) continue;
    ++run;
    EXPECT_LE(kattn_test::errorAgainstReference<Layer>(p, custom), kattn_ref::tolerance<Scalar>())
        << "seed " << seed << ": " << (custom ? "custom map, " : "") << p.describe();
  }
  EXPECT_GE(3 * run, 2 * count) << "too many ill-conditioned problems: only " << run << " of "
                                << count << " ran";
}

TYPED_TEST(LayerTest, RandomProblemsMatchReference) {
  randomAgainstReference<typename TestFixture::Layer>(TestFixture::mapName(), 60, 17);
}

TYPED_TEST(LayerTest, LongSequencesMatchReference) {
  Options o;
  o.min_len = 120;
  o.max_len = 300;
  randomAgainstReference<typename TestFixture::Layer>(TestFixture::mapName(), 3, 4242, o);
}

/// attend on heads the caller projected against the reference's heads before the output
/// projection (forward's tests see the heads only through the output projection).
TYPED_TEST(LayerTest, AttendOnHeadsMatchesReferenceHeads) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  Options o;
  o.allow_begin_kernel = false;  // attend's softmax rows come first; the reference keeps them apart
  int checked = 0;
  for (std::uint64_t seed = 0; seed < 20; ++seed) {
    Rng r(seed * 7919 + 61);
    const Problem p = randomProblem(r, TestFixture::mapName(), o);
    if (!kattn_test::wellConditioned<Scalar>(p)) continue;
    ++checked;
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    kattn_ref::Heads want;
    kattn_test::runReference<Scalar>(p, kattn_test::projectionOf(layer.projection()), nullptr,
                                     kattn_ref::kEps, &want);
    const kattn_test::ProjectedHeads<Scalar> in(p);
    std::optional<kattn::Tensor<Scalar, 2>> m;
    std::optional<kattn::ConstTensorMap<Scalar, 2>> mv;
    if (p.mask) mv.emplace(m.emplace(kattn_test::cast<Scalar>(*p.mask)));
    EXPECT_LE(kattn_ref::relativeError(layer.attend(in.q, in.k, in.v, mv), kattn_test::flat(want)),
              TestFixture::kTol)
        << "seed " << seed << ": " << p.describe();
  }
  EXPECT_GE(checked, 10) << "too few well-conditioned problems among the seeds";
}

/// Each path of the layer on purpose: short, kernel with/without mask and projection, and
/// begin_kernel 0, inside T and past T.
TYPED_TEST(LayerTest, EveryPathMatchesReference) {
  using Layer = typename TestFixture::Layer;
  Rng r(99);
  for (bool short_seq : {false, true})
    for (int m : {0, 12})
      for (bool mask : {false, true})
        for (int K : {0, 3, 9}) {
          Problem p;
          auto& c = p.cfg;
          c.feature_transform = TestFixture::mapName();
          c.num_heads = 2;
          c.key_dim = 4;
          c.value_dim = 3;
          c.num_random_features = m;
          c.is_short_seq = short_seq;
          c.begin_kernel = K;
          const Index B = 2, T = 7, S = 11;
          p.weights = kattn_test::randomWeights(r, c, 5, 6, 6, 2.0);
          p.query = kattn_test::randomTensor(r, B, T, 5, 1.0);
          p.value = kattn_test::randomTensor(r, B, S, 6, 1.0);
          if (mask) {
            p.mask = kattn_test::randomMask(r, B, S, 0.4, 1);
            (*p.mask)(1, 0) = 0.0;  // at least one masked key
          }
          EXPECT_LE(kattn_test::errorAgainstReference<Layer>(p), TestFixture::kTol)
              << p.describe();
        }
}

/// The layer's explicit-matrix and low-rank choices, on both sides of the cost model.
TYPED_TEST(LayerTest, BothSidesOfExplicitIsCheaperMatchReference) {
  using Layer = typename TestFixture::Layer;
  struct Shape {
    Index T, S, d, dv;
    bool explicit_cheaper;
  };
  const Shape shapes[] = {{2, 3, 16, 16, true}, {3, 2, 12, 6, true}, {120, 100, 4, 2, false},
                          {90, 3, 3, 7, false}};
  Rng r(5);
  for (const Shape& s : shapes) {
    ASSERT_EQ(kattn::detail::explicitIsCheaper(s.T, s.S, s.d, s.dv), s.explicit_cheaper)
        << "the cost model moved: pick shapes on each side again";
    for (bool mask : {false, true}) {
      Problem p;
      p.cfg.feature_transform = TestFixture::mapName();
      p.cfg.num_heads = 2;
      p.cfg.key_dim = int(s.d);
      p.cfg.value_dim = int(s.dv);
      p.cfg.num_random_features = 0;  // F = d
      p.weights = kattn_test::randomWeights(r, p.cfg, 5, 4, 4, 2.0);
      p.query = kattn_test::randomTensor(r, 2, s.T, 5, 1.0);
      p.value = kattn_test::randomTensor(r, 2, s.S, 4, 1.0);
      if (mask) p.mask = kattn_test::randomMask(r, 2, s.S, 0.3, 1);
      EXPECT_LE(kattn_test::errorAgainstReference<Layer>(p), TestFixture::kTol) << p.describe();
    }
  }
}

/// Both forms of the bidirectional kernel path, forced (setCoreForm), against the reference,
/// on short sequences and on sequences spanning several of the layer's internal row blocks.
TYPED_TEST(LayerTest, ForcedExplicitAndLowRankFormsMatchReference) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  int run = 0;
  const int count = 24;
  for (int seed = 0; seed < count; ++seed) {
    Rng r(std::uint64_t(seed) + 2024);
    Options o;
    o.allow_short = false;
    if (seed % 6 == 5) {
      o.min_len = 300;
      o.max_len = 700;
    }
    const Problem p = randomProblem(r, TestFixture::mapName(), o);
    if (!kattn_test::wellConditioned<Scalar>(p)) continue;
    ++run;
    Layer layer = kattn_test::makeLayer<Layer>(p);
    const Tensor3 want =
        kattn_test::runReference<Scalar>(p, kattn_test::projectionOf(layer.projection()));
    for (auto form : {kattn::CoreForm::Explicit, kattn::CoreForm::LowRank, kattn::CoreForm::Auto}) {
      layer.setCoreForm(form);
      EXPECT_LE(kattn_ref::relativeError(kattn_test::runLayer(layer, p), want), TestFixture::kTol)
          << "form " << int(form) << ", seed " << seed << ": " << p.describe();
    }
  }
  EXPECT_GE(3 * run, 2 * count);
}

TYPED_TEST(LayerTest, EmptySequences) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  Rng r(3);
  for (Index T : {0, 4})
    for (Index S : {0, 5}) {
      Problem p;
      p.cfg.feature_transform = TestFixture::mapName();
      p.cfg.num_heads = 2;
      p.cfg.key_dim = 3;
      p.cfg.num_random_features = 6;
      p.weights = kattn_test::randomWeights(r, p.cfg, 4, 4, 4, 2.0);
      p.query = kattn_test::randomTensor(r, 2, T, 4, 1.0);
      p.value = kattn_test::randomTensor(r, 2, S, 4, 1.0);
      const Layer layer = kattn_test::makeLayer<Layer>(p);
      kattn::Tensor<Scalar, 3> got;
      ASSERT_NO_THROW(got = kattn_test::runLayer(layer, p)) << "T=" << T << " S=" << S;
      ASSERT_EQ(got.dimension(1), T);
      // No key: the heads are zero, the output is the output bias.
      const Tensor3 want = kattn_test::runReference<Scalar>(
          p, kattn_test::projectionOf(layer.projection()));
      EXPECT_LE(kattn_ref::relativeError(got, want), TestFixture::kTol) << "T=" << T << " S=" << S;
    }
}

/// Arbitrary (large, finite) values in the key and value inputs at masked key positions never
/// change any output, in the kernel and in the short path.
TYPED_TEST(LayerTest, MaskedKeyPositionsNeverChangeOutputs) {
  using Layer = typename TestFixture::Layer;
  for (std::uint64_t seed = 0; seed < 12; ++seed) {
    Rng r(seed + 6060);
    Options o;
    o.allow_begin_kernel = seed % 3 == 0;
    Problem p = randomProblem(r, TestFixture::mapName(), o);
    p.cfg.scale_by_length = false;
    if (!p.key) p.key = p.value;  // a key input of its own, so that queries stay untouched
    p.mask = kattn_test::randomMask(r, p.B(), p.S(), 0.35, 1);
    Problem q = p;
    for (Index b = 0; b < p.B(); ++b)
      for (Index s = 0; s < p.S(); ++s) {
        if ((*p.mask)(b, s) != 0.0) continue;
        // exp and expmod shift by the maximum over all key positions, masked ones included
        // (SPEC 2), so a masked key reaches the output through the eps term by definition.
        if (!TestFixture::kExpType)
          for (Index j = 0; j < p.key->dimension(2); ++j) (*q.key)(b, s, j) = 100.0 * r.normal();
        for (Index j = 0; j < p.value.dimension(2); ++j) q.value(b, s, j) = 1e4 * r.normal();
      }
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    EXPECT_LE(kattn_ref::relativeError(kattn_test::runLayer(layer, q), kattn_test::runLayer(layer, p)),
              TestFixture::kTol)
        << "seed " << seed << ": " << p.describe();
  }
}

// ---- a user-defined feature map ---------------------------------------------------------------

/// softplus(z) = log(1 + exp(z)), positive, written against the contract of feature_maps.hpp.
struct Softplus {
  static constexpr const char* name = "softplus";
  template <typename Scalar>
  void operator()(const kattn::FeatureInput<Scalar>& in, kattn::FeatureBlock<Scalar> out) const {
    if (in.projection) {
      out.noalias() = in.x * in.projection->transpose();
    } else {
      out = in.x;
    }
    const Scalar norm =
        in.projection ? Scalar(1) / std::sqrt(Scalar(in.projection->rows())) : Scalar(1);
    for (Index i = 0; i < out.rows(); ++i)
      for (Index j = 0; j < out.cols(); ++j) {
        const Scalar z = out(i, j);
        out(i, j) = norm * (std::max(z, Scalar(0)) + std::log1p(std::exp(-std::abs(z))));
      }
  }
};

static_assert(kattn::is_feature_map_v<Softplus, float> && kattn::is_feature_map_v<Softplus, double>,
              "Softplus meets the feature map contract");

template <typename Scalar>
class ScalarTest : public ::testing::Test {};
struct ScalarNames {
  template <typename S>
  static std::string GetName(int) {
    return kattn_test::scalarName<S>();
  }
};
using Scalars = ::testing::Types<double, float>;
TYPED_TEST_SUITE(ScalarTest, Scalars, ScalarNames);

TYPED_TEST(ScalarTest, UserDefinedFeatureMapMatchesReference) {
  using Layer = kattn::KernelAttention<TypeParam, Softplus>;
  const kattn_ref::ElementwiseF softplus = [](double z) { return std::log1p(std::exp(z)); };
  // validate() knows only the built-in names, so the config keeps one ("elu"); the layer type
  // decides the map (checkFeatureTransformName only guards the built-in maps).
  randomAgainstReference<Layer>("elu", 25, 300, {}, &softplus);
}

// ---- explicit = low-rank ------------------------------------------------------------------------

TYPED_TEST(ScalarTest, ExplicitAndLowRankFormsAgree) {
  using Scalar = TypeParam;
  using Mat = kattn::Matrix<Scalar>;
  Rng r(11);
  for (int i = 0; i < 300; ++i) {
    const Index T = r.intIn(1, 80), S = r.intIn(1, 80), F = r.intIn(1, 16), dv = r.intIn(1, 8);
    Mat qf(T, F), kf(S, F), v(S, dv), a(T, dv), b(T, dv);
    for (Index j = 0; j < qf.size(); ++j) qf.data()[j] = Scalar(r.uniform(0.05, 1.0));
    for (Index j = 0; j < kf.size(); ++j) kf.data()[j] = Scalar(r.uniform(0.05, 1.0));
    for (Index j = 0; j < v.size(); ++j) v.data()[j] = Scalar(r.normal());
    for (Index s = 1; s < S; ++s)
      if (r.coin(0.2)) kf.row(s).setZero();  // masked keys (never all of them)
    kattn::detail::explicitAttention<Scalar>(qf, kf, v, a);
    kattn::detail::lowRankAttention<Scalar>(qf, kf, v, b);
    // Both against a float64 evaluation of the formula.
    const Eigen::MatrixXd qd = qf.template cast<double>(), kd = kf.template cast<double>(),
                          vd = v.template cast<double>();
    const Eigen::MatrixXd scores = qd * kd.transpose();
    Eigen::MatrixXd want = scores * vd;
    for (Index t = 0; t < T; ++t) want.row(t) /= scores.row(t).sum() + 1e-6;
    const Eigen::MatrixXd ad = a.template cast<double>(), bd = b.template cast<double>();
    const double ref = want.cwiseAbs().maxCoeff();
    EXPECT_LE((ad - want).cwiseAbs().maxCoeff() / ref, kattn_ref::tolerance<Scalar>())
        << "explicit T=" << T << " S=" << S << " F=" << F << " dv=" << dv;
    EXPECT_LE((bd - want).cwiseAbs().maxCoeff() / ref, kattn_ref::tolerance<Scalar>())
        << "low-rank T=" << T << " S=" << S << " F=" << F << " dv=" << dv;
    EXPECT_LE((ad - bd).cwiseAbs().maxCoeff() / ref, kattn_ref::tolerance<Scalar>())
        << "explicit vs low-rank T=" << T << " S=" << S << " F=" << F << " dv=" << dv;
  }
}

// ---- bit-exact invariants --------------------------------------------------------------------

TYPED_TEST(LayerTest, ConstTensorMapOverCallerMemoryIsBitIdentical) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  for (std::uint64_t seed = 0; seed < 6; ++seed) {
    Rng r(seed + 77);
    Problem p = randomProblem(r, TestFixture::mapName());
    if (!p.key) p.key = p.value;  // same numbers as no key, now through the key argument
    if (!p.mask) p.mask = kattn_test::randomMask(r, p.B(), p.S(), 0.3, 1);
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    const auto owning = kattn_test::runLayer(layer, p);

    // The same numbers in plain caller buffers.
    auto buffer = [](const auto& t) {
      return std::vector<Scalar>(t.data(), t.data() + t.size());
    };
    const kattn::Tensor<Scalar, 3> q = kattn_test::cast<Scalar>(p.query),
                                   v = kattn_test::cast<Scalar>(p.value),
                                   k = kattn_test::cast<Scalar>(*p.key);
    const kattn::Tensor<Scalar, 2> m = kattn_test::cast<Scalar>(*p.mask);
    const std::vector<Scalar> qb = buffer(q), vb = buffer(v), kb = buffer(k), mb = buffer(m);
    const kattn::ConstTensorMap<Scalar, 3> qm(qb.data(), q.dimensions()),
        vm(vb.data(), v.dimensions()), km(kb.data(), k.dimensions());
    const kattn::ConstTensorMap<Scalar, 2> mm(mb.data(), m.dimensions());
    const auto viewed = layer.forward(qm, vm, km, mm);
    EXPECT_TRUE(kattn_ref::bitIdentical(owning, viewed)) << p.describe();

    // Into caller memory.
    std::vector<Scalar> out(std::size_t(owning.size()), Scalar(-7));
    layer.forward(qm, vm, km, mm, false,
                  kattn::TensorMap<Scalar, 3>(out.data(), owning.dimensions()));
    EXPECT_TRUE(std::equal(out.begin(), out.end(), owning.data())) << p.describe();
  }
}

TYPED_TEST(LayerTest, ForwardIsDeterministicAndIndependentOfThreads) {
  using Layer = typename TestFixture::Layer;
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    Rng r(seed + 500);
    Options o;
    o.min_len = 200;
    o.max_len = 700;  // several row slices of the dense products
    Problem p = randomProblem(r, TestFixture::mapName(), o);
    Layer layer = kattn_test::makeLayer<Layer>(p);
    const auto first = kattn_test::runLayer(layer, p);
    EXPECT_TRUE(kattn_ref::bitIdentical(first, kattn_test::runLayer(layer, p))) << p.describe();
    for (int threads : {1, 2, 3}) {
      layer.setThreads(threads);
      EXPECT_TRUE(kattn_ref::bitIdentical(first, kattn_test::runLayer(layer, p)))
          << threads << " threads: " << p.describe();
    }
    layer.setThreadPool(nullptr);
    EXPECT_TRUE(kattn_ref::bitIdentical(first, kattn_test::runLayer(layer, p)))
        << "no pool: " << p.describe();
  }
}

TYPED_TEST(LayerTest, AnyKernelAttentionEqualsTypedLayerBitForBit) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  for (std::uint64_t seed = 0; seed < 10; ++seed) {
    Rng r(seed + 900);
    const Problem p = randomProblem(r, TestFixture::mapName());
    const Layer typed = kattn_test::makeLayer<Layer>(p);
    const auto any = kattn_test::makeLayer<kattn::AnyKernelAttention<Scalar>>(p);
    EXPECT_EQ(any.numFeatures(), typed.numFeatures());
    EXPECT_EQ(any.outputDim(), typed.outputDim());
    EXPECT_TRUE(kattn_ref::bitIdentical(kattn_test::runLayer(typed, p),
                                        kattn_test::runLayer(any, p)))
        << p.describe();
  }
}

// ---- projection ---------------------------------------------------------------------------------

TYPED_TEST(LayerTest, DefaultProjectionIsTheSeedsAndDiffersAcrossSeeds) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  kattn::LayerConfig c;
  c.feature_transform = TestFixture::mapName();
  c.key_dim = 5;
  c.num_random_features = 13;
  c.seed = 1234;
  const Layer a(c);
  const kattn::Matrix<Scalar> want = kattn::randomProjection<Scalar>(13, 5, 1234);
  ASSERT_EQ(a.projection().rows(), 13);
  ASSERT_EQ(a.projection().cols(), 5);
  EXPECT_TRUE(a.projection() == want);
  c.seed = 1235;
  const Layer b(c);
  EXPECT_TRUE(b.projection() == kattn::randomProjection<Scalar>(13, 5, 1235));
  EXPECT_GT((a.projection() - b.projection()).cwiseAbs().maxCoeff(), Scalar(0.1));
  c.num_random_features = 0;
  EXPECT_EQ(Layer(c).projection().size(), 0);
  EXPECT_EQ(Layer(c).numFeatures(), 5);
}

// ---- dropout -------------------------------------------------------------------------------------

/// A problem whose output is the attention heads: Wo = identity [N, dv, N dv], no bias.
Problem headsProblem(Rng& r, const std::string& map, double rate, int begin_kernel = 0) {
  Problem p;
  auto& c = p.cfg;
  c.feature_transform = map;
  c.num_heads = 2;
  c.key_dim = 4;
  c.value_dim = 16;
  c.output_shape = 32;
  c.use_bias = false;
  c.dropout = rate;
  c.seed = 21;
  c.num_random_features = 8;
  c.begin_kernel = begin_kernel;
  p.weights = kattn_test::randomWeights(r, c, 6, 6, 6);
  for (auto* Wo : {&p.weights.output_kernel, &p.weights.output_softmax_kernel}) {
    if (Wo->size() == 0) continue;
    Wo->setZero();
    for (Index n = 0; n < 2; ++n)
      for (Index h = 0; h < 16; ++h) (*Wo)(n, h, n * 16 + h) = 1.0;
  }
  // Identity needs its normaliser away from zero: queries and keys share the inputs' offset.
  p.query = kattn_test::randomTensor(r, 2, 64, 6, 1.0);
  p.value = kattn_test::randomTensor(r, 2, 20, 6, 1.0);
  if (map == "identity") {
    p.weights.key_kernel = p.weights.query_kernel;
    for (Index i = 0; i < p.query.size(); ++i) p.query.data()[i] += 3.0;
    for (Index i = 0; i < p.value.size(); ++i) p.value.data()[i] += 3.0;
  }
  return p;
}

TYPED_TEST(LayerTest, DropoutScalesKeptHeadsAndDropsAboutTheRate) {
  using Layer = typename TestFixture::Layer;
  for (int K : {0, 20}) {
    Rng r(8);
    const double rate = 0.3;
    const Problem p = headsProblem(r, TestFixture::mapName(), rate, K);
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    const auto inference = kattn_test::runLayer(layer, p);
    const auto train = kattn_test::runLayer(layer, p, true);
    Index dropped = 0, dropped_softmax_part = 0, bad = 0;
    const Index O = inference.dimension(2);
    for (Index i = 0; i < train.size(); ++i) {
      const double y = train.data()[i], y0 = inference.data()[i];
      ASSERT_NE(y0, 0.0);
      if (y == 0.0) {
        ++dropped;
        if ((i / O) % 64 < K) ++dropped_softmax_part;
      } else if (std::abs(y - y0 / (1.0 - rate)) > 1e-5 * std::abs(y0 / (1.0 - rate))) {
        ++bad;
      }
    }
    EXPECT_EQ(bad, 0) << "kept heads must be scaled by 1/(1-rate)";
    const double fraction = double(dropped) / double(train.size());
    EXPECT_NEAR(fraction, rate, 0.04) << train.size() << " heads, K=" << K;
    if (K > 0) {
      const double part = double(dropped_softmax_part) / double(2 * K * O);
      EXPECT_NEAR(part, rate, 0.06) << "the softmax part has its own dropout";
    }
  }
}

TYPED_TEST(LayerTest, DropoutIsReproducibleDiffersPerCallAndInferenceIgnoresIt) {
  using Layer = typename TestFixture::Layer;
  Rng r(9);
  const Problem p = headsProblem(r, TestFixture::mapName(), 0.25);
  const Layer a = kattn_test::makeLayer<Layer>(p), b = kattn_test::makeLayer<Layer>(p);
  const auto a1 = kattn_test::runLayer(a, p, true);
  const auto a_inf = kattn_test::runLayer(a, p, false);  // does not advance the stream
  const auto a2 = kattn_test::runLayer(a, p, true);
  const auto b1 = kattn_test::runLayer(b, p, true);
  const auto b2 = kattn_test::runLayer(b, p, true);
  EXPECT_TRUE(kattn_ref::bitIdentical(a1, b1)) << "same seed, same first training call";
  EXPECT_TRUE(kattn_ref::bitIdentical(a2, b2)) << "same seed, same second training call";
  EXPECT_FALSE(kattn_ref::bitIdentical(a1, a2)) << "successive training calls must differ";

  Problem q = p;
  q.cfg.dropout = 0.0;
  const Layer no_dropout = kattn_test::makeLayer<Layer>(q);
  EXPECT_TRUE(kattn_ref::bitIdentical(a_inf, kattn_test::runLayer(no_dropout, p)))
      << "inference ignores dropout";
  EXPECT_TRUE(kattn_ref::bitIdentical(kattn_test::runLayer(no_dropout, p, true), a_inf))
      << "rate 0 drops nothing in training";

  q = p;
  q.cfg.seed = 22;
  const Layer other_seed = kattn_test::makeLayer<Layer>(q);
  EXPECT_FALSE(kattn_ref::bitIdentical(a1, kattn_test::runLayer(other_seed, p, true)));
}

// ---- redraw ---------------------------------------------------------------------------------------

TYPED_TEST(LayerTest, RedrawUsesTheKthRedrawProjectionInTrainingOnly) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  Rng r(10);
  Problem p = randomProblem(r, TestFixture::mapName());
  p.projection.reset();
  p.cfg.num_random_features = 9;
  p.cfg.key_dim = 4;
  p.cfg.begin_kernel = 0;
  p.cfg.is_short_seq = false;
  p.cfg.seed = 31;
  p.cfg.redraw = true;
  p.cfg.scale_by_length = false;  // a mask row summing to 1 gives s_b = 0: no projection effect
  p.weights = kattn_test::randomWeights(r, p.cfg, p.query.dimension(2),
                                        p.key ? p.key->dimension(2) : p.value.dimension(2),
                                        p.value.dimension(2), 2.0);
  const Layer a = kattn_test::makeLayer<Layer>(p), b = kattn_test::makeLayer<Layer>(p);
  Problem fixed = p;
  fixed.cfg.redraw = false;
  const auto inference = kattn_test::runLayer(kattn_test::makeLayer<Layer>(fixed), p);

  std::vector<kattn::Tensor<Scalar, 3>> calls;
  for (std::uint64_t k = 0; k < 3; ++k) {
    calls.push_back(kattn_test::runLayer(a, p, true));
    // Inference between training calls: the seed's projection, and no redraw consumed.
    EXPECT_TRUE(kattn_ref::bitIdentical(kattn_test::runLayer(a, p, false), inference))
        << "inference after training call " << k;
    EXPECT_TRUE(kattn_ref::bitIdentical(kattn_test::runLayer(b, p, true), calls.back()))
        << "a fresh layer with the same seed repeats training call " << k;
    // A layer with the k-th redraw as its fixed projection gives the same numbers.
    Layer expect_layer = kattn_test::makeLayer<Layer>(fixed);
    expect_layer.setProjection(kattn::redrawProjection<Scalar>(9, 4, 31, k));
    const auto want = kattn_test::runLayer(expect_layer, p);
    EXPECT_LE(kattn_ref::relativeError(calls.back(), want), TestFixture::kTol)
        << "training call " << k << " uses redrawProjection(m, d, seed, " << k << ")";
    EXPECT_GT(kattn_ref::relativeError(calls.back(), inference), 1e-4)
        << "training call " << k << " must not use the seed's projection";
  }
  EXPECT_GT(kattn_ref::relativeError(calls[0], calls[1]), 1e-4);
  EXPECT_GT(kattn_ref::relativeError(calls[1], calls[2]), 1e-4);
}

// ---- errors at setWeights / setProjection / forward -------------------------------------------

using kattn_test::throwsWith;

/// A small valid double elu layer problem: N=2, d=3, dv=4, Dq=5, Dk=6, Dv=7, O=8.
Problem smallProblem(bool use_bias = true, int begin_kernel = 0) {
  Rng r(1);
  Problem p;
  auto& c = p.cfg;
  c.feature_transform = "elu";
  c.num_heads = 2;
  c.key_dim = 3;
  c.value_dim = 4;
  c.output_shape = 8;
  c.num_random_features = 5;
  c.use_bias = use_bias;
  c.begin_kernel = begin_kernel;
  p.weights = kattn_test::randomWeights(r, c, 5, 6, 7);
  p.query = kattn_test::randomTensor(r, 2, 3, 5, 1.0);
  p.value = kattn_test::randomTensor(r, 2, 4, 7, 1.0);
  p.key = kattn_test::randomTensor(r, 2, 4, 6, 1.0);
  return p;
}

using EluLayer = kattn::KernelAttention<double, kattn::Elu>;

TEST(LayerErrors, ForwardShapeErrorsNameTheTensor) {
  const Problem p = smallProblem();
  const EluLayer layer = kattn_test::makeLayer<EluLayer>(p);
  ASSERT_NO_THROW(kattn_test::runLayer(layer, p));
  Rng r(2);
  auto run = [&](const Problem& q) { return [&layer, q] { kattn_test::runLayer(layer, q); }; };

  Problem q = p;
  q.query = kattn_test::randomTensor(r, 2, 3, 6, 1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "query")) << "query last dim";
  q = p;
  q.value = kattn_test::randomTensor(r, 3, 4, 7, 1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "value")) << "value batch";
  q = p;
  q.value = kattn_test::randomTensor(r, 2, 4, 6, 1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "value")) << "value last dim";
  q = p;
  q.key = kattn_test::randomTensor(r, 2, 5, 6, 1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "key")) << "key S";
  q = p;
  q.key = kattn_test::randomTensor(r, 2, 4, 7, 1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "key")) << "key last dim";
  q = p;
  q.key = kattn_test::randomTensor(r, 1, 4, 6, 1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "key")) << "key batch";
  q = p;
  q.key.reset();  // D_k = 6 but the value has 7
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "key")) << "key absent, D_k != D_v";
  q = p;
  q.mask = Tensor2(2, 5);
  q.mask->setConstant(1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "attention_mask")) << "mask S";
  q.mask = Tensor2(1, 4);
  q.mask->setConstant(1.0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(run(q), "attention_mask")) << "mask B";

  // Output into caller memory of the wrong shape.
  const kattn::Tensor<double, 3> x = p.query, v = p.value, k = *p.key;
  for (auto dims : {Eigen::array<Index, 3>{2, 4, 8}, Eigen::array<Index, 3>{2, 3, 7},
                    Eigen::array<Index, 3>{1, 3, 8}}) {
    kattn::Tensor<double, 3> out(dims);
    EXPECT_TRUE(throwsWith<std::invalid_argument>(
        [&] { layer.forward(x, v, k, std::nullopt, false, kattn::TensorMap<double, 3>(out)); },
        "output"))
        << kattn::shapeString(dims);
  }
  kattn::Tensor<double, 3> out(2, 3, 8);
  EXPECT_NO_THROW(layer.forward(x, v, k, std::nullopt, false, kattn::TensorMap<double, 3>(out)));

  // Key absent is fine when D_k = D_v.
  Problem same = p;
  same.weights.key_kernel = kattn_test::randomTensor(r, 7, 2, 3, 0.3);
  same.key.reset();
  EXPECT_NO_THROW(kattn_test::runLayer(kattn_test::makeLayer<EluLayer>(same), same));
}

/// Without setWeights the first forward builds the layer from its initializers (Keras's lazy
/// build): the owning forward, the forward into caller memory and the run-time layer agree.
TEST(LayerErrors, ForwardBeforeSetWeightsBuildsFromTheInitializers) {
  const Problem p = smallProblem();
  const EluLayer layer(p.cfg);
  EXPECT_FALSE(layer.hasWeights());
  const kattn::Tensor<double, 3> y = kattn_test::runLayer(layer, p);
  EXPECT_TRUE(layer.hasWeights());
  const EluLayer into(p.cfg);
  kattn::Tensor<double, 3> out(y.dimensions());
  into.forward(p.query, p.value, p.key, std::nullopt, false, kattn::TensorMap<double, 3>(out));
  EXPECT_EQ(kattn_ref::relativeError(out, y), 0.0);
  const kattn::AnyKernelAttention<double> any(p.cfg);
  EXPECT_EQ(kattn_ref::relativeError(kattn_test::runLayer(any, p), y), 0.0);
}

TEST(LayerErrors, SetWeightsChecksEveryTensor) {
  Rng r(4);
  for (bool use_bias : {true, false}) {
    const Problem p = smallProblem(use_bias, 2);  // begin_kernel: the softmax output too
    EluLayer layer(p.cfg);
    ASSERT_NO_THROW(layer.setWeights(p.weights));
    struct Bad {
      const char* name;
      std::function<void(kattn::Weights<double>&)> edit;
    };
    const std::vector<Bad> bads = {
        {"query/kernel", [&](auto& w) { w.query_kernel = kattn_test::randomTensor(r, 5, 3, 3, 1); }},
        {"query/kernel", [&](auto& w) { w.query_kernel = kattn_test::randomTensor(r, 5, 2, 4, 1); }},
        {"key/kernel", [&](auto& w) { w.key_kernel = kattn_test::randomTensor(r, 6, 2, 2, 1); }},
        {"key/kernel", [&](auto& w) { w.key_kernel = kattn_test::randomTensor(r, 6, 1, 3, 1); }},
        {"value/kernel", [&](auto& w) { w.value_kernel = kattn_test::randomTensor(r, 7, 2, 3, 1); }},
        {"value/kernel", [&](auto& w) { w.value_kernel = kattn_test::randomTensor(r, 7, 3, 4, 1); }},
        {"attention_output/kernel",
         [&](auto& w) { w.output_kernel = kattn_test::randomTensor(r, 2, 4, 9, 1); }},
        {"attention_output/kernel",
         [&](auto& w) { w.output_kernel = kattn_test::randomTensor(r, 2, 3, 8, 1); }},
        {"attention_output/kernel",
         [&](auto& w) { w.output_kernel = kattn_test::randomTensor(r, 1, 4, 8, 1); }},
        {"attention_output_softmax/kernel",
         [&](auto& w) { w.output_softmax_kernel = kattn_test::randomTensor(r, 2, 4, 7, 1); }},
        {"attention_output_softmax/kernel",
         [&](auto& w) { w.output_softmax_kernel = kattn::Tensor<double, 3>(); }},
    };
    for (const Bad& bad : bads) {
      kattn::Weights<double> w = p.weights;
      bad.edit(w);
      EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { layer.setWeights(w); }, bad.name))
          << bad.name << " use_bias=" << use_bias;
    }
    if (use_bias) {
      const std::vector<Bad> bias_bads = {
          {"query/bias", [](auto& w) { w.query_bias = Tensor2(2, 4); }},
          {"key/bias", [](auto& w) { w.key_bias = Tensor2(3, 3); }},
          {"value/bias", [](auto& w) { w.value_bias = Tensor2(2, 3); }},
          {"attention_output/bias", [](auto& w) { w.output_bias = kattn_ref::Tensor1(7); }},
          {"attention_output/bias", [](auto& w) { w.output_bias = kattn_ref::Tensor1(); }},
          {"attention_output_softmax/bias",
           [](auto& w) { w.output_softmax_bias = kattn_ref::Tensor1(9); }},
      };
      for (const Bad& bad : bias_bads) {
        kattn::Weights<double> w = p.weights;
        bad.edit(w);
        EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { layer.setWeights(w); }, bad.name))
            << bad.name;
      }
    } else {
      // Biases given although use_bias is false.
      const std::vector<Bad> present = {
          {"query/bias", [](auto& w) { w.query_bias = Tensor2(2, 3); }},
          {"key/bias", [](auto& w) { w.key_bias = Tensor2(2, 3); }},
          {"value/bias", [](auto& w) { w.value_bias = Tensor2(2, 4); }},
          {"attention_output/bias", [](auto& w) { w.output_bias = kattn_ref::Tensor1(8); }},
          {"attention_output_softmax/bias",
           [](auto& w) { w.output_softmax_bias = kattn_ref::Tensor1(8); }},
      };
      for (const Bad& bad : present) {
        kattn::Weights<double> w = p.weights;
        bad.edit(w);
        EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { layer.setWeights(w); }, bad.name))
            << bad.name << " present with use_bias = false";
      }
    }
  }
}

TEST(LayerErrors, SetProjectionChecksTheShape) {
  const Problem p = smallProblem();  // m = 5, d = 3
  EluLayer layer(p.cfg);
  EXPECT_NO_THROW(layer.setProjection(kattn::randomProjection<double>(5, 3, 1)));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { layer.setProjection(kattn::randomProjection<double>(4, 3, 1)); }, "projection_matrix"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { layer.setProjection(kattn::randomProjection<double>(5, 4, 1)); }, "projection_matrix"));
  kattn::LayerConfig none = p.cfg;
  none.num_random_features = 0;
  EluLayer no_projection(none);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { no_projection.setProjection(kattn::randomProjection<double>(5, 3, 1)); },
      "projection_matrix"));
  kattn::AnyKernelAttention<double> any(p.cfg);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { any.setProjection(kattn::randomProjection<double>(3, 3, 1)); }, "projection_matrix"));
}

TEST(LayerErrors, ScaleByLengthNeedsAMaskWhoseRowsSumToOne) {
  Problem p = smallProblem();
  p.cfg.scale_by_length = true;
  const EluLayer layer = kattn_test::makeLayer<EluLayer>(p);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { kattn_test::runLayer(layer, p); },
                                                "scale_by_length"))
      << "no mask";
  p.mask = Tensor2(2, 4);
  p.mask->setConstant(1.0);
  EXPECT_NO_THROW(kattn_test::runLayer(layer, p));
  (*p.mask)(1, 0) = (*p.mask)(1, 1) = (*p.mask)(1, 2) = (*p.mask)(1, 3) = 0.0;
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { kattn_test::runLayer(layer, p); },
                                                "scale_by_length"))
      << "a row of zeros";
  (*p.mask)(1, 2) = 0.5;
  (*p.mask)(1, 3) = 0.25;
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { kattn_test::runLayer(layer, p); },
                                                "scale_by_length"))
      << "a row summing to 0.75";
  (*p.mask)(1, 0) = 0.25;
  EXPECT_NO_THROW(kattn_test::runLayer(layer, p)) << "a row summing to exactly 1";
}

}  // namespace
