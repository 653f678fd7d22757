// The core API (core.hpp, key_summary.hpp, combine in streaming.hpp): the key side of
// bidirectional attention as a summary that combines, readout from a summary, and the causal
// core run piece by piece from a state in to a state out. Pieces must give the whole pass's
// heads to 1e-12 in float64 for every map but expplus (whose key features depend on the
// queries' statistics, so a piece of keys has no summary of its own).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <kattn/core.hpp>
#include <kattn/kattn.hpp>

namespace {

using kattn::Index;
template <typename S, int R>
using Tensor = kattn::Tensor<S, R>;
template <typename S, int R>
using CMap = kattn::ConstTensorMap<S, R>;
template <typename S, int R>
using Map = kattn::TensorMap<S, R>;

constexpr Index kB = 2, kN = 2, kD = 4, kDv = 3;

Tensor<double, 4> randomHeads(Index B, Index T, Index N, Index d, std::mt19937& gen, double lo,
                              double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  Tensor<double, 4> x(B, T, N, d);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = u(gen);
  return x;
}

/// Rows [t0, t0 + len) of x [B, T, ...].
template <int R>
Tensor<double, R> rows(const Tensor<double, R>& x, Index t0, Index len) {
  auto dims = x.dimensions();
  dims[1] = len;
  Tensor<double, R> out(dims);
  const Index inner = x.size() / (x.dimension(0) * x.dimension(1));
  for (Index b = 0; b < x.dimension(0); ++b)
    std::copy_n(x.data() + (b * x.dimension(1) + t0) * inner, len * inner,
                out.data() + (b * len) * inner);
  return out;
}

/// Writes y [B, len, ...] into rows [t0, t0 + len) of x.
template <int R>
void putRows(Tensor<double, R>& x, Index t0, const Tensor<double, R>& y) {
  const Index len = y.dimension(1), inner = x.size() / (x.dimension(0) * x.dimension(1));
  for (Index b = 0; b < x.dimension(0); ++b)
    std::copy_n(y.data() + b * len * inner, len * inner,
                x.data() + (b * x.dimension(1) + t0) * inner);
}

/// max |a - b| / max |b|.
template <int R>
double relError(const Tensor<double, R>& a, const Tensor<double, R>& b) {
  double err = 0, ref = 0;
  for (Index i = 0; i < b.size(); ++i) {
    err = std::max(err, std::abs(a.data()[i] - b.data()[i]));
    ref = std::max(ref, std::abs(b.data()[i]));
  }
  return err / ref;
}

kattn::LayerConfig config(int m, const char* map) {
  kattn::LayerConfig c;
  c.num_heads = int(kN);
  c.key_dim = int(kD);
  c.value_dim = int(kDv);
  c.num_random_features = m;
  c.feature_transform = map;
  c.seed = 11;
  return c;
}

/// Cut points 0 = c_0 <= ... <= c_k = T, with an empty piece among them.
std::vector<Index> cuts(Index T, Index unit, std::mt19937& gen) {
  std::vector<Index> c{0, 0};
  std::uniform_int_distribution<Index> u(0, T / unit);
  for (int i = 0; i < 3; ++i) c.push_back(u(gen) * unit);
  c.push_back(T);
  std::sort(c.begin(), c.end());
  return c;
}

/// Every map but expplus (whose key features depend on the queries' statistics).
using CoreMaps = ::testing::Types<kattn::Elu, kattn::Relu, kattn::Square, kattn::Exp,
                                  kattn::ExpMod, kattn::Identity>;

/// Inputs' lower bound for `Map`: identity features take any sign, and positive inputs keep
/// its normaliser away from zero.
template <typename Map>
constexpr double lowestInput() {
  return std::is_same_v<Map, kattn::Identity> ? 0.1 : -1.0;
}

/// Typed tests named by their map.
struct MapNames {
  template <typename T>
  static std::string GetName(int) {
    return T::name;
  }
};

// ---- bidirectional ------------------------------------------------------------------------

template <typename Map>
class BidirectionalPieces : public ::testing::Test {};
TYPED_TEST_SUITE(BidirectionalPieces, CoreMaps, MapNames);

TYPED_TEST(BidirectionalPieces, SummariesOfKeyPiecesCombineToTheWholePass) {
  using MapT = TypeParam;
  std::mt19937 gen(5);
  const double lo = lowestInput<MapT>();
  for (int m : {0, 8}) {
    kattn::KernelAttention<double, MapT> layer(config(m, MapT::name));
    layer.setThreads(2);
    const Index T = 29, S = 300;  // S spans more than one block of keys
    const auto q = randomHeads(kB, T, kN, kD, gen, lo, 1.0);
    const auto k = randomHeads(kB, S, kN, kD, gen, lo, 1.0);
    const auto v = randomHeads(kB, S, kN, kDv, gen, -1.0, 1.0);
    Tensor<double, 2> mask(kB, S);
    std::uniform_real_distribution<double> u(0, 1);
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = u(gen) < 0.2 ? 0.0 : 1.0;
    const Tensor<double, 4> whole = layer.attend(q, k, v, CMap<double, 2>(mask));

    // Keys in pieces (one of them empty), summaries combined in two associations.
    const std::vector<Index> c = cuts(S, 1, gen);
    std::vector<kattn::KeySummary<double>> parts;
    for (std::size_t i = 0; i + 1 < c.size(); ++i) {
      const Index len = c[i + 1] - c[i];
      const auto kp = rows(k, c[i], len), vp = rows(v, c[i], len);
      Tensor<double, 2> mp(kB, len);
      for (Index b = 0; b < kB; ++b)
        for (Index s = 0; s < len; ++s) mp(b, s) = mask(b, c[i] + s);
      parts.push_back(kattn::summarizeKeys(layer, CMap<double, 4>(kp), CMap<double, 4>(vp),
                                           CMap<double, 2>(mp)));
    }
    kattn::KeySummary<double> left = parts[0], right = parts.back();
    for (std::size_t i = 1; i < parts.size(); ++i) left = kattn::combine(left, parts[i]);
    for (std::size_t i = parts.size() - 1; i-- > 0;) right = kattn::combine(parts[i], right);

    for (const auto* s : {&left, &right}) {
      Tensor<double, 4> heads(kB, T, kN, kDv);
      kattn::readout(layer, CMap<double, 4>(q), *s, Map<double, 4>(heads));
      EXPECT_LE(relError(heads, whole), 1e-12) << MapT::name << " m = " << m;
    }

    // Queries in pieces too, with the whole sequence's query shift.
    const std::vector<double> shift = kattn::queryShift(layer, CMap<double, 4>(q));
    Tensor<double, 4> heads(kB, T, kN, kDv);
    const std::vector<Index> qc = cuts(T, 1, gen);
    for (std::size_t i = 0; i + 1 < qc.size(); ++i) {
      const Index len = qc[i + 1] - qc[i];
      const auto qp = rows(q, qc[i], len);
      Tensor<double, 4> hp(kB, len, kN, kDv);
      kattn::readout(layer, CMap<double, 4>(qp), left, Map<double, 4>(hp), shift);
      putRows(heads, qc[i], hp);
    }
    EXPECT_LE(relError(heads, whole), 1e-12) << MapT::name << " m = " << m << " (query pieces)";
  }
}

TEST(KeySummary, CombineIsAssociativeAndHasAnIdentity) {
  std::mt19937 gen(3);
  std::normal_distribution<double> g(0, 1);
  auto random = [&] {
    kattn::KeySummary<double> s(2, 3, 5, 4);
    for (Index b = 0; b < 2; ++b)
      for (Index n = 0; n < 3; ++n) {
        for (Index i = 0; i < s.kv(b, n).size(); ++i) s.kv(b, n).data()[i] = g(gen);
        for (Index i = 0; i < s.z(b, n).size(); ++i) s.z(b, n)(i) = g(gen);
        s.shift(b, n) = 3 * g(gen);
      }
    return s;
  };
  const auto a = random(), b = random(), c = random();
  const auto ab_c = kattn::combine(kattn::combine(a, b), c);
  const auto a_bc = kattn::combine(a, kattn::combine(b, c));
  const kattn::KeySummary<double> empty(2, 3, 5, 4);
  const auto a_empty = kattn::combine(a, empty);
  for (Index i = 0; i < 2; ++i)
    for (Index n = 0; n < 3; ++n) {
      EXPECT_EQ(ab_c.shift(i, n), a_bc.shift(i, n));
      const double scale = ab_c.kv(i, n).cwiseAbs().maxCoeff();
      EXPECT_LE((ab_c.kv(i, n) - a_bc.kv(i, n)).cwiseAbs().maxCoeff(), 1e-14 * scale);
      EXPECT_LE((ab_c.z(i, n) - a_bc.z(i, n)).cwiseAbs().maxCoeff(),
                1e-14 * ab_c.z(i, n).cwiseAbs().maxCoeff());
      EXPECT_EQ(a_empty.kv(i, n), a.kv(i, n));
      EXPECT_EQ(a_empty.shift(i, n), a.shift(i, n));
    }
}

TEST(KeySummary, BadInputsAreRefused) {
  kattn::KernelAttention<double, kattn::Relu> layer(config(0, "relu"));
  std::mt19937 gen(1);
  const auto k = randomHeads(1, 4, kN, kD, gen, -1, 1), v = randomHeads(1, 4, kN, kDv, gen, -1, 1);
  const auto bad_v = randomHeads(1, 5, kN, kDv, gen, -1, 1);
  EXPECT_THROW(kattn::summarizeKeys(layer, CMap<double, 4>(k), CMap<double, 4>(bad_v)),
               std::invalid_argument);
  const auto s = kattn::summarizeKeys(layer, CMap<double, 4>(k), CMap<double, 4>(v));
  EXPECT_THROW(kattn::combine(s, kattn::KeySummary<double>(2, kN, kD, kDv)),
               std::invalid_argument);
  Tensor<double, 4> heads(2, 4, kN, kDv);
  const auto q2 = randomHeads(2, 4, kN, kD, gen, -1, 1);
  EXPECT_THROW(kattn::readout(layer, CMap<double, 4>(q2), s, Map<double, 4>(heads)),
               std::invalid_argument);
  auto c = config(0, "relu");
  c.scale_by_length = true;
  kattn::KernelAttention<double, kattn::Relu> by_length(c);
  EXPECT_THROW(kattn::summarizeKeys(by_length, CMap<double, 4>(k), CMap<double, 4>(v)),
               std::invalid_argument);
}

// ---- causal -------------------------------------------------------------------------------

template <typename Map>
class CausalPieces : public ::testing::Test {};
TYPED_TEST_SUITE(CausalPieces, CoreMaps, MapNames);

/// Pieces of whole chunks, each fed from a fresh exact state; piece i then fed again from
/// the combine of the states of the pieces before it: the heads equal the whole pass's, and
/// the combined state equals the state of one stream fed every piece in order.
TYPED_TEST(CausalPieces, StatesOfPiecesCombineToTheWholePass) {
  using MapT = TypeParam;
  std::mt19937 gen(9);
  const double lo = lowestInput<MapT>();
  struct Shape {
    int chunk, window;
    std::optional<double> decay;
  };
  for (const Shape sh : {Shape{1, 100, std::nullopt}, Shape{3, 2, std::nullopt},
                         Shape{3, 3, 0.7}, Shape{1, 4, 0.9}}) {
    for (int m : {0, 8}) {
      auto c = config(m, MapT::name);
      c.use_causal_windowed = true;
      c.causal_chunk_length = sh.chunk;
      c.causal_window_length = sh.window;
      c.causal_window_decay = sh.decay;
      kattn::CausalKernelAttention<double, MapT> layer(c);
      const Index T = 10 * sh.chunk;
      const auto q = randomHeads(kB, T, kN, kD, gen, lo, 1.0);
      const auto k = randomHeads(kB, T, kN, kD, gen, lo, 1.0);
      const auto v = randomHeads(kB, T, kN, kDv, gen, -1.0, 1.0);
      const Tensor<double, 4> whole = layer.attend(q, k, v);
      const auto q_shift = kattn::queryShift(layer, CMap<double, 4>(q));
      const auto k_shift = kattn::queryShift(layer, CMap<double, 4>(k));
      auto fresh = [&] {
        auto s = layer.makeState(kB, kattn::StreamingMode::Exact);
        for (Index b = 0; b < kB; ++b) {
          if (kattn::feature_map_traits<MapT>::max_shifted) {
            s.fixQueryShift(b, q_shift[std::size_t(b)]);
            s.raiseKeyShift(b, k_shift[std::size_t(b)]);
          }
        }
        return s;
      };
      const std::vector<Index> pc = cuts(T, sh.chunk, gen);
      std::vector<kattn::StreamingState<double>> after;  // state of each piece alone
      auto prefix = fresh();
      Tensor<double, 4> heads(kB, T, kN, kDv);
      for (std::size_t i = 0; i + 1 < pc.size(); ++i) {
        const Index len = pc[i + 1] - pc[i];
        const auto qp = rows(q, pc[i], len), kp = rows(k, pc[i], len), vp = rows(v, pc[i], len);
        auto own = fresh();
        if (len > 0) layer.attend(qp, kp, vp, std::nullopt, own);
        // The piece's heads from the combined state of the pieces before it.
        auto in = prefix;
        if (len > 0) putRows(heads, pc[i], layer.attend(qp, kp, vp, std::nullopt, in));
        prefix = kattn::combine(prefix, own);
        EXPECT_EQ(prefix.tokens(), pc[i + 1]);
      }
      EXPECT_LE(relError(heads, whole), 1e-12)
          << MapT::name << " m = " << m << " C = " << sh.chunk << " W = " << sh.window;
      // The scan's result is the state of the whole stream: the next chunk reads the same.
      auto stream = fresh();
      layer.attend(q, k, v, std::nullopt, stream);
      const auto qn = randomHeads(kB, sh.chunk, kN, kD, gen, lo, 1.0);
      const auto kn = randomHeads(kB, sh.chunk, kN, kD, gen, lo, 1.0);
      const auto vn = randomHeads(kB, sh.chunk, kN, kDv, gen, -1.0, 1.0);
      const auto from_scan = layer.attend(qn, kn, vn, std::nullopt, prefix);
      const auto from_stream = layer.attend(qn, kn, vn, std::nullopt, stream);
      EXPECT_LE(relError(from_scan, from_stream), 1e-12) << MapT::name << " next chunk";
    }
  }
}

TEST(CausalCombine, IsAssociative) {
  auto c = config(0, "elu");
  c.use_causal_windowed = true;
  c.causal_chunk_length = 2;
  c.causal_window_length = 3;
  c.causal_window_decay = 0.8;
  kattn::CausalKernelAttention<double, kattn::Elu> layer(c);
  std::mt19937 gen(4);
  std::vector<kattn::StreamingState<double>> s;
  for (Index len : {4, 2, 6}) {
    s.push_back(layer.makeState(kB, kattn::StreamingMode::Exact));
    layer.attend(randomHeads(kB, len, kN, kD, gen, -1, 1), randomHeads(kB, len, kN, kD, gen, -1, 1),
                 randomHeads(kB, len, kN, kDv, gen, -1, 1), std::nullopt, s.back());
  }
  auto ab_c = kattn::combine(kattn::combine(s[0], s[1]), s[2]);
  auto a_bc = kattn::combine(s[0], kattn::combine(s[1], s[2]));
  EXPECT_EQ(ab_c.tokens(), 12);
  EXPECT_EQ(a_bc.tokens(), 12);
  const auto q = randomHeads(kB, 2, kN, kD, gen, -1, 1), k = randomHeads(kB, 2, kN, kD, gen, -1, 1);
  const auto v = randomHeads(kB, 2, kN, kDv, gen, -1, 1);
  EXPECT_LE(relError(layer.attend(q, k, v, std::nullopt, ab_c),
                     layer.attend(q, k, v, std::nullopt, a_bc)),
            1e-13);
}

/// A later piece that ends inside a chunk (right padding) combines: the result is the state of
/// one stream fed both, finished as that stream is; a finished earlier piece is refused.
TEST(CausalCombine, ALaterPieceThatEndsInsideAChunk) {
  for (int window : {2, kattn::kUnboundedWindow}) {
    auto c = config(0, "elu");
    c.use_causal_windowed = true;
    c.causal_chunk_length = 3;
    c.causal_window_length = window;
    c.causal_padding = "right";
    kattn::CausalKernelAttention<double, kattn::Elu> layer(c);
    std::mt19937 gen(8);
    const Index T = 10;  // 6 rows, then 4 that end inside a chunk
    const auto q = randomHeads(kB, T, kN, kD, gen, -1, 1), k = randomHeads(kB, T, kN, kD, gen, -1, 1);
    const auto v = randomHeads(kB, T, kN, kDv, gen, -1, 1);
    auto whole = layer.makeState(kB, kattn::StreamingMode::Exact);
    layer.attend(q, k, v, std::nullopt, whole);
    auto a = layer.makeState(kB, kattn::StreamingMode::Exact);
    auto b = layer.makeState(kB, kattn::StreamingMode::Exact);
    layer.attend(rows(q, 0, 6), rows(k, 0, 6), rows(v, 0, 6), std::nullopt, a);
    layer.attend(rows(q, 6, 4), rows(k, 6, 4), rows(v, 6, 4), std::nullopt, b);
    const auto ab = kattn::combine(a, b);
    EXPECT_TRUE(ab.finished());
    EXPECT_EQ(ab.tokens(), T);
    EXPECT_LE(relError(ab.kv(), whole.kv()), 1e-13) << "W = " << window;
    EXPECT_LE(relError(ab.kSum(), whole.kSum()), 1e-13) << "W = " << window;
    EXPECT_THROW(kattn::combine(b, a), std::invalid_argument);
  }
}

TEST(CausalCombine, BadStatesAreRefused) {
  auto c = config(0, "relu");
  c.use_causal_windowed = true;
  c.causal_window_decay = 0.5;
  kattn::CausalKernelAttention<double, kattn::Relu> layer(c);
  const auto exact = layer.makeState(1, kattn::StreamingMode::Exact);
  const auto recurrent = layer.makeState(1, kattn::StreamingMode::Recurrent);
  EXPECT_THROW(kattn::combine(exact, recurrent), std::invalid_argument);
  EXPECT_THROW(kattn::combine(recurrent, recurrent), std::invalid_argument);  // decay
  EXPECT_THROW(kattn::combine(exact, layer.makeState(2, kattn::StreamingMode::Exact)),
               std::invalid_argument);
}

}  // namespace
