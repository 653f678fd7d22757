// LayerConfig::validate (config.hpp), the masking policies' fromConfig (masking.hpp) and the
// configuration errors of SPEC section 5 as the layers report them at construction: each is
// a std::invalid_argument whose message names the option. Valid neighbours of every invalid
// value are accepted, so that a check that rejects too much fails too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>

#include <kattn/kattn.hpp>

#include "reference.hpp"

namespace {

using kattn::LayerConfig;
using kattn_test::throwsWith;

/// A config that is valid in both masking modes (causal fields set to valid values).
LayerConfig valid() {
  LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.feature_transform = "elu";
  c.num_random_features = 8;
  return c;
}

LayerConfig causal() {
  LayerConfig c = valid();
  c.use_causal_windowed = true;
  c.causal_chunk_length = 2;
  c.causal_window_length = 3;
  return c;
}

/// validate() throws std::invalid_argument naming `option`; so do both layer kinds.
::testing::AssertionResult rejected(const LayerConfig& c, const std::string& option) {
  auto r = throwsWith<std::invalid_argument>([&] { c.validate(); }, option);
  if (!r) return r << " (validate)";
  r = throwsWith<std::invalid_argument>([&] { kattn::AnyKernelAttention<double> layer(c); },
                                        option);
  if (!r) return r << " (AnyKernelAttention)";
  if (c.use_causal_windowed) {
    r = throwsWith<std::invalid_argument>(
        [&] { kattn::KernelAttention<float, kattn::Elu, kattn::CausalWindowed> layer(c); }, option);
  } else {
    r = throwsWith<std::invalid_argument>([&] { kattn::KernelAttention<float, kattn::Elu> layer(c); },
                                          option);
  }
  if (!r) return r << " (KernelAttention)";
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult accepted(const LayerConfig& c) {
  try {
    c.validate();
    kattn::AnyKernelAttention<double> layer(c);
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "rejected: " << e.what();
  }
  return ::testing::AssertionSuccess();
}

TEST(Config, DefaultsAndBaseConfigsAreValid) {
  EXPECT_TRUE(accepted(LayerConfig{}));
  EXPECT_TRUE(accepted(valid()));
  EXPECT_TRUE(accepted(causal()));
  const LayerConfig d;
  EXPECT_EQ(d.num_heads, 1);
  EXPECT_EQ(d.key_dim, 64);
  EXPECT_EQ(d.resolvedValueDim(), 64);
  EXPECT_DOUBLE_EQ(d.resolvedScale(), 1.0 / 8.0);
  EXPECT_EQ(d.feature_transform, "exp");
  EXPECT_EQ(d.num_random_features, 256);
  EXPECT_TRUE(d.use_bias);
  EXPECT_EQ(d.featureDim(), 256);
  LayerConfig none = d;
  none.num_random_features = 0;
  EXPECT_FALSE(none.hasProjection());
  EXPECT_EQ(none.featureDim(), 64);
  none.value_dim = 5;
  none.scale = 0.25;
  EXPECT_EQ(none.resolvedValueDim(), 5);
  EXPECT_DOUBLE_EQ(none.resolvedScale(), 0.25);
}

TEST(Config, UnknownFeatureTransformListsTheValidOnes) {
  for (const char* bad : {"softmax", "", "Elu", "exp "}) {
    LayerConfig c = valid();
    c.feature_transform = bad;
    EXPECT_TRUE(rejected(c, "feature_transform")) << '"' << bad << '"';
    try {
      c.validate();
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      for (const char* name : {"elu", "relu", "square", "exp", "expplus", "expmod", "identity"}) {
        EXPECT_NE(msg.find(name), std::string::npos) << msg << " lacks " << name;
      }
    }
  }
  for (const char* good : kattn::kFeatureTransforms) {
    LayerConfig c = valid();
    c.feature_transform = good;
    EXPECT_TRUE(accepted(c)) << good;
    c.use_causal_windowed = true;
    EXPECT_TRUE(accepted(c)) << good << " causal";
  }
}

TEST(Config, RedrawNeedsAProjection) {
  LayerConfig c = valid();
  c.redraw = true;
  EXPECT_TRUE(accepted(c));
  for (int m : {0, -1}) {
    c.num_random_features = m;
    EXPECT_TRUE(rejected(c, "redraw")) << "m = " << m;
    EXPECT_TRUE(rejected(c, "nothing to redraw")) << "m = " << m;
  }
  c.redraw = false;
  EXPECT_TRUE(accepted(c)) << "m <= 0 without redraw means no projection";
}

TEST(Config, CausalWindowedExcludesShortSeqAndBeginKernel) {
  LayerConfig c = causal();
  c.is_short_seq = true;
  EXPECT_TRUE(rejected(c, "is_short_seq"));
  EXPECT_TRUE(rejected(c, "use_causal_windowed"));
  c = causal();
  c.begin_kernel = 3;
  EXPECT_TRUE(rejected(c, "begin_kernel"));
  c = valid();
  c.is_short_seq = true;
  c.begin_kernel = 3;
  EXPECT_TRUE(accepted(c)) << "both are fine without causal";
  c.begin_kernel = -1;
  EXPECT_TRUE(rejected(c, "begin_kernel"));
}

TEST(Config, DecayMustBeInZeroOne) {
  for (double bad : {-0.1, 1.0000001, 2.0, std::nan(""), std::numeric_limits<double>::infinity(),
                     -std::numeric_limits<double>::infinity()}) {
    LayerConfig c = causal();
    c.causal_window_decay = bad;
    EXPECT_TRUE(rejected(c, "causal_window_decay")) << bad;
  }
  for (double good : {0.0, 0.5, 0.9, 1.0}) {
    LayerConfig c = causal();
    c.causal_window_decay = good;
    EXPECT_TRUE(accepted(c)) << good;
  }
}

TEST(Config, PaddingIsNoneLeftOrRight) {
  for (const char* bad : {"Left", "both", "pre", "RIGHT", " left"}) {
    LayerConfig c = causal();
    c.causal_padding = bad;
    EXPECT_TRUE(rejected(c, "causal_padding")) << bad;
  }
  for (const char* good : {"none", "left", "right"}) {
    LayerConfig c = causal();
    c.causal_padding = good;
    EXPECT_TRUE(accepted(c)) << good;
  }
  EXPECT_EQ(kattn::parsePadding(std::nullopt), kattn::Padding::None);
  EXPECT_EQ(kattn::parsePadding(std::string("none")), kattn::Padding::None);
  EXPECT_EQ(kattn::parsePadding(std::string("left")), kattn::Padding::Left);
  EXPECT_EQ(kattn::parsePadding(std::string("right")), kattn::Padding::Right);
}

TEST(Config, ChunkAndWindowAtLeastOne) {
  for (int bad : {0, -3}) {
    LayerConfig c = causal();
    c.causal_chunk_length = bad;
    EXPECT_TRUE(rejected(c, "causal_chunk_length")) << bad;
    c = causal();
    c.causal_window_length = bad;
    EXPECT_TRUE(rejected(c, "causal_window_length")) << bad;
  }
  LayerConfig c = causal();
  c.causal_chunk_length = 1;
  c.causal_window_length = 1;
  EXPECT_TRUE(accepted(c));
}

TEST(Config, SizesAtLeastOne) {
  const std::pair<const char*, std::function<void(LayerConfig&, int)>> options[] = {
      {"num_heads", [](LayerConfig& c, int v) { c.num_heads = v; }},
      {"key_dim", [](LayerConfig& c, int v) { c.key_dim = v; }},
      {"value_dim", [](LayerConfig& c, int v) { c.value_dim = v; }},
      {"output_shape", [](LayerConfig& c, int v) { c.output_shape = v; }},
  };
  for (const auto& [name, set] : options) {
    for (int bad : {0, -1}) {
      LayerConfig c = valid();
      set(c, bad);
      EXPECT_TRUE(rejected(c, name)) << name << " = " << bad;
      c.use_causal_windowed = true;
      EXPECT_TRUE(rejected(c, name)) << name << " = " << bad << " causal";
    }
    LayerConfig c = valid();
    set(c, 1);
    EXPECT_TRUE(accepted(c)) << name << " = 1";
  }
}

TEST(Config, DropoutInZeroOne) {
  for (double bad : {-0.01, 1.0, 1.5, std::nan("")}) {
    LayerConfig c = valid();
    c.dropout = bad;
    EXPECT_TRUE(rejected(c, "dropout")) << bad;
  }
  for (double good : {0.0, 0.5, 0.999}) {
    LayerConfig c = valid();
    c.dropout = good;
    EXPECT_TRUE(accepted(c)) << good;
  }
}

TEST(Config, ScaleMustBeFinite) {
  for (double bad : {std::nan(""), std::numeric_limits<double>::infinity(),
                     -std::numeric_limits<double>::infinity()}) {
    LayerConfig c = valid();
    c.scale = bad;
    EXPECT_TRUE(rejected(c, "scale")) << bad;
  }
  LayerConfig c = valid();
  c.scale = 0.3;
  EXPECT_TRUE(accepted(c));
}

TEST(Config, SeedMustLeaveRoomForSeedPlusOne) {
  LayerConfig c = valid();
  c.seed = std::numeric_limits<std::int64_t>::max();
  EXPECT_TRUE(rejected(c, "seed"));
  c.seed = std::numeric_limits<std::int64_t>::max() - 1;
  EXPECT_TRUE(accepted(c));
  c.seed = -5;
  EXPECT_TRUE(accepted(c));
}

// ---- the policies and the typed layer --------------------------------------------------------

TEST(Policies, BidirectionalFromConfig) {
  EXPECT_NO_THROW(kattn::Bidirectional::fromConfig(valid()));
  EXPECT_FALSE(kattn::Bidirectional::causal);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [] { kattn::Bidirectional::fromConfig(causal()); }, "use_causal_windowed"));
}

TEST(Policies, CausalWindowedFromConfig) {
  EXPECT_TRUE(kattn::CausalWindowed::causal);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [] { kattn::CausalWindowed::fromConfig(valid()); }, "use_causal_windowed"));
  LayerConfig c = causal();
  c.causal_chunk_length = 4;
  c.causal_window_length = 7;
  c.causal_window_decay = 0.5;
  c.causal_padding = "left";
  const kattn::CausalWindowed p = kattn::CausalWindowed::fromConfig(c);
  EXPECT_EQ(p.chunk, 4);
  EXPECT_EQ(p.window, 7);
  ASSERT_TRUE(p.decay.has_value());
  EXPECT_EQ(*p.decay, 0.5);
  EXPECT_EQ(p.gamma(), 0.5);
  EXPECT_EQ(p.padding, kattn::Padding::Left);
  EXPECT_EQ(p.leadingPad(8), 0);
  EXPECT_EQ(p.leadingPad(9), 3);
  EXPECT_EQ(p.leadingPad(11), 1);
  c.causal_window_decay.reset();
  c.causal_padding = "right";
  const kattn::CausalWindowed q = kattn::CausalWindowed::fromConfig(c);
  EXPECT_FALSE(q.decay.has_value());
  EXPECT_EQ(q.gamma(), 1.0);
  EXPECT_EQ(q.leadingPad(9), 0);
  c.causal_padding.reset();
  const kattn::CausalWindowed none = kattn::CausalWindowed::fromConfig(c);
  EXPECT_EQ(none.padding, kattn::Padding::None);
  EXPECT_EQ(none.leadingPad(8), 0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { none.leadingPad(9); },
                                                "causal_chunk_length"));
  c.causal_padding = "middle";
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { kattn::CausalWindowed::fromConfig(c); },
                                                "causal_padding"));
}

TEST(TypedLayer, FeatureMapMustAgreeWithTheConfig) {
  LayerConfig c = valid();  // elu
  EXPECT_NO_THROW((kattn::KernelAttention<double, kattn::Elu>(c)));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { kattn::KernelAttention<double, kattn::Relu> layer(c); }, "feature_transform"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { kattn::KernelAttention<float, kattn::Exp> layer(c); }, "feature_transform"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { kattn::KernelAttention<double, kattn::ExpPlus, kattn::CausalWindowed> layer(causal()); },
      "feature_transform"));
  c.feature_transform = "expmod";
  EXPECT_NO_THROW((kattn::KernelAttention<float, kattn::ExpMod>(c)));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { kattn::KernelAttention<float, kattn::Exp> layer(c); }, "expmod"));
}

TEST(TypedLayer, MaskingMustAgreeWithTheConfig) {
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [] { kattn::KernelAttention<double, kattn::Elu, kattn::Bidirectional> layer(causal()); },
      "use_causal_windowed"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [] { kattn::KernelAttention<double, kattn::Elu, kattn::CausalWindowed> layer(valid()); },
      "use_causal_windowed"));
  EXPECT_NO_THROW((kattn::KernelAttention<double, kattn::Elu, kattn::CausalWindowed>(causal())));
  const kattn::KernelAttention<double, kattn::Elu, kattn::CausalWindowed> layer(causal());
  EXPECT_EQ(layer.masking().chunk, 2);
  EXPECT_EQ(layer.masking().window, 3);
}

TEST(TypedLayer, ConfigIsKeptAsGiven) {
  LayerConfig c = causal();
  c.causal_window_decay = 0.25;
  c.value_dim = 6;
  const kattn::KernelAttention<double, kattn::Elu, kattn::CausalWindowed> layer(c);
  EXPECT_EQ(layer.config().num_heads, 2);
  EXPECT_EQ(layer.config().resolvedValueDim(), 6);
  EXPECT_EQ(*layer.config().causal_window_decay, 0.25);
  EXPECT_EQ(layer.numFeatures(), 8);
}

/// A typed layer takes its map's name from its type when the config leaves feature_transform at
/// its default ("exp"), and refuses only another built-in name.
TEST(LayerConfig, TypedLayerTakesItsMapNameWhenTheConfigLeavesTheDefault) {
  const kattn::KernelAttention<float, kattn::Elu> elu(kattn::LayerConfig{});
  EXPECT_EQ(elu.config().feature_transform, "elu");
  const kattn::KernelAttention<double, kattn::Exp> exp(kattn::LayerConfig{});
  EXPECT_EQ(exp.config().feature_transform, "exp");
  kattn::LayerConfig relu;
  relu.feature_transform = "relu";
  EXPECT_THROW((kattn::KernelAttention<float, kattn::Elu>(relu)), std::invalid_argument);
  relu.feature_transform = "no_such_map";
  EXPECT_THROW((kattn::KernelAttention<float, kattn::Elu>(relu)), std::invalid_argument);
}

}  // namespace
