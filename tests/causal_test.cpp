// The whole-sequence pass of the causal windowed layer (layer.hpp with CausalWindowed,
// detail/causal_*.hpp) against the float64 reference of tests/reference.hpp (explicit T x T
// weights): random problems, every padding, long sequences across the internal groups and
// blocks, attend on the caller's heads, and masked key positions.
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

// ---- the whole pass against the reference -----------------------------------------------------

TYPED_TEST(CausalTest, WholePassMatchesReference) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  int run = 0;
  const int count = 80;
  for (int seed = 0; seed < count; ++seed) {
    Rng r(std::uint64_t(seed) * 104729 + 3);
    CausalOptions o;
    if (seed % 10 == 9) o.max_len = 300;
    const Problem p = randomCausal(r, TestFixture::mapName(), o);
    if (!kattn_test::wellConditioned<Scalar>(p)) continue;
    ++run;
    EXPECT_LE(kattn_test::errorAgainstReference<Layer>(p), TestFixture::kTol)
        << "seed " << seed << ": " << p.describe();
  }
  EXPECT_GE(3 * run, 2 * count) << "only " << run << " well-conditioned problems";
}

/// Every padding, with T both a multiple of C and not: left padding returns the real positions.
TYPED_TEST(CausalTest, PaddingReturnsTheRealPositions) {
  using Layer = typename TestFixture::Layer;
  for (const char* pad : {"left", "right"})
    for (Index T : {1, 5, 6, 7, 8, 11}) {
      Rng r(std::uint64_t(T) * 31 + (pad[0] == 'l'));
      CausalOptions o;
      o.T = T;
      o.chunk = 3;
      o.window = 2;
      o.allow_padding = false;
      o.allow_mask = false;
      Problem p = randomCausal(r, TestFixture::mapName(), o);
      p.cfg.causal_padding = pad;
      EXPECT_LE(kattn_test::errorAgainstReference<Layer>(p), TestFixture::kTol)
          << pad << " T=" << T << ": " << p.describe();
    }
}

// ---- long sequences: internal grouping and block size ------------------------------------------

/// T around 5000 spans several internal blocks (about 2048 rows) and many groups
/// (detail::groupRows); neither may change results beyond rounding.
TYPED_TEST(CausalTest, LongSequencesAcrossInternalBlocks) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  struct Setting {
    Index T, C, W;
    const char* padding;
    std::optional<double> decay;
  };
  const Setting settings[] = {{5000, 1, 6000, "none", std::nullopt},  // token-level prefix sums
                              {4999, 3, 4, "left", 0.9},              // windows that drop
                              {5000, 1, 7, "none", std::nullopt},
                              {4998, 3, 300, "none", 0.5},
                              // chunks longer than a group: each group is one chunk, read
                              // out in the low-rank form
                              {3000, 100, 40, "none", 0.9},
                              {2950, 70, 500, "left", std::nullopt}};
  for (const Setting& s : settings) {
    ASSERT_LE(8 * kattn::detail::groupRows(s.C), s.T) << "T must span many groups";
    Rng r(std::uint64_t(s.T + s.C * 7 + s.W));
    CausalOptions o;
    o.T = s.T;
    o.chunk = s.C;
    o.window = s.W;
    o.fixed_decay = true;
    o.decay = s.decay;
    o.allow_padding = false;
    o.allow_scale = false;
    o.max_batch = 1;
    o.input_scale = TestFixture::kExpType ? 0.5 : 1.0;
    Problem p = randomCausal(r, TestFixture::mapName(), o);
    p.cfg.causal_padding = s.padding;
    // One head of small size keeps the T x T reference affordable.
    p.cfg.num_heads = 1;
    p.cfg.key_dim = 3;
    p.cfg.value_dim = 2;
    p.cfg.output_shape = 2;
    p.cfg.num_random_features = TestFixture::mapName() == "identity" ? 4 : 5;
    p.projection.reset();
    p.mask = kattn_test::randomMask(r, 1, s.T, 0.2);
    p.weights = kattn_test::randomWeights(r, p.cfg, p.query.dimension(2),
                                          p.key ? p.key->dimension(2) : p.value.dimension(2),
                                          p.value.dimension(2),
                                          TestFixture::mapName() == "identity" ? 4.0 : 0.0);
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    const auto whole = kattn_test::runLayer(layer, p);
    // The reference (and, for the exp maps, the weight of eps for the streamed comparison).
    const auto check = kattn_test::epsCheck<Scalar>(p, kattn_test::projectionOf(layer.projection()));
    EXPECT_LE(kattn_ref::relativeError(whole, check.y), TestFixture::kTol)
        << "T=" << s.T << " C=" << s.C << " W=" << s.W << " " << s.padding;
    if (std::string(s.padding) == "none") {
      // Exact streaming in small, uneven calls: other groupings, other blocks.
      std::vector<Index> calls;
      for (Index left = s.T / s.C; left > 0;) {
        const Index k = std::min(left, r.intIn(1, 90));
        calls.push_back(k * s.C);
        left -= k;
      }
      const double tol = TestFixture::kTol + (TestFixture::kExpType ? check.bound : 0.0);
      auto state = layer.makeState(1, kattn::StreamingMode::Exact);
      EXPECT_LE(kattn_ref::relativeError(stream(layer, p, calls, state), whole), tol)
          << "streamed T=" << s.T << " C=" << s.C << " W=" << s.W;
      // And one call of the whole sequence through a state (one call, many groups).
      auto one = layer.makeState(1, kattn::StreamingMode::Exact);
      EXPECT_LE(kattn_ref::relativeError(stream(layer, p, {s.T}, one), whole), tol)
          << "one streamed call T=" << s.T << " C=" << s.C << " W=" << s.W;
    }
  }
}

/// attend on heads the caller projected, against the reference's heads before the output
/// projection: the whole pass and one-token streaming calls (the decode step scales and
/// featurises the caller's heads itself; forward gives it heads it projected and scaled).
TYPED_TEST(CausalTest, AttendOnHeadsMatchesReferenceHeads) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  using Heads4 = kattn::Tensor<Scalar, 4>;
  int checked = 0;
  for (int seed = 0; seed < 12; ++seed) {
    Rng r(std::uint64_t(seed) + 5150);
    CausalOptions o;
    o.chunk = 1;
    o.window = 1000;
    o.allow_padding = false;
    o.allow_scale = false;
    o.input_scale = TestFixture::kExpType ? 0.5 : 1.0;
    const Problem p = randomCausal(r, TestFixture::mapName(), o);
    if (!kattn_test::wellConditioned<Scalar>(p)) continue;
    ++checked;
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    kattn_ref::Heads want, want_eps0;
    kattn_test::runReference<Scalar>(p, kattn_test::projectionOf(layer.projection()), nullptr,
                                     kattn_ref::kEps, &want, &want_eps0);
    // The exp maps' streamed shifts differ from the whole pass's: an effective eps in
    // (0, 1e-6] (see kattn_test::epsCheck), so the weight of eps in these heads is allowed.
    const double eps_weight =
        kattn_ref::relativeError(kattn_test::flat(want_eps0), kattn_test::flat(want));
    const double stream_tol = TestFixture::kTol + (TestFixture::kExpType ? eps_weight : 0.0);
    const kattn_test::ProjectedHeads<Scalar> in(p);
    const Heads4 &q = in.q, &k = in.k, &v = in.v;
    std::optional<kattn::Tensor<Scalar, 2>> m;
    std::optional<kattn::ConstTensorMap<Scalar, 2>> mv;
    if (p.mask) mv.emplace(m.emplace(kattn_test::cast<Scalar>(*p.mask)));
    EXPECT_LE(kattn_ref::relativeError(layer.attend(q, k, v, mv), kattn_test::flat(want)),
              TestFixture::kTol)
        << "whole pass: " << p.describe();
    auto state = layer.makeState(p.B(), kattn::StreamingMode::Recurrent);
    Heads4 streamed(q.dimension(0), q.dimension(1), q.dimension(2), v.dimension(3));
    for (Index t = 0; t < p.T(); ++t) {
      auto token = [t](const Heads4& x) -> Heads4 {
        return x.slice(Eigen::array<Index, 4>{0, t, 0, 0},
                       Eigen::array<Index, 4>{x.dimension(0), 1, x.dimension(2), x.dimension(3)});
      };
      std::optional<kattn::Tensor<Scalar, 2>> mc;
      std::optional<kattn::ConstTensorMap<Scalar, 2>> mcv;
      if (m) mcv.emplace(mc.emplace(cols(*m, t, 1)));
      streamed.slice(Eigen::array<Index, 4>{0, t, 0, 0},
                     Eigen::array<Index, 4>{q.dimension(0), 1, q.dimension(2), v.dimension(3)}) =
          layer.attend(token(q), token(k), token(v), mcv, state);
    }
    EXPECT_LE(kattn_ref::relativeError(streamed, kattn_test::flat(want)), stream_tol)
        << "one-token calls: " << p.describe();
  }
  EXPECT_GE(checked, 3) << "too few well-conditioned problems among the seeds";
}

// ---- the key padding mask ---------------------------------------------------------------------

/// Arbitrary values in the key and value inputs at masked positions never change any output,
/// neither in the whole pass nor across streaming calls (the mask must reach the state).
TYPED_TEST(CausalTest, MaskedKeyPositionsNeverChangeOutputs) {
  using Layer = typename TestFixture::Layer;
  for (int seed = 0; seed < 10; ++seed) {
    Rng r(std::uint64_t(seed) + 4040);
    CausalOptions o;
    o.allow_padding = false;
    o.allow_scale = false;
    o.allow_mask = false;
    o.input_scale = TestFixture::kExpType ? 0.5 : 1.0;
    Problem p = randomCausal(r, TestFixture::mapName(), o);
    if (!p.key) p.key = p.value;  // the key input separate from the query input
    p.mask = kattn_test::randomMask(r, p.B(), p.T(), 0.35, 1);
    Problem q = p;
    for (Index b = 0; b < p.B(); ++b)
      for (Index t = 0; t < p.T(); ++t) {
        if ((*p.mask)(b, t) != 0.0) continue;
        // exp and expmod shift by the maximum over all key positions, masked ones included
        // (SPEC 2), so a masked key reaches the output through the eps term by definition.
        if (!TestFixture::kExpType)
          for (Index j = 0; j < p.key->dimension(2); ++j) (*q.key)(b, t, j) = 100.0 * r.normal();
        for (Index j = 0; j < p.value.dimension(2); ++j) q.value(b, t, j) = 1e4 * r.normal();
      }
    const Layer layer = kattn_test::makeLayer<Layer>(p);
    EXPECT_LE(kattn_ref::relativeError(kattn_test::runLayer(layer, q), kattn_test::runLayer(layer, p)),
              TestFixture::kTol)
        << "whole pass, seed " << seed << ": " << p.describe();
    const auto calls = randomSplit(r, p.T(), p.cfg.causal_chunk_length);
    for (auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
      auto s1 = layer.makeState(p.B(), mode);
      auto s2 = layer.makeState(p.B(), mode);
      EXPECT_LE(kattn_ref::relativeError(stream(layer, q, calls, s2), stream(layer, p, calls, s1)),
                TestFixture::kTol)
          << (mode == kattn::StreamingMode::Exact ? "exact" : "recurrent") << " streaming "
          << show(calls) << ", seed " << seed << ": " << p.describe();
    }
  }
}

}  // namespace
