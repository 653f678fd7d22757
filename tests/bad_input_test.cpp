// Input errors of the causal layer and of streaming: whole-pass shapes, states of another
// layer, batch or mode, a right-padded stream after its partial chunk, and state bytes that are
// truncated, garbage or crafted to allocate without bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

#include <kattn/kattn.hpp>

#include "test_support.hpp"

namespace {

using namespace kattn_test;

// ---- the layer's inputs and states ------------------------------------------------------------

TEST(CausalErrors, WholePassShapes) {
  const Problem p = smallCausal();
  const EluCausal layer = kattn_test::makeLayer<EluCausal>(p);
  ASSERT_NO_THROW(kattn_test::runLayer(layer, p));
  Problem q = p;
  q.query = rows(p.query, 0, 5);
  q.value = rows(p.value, 0, 5);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { kattn_test::runLayer(layer, q); },
                                                "causal_chunk_length"))
      << "T = 5 with C = 2 and padding none";
  q = p;
  q.value = rows(p.value, 0, 4);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { kattn_test::runLayer(layer, q); }, "S = 4"))
      << "S != T";
  q = p;
  q.cfg.scale_by_length = true;
  const EluCausal by_length = kattn_test::makeLayer<EluCausal>(q);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { kattn_test::runLayer(by_length, q); },
                                                "scale_by_length"));
}

TEST(CausalErrors, StreamingStateMismatches) {
  const Problem p = smallCausal(2, 3, 0.5);
  const EluCausal layer = kattn_test::makeLayer<EluCausal>(p);
  {
    auto ok = layer.makeState(2);
    ASSERT_NO_THROW(stream(layer, p, {2, 4}, ok));
  }
  auto wrong_batch = layer.makeState(3);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(layer, p, {2}, wrong_batch); }, "state"));
  for (const Problem& other : {smallCausal(1, 3, 0.5), smallCausal(2, 4, 0.5), smallCausal(2, 3, 0.6),
                               smallCausal(2, 3, std::nullopt)}) {
    const EluCausal other_layer = kattn_test::makeLayer<EluCausal>(other);
    for (auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
      auto foreign = other_layer.makeState(2, mode);
      EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(layer, p, {2}, foreign); },
                                                    "another layer"))
          << other.describe();
    }
  }
  // A state of other sizes (heads / features / value dim).
  Problem sizes = p;
  sizes.cfg.num_random_features = 5;
  auto other_features = kattn_test::makeLayer<EluCausal>(sizes).makeState(2);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(layer, p, {2}, other_features); }, "state"));

  // Exact mode needs whole chunks (C = 2).
  auto exact = layer.makeState(2, kattn::StreamingMode::Exact);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(layer, p, {3}, exact); },
                                                "causal_chunk_length"));
  auto recurrent = layer.makeState(2, kattn::StreamingMode::Recurrent);
  EXPECT_NO_THROW(stream(layer, p, {3, 1, 2}, recurrent)) << "recurrent calls are any length";

  // scale_by_length has no streaming definition.
  Problem q = p;
  q.cfg.scale_by_length = true;
  q.mask = Tensor2(2, 6);
  q.mask->setConstant(1.0);
  const EluCausal by_length = kattn_test::makeLayer<EluCausal>(q);
  ASSERT_NO_THROW(kattn_test::runLayer(by_length, q));
  auto st = by_length.makeState(2);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(by_length, q, {2}, st); },
                                                "scale_by_length"));
}

TEST(CausalErrors, RightPaddedStreamFinishesAfterAPartialChunk) {
  Problem p = smallCausal(4, 3);
  p.cfg.causal_padding = "right";
  const EluCausal layer = kattn_test::makeLayer<EluCausal>(p);
  auto st = layer.makeState(2, kattn::StreamingMode::Exact);
  const auto streamed = stream(layer, p, {4, 2}, st);  // the second call ends inside a chunk
  EXPECT_LE(kattn_ref::relativeError(streamed, kattn_test::runLayer(layer, p)), 1e-10);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { stream(layer, p, {4}, st); }, "reset"));
  st.reset();
  EXPECT_EQ(st.tokens(), 0);
  EXPECT_NO_THROW(stream(layer, p, {4}, st));
}

// ---- state bytes ---------------------------------------------------------------------------------

TEST(StreamingBytes, TruncatedOrGarbageBytesThrowRuntimeError) {
  using State = kattn::StreamingState<double>;
  const Problem p = smallCausal(2, 2);
  const EluCausal layer = kattn_test::makeLayer<EluCausal>(p);
  for (auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
    auto st = layer.makeState(2, mode);
    stream(layer, p, {2, 2}, st);  // exact: a full window (ExactStateWithDroppedChunks...)
    const std::string bytes = st.toBytes();
    ASSERT_NO_THROW(State::fromBytes(bytes));
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      EXPECT_THROW(State::fromBytes(bytes.substr(0, n)), std::runtime_error) << "first " << n << " bytes";
    }
    // Another scalar type.
    EXPECT_THROW(kattn::StreamingState<float>::fromBytes(bytes), std::runtime_error);
    // Garbage: random bytes, and the valid bytes with random bytes overwritten.
    Rng r(1);
    for (int i = 0; i < 200; ++i) {
      std::string g(std::size_t(r.intIn(0, 300)), '\0');
      for (char& c : g) c = char(r.intIn(0, 255));
      EXPECT_THROW(State::fromBytes(g), std::runtime_error);
    }
    for (int i = 0; i < 400; ++i) {
      std::string g = bytes;
      const Index flips = r.intIn(1, 4);
      for (Index f = 0; f < flips; ++f) g[std::size_t(r.intIn(0, Index(g.size()) - 1))] = char(r.intIn(0, 255));
      try {
        const State s = State::fromBytes(g);  // may be valid: then it must be usable
        (void)s.toBytes();
      } catch (const std::runtime_error&) {
      } catch (const std::exception& e) {
        ADD_FAILURE() << "fromBytes threw " << typeid(e).name() << ": " << e.what();
      }
    }
  }
}

/// A crafted header: a huge window and ring length in an otherwise valid exact-mode state.
TEST(StreamingBytes, HugeRingCountInAStateIsRejectedWithoutAllocating) {
  using State = kattn::StreamingState<double>;
  const Problem p = smallCausal(2, 2);
  const EluCausal layer = kattn_test::makeLayer<EluCausal>(p);
  auto st = layer.makeState(2, kattn::StreamingMode::Exact);
  stream(layer, p, {2}, st);
  std::string bytes = st.toBytes();
  // Layout (streaming.hpp): magic[8], sizeof(Scalar), B, N, F, V, mode, chunk, window, tokens,
  // finished (int64 each), gamma (double), key shifts (B doubles), then per head kv, z, z's
  // compensation and the ring count (int64).
  const std::size_t window_at = 8 + 8 * 7;
  const std::int64_t huge_window = std::int64_t(1) << 40;
  std::memcpy(&bytes[window_at], &huge_window, 8);
  const std::size_t B = 2, F = 4, V = 2;
  const std::size_t ring_at = 8 + 8 * 10 + 8 + 8 * B + 8 * (F * V + 2 * F);
  std::int64_t ring = 0;
  std::memcpy(&ring, &bytes[ring_at], 8);
  ASSERT_EQ(ring, 1) << "layout assumption: one chunk in the ring";
  const std::int64_t huge_ring = std::int64_t(1) << 39;
  std::memcpy(&bytes[ring_at], &huge_ring, 8);
  EXPECT_THROW(State::fromBytes(bytes), std::runtime_error);
}

// ---- what the messages say --------------------------------------------------------------------

kattn::Tensor<float, 3> filled(Index B, Index T, Index D) {
  kattn::Tensor<float, 3> x(B, T, D);
  x.setConstant(0.5f);
  return x;
}

TEST(ErrorMessages, SayWhatIsWrongInPlainWords) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.feature_transform = "relu";
  c.use_causal_windowed = true;
  c.causal_chunk_length = 2;
  kattn::CausalKernelAttention<float, kattn::Relu> layer(c);
  const kattn::Tensor<float, 3> x1 = filled(2, 1, 8), x2 = filled(2, 2, 8);
  layer.forward(x2, x2);  // draws the weights for width 8
  auto exact = layer.makeState(2, kattn::StreamingMode::Exact);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { layer.forward(x1, x1, std::nullopt, std::nullopt, exact); }, "a call of 1 token is"));
  auto three = layer.makeState(3, kattn::StreamingMode::Exact);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { layer.forward(x2, x2, std::nullopt, std::nullopt, three); },
      "state: made for a batch of 3 rows, but the call has 2"));
  const kattn::Tensor<float, 3> narrow = filled(2, 2, 6);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { layer.forward(narrow, narrow); },
      "query: the layer was built for query width 8 on its first call"));

  kattn::LayerConfig d;
  d.dropout = 1.5;
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { d.validate(); }, "got 1.5"));
  kattn::LayerConfig s;
  s.num_heads = 1;
  s.key_dim = 4;
  s.feature_transform = "relu";
  s.scale_by_length = true;
  kattn::KernelAttention<float, kattn::Relu> by_length(s);
  kattn::Tensor<float, 2> half(1, 2);
  half.setConstant(0.25f);
  const kattn::Tensor<float, 3> x = filled(1, 2, 8);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { by_length.forward(x, x, std::nullopt, kattn::ConstTensorMap<float, 2>(half)); },
      "row 0 sums to 0.5"));
}

}  // namespace
