// The memory limit (limits.hpp): every allocation a configuration, an input or a file asks for
// is refused beyond the limit, before it is made, with a MemoryLimitError that gives the size;
// the same requests pass once the limit allows them, so a check that refuses too much fails.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include <kattn/io/safetensors.hpp>
#include <kattn/kattn.hpp>

#include "reference.hpp"

namespace {

using kattn::Index;
using kattn_test::throwsWith;

/// Sets the limit for one test and restores the previous one.
class LimitGuard {
 public:
  explicit LimitGuard(std::size_t bytes) : m_saved(kattn::memoryLimit()) {
    kattn::setMemoryLimit(bytes);
  }
  ~LimitGuard() { kattn::setMemoryLimit(m_saved); }
  LimitGuard(const LimitGuard&) = delete;
  LimitGuard& operator=(const LimitGuard&) = delete;

 private:
  std::size_t m_saved;
};

constexpr std::size_t kMiB = std::size_t(1) << 20;

kattn::LayerConfig config(bool causal, int m = 8) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.num_random_features = m;
  c.feature_transform = "relu";
  c.use_causal_windowed = causal;
  c.causal_chunk_length = 1;
  c.causal_window_length = 1 << 20;
  return c;
}

template <typename Layer>
void setOnes(Layer& layer, Index D) {
  kattn::Weights<float> w;
  const Index N = layer.config().num_heads, d = layer.config().key_dim;
  w.query_kernel = kattn::Tensor<float, 3>(D, N, d);
  w.key_kernel = kattn::Tensor<float, 3>(D, N, d);
  w.value_kernel = kattn::Tensor<float, 3>(D, N, d);
  w.output_kernel = kattn::Tensor<float, 3>(N, d, D);
  w.query_kernel.setConstant(0.1f);
  w.key_kernel.setConstant(0.1f);
  w.value_kernel.setConstant(0.1f);
  w.output_kernel.setConstant(0.1f);
  w.query_bias = kattn::Tensor<float, 2>(N, d);
  w.key_bias = kattn::Tensor<float, 2>(N, d);
  w.value_bias = kattn::Tensor<float, 2>(N, d);
  w.output_bias = kattn::Tensor<float, 1>(D);
  w.query_bias.setZero();
  w.key_bias.setZero();
  w.value_bias.setZero();
  w.output_bias.setZero();
  layer.setWeights(std::move(w));
}

kattn::Tensor<float, 3> ones(Index B, Index T, Index D) {
  kattn::Tensor<float, 3> x(B, T, D);
  x.setConstant(0.5f);
  return x;
}

TEST(MemoryLimit, DefaultIsFourGiBAndSettable) {
  EXPECT_EQ(kattn::memoryLimit(), kattn::kDefaultMemoryLimit);
  EXPECT_EQ(kattn::kDefaultMemoryLimit, std::size_t(4) << 30);
  {
    LimitGuard guard(123);
    EXPECT_EQ(kattn::memoryLimit(), 123u);
  }
  EXPECT_EQ(kattn::memoryLimit(), kattn::kDefaultMemoryLimit);
}

TEST(MemoryLimit, MessageGivesTheSizeAndTheLimit) {
  LimitGuard guard(kMiB);
  EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
      [] { kattn::checkAllocation("a thing", 3.0 * double(kMiB), 1); },
      "a thing needs 3.0 MiB, more than the memory limit of 1.0 MiB (kattn::setMemoryLimit)"));
  // A product that overflows any integer type is still refused.
  EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
      [] { kattn::checkAllocation("huge", 1e300 * 1e300, 8); }, "huge needs"));
  EXPECT_NO_THROW(kattn::checkAllocation("fits", double(kMiB) / 4, 4));
}

TEST(MemoryLimit, ProjectionIsRefusedAtConstruction) {
  kattn::LayerConfig c = config(false, 1 << 16);  // 65536 x 4 floats = 1 MiB
  {
    LimitGuard guard(kMiB / 2);
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
        [&] { kattn::KernelAttention<float, kattn::Relu> layer(c); },
        "the projection [num_random_features, key_dim] = [65536, 4] needs 1.0 MiB"));
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
        [&] { kattn::AnyKernelAttention<float> layer(c); }, "the projection"));
  }
  LimitGuard guard(2 * kMiB);
  const auto construct = [&] { kattn::KernelAttention<float, kattn::Relu> layer(c); };
  EXPECT_NO_THROW(construct());
}

TEST(MemoryLimit, OwningOutputIsRefusedBeforeTheForward) {
  kattn::KernelAttention<float, kattn::Relu> layer(config(false));
  const Index D = 8;
  setOnes(layer, D);
  const auto x = ones(1, 40000, D);  // output 40000 x 8 floats = 1.2 MiB
  {
    LimitGuard guard(kMiB);
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>([&] { layer.forward(x, x); },
                                                    "the output [B, T, O] = [1, 40000, 8]"));
  }
  LimitGuard guard(4 * kMiB);
  EXPECT_NO_THROW(layer.forward(x, x));
}

TEST(MemoryLimit, QuadraticFormsAreRefusedButTheLowRankFormIsNot) {
  kattn::LayerConfig c = config(false);
  const Index D = 8, T = 600;  // one [600, 600] float matrix = 1.4 MiB
  const auto x = ones(1, T, D);
  kattn::Tensor<float, 3> y(1, T, D);
  LimitGuard guard(kMiB);
  {
    kattn::LayerConfig s = c;
    s.is_short_seq = true;
    kattn::KernelAttention<float, kattn::Relu> layer(s);
    setOnes(layer, D);
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
        [&] { layer.forward(x, x, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(y)); },
        "the short-sequence path's attention matrices [T, S] = [600, 600], one per thread"));
  }
  kattn::KernelAttention<float, kattn::Relu> layer(c);
  setOnes(layer, D);
  layer.setCoreForm(kattn::CoreForm::Explicit);
  EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
      [&] { layer.forward(x, x, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(y)); },
      "the explicit form's attention matrices"));
  layer.setCoreForm(kattn::CoreForm::LowRank);
  EXPECT_NO_THROW(
      layer.forward(x, x, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(y)));
}

TEST(MemoryLimit, LowRankBlocksAndTheCausalWindowAreCounted) {
  const Index D = 8;
  {
    // 65536 features: a low-rank task's block of features [256, 65536] alone is 64 MiB.
    kattn::KernelAttention<float, kattn::Relu> layer(config(false, 1 << 16));
    setOnes(layer, D);
    const auto x = ones(1, 300, D);
    LimitGuard guard(32 * kMiB);
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
        [&] { layer.forward(x, x); }, "the working buffers of 300 queries and 300 keys needs"));
  }
  {
    // A dropping window of 20000 one-token chunks: 2 heads x (320 + 20000 x 68 rows + 65536 +
    // 20000 x 320 suffix sums) floats = 59.7 MiB.
    kattn::LayerConfig c = config(true, 64);
    c.causal_window_length = 20000;
    kattn::KernelAttention<float, kattn::Relu, kattn::CausalWindowed> layer(c);
    setOnes(layer, D);
    const auto x = ones(1, 40000, D);
    LimitGuard guard(32 * kMiB);
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
        [&] { layer.forward(x, x); }, "the causal window of 20000 chunks needs 59.7 MiB"));
  }
}

TEST(MemoryLimit, StreamingStateAndItsExactWindow) {
  kattn::KernelAttention<float, kattn::Relu, kattn::CausalWindowed> layer(config(true, 64));
  const Index D = 8;
  setOnes(layer, D);
  {
    // 5000 x 2 heads x (64 x 4 + 64) floats = 12.2 MiB
    LimitGuard guard(8 * kMiB);
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
        [&] { (void)layer.makeState(5000, kattn::StreamingMode::Exact); },
        "a StreamingState of batch 5000, 2 heads, 64 features and value_dim 4 needs"));
  }
  // Exact mode keeps the window's chunks. Relu's states keep a token's rows, F + d_v = 68
  // floats per head, with one block of 64Ki floats per head being filled; the bound per head is
  // 320 (kv and z) + 68 per chunk held or added + 65536.
  auto state = layer.makeState(1, kattn::StreamingMode::Exact);
  const auto x = ones(1, 1024, D);
  auto feed = [](auto& l, auto& s, const kattn::Tensor<float, 3>& in) {
    return [lp = &l, sp = &s, ip = &in] {
      lp->forward(*ip, *ip, std::nullopt, std::nullopt, *sp);
    };
  };
  {
    LimitGuard guard(2 * kMiB);
    EXPECT_NO_THROW(feed(layer, state, x)());  // 2 heads x 135,488 floats = 1.03 MiB
    EXPECT_NO_THROW(feed(layer, state, x)());  // 205,120 x 2 floats = 1.57 MiB
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(  // 274,752 x 2 floats = 2.10 MiB
        feed(layer, state, x), "the exact streaming window of 3072 chunks needs 2.1 MiB"));
  }
  {
    // Once the window drops, the state also holds up to W suffix sums of 320 floats.
    kattn::LayerConfig c = config(true, 64);
    c.causal_window_length = 512;
    kattn::KernelAttention<float, kattn::Relu, kattn::CausalWindowed> windowed(c);
    setOnes(windowed, D);
    auto s = windowed.makeState(1, kattn::StreamingMode::Exact);
    const auto x400 = ones(1, 400, D);
    LimitGuard guard(3 * kMiB / 2);
    EXPECT_NO_THROW(feed(windowed, s, x400)());  // no drop: 93,056 x 2 floats = 0.71 MiB
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(  // 284,096 x 2 floats = 2.17 MiB
        feed(windowed, s, x400), "the exact streaming window of 512 chunks needs 2.2 MiB"));
  }
  {
    // The exp maps' states keep every chunk as a term: 64 x 4 + 64 = 320 floats per head.
    kattn::LayerConfig c = config(true, 64);
    c.feature_transform = "exp";
    kattn::KernelAttention<float, kattn::Exp, kattn::CausalWindowed> exp_layer(c);
    setOnes(exp_layer, D);
    auto s = exp_layer.makeState(1, kattn::StreamingMode::Exact);
    const auto x256 = ones(1, 256, D);
    LimitGuard guard(2 * kMiB);
    for (int i = 0; i < 3; ++i) EXPECT_NO_THROW(feed(exp_layer, s, x256)());  // 1.88 MiB last
    EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(  // 2 x (320 + 1024 x 320) floats
        feed(exp_layer, s, x256), "the exact streaming window of 1024 chunks needs 2.5 MiB"));
  }
  // The recurrent state does not grow.
  auto recurrent = layer.makeState(1, kattn::StreamingMode::Recurrent);
  LimitGuard guard(2 * kMiB);
  for (int i = 0; i < 4; ++i) EXPECT_NO_THROW(feed(layer, recurrent, x)());
}

TEST(MemoryLimit, SafetensorsTensorAndFile) {
  kattn::io::SafeTensorsWriter writer;
  kattn::Tensor<double, 2> big(512, 300);  // 1.2 MiB as double, 0.6 MiB as float
  big.setConstant(1.0);
  writer.add("big", big);
  const std::vector<std::uint8_t> bytes = writer.bytes();
  const auto file = kattn::io::SafeTensors::parse(bytes, "mem");
  LimitGuard guard(kMiB);
  EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
      [&] { (void)file.tensor<double, 2>("big"); }, "tensor 'big' of 'mem' needs 1.2 MiB"));
  const auto as_float = [&] { return file.tensor<float, 2>("big"); };
  EXPECT_NO_THROW(as_float());

  const std::string path = ::testing::TempDir() + "kattn_limits_test.safetensors";
  writer.write(path);
  EXPECT_TRUE(throwsWith<kattn::MemoryLimitError>(
      [&] { (void)kattn::io::SafeTensors::load(path); }, "safetensors file"));
  kattn::setMemoryLimit(2 * kMiB);
  EXPECT_NO_THROW((void)kattn::io::SafeTensors::load(path));
}

}  // namespace
