// Defined behaviour at the edges (issue 5, item 3), for every path of the layer that applies
// (kattn_test::paths): the bidirectional kernel path (both forms), the short-sequence softmax
// path, begin_kernel, the whole-sequence causal windowed pass and streaming (exact and
// recurrent). As these tests pin it down:
// - decay 0: a chunk attends to itself only; decay 1: the same as no decay (bit for bit).
// - chunk longer than T: with left or right padding the whole sequence is one chunk
//   (bidirectional attention over it); with padding none it is an input error.
// - window longer than the number of chunks: the same as a window of exactly that many chunks
//   (bit for bit), i.e. plain causal attention over chunks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <kattn/kattn.hpp>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace {

using namespace kattn_test::paths;

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
