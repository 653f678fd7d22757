// The causal scan of sequence-parallel attention (docs/distributed.md), simulated on P ranks in
// one process: each rank's slice of whole chunks fed from a fresh exact state, the states
// scanned under kattn::combine in the Hillis-Steele order (messages as save() bytes), each
// slice fed again from its exclusive prefix. The concatenated outputs must equal the
// single-process whole pass (1e-10 relative in float64, 1e-5 in float32), and the tree scan
// must agree with a left-to-right scan (1e-12 in float64). Rank counts include non-powers of
// two, where the last round reaches only some ranks.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>

namespace {

using kattn::Index;
template <typename S>
using Layer = kattn::CausalKernelAttention<S, kattn::Relu>;
template <typename S>
using State = kattn::StreamingState<S>;
template <typename S>
using Tensor3 = kattn::Tensor<S, 3>;

constexpr Index kBatch = 2, kModelDim = 16;

struct Case {
  Index ranks, tokens_per_rank;
  int chunk, window;
  std::optional<double> decay;
};

std::string describe(const Case& c) {
  return "P = " + std::to_string(c.ranks) + ", " + std::to_string(c.tokens_per_rank) +
         " tokens per rank, C = " + std::to_string(c.chunk) + ", W = " +
         (c.window == kattn::kUnboundedWindow ? std::string("unbounded")
                                              : std::to_string(c.window)) +
         ", decay " + (c.decay ? std::to_string(*c.decay) : std::string("none"));
}

// Windows shorter than a slice (W = 2 with 3 chunks a slice: each slice's own state has
// slid), reaching over one or more ranks before, and unbounded with and without decay.
const Case kCases[] = {
    {64, 3, 1, kattn::kUnboundedWindow, std::nullopt},
    {100, 2, 2, kattn::kUnboundedWindow, 0.9},
    {100, 2, 1, 5, 0.9},
    {100, 4, 2, 3, std::nullopt},
    {64, 6, 2, 2, 0.8},
    {1, 4, 2, 3, std::nullopt},
};

/// max |a - ref| / max |ref|, in double.
template <typename A, typename B>
double relError(const Tensor3<A>& a, const Tensor3<B>& ref) {
  double err = 0, scale = 0;
  for (Index i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(double(a.data()[i]) - double(ref.data()[i])));
    scale = std::max(scale, std::abs(double(ref.data()[i])));
  }
  return err / scale;
}

/// Rows [t0, t0 + len) of x [B, T, D].
template <typename S>
Tensor3<S> rows(const Tensor3<S>& x, Index t0, Index len) {
  Tensor3<S> out(x.dimension(0), len, x.dimension(2));
  const Index D = x.dimension(2);
  for (Index b = 0; b < x.dimension(0); ++b)
    std::copy_n(x.data() + (b * x.dimension(1) + t0) * D, len * D, out.data() + b * len * D);
  return out;
}

/// Writes y [B, len, D] into rows [t0, t0 + len) of x.
template <typename S>
void putRows(Tensor3<S>& x, Index t0, const Tensor3<S>& y) {
  const Index len = y.dimension(1), D = x.dimension(2);
  for (Index b = 0; b < x.dimension(0); ++b)
    std::copy_n(y.data() + b * len * D, len * D, x.data() + (b * x.dimension(1) + t0) * D);
}

/**
 * Rank r's partial becomes the state of slices 0..r: the Hillis-Steele inclusive scan as P
 * ranks run it; in round j (distance 2^j) rank r >= 2^j receives rank r - 2^j's partial of the
 * round before, as bytes, and sets partial_r = combine(received, partial_r).
 * `received_first = false` swaps the operands (the wrong order). Returns the rounds.
 */
template <typename S>
int treeScan(std::vector<State<S>>& partial, bool received_first = true) {
  int rounds = 0;
  const Index P = Index(partial.size());
  for (Index d = 1; d < P; d *= 2, ++rounds) {
    // From the last rank down, so that rank r - d still holds its partial of the round before.
    for (Index r = P - 1; r >= d; --r) {
      const State<S> received = State<S>::fromBytes(partial[std::size_t(r - d)].toBytes());
      State<S>& own = partial[std::size_t(r)];
      own = received_first ? kattn::combine(received, own) : kattn::combine(own, received);
    }
  }
  return rounds;
}

kattn::LayerConfig config(const Case& c) {
  kattn::LayerConfig config;
  config.num_heads = 2;
  config.key_dim = 8;
  config.feature_transform = "relu";
  config.num_random_features = 0;
  config.use_causal_windowed = true;
  config.causal_chunk_length = c.chunk;
  config.causal_window_length = c.window;
  config.causal_window_decay = c.decay;
  config.bias_initializer = kattn::Initializer{"random_normal"};
  config.seed = 23;
  return config;
}

/// The float64 layer of a case, with its weights drawn; the float32 one takes them cast.
Layer<double> layer64(const Case& c) {
  Layer<double> layer(config(c));
  layer.setThreads(1);
  layer.initializeWeights(kModelDim, kModelDim);
  return layer;
}

Tensor3<double> input(const Case& c) {
  Tensor3<double> x(kBatch, c.ranks * c.tokens_per_rank, kModelDim);
  std::mt19937 gen(std::uint32_t(7 + c.ranks + 10 * (c.window % 1000)));
  std::normal_distribution<double> normal(0.0, 1.0);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  return x;
}

template <typename S>
struct Scanned {
  Tensor3<S> tree, sequential;  // the concatenated outputs [B, T, D]
  int rounds = 0;
  std::vector<Index> prefix_tokens;  // tokens of each rank's exclusive prefix (tree scan)
  Index final_tokens = 0;            // tokens of the last inclusive partial
};

template <typename S>
Scanned<S> scan(const Layer<S>& layer, const Case& c, const Tensor3<S>& x,
                bool received_first = true) {
  const Index P = c.ranks, L = c.tokens_per_rank;
  const auto fresh = [&] { return layer.makeState(kBatch, kattn::StreamingMode::Exact); };
  std::vector<State<S>> own(std::size_t(P), fresh());
  std::vector<Tensor3<S>> slices;
  for (Index r = 0; r < P; ++r) {
    slices.push_back(rows(x, r * L, L));
    layer.forward(slices.back(), slices.back(), std::nullopt, std::nullopt, own[std::size_t(r)]);
  }
  Scanned<S> out;
  std::vector<State<S>> partial = own;
  out.rounds = treeScan(partial, received_first);
  out.final_tokens = partial.back().tokens();
  out.tree = Tensor3<S>(x.dimensions());
  for (Index r = 0; r < P; ++r) {
    State<S> prefix =
        r == 0 ? fresh() : State<S>::fromBytes(partial[std::size_t(r - 1)].toBytes());
    out.prefix_tokens.push_back(prefix.tokens());
    const auto& s = slices[std::size_t(r)];
    putRows(out.tree, r * L, layer.forward(s, s, std::nullopt, std::nullopt, prefix));
  }
  out.sequential = Tensor3<S>(x.dimensions());
  State<S> running = fresh();
  for (Index r = 0; r < P; ++r) {
    State<S> prefix = running;
    const auto& s = slices[std::size_t(r)];
    putRows(out.sequential, r * L, layer.forward(s, s, std::nullopt, std::nullopt, prefix));
    running = kattn::combine(running, own[std::size_t(r)]);
  }
  return out;
}

int ceilLog2(Index P) {
  int k = 0;
  while ((Index(1) << k) < P) ++k;
  return k;
}

TEST(ScanSimulation, TreeScanGivesTheWholePassInFloat64) {
  for (const Case& c : kCases) {
    const Layer<double> layer = layer64(c);
    const Tensor3<double> x = input(c);
    const Tensor3<double> whole = layer.forward(x, x);
    const Scanned<double> s = scan(layer, c, x);
    EXPECT_EQ(s.rounds, ceilLog2(c.ranks)) << describe(c);
    EXPECT_EQ(s.final_tokens, c.ranks * c.tokens_per_rank) << describe(c);
    for (Index r = 0; r < c.ranks; ++r) {
      ASSERT_EQ(s.prefix_tokens[std::size_t(r)], r * c.tokens_per_rank) << describe(c);
    }
    EXPECT_LE(relError(s.tree, whole), 1e-10) << describe(c);
    EXPECT_LE(relError(s.sequential, whole), 1e-10) << describe(c);
    EXPECT_LE(relError(s.tree, s.sequential), 1e-12) << describe(c);
  }
}

TEST(ScanSimulation, TreeScanGivesTheWholePassInFloat32) {
  for (const Case& c : kCases) {
    const Layer<double> l64 = layer64(c);
    Layer<float> l32(config(c));
    l32.setThreads(1);
    l32.setWeights(kattn::castWeights<float>(l64.weights()));
    const Tensor3<double> x64 = input(c);
    const Tensor3<float> x32 = x64.cast<float>();
    const Tensor3<double> whole64 = l64.forward(x64, x64);
    const Tensor3<float> whole32 = l32.forward(x32, x32);
    const Scanned<float> s = scan(l32, c, x32);
    EXPECT_LE(relError(s.tree, whole32), 1e-5) << describe(c);
    EXPECT_LE(relError(s.tree, whole64), 1e-5) << describe(c);
    EXPECT_LE(relError(s.sequential, whole32), 1e-5) << describe(c);
    EXPECT_LE(relError(s.tree, s.sequential), 1e-5) << describe(c);
  }
}

// combine is not commutative once a window or a decay is involved: a scan that puts the
// received partial second gives other outputs, which the tolerances above would catch.
TEST(ScanSimulation, OperandsInTheWrongOrderAreCaught) {
  for (const Case& c : {kCases[1], kCases[2], kCases[3]}) {
    const Layer<double> layer = layer64(c);
    const Tensor3<double> x = input(c);
    const Tensor3<double> whole = layer.forward(x, x);
    EXPECT_GT(relError(scan(layer, c, x, /*received_first=*/false).tree, whole), 1e-3)
        << describe(c);
  }
}

}  // namespace
