// The run-time layer (any_layer.hpp) on the causal path: bit for bit the typed layer, whole
// pass and streaming, and the states it refuses (bidirectional or expplus configurations).
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

TYPED_TEST(CausalTest, AnyKernelAttentionEqualsTypedLayerBitForBit) {
  using Layer = typename TestFixture::Layer;
  using Scalar = typename TestFixture::Scalar;
  for (int seed = 0; seed < 6; ++seed) {
    Rng r(std::uint64_t(seed) + 31337);
    CausalOptions o;
    o.allow_padding = false;
    o.allow_scale = false;
    const Problem p = randomCausal(r, TestFixture::mapName(), o);
    const Layer typed = kattn_test::makeLayer<Layer>(p);
    const auto any = kattn_test::makeLayer<kattn::AnyKernelAttention<Scalar>>(p);
    EXPECT_TRUE(kattn_ref::bitIdentical(kattn_test::runLayer(typed, p), kattn_test::runLayer(any, p)))
        << p.describe();
    const auto calls = randomSplit(r, p.T(), p.cfg.causal_chunk_length);
    for (auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
      auto s1 = typed.makeState(p.B(), mode);
      auto s2 = any.makeState(p.B(), mode);
      EXPECT_TRUE(kattn_ref::bitIdentical(stream(typed, p, calls, s1), stream(any, p, calls, s2)))
          << "streaming " << show(calls) << ": " << p.describe();
      EXPECT_EQ(s1.toBytes(), s2.toBytes());
      // The run-time layer's streaming forward into caller memory too.
      auto s3 = typed.makeState(p.B(), mode);
      auto s4 = any.makeState(p.B(), mode);
      EXPECT_TRUE(kattn_ref::bitIdentical(stream(typed, p, calls, s3),
                                          stream(any, p, calls, s4, 0, true)))
          << "streaming into memory " << show(calls) << ": " << p.describe();
      EXPECT_EQ(s3.toBytes(), s4.toBytes());
    }
  }
}

TEST(CausalErrors, RunTimeLayerRefusesStatesItCannotUse) {
  Problem p = smallCausal();
  kattn::LayerConfig bi = p.cfg;
  bi.use_causal_windowed = false;
  const kattn::AnyKernelAttention<double> bidirectional(bi);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { bidirectional.makeState(2); },
                                                "use_causal_windowed"));
  kattn::LayerConfig plus = p.cfg;
  plus.feature_transform = "expplus";
  const kattn::AnyKernelAttention<double> expplus(plus);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { expplus.makeState(2); }, "expplus"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { expplus.makeState(2); }, "stream"));

  // A state made elsewhere, passed to layers that cannot stream.
  auto state = kattn_test::makeLayer<EluCausal>(p).makeState(2);
  Problem pb = p;
  pb.cfg = bi;
  const auto any_bi = kattn_test::makeLayer<kattn::AnyKernelAttention<double>>(pb);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(any_bi, pb, {2}, state); },
                                                "use_causal_windowed"));
  Problem pp = p;
  pp.cfg = plus;
  const auto any_plus = kattn_test::makeLayer<kattn::AnyKernelAttention<double>>(pp);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(any_plus, pp, {2}, state); }, "expplus"));
}

}  // namespace
