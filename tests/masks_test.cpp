// Defined behaviour at the edges (issue 5, item 3), for every path of the layer that applies
// (kattn_test::paths): the bidirectional kernel path (both forms), the short-sequence softmax
// path, begin_kernel, the whole-sequence causal windowed pass and streaming (exact and
// recurrent). As these tests pin it down:
// - Every key of a batch row masked: zero heads, so that row's outputs equal the output bias;
//   the other batch rows are computed as if alone.
// - Mask values other than 0 and 1 multiply the key features (SPEC: phi(k) *= mask). In the
//   kernel paths a key with mask w counts w times: mask 2 on a key equals that key given
//   twice, and mask 2 on every key equals no mask up to the eps of the normaliser,
//   a_t = q'(2 KV) / (q'(2 z) + eps). In the short path the mask scales the scores q'.k' of
//   the keys with mask != 0 (a softmax temperature per key); mask 0 excludes a key.
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

// ---- masks -----------------------------------------------------------------------------------

TEST(EdgeCases, AllKeysMaskedGiveTheOutputBiasAndLeaveOtherRowsAlone) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const kattn::LayerConfig c = configFor(path, map);
      const Any layer = makeLayer(path, c);
      Rng r(8);
      Problem p = makeProblem(r, 2, 6, 6, true);
      for (Index s = 0; s < 6; ++s) (*p.mask)(0, s) = 0.0f;
      const Tensor3 y = run(layer, path, p);
      for (Index t = 0; t < 6; ++t)
        expectBiasRow(y, 0, t, layer.weights(), c.begin_kernel, "masked");
      // Batch row 1 as if alone. expplus couples the batch rows through its key stabiliser
      // (the largest logit over the whole key tensor, as in the reference), which moves the
      // result by rounding only.
      const Tensor3 alone = run(layer, path, sliceProblemBatch(p, 1, 1));
      if (map == "expplus") {
        EXPECT_LT(relDiff(sliceBatch(y, 1, 1), alone), 1e-5);
      } else {
        for (Index t = 0; t < 6; ++t) EXPECT_TRUE(rowSameBits(y, 1, alone, 0, t)) << "t=" << t;
      }
    }
}

TEST(EdgeCases, MaskTwoOnEveryKeyScalesKVAndZ) {
  // Kernel paths: a_t = q'(2 KV) / (q'(2 z) + eps), checked against the float64 formula.
  for (Path path : {Path::KernelExplicit, Path::KernelLowRank, Path::Causal, Path::Streaming}) {
    SCOPED_TRACE(pathName(path));
    const kattn::LayerConfig c = configFor(path, "relu");
    const Any layer = makeLayer(path, c);
    Rng r(9);
    Problem p = makeProblem(r, 2, 8, 8, false);
    p.mask = Tensor2(2, 8);
    p.mask->setConstant(2.0f);
    const auto ref =
        referenceRelu(c, layer.weights(), layer.projection(), p,
                      causal(path) ? c.causal_chunk_length : 0, c.causal_window_length, 1.0);
    EXPECT_LT(relDiff(run(layer, path, p), ref), 2e-5);
  }
  // So on inputs where q'z >> eps, mask 2 everywhere is no mask.
  for (const char* map : {"elu", "exp", "expmod"})
    for (Path path : {Path::KernelExplicit, Path::KernelLowRank, Path::Causal, Path::Streaming}) {
      SCOPED_TRACE(std::string(map) + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(9);
      Problem p = makeProblem(r, 2, 8, 8, false, 0.3f);
      const Tensor3 plain = run(layer, path, p);
      p.mask = Tensor2(2, 8);
      p.mask->setConstant(2.0f);
      EXPECT_LT(relDiff(run(layer, path, p), plain), 1e-4);
    }
}

TEST(EdgeCases, MaskTwoOnAKeyCountsItTwiceInTheKernelPath) {
  for (const char* map : {"elu", "relu", "exp", "expmod"})
    for (Path path : {Path::KernelExplicit, Path::KernelLowRank}) {
      SCOPED_TRACE(std::string(map) + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      Rng r(10);
      Problem p = makeProblem(r, 2, 5, 4, false, 0.3f);
      p.mask = Tensor2(2, 4);
      p.mask->setConstant(1.0f);
      (*p.mask)(0, 2) = 2.0f;
      (*p.mask)(1, 0) = 2.0f;
      // The same keys with the weighted ones given twice (S = 5, mask 1).
      Problem dup = p;
      dup.mask.reset();
      dup.value = Tensor3(2, 5, kDim);
      dup.key = Tensor3(2, 5, kDim);
      for (Index b = 0; b < 2; ++b) {
        const Index twice = b == 0 ? 2 : 0;
        Index s2 = 0;
        for (Index s = 0; s < 4; ++s)
          for (int rep = 0; rep < (s == twice ? 2 : 1); ++rep, ++s2)
            for (Index j = 0; j < kDim; ++j) {
              dup.value(b, s2, j) = p.value(b, s, j);
              dup.key(b, s2, j) = p.key(b, s, j);
            }
      }
      EXPECT_LT(relDiff(run(layer, path, p), run(layer, path, dup)), 1e-5);
    }
}

TEST(EdgeCases, MaskScalesTheScoresInTheShortPath) {
  // identity features without a projection: q' = s q, k' = k, so mask 2 on every key gives
  // the scores (s q).(2 k) = (2 s q).k, i.e. the layer with scale 2 s, bit for bit.
  kattn::LayerConfig c = configFor(Path::Short, "identity");
  c.num_random_features = 0;
  c.scale = 0.375;
  const Any layer = makeLayer(Path::Short, c);
  c.scale = 0.75;
  const Any doubled = makeLayer(Path::Short, c);
  Rng r(11);
  Problem p = makeProblem(r, 2, 5, 7, false);
  const Tensor3 expected = run(doubled, Path::Short, p);
  p.mask = Tensor2(2, 7);
  p.mask->setConstant(2.0f);
  const Tensor3 y = run(layer, Path::Short, p);
  for (Index i = 0; i < y.size(); ++i) ASSERT_TRUE(sameBits(y.data()[i], expected.data()[i])) << i;
}

}  // namespace
