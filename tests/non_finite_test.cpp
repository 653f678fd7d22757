// Defined behaviour at the edges (issue 5, item 3), for every path of the layer that applies
// (kattn_test::paths): the bidirectional kernel path (both forms), the short-sequence softmax
// path, begin_kernel, the whole-sequence causal windowed pass and streaming (exact and
// recurrent). As these tests pin it down:
// - NaN or Inf in the inputs never crashes; NaN reaches the outputs that depend on it:
//   a NaN query row gives a NaN output row; a NaN key or value reaches every output that
//   attends to it (the whole batch row when bidirectional; the positions from its chunk on,
//   within the window, when causal); other batch rows are untouched. A mask does not shield
//   a NaN: masked features are multiplied by 0, and 0 * NaN = NaN (as in the reference).
//   With the exp maps the shift is a maximum over the batch row, so a NaN anywhere in a batch
//   row may reach all of that row (the reference's shift behaves the same).
// - exp / expmod features with logits up to 1e4 in float32: finite outputs, heads bounded by
//   the largest |value| (the max shifts keep exp from overflowing; exp's h(x) underflows to
//   0 there, giving zero features and zero heads).
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
using kattn_test::randomTensor;

// ---- NaN and Inf ---------------------------------------------------------------------------

/// The outputs with input `which` ("query", "key", "value") at (b = 0, position pos) set to
/// `x` in every component, and the clean outputs.
struct Poisoned {
  Tensor3 clean, dirty;
};

Poisoned poison(const Any& layer, Path path, const std::string& which, Index pos, float x,
                Index T = 8) {
  Rng r(12);
  Problem p = makeProblem(r, 2, T, T, true);
  Poisoned out;
  out.clean = run(layer, path, p);
  Tensor3& t = which == "query" ? p.query : which == "key" ? p.key : p.value;
  for (Index j = 0; j < kDim; ++j) t(0, pos, j) = x;
  out.dirty = run(layer, path, p);
  return out;
}

TEST(EdgeCases, NaNInAQueryReachesItsOutputRow) {
  for (const std::string& map : kMaps)
    for (Path path : kAllPaths) {
      if (!applicable(path, map)) continue;
      SCOPED_TRACE(map + " " + pathName(path));
      const Any layer = makeLayer(path, configFor(path, map));
      const Index pos = 3;
      const Poisoned r = poison(layer, path, "query", pos, kNaN);
      EXPECT_TRUE(rowAll(r.dirty, 0, pos, isNaN));
      for (Index t = 0; t < 8; ++t) EXPECT_TRUE(rowSameBits(r.dirty, 1, r.clean, 1, t)) << t;
      // Maps without a batch-row statistic keep the other rows of batch row 0 exact (the
      // streaming call of the NaN row excepted: a call is one block).
      const bool row_statistic = map == "exp" || map == "expmod" || map == "expplus";
      if (row_statistic) continue;
      for (Index t = 0; t < 8; ++t) {
        if (t == pos) continue;
        EXPECT_TRUE(rowSameBits(r.dirty, 0, r.clean, 0, t)) << "t=" << t;
      }
    }
}

TEST(EdgeCases, NaNInAKeyOrValueReachesTheOutputsThatAttendToIt) {
  // Causal: C = 2; W = 2 (a window shorter than the sequence: chunks leave it) and W = 100
  // (a window covering the sequence: prefix sums over groups of chunks).
  for (Index W : {2, 100})
    for (const char* which : {"key", "value"})
      for (const std::string& map : kMaps)
        for (Path path : kAllPaths) {
          if (!applicable(path, map) || (!causal(path) && W != 2)) continue;
          SCOPED_TRACE(std::string(which) + " " + map + " " + pathName(path) +
                       " W=" + std::to_string(W));
          kattn::LayerConfig c = configFor(path, map);
          if (causal(path)) c.causal_window_length = int(W);
          const Any layer = makeLayer(path, c);
          const Index pos = 4;  // chunk 2: rows 4 .. 4 + 2 W - 1 attend to it
          const Index T = 12;
          const Poisoned r = poison(layer, path, which, pos, kNaN, T);
          for (Index t = 0; t < T; ++t) {
            EXPECT_TRUE(rowSameBits(r.dirty, 1, r.clean, 1, t)) << t;
          }
          if (!causal(path)) {
            for (Index t = 0; t < T; ++t) EXPECT_TRUE(rowAll(r.dirty, 0, t, isNaN)) << "t=" << t;
            continue;
          }
          const bool row_statistic = map == "exp" || map == "expmod" || map == "expplus";
          for (Index t = 0; t < T; ++t) {
            if (t >= pos && t < pos + 2 * W) {
              EXPECT_TRUE(rowAll(r.dirty, 0, t, isNaN)) << "t=" << t;
            } else if (t < pos && !(row_statistic && std::string(which) == "key")) {
              // Causality: positions before the NaN's chunk do not see it.
              EXPECT_TRUE(rowSameBits(r.dirty, 0, r.clean, 0, t)) << "t=" << t;
            }
          }
        }
}

TEST(EdgeCases, FutureNonFiniteValueDoesNotReachEarlierRows) {
  for (const char* map : {"relu", "elu", "exp"})
    for (float x : {kNaN, kInf}) {
      SCOPED_TRACE(map);
      kattn::LayerConfig c = configFor(Path::Causal, map);
      c.causal_window_length = 100;
      const Any layer = makeLayer(Path::Causal, c);
      const Index pos = 9;
      const Poisoned r = poison(layer, Path::Causal, "value", pos, x, 12);
      for (Index t = 0; t < 8; ++t) EXPECT_TRUE(rowSameBits(r.dirty, 0, r.clean, 0, t)) << t;
      for (Index t = 8; t < 12; ++t) EXPECT_FALSE(rowAll(r.dirty, 0, t, isFinite)) << t;
    }
}

TEST(EdgeCases, InfInInputsGivesNonFiniteAffectedOutputsOnly) {
  for (const char* map : {"relu", "elu", "exp"})
    for (Path path : kAllPaths)
      for (float x : {kInf, -kInf}) {
        SCOPED_TRACE(std::string(map) + " " + pathName(path) + (x > 0 ? " +inf" : " -inf"));
        const Any layer = makeLayer(path, configFor(path, map));
        const Poisoned q = poison(layer, path, "query", 3, x);
        const Poisoned k = poison(layer, path, "key", 3, x);
        for (Index t = 0; t < 8; ++t) {
          EXPECT_TRUE(rowSameBits(q.dirty, 1, q.clean, 1, t));
          EXPECT_TRUE(rowSameBits(k.dirty, 1, k.clean, 1, t));
        }
        // What the rows of batch row 0 get is whatever IEEE arithmetic gives (Inf - Inf = NaN,
        // exp(-Inf) = 0, relu(-Inf) = 0, ...): only "never a crash, never another batch row"
        // is promised.
      }
}

TEST(EdgeCases, NaNInTheMaskReachesTheOutputsThatAttendToThatKey) {
  for (Path path : {Path::Kernel, Path::Causal, Path::Streaming}) {
    SCOPED_TRACE(pathName(path));
    const Any layer = makeLayer(path, configFor(path, "relu"));
    Rng r(13);
    Problem p = makeProblem(r, 2, 8, 8, true);
    const Tensor3 clean = run(layer, path, p);
    (*p.mask)(0, 5) = kNaN;
    const Tensor3 dirty = run(layer, path, p);
    for (Index t = 0; t < 8; ++t) {
      EXPECT_TRUE(rowSameBits(dirty, 1, clean, 1, t));
      const bool sees = !causal(path) || (t >= 4);
      if (sees) {
        EXPECT_TRUE(rowAll(dirty, 0, t, isNaN)) << t;
      } else {
        EXPECT_TRUE(rowSameBits(dirty, 0, clean, 0, t)) << t;
      }
    }
  }
}

// ---- exp with huge logits ------------------------------------------------------------------

/// Largest |logit| sqrt(s) x.P_i over the rows x [L, N d] (per head blocks of d).
double maxLogit(const Tensor4& x, const kattn::Matrix<float>& P, double s) {
  double m = 0;
  const Index d = x.dimension(3);
  for (Index b = 0; b < x.dimension(0); ++b)
    for (Index t = 0; t < x.dimension(1); ++t)
      for (Index n = 0; n < x.dimension(2); ++n)
        for (Index i = 0; i < P.rows(); ++i) {
          double z = 0;
          for (Index j = 0; j < d; ++j) z += double(x(b, t, n, j)) * P(i, j);
          m = std::max(m, std::abs(std::sqrt(s) * z));
        }
  return m;
}

TEST(EdgeCases, ExpFeaturesWithLogitsUpTo1e4StayFinite) {
  for (const char* map : {"exp", "expmod"})
    for (Path path : kAllPaths)
      for (Index T : {8, 300}) {
        SCOPED_TRACE(std::string(map) + " " + pathName(path) + " T=" + std::to_string(T));
        kattn::LayerConfig c = configFor(path, map);
        c.num_random_features = 16;
        const Any layer = makeLayer(path, c);
        const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim();
        const double s = c.resolvedScale();
        Rng r(14);
        // Heads whose logits spread over [-1e4, 1e4], differently per head and batch row
        // (so the per-block and per-head shifts differ by thousands).
        Tensor4 q = randomTensor<4>(r, 1.0f, Index(2), T, N, d);
        Tensor4 k = randomTensor<4>(r, 1.0f, Index(2), T, N, d);
        Tensor4 v = randomTensor<4>(r, 1.0f, Index(2), T, N, dv);
        for (Index b = 0; b < 2; ++b)
          for (Index t = 0; t < T; ++t)
            for (Index n = 0; n < N; ++n)
              for (Index j = 0; j < d; ++j) {
                q(b, t, n, j) *= float(1 + (t % 7) + 3 * n + 2 * b);
                k(b, t, n, j) *= float(1 + (t % 5) + 2 * n + b);
              }
        const double target = 1e4;
        const float fq = float(target / maxLogit(q, layer.projection(), s));
        const float fk = float(target / maxLogit(k, layer.projection(), s));
        q = q * fq;
        k = k * fk;
        ASSERT_GT(maxLogit(q, layer.projection(), s), 0.9 * target);
        ASSERT_GT(maxLogit(k, layer.projection(), s), 0.9 * target);
        float vmax = 0;
        for (Index i = 0; i < v.size(); ++i) vmax = std::max(vmax, std::abs(v.data()[i]));
        // Weights that pass the heads through: D = N d, the query and key kernels select the
        // head columns, so q and k reach the core as built above; the value kernel passes
        // the first min(d, d_v) columns of v. Every head a = sum_s w_s v_s has w >= 0 and
        // sum_s w_s <= 1 (positive features, normaliser + eps), so |a| <= max |v|.
        kattn::LayerConfig cf = c;
        cf.use_bias = false;
        const Index D = N * d;
        kattn::Weights<float> w;
        w.query_kernel = Tensor3(D, N, d);
        w.query_kernel.setZero();
        for (Index n = 0; n < N; ++n)
          for (Index j = 0; j < d; ++j) w.query_kernel(n * d + j, n, j) = 1.0f;
        w.key_kernel = w.query_kernel;
        w.value_kernel = Tensor3(D, N, dv);
        w.value_kernel.setZero();
        for (Index n = 0; n < N; ++n)
          for (Index j = 0; j < std::min(d, dv); ++j) w.value_kernel(n * d + j, n, j) = 1.0f;
        w.output_kernel = Tensor3(N, dv, D);
        w.output_kernel.setZero();
        for (Index n = 0; n < N; ++n)
          for (Index j = 0; j < dv; ++j) w.output_kernel(n, j, n * d + (j % d)) = 1.0f;
        if (cf.begin_kernel > 0) w.output_softmax_kernel = w.output_kernel;
        Any flat(cf);
        flat.setWeights(w);
        if (path == Path::KernelExplicit) flat.setCoreForm(kattn::CoreForm::Explicit);
        if (path == Path::KernelLowRank) flat.setCoreForm(kattn::CoreForm::LowRank);
        Problem p{Tensor3(2, T, D), Tensor3(2, T, D), Tensor3(2, T, D), {}};
        for (Index b = 0; b < 2; ++b)
          for (Index t = 0; t < T; ++t)
            for (Index n = 0; n < N; ++n)
              for (Index j = 0; j < d; ++j) {
                p.query(b, t, n * d + j) = q(b, t, n, j);
                p.key(b, t, n * d + j) = k(b, t, n, j);
                p.value(b, t, n * d + j) = j < dv ? v(b, t, n, j) : 0.0f;
              }
        flat.setProjection(layer.projection());
        const Tensor3 y = run(flat, path, p);
        // Each output is a sum of at most ceil(d_v / d) heads per column: bounded by
        // (d_v / d + 1) max |v| when the stabilisers hold.
        const float bound = vmax * float(dv / d + 1) * 1.0001f;
        for (Index i = 0; i < y.size(); ++i) {
          ASSERT_TRUE(std::isfinite(y.data()[i])) << i;
          ASSERT_LE(std::abs(y.data()[i]), bound) << i;
        }
      }
}

}  // namespace
