// Defined behaviour at the edges (issue 5, item 3), for every path of the layer that applies
// (kattn_test::paths): the bidirectional kernel path (both forms), the short-sequence softmax
// path, begin_kernel, the whole-sequence causal windowed pass and streaming (exact and
// recurrent). As these tests pin it down:
// - T = 0: an empty output [B, 0, O]; a streaming call of 0 tokens leaves the state as it was.
// - S = 0 (bidirectional): no keys, so every head is 0 (the kernel paths give 0 / (0 + eps),
//   the short path has nothing to average) and every output row equals the output bias
//   (the softmax part's bias for the rows t < begin_kernel). scale_by_length with S = 0 is
//   an input error (the mask row sums to 0 < 1).
// - B = 0: an empty output [0, T, O].
// - One head, m = 1: ordinary sizes (checked against a float64 reference).
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

// ---- T = 0, S = 0, B = 0 ---------------------------------------------------------------------

TEST(EdgeCases, ZeroLengthQueriesGiveAnEmptyOutput) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(1);
      const Problem p = makeProblem(r, 2, 0, causal(path) ? 0 : 5, true);
      const Tensor3 y = run(layer, path, p);
      EXPECT_EQ(y.dimension(0), 2);
      EXPECT_EQ(y.dimension(1), 0);
      EXPECT_EQ(y.dimension(2), kDim);
    }
}

TEST(EdgeCases, StreamingCallOfZeroTokensChangesNothing) {
  for (const char* map : {"relu", "exp"})
    for (std::optional<double> decay : {std::optional<double>(), std::optional<double>(0.9)}) {
      kattn::LayerConfig c = configFor(Path::Streaming, map);
      c.causal_window_decay = decay;
      const Any layer = makeLayer(Path::Streaming, c);
      Rng r(2);
      const Problem p = makeProblem(r, 2, 6, 6, true);
      const Problem empty = makeProblem(r, 2, 0, 0, true);
      auto plain = layer.makeState(2), with_empty = layer.makeState(2);
      for (Index r0 = 0; r0 < 6; r0 += 2) {
        const Problem c2 = sliceProblemRows(p, r0, 2);
        const Tensor3 e = layer.forward(view(empty.query), view(empty.value), view(empty.key),
                                        empty.maskView(), with_empty);
        EXPECT_EQ(e.dimension(1), 0);
        EXPECT_EQ(with_empty.tokens(), plain.tokens());
        const Tensor3 a =
            layer.forward(view(c2.query), view(c2.value), view(c2.key), c2.maskView(), plain);
        const Tensor3 b =
            layer.forward(view(c2.query), view(c2.value), view(c2.key), c2.maskView(), with_empty);
        for (Index i = 0; i < a.size(); ++i) ASSERT_TRUE(sameBits(a.data()[i], b.data()[i]));
      }
      EXPECT_EQ(with_empty.toBytes(), plain.toBytes());
    }
}

TEST(EdgeCases, ZeroKeysGiveTheOutputBias) {
  for (const std::string& map : kMaps)
    for (Path path : {Path::Kernel, Path::KernelExplicit, Path::KernelLowRank, Path::Short,
                      Path::BeginKernel}) {
      SCOPED_TRACE(map + " " + pathName(path));
      const kattn::LayerConfig c = configFor(path, map);
      const Any layer = makeLayer(path, c);
      Rng r(3);
      for (bool with_mask : {false, true}) {
        const Problem p = makeProblem(r, 2, 5, 0, with_mask);
        const Tensor3 y = run(layer, path, p);
        ASSERT_EQ(y.dimension(1), 5);
        for (Index b = 0; b < 2; ++b)
          for (Index t = 0; t < 5; ++t)
            expectBiasRow(y, b, t, layer.weights(), c.begin_kernel, "S = 0");
      }
    }
}

TEST(EdgeCases, ZeroKeysWithScaleByLengthIsAnInputError) {
  kattn::LayerConfig c = configFor(Path::Kernel, "relu");
  c.scale_by_length = true;
  const Any layer = makeLayer(Path::Kernel, c);
  Rng r(4);
  const Problem p = makeProblem(r, 2, 5, 0, true);
  EXPECT_THROW(run(layer, Path::Kernel, p), std::invalid_argument);
}

TEST(EdgeCases, ZeroBatchGivesAnEmptyOutput) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(5);
      for (Index T : {0, 4}) {
        const Problem p = makeProblem(r, 0, T, causal(path) ? T : 3, true);
        const Tensor3 y = run(layer, path, p);
        EXPECT_EQ(y.dimension(0), 0);
        EXPECT_EQ(y.dimension(1), T);
        EXPECT_EQ(y.dimension(2), kDim);
      }
    }
}

// ---- one head, one random feature -------------------------------------------------------------

TEST(EdgeCases, OneHeadOneRandomFeature) {
  for (Path path : {Path::KernelExplicit, Path::KernelLowRank, Path::Causal, Path::Streaming}) {
    SCOPED_TRACE(pathName(path));
    kattn::LayerConfig c = configFor(path, "relu");
    c.num_heads = 1;
    c.num_random_features = 1;
    if (causal(path)) c.causal_window_length = 3;
    const Any layer = makeLayer(path, c);
    ASSERT_EQ(layer.projection().rows(), 1);
    Rng r(6);
    const Problem p = makeProblem(r, 2, 8, causal(path) ? 8 : 9, true);
    const Tensor3 y = run(layer, path, p);
    const auto ref =
        referenceRelu(c, layer.weights(), layer.projection(), p, causal(path) ? 2 : 0, 3, 1.0);
    EXPECT_LT(relDiff(y, ref), 2e-5);
  }
  // Every feature map with N = 1 and m = 1 (and without a projection) runs and is finite.
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      for (int m : {1, 0}) {
        SCOPED_TRACE(map + " " + pathName(path) + " m=" + std::to_string(m));
        kattn::LayerConfig c = configFor(path, map);
        c.num_heads = 1;
        c.key_dim = 1;
        c.value_dim = 1;
        c.num_random_features = m;
        const Any layer = makeLayer(path, c);
        Rng r(7);
        const Problem p = makeProblem(r, 2, 6, causal(path) ? 6 : 4, true);
        const Tensor3 y = run(layer, path, p);
        // identity features of any sign can make the normaliser vanish: finiteness is not
        // promised there.
        if (map == "identity") continue;
        for (Index i = 0; i < y.size(); ++i) ASSERT_TRUE(std::isfinite(y.data()[i]));
      }
    }
}

}  // namespace
