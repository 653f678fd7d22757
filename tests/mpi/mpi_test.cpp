// Sequence-parallel attention over MPI (kattn/mpi.hpp), run by ctest under mpirun with 1 to 4
// ranks. Every rank draws the same problem (same seeds), runs the single-process forward on
// the whole sequences, passes its slice to SequenceParallel and compares its rows of the
// output. Slices are drawn at random, empty ones and cuts inside chunks included.

#include <mpi.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>
#include <kattn/mpi.hpp>

namespace {

using kattn::Index;
template <typename S, int R>
using Tensor = kattn::Tensor<S, R>;

int worldRank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int worldSize() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

template <typename S, int R>
Tensor<S, R> randomTensor(std::mt19937& g, const std::array<Index, R>& dims, double lo,
                          double hi) {
  Tensor<S, R> t(dims);
  std::uniform_real_distribution<double> u(lo, hi);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = S(u(g));
  return t;
}

/// Rows [t0, t0 + n) of the middle dimension.
template <typename S>
Tensor<S, 3> rowsOf(const Tensor<S, 3>& t, Index t0, Index n) {
  Tensor<S, 3> out(t.dimension(0), n, t.dimension(2));
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index i = 0; i < n; ++i)
      for (Index c = 0; c < t.dimension(2); ++c) out(b, i, c) = t(b, t0 + i, c);
  return out;
}
template <typename S>
Tensor<S, 2> colsOf(const Tensor<S, 2>& t, Index t0, Index n) {
  Tensor<S, 2> out(t.dimension(0), n);
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index i = 0; i < n; ++i) out(b, i) = t(b, t0 + i);
  return out;
}

/// Slice offsets of T rows over P ranks: random cuts, so slices of length 0 and cuts inside
/// chunks occur. Every rank draws the same from the same generator.
std::vector<Index> randomCuts(std::mt19937& g, Index T, int P) {
  std::vector<Index> cuts{0, T};
  std::uniform_int_distribution<Index> u(0, T);
  for (int r = 1; r < P; ++r) cuts.push_back(u(g));
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

/// Weights of a layer of input and output size D. With `positive` (the identity map's
/// features are the heads themselves) positive inputs give positive heads, whose normaliser
/// q'z cannot cancel: a cancelling normaliser would measure float32's conditioning, not kattn.
template <typename S>
kattn::Weights<S> randomWeights(std::mt19937& g, const kattn::LayerConfig& c, Index D,
                                bool positive) {
  const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim();
  const double a = 1.0 / std::sqrt(double(D)), lo = positive ? 0.0 : -a;
  kattn::Weights<S> w;
  w.query_kernel = randomTensor<S, 3>(g, {D, N, d}, lo, a);
  w.key_kernel = randomTensor<S, 3>(g, {D, N, d}, lo, a);
  w.value_kernel = randomTensor<S, 3>(g, {D, N, dv}, -a, a);
  w.output_kernel = randomTensor<S, 3>(g, {N, dv, D}, -a, a);
  w.query_bias = randomTensor<S, 2>(g, {N, d}, positive ? 0.0 : -0.1, 0.1);
  w.key_bias = randomTensor<S, 2>(g, {N, d}, positive ? 0.0 : -0.1, 0.1);
  w.value_bias = randomTensor<S, 2>(g, {N, dv}, -0.1, 0.1);
  w.output_bias = randomTensor<S, 1>(g, {D}, -0.1, 0.1);
  return w;
}

/// max-abs error of `got` over the max-abs of the whole reference `full`.
template <typename S>
double relError(const Tensor<S, 3>& got, const Tensor<S, 3>& want, const Tensor<S, 3>& full) {
  double err = 0, ref = 0;
  for (Index i = 0; i < got.size(); ++i)
    err = std::max(err, std::abs(double(got.data()[i]) - double(want.data()[i])));
  for (Index i = 0; i < full.size(); ++i) ref = std::max(ref, std::abs(double(full.data()[i])));
  return err / ref;
}

struct Case {
  std::string map;
  int m = 0;                      // random features
  bool causal = false;
  int chunk = 1, window = 3;
  std::optional<double> decay;
  std::string padding = "none";
  bool mask = false, key = false, scale_by_length = false;
  Index T = 24, S = 24;           // S: bidirectional keys
};

std::string describe(const Case& c) {
  std::string s = c.map + " m=" + std::to_string(c.m);
  if (c.causal) {
    s += " causal C=" + std::to_string(c.chunk) + " W=" +
         (c.window >= kattn::kUnboundedWindow ? std::string("inf") : std::to_string(c.window)) +
         (c.decay ? " decay" : "") + " padding=" + c.padding;
  }
  return s + (c.mask ? " mask" : "") + (c.key ? " key" : "") +
         (c.scale_by_length ? " scale_by_length" : "") + " T=" + std::to_string(c.T);
}

/// `cuts`: the slice offsets for 4 ranks (fewer ranks take the first and the last ones);
/// absent: random.
template <typename Sc, typename Map, typename Masking>
void runCase(const Case& k, std::uint32_t seed, double tol, std::vector<Index> cuts = {}) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.value_dim = 3;
  c.feature_transform = k.map;
  c.num_random_features = k.m;
  c.seed = 3;
  c.scale_by_length = k.scale_by_length;
  c.use_causal_windowed = k.causal;
  c.causal_chunk_length = k.chunk;
  c.causal_window_length = k.window;
  c.causal_window_decay = k.decay;
  c.causal_padding = k.padding;
  const Index B = 2, D = 5, T = k.T, S = k.causal ? k.T : k.S;
  std::mt19937 g(seed);
  kattn::KernelAttention<Sc, Map, Masking> layer(c);
  const bool linear = k.map == "identity" || (k.map == "expplus" && k.m == 0);
  layer.setWeights(randomWeights<Sc>(g, c, D, linear));
  const double lo = linear ? 0.1 : -1.0;
  const auto q = randomTensor<Sc, 3>(g, {B, T, D}, lo, 1.0);
  const auto v = randomTensor<Sc, 3>(g, {B, S, D}, lo, 1.0);
  const auto kk = randomTensor<Sc, 3>(g, {B, S, D}, lo, 1.0);
  Tensor<Sc, 2> mask(B, S);
  std::uniform_real_distribution<double> u(0, 1);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = u(g) < 0.25 ? Sc(0) : Sc(1);
  for (Index b = 0; b < B; ++b) mask(b, 0) = 1;  // scale_by_length needs a sum >= 1
  std::optional<Tensor<Sc, 3>> key;
  if (k.key) key = kk;
  std::optional<Tensor<Sc, 2>> m;
  if (k.mask) m = mask;
  const Tensor<Sc, 3> full = layer.forward(q, v, key, m);

  const int P = worldSize(), r = worldRank();
  std::vector<Index> qc = randomCuts(g, T, P);
  if (!cuts.empty()) {
    qc.assign(cuts.begin(), cuts.begin() + P);
    qc.push_back(T);
  }
  const auto kc = k.causal ? qc : randomCuts(g, S, P);
  const Index t0 = qc[std::size_t(r)], tn = qc[std::size_t(r) + 1] - t0;
  const Index s0 = kc[std::size_t(r)], sn = kc[std::size_t(r) + 1] - s0;
  std::optional<Tensor<Sc, 3>> key_r;
  if (k.key) key_r = rowsOf(kk, s0, sn);
  std::optional<Tensor<Sc, 2>> m_r;
  if (k.mask) m_r = colsOf(mask, s0, sn);
  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
  const Tensor<Sc, 3> y = sp.forward(rowsOf(q, t0, tn), rowsOf(v, s0, sn), key_r, m_r);
  ASSERT_EQ(y.dimension(1), tn);
  EXPECT_LE(relError(y, rowsOf(full, t0, tn), full), tol)
      << describe(k) << " rank " << r << " of " << P << " rows " << t0 << ".." << t0 + tn;
}

template <typename Map>
class Parallel : public ::testing::Test {};
using Maps = ::testing::Types<kattn::Elu, kattn::Relu, kattn::Square, kattn::Exp, kattn::ExpMod,
                              kattn::Identity, kattn::ExpPlus>;
struct MapNames {
  template <typename T>
  static std::string GetName(int) {
    return T::name;
  }
};
TYPED_TEST_SUITE(Parallel, Maps, MapNames);

std::vector<Case> bidirectionalCases(const std::string& map) {
  std::vector<Case> out;
  for (int m : {0, 8}) {
    Case c;
    c.map = map;
    c.m = m;
    out.push_back(c);
    c.mask = true;
    c.key = true;
    c.T = 17;
    c.S = 31;  // cross attention: queries and keys split differently
    out.push_back(c);
    c.scale_by_length = true;
    out.push_back(c);
  }
  return out;
}

std::vector<Case> causalCases(const std::string& map) {
  std::vector<Case> out;
  struct Shape {
    int chunk, window;
    std::optional<double> decay;
  };
  const Shape shapes[] = {{1, kattn::kUnboundedWindow, std::nullopt},
                          {1, 4, std::nullopt},
                          {3, 2, std::nullopt},
                          {3, 2, 0.8},
                          {2, kattn::kUnboundedWindow, 0.9},
                          {4, 40, std::nullopt}};  // a window longer than any slice
  for (const Shape& sh : shapes) {
    for (const char* padding : {"none", "left", "right"}) {
      Case c;
      c.map = map;
      c.m = map == "expplus" ? 8 : 0;
      c.causal = true;
      c.chunk = sh.chunk;
      c.window = sh.window;
      c.decay = sh.decay;
      c.padding = padding;
      c.T = std::string(padding) == "none" ? 12 * sh.chunk : 12 * sh.chunk - 1;
      c.mask = sh.chunk == 3;
      out.push_back(c);
    }
  }
  Case c = out.front();
  c.m = 8;
  c.key = true;
  c.mask = true;
  out.push_back(c);
  return out;
}

TYPED_TEST(Parallel, BidirectionalEqualsOneProcess) {
  std::uint32_t seed = 11;
  for (const Case& c : bidirectionalCases(TypeParam::name)) {
    runCase<double, TypeParam, kattn::Bidirectional>(c, seed, 1e-10);
    runCase<float, TypeParam, kattn::Bidirectional>(c, seed++, 1e-5);
  }
}

TYPED_TEST(Parallel, CausalEqualsOneProcess) {
  std::uint32_t seed = 23;
  for (const Case& c : causalCases(TypeParam::name)) {
    runCase<double, TypeParam, kattn::CausalWindowed>(c, seed, 1e-10);
    runCase<float, TypeParam, kattn::CausalWindowed>(c, seed++, 1e-5);
  }
}

TEST(Blocks, SlicesLongerThanABlockOfRows) {
  // A rank works through its rows 4096 at a time: slices of several blocks, every map kind
  // that keeps something across blocks (the exp maps' shifts, expplus's statistics).
  Case c;
  c.map = "exp";
  c.m = 8;
  c.T = c.S = 9001;
  c.mask = true;
  runCase<double, kattn::Exp, kattn::Bidirectional>(c, 41, 1e-10);
  c.map = "expplus";
  runCase<double, kattn::ExpPlus, kattn::Bidirectional>(c, 42, 1e-10);
  c.map = "exp";
  c.causal = true;
  c.chunk = 3;
  c.window = 2;
  c.padding = "left";
  runCase<double, kattn::Exp, kattn::CausalWindowed>(c, 43, 1e-10);
  c.window = kattn::kUnboundedWindow;
  c.decay = 0.999;
  c.padding = "right";
  runCase<double, kattn::Exp, kattn::CausalWindowed>(c, 44, 1e-10);
}

TEST(Blocks, TheLastChunkCutWithRightPadding) {
  // The last rank holds only rows of the last, partial chunk: the rank before computes them,
  // and its state (a stream that ended inside a chunk) is the last one the scan combines.
  for (const char* padding : {"right", "left"}) {
    Case c;
    c.map = "elu";
    c.causal = true;
    c.chunk = 4;
    c.window = 3;
    c.padding = padding;
    c.T = 47;
    runCase<double, kattn::Elu, kattn::CausalWindowed>(c, 45, 1e-10, {0, 20, 30, 46, 47});
    c.window = kattn::kUnboundedWindow;
    runCase<double, kattn::Elu, kattn::CausalWindowed>(c, 46, 1e-10, {0, 45, 46, 46, 47});
  }
}

// ---- faults: the same error on every rank, none left waiting --------------------------------

using Layer = kattn::KernelAttention<double, kattn::Relu, kattn::CausalWindowed>;

Layer causalLayer(std::uint32_t seed = 5) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.feature_transform = "relu";
  c.num_random_features = 0;
  c.use_causal_windowed = true;
  c.causal_chunk_length = 2;
  c.causal_window_length = 3;
  Layer layer(c);
  std::mt19937 g(seed);
  layer.setWeights(randomWeights<double>(g, c, 5, false));
  return layer;
}

/// The message every rank threw, gathered: all equal, and containing `needle`.
void expectSameError(const std::string& what, const std::string& needle) {
  EXPECT_NE(what.find(needle), std::string::npos) << what;
  const int n = int(what.size());
  int lo = n, hi = n;
  MPI_Allreduce(&n, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&n, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_EQ(lo, hi) << "the ranks threw different messages; this one: " << what;
}

TEST(Faults, BadInputOnOneRankThrowsOnEveryRank) {
  const Layer layer = causalLayer();
  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
  const int bad = worldSize() - 1;
  const Index D = worldRank() == bad ? 7 : 5;  // the last rank's rows have the wrong width
  std::mt19937 g(1);
  const auto x = randomTensor<double, 3>(g, {2, 4, D}, -1, 1);
  try {
    sp.forward(x, x);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    expectSameError(e.what(), "query");
    if (worldSize() > 1) {
      EXPECT_NE(std::string(e.what()).find("rank " + std::to_string(bad)), std::string::npos)
          << e.what();
    }
  }
  // The communicator is still usable: the next call succeeds.
  const auto ok = randomTensor<double, 3>(g, {2, 4, 5}, -1, 1);
  EXPECT_EQ(sp.forward(ok, ok).dimension(1), 4);
}

TEST(Faults, LayersThatDifferThrowOnEveryRank) {
  // The last rank loads other weights.
  const Layer layer = causalLayer(worldRank() == worldSize() - 1 && worldSize() > 1 ? 6 : 5);
  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
  std::mt19937 g(2);
  const auto x = randomTensor<double, 3>(g, {2, 4, 5}, -1, 1);
  if (worldSize() == 1) {
    EXPECT_NO_THROW(sp.forward(x, x));
    return;
  }
  try {
    sp.forward(x, x);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    expectSameError(e.what(), "differ in their layer");
  }
}

TEST(Faults, BatchSizesThatDifferThrowOnEveryRank) {
  const Layer layer = causalLayer();
  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
  std::mt19937 g(3);
  const auto x = randomTensor<double, 3>(g, {worldRank() == 0 ? 2 : 3, 4, 5}, -1, 1);
  if (worldSize() == 1) return;
  try {
    sp.forward(x, x);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    expectSameError(e.what(), "batch size");
  }
}

TEST(Faults, PaddingNoneRefusesALengthThatBreaksAChunk) {
  const Layer layer = causalLayer();  // C = 2, padding none
  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
  std::mt19937 g(4);
  // Every rank's slice is whole chunks but one: the total is odd.
  const auto x = randomTensor<double, 3>(g, {1, worldRank() == 0 ? 3 : 2, 5}, -1, 1);
  try {
    sp.forward(x, x);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    expectSameError(e.what(), "causal_chunk_length");
  }
}

TEST(Faults, NullCommunicatorAndMpiErrors) {
  const Layer layer = causalLayer();
  EXPECT_THROW(kattn::mpi::SequenceParallel(layer, MPI_COMM_NULL), std::invalid_argument);
  // An MPI error code becomes an Error naming the call and MPI's own message.
  kattn::mpi::detail::Comm comm(MPI_COMM_WORLD);
  try {
    comm.check(MPI_ERR_TRUNCATE, "MPI_Recv");
    ADD_FAILURE() << "no exception";
  } catch (const kattn::mpi::Error& e) {
    EXPECT_NE(std::string(e.what()).find("MPI_Recv failed on rank"), std::string::npos);
    EXPECT_EQ(e.failedRank(), worldRank());
  }
}

TEST(Faults, CommunicatorOfOneRankIsTheSingleProcessForward) {
  const Layer layer = causalLayer();
  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_SELF);
  std::mt19937 g(5);
  const auto x = randomTensor<double, 3>(g, {2, 6, 5}, -1, 1);
  const Tensor<double, 3> want = layer.forward(x, x);
  EXPECT_LE(relError(sp.forward(x, x), want, want), 1e-12);
}

TEST(Faults, UnsupportedPathsThrowOnEveryRank) {
  kattn::LayerConfig c;
  c.num_heads = 1;
  c.key_dim = 4;
  c.feature_transform = "elu";
  c.num_random_features = 0;
  c.begin_kernel = 2;
  kattn::KernelAttention<double, kattn::Elu> layer(c);
  std::mt19937 g(6);
  kattn::Weights<double> w = randomWeights<double>(g, c, 5, false);
  w.output_softmax_kernel = w.output_kernel;
  w.output_softmax_bias = w.output_bias;
  layer.setWeights(w);
  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
  const auto x = randomTensor<double, 3>(g, {1, 3, 5}, -1, 1);
  try {
    sp.forward(x, x);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    expectSameError(e.what(), "begin_kernel");
  }
  // A bidirectional layer has no state to hand out.
  c.begin_kernel = 0;
  kattn::KernelAttention<double, kattn::Elu> plain(c);
  plain.setWeights(randomWeights<double>(g, c, 5, false));
  kattn::mpi::SequenceParallel sp2(plain, MPI_COMM_WORLD);
  kattn::StreamingState<double> state;
  try {
    sp2.forward(x, x, std::nullopt, std::nullopt, &state);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    expectSameError(e.what(), "final_state");
  }
}

// ---- decoding after a parallel prefill --------------------------------------------------------

TEST(Streaming, TheLastRankHandsOutTheStateAfterThePrefill) {
  for (std::optional<double> decay : {std::optional<double>(), std::optional<double>(0.9)}) {
    kattn::LayerConfig c;
    c.num_heads = 2;
    c.key_dim = 4;
    c.feature_transform = "exp";
    c.num_random_features = 8;
    c.use_causal_windowed = true;
    c.causal_chunk_length = 2;
    c.causal_window_length = 3;
    c.causal_window_decay = decay;
    kattn::KernelAttention<double, kattn::Exp, kattn::CausalWindowed> layer(c);
    std::mt19937 g(7);
    layer.setWeights(randomWeights<double>(g, c, 5, false));
    const Index T = 20;
    const auto x = randomTensor<double, 3>(g, {2, T, 5}, -1, 1);
    const auto next = randomTensor<double, 3>(g, {2, 2, 5}, -1, 1);
    // One process: a stream fed the prefill, then the next chunk.
    auto stream = layer.makeState(2, kattn::StreamingMode::Exact);
    layer.forward(x, x, std::nullopt, std::nullopt, stream);
    const Tensor<double, 3> want = layer.forward(next, next, std::nullopt, std::nullopt, stream);
    const auto cuts = randomCuts(g, T, worldSize());
    const Index t0 = cuts[std::size_t(worldRank())], n = cuts[std::size_t(worldRank()) + 1] - t0;
    kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
    kattn::StreamingState<double> state;
    sp.forward(rowsOf(x, t0, n), rowsOf(x, t0, n), std::nullopt, std::nullopt, &state);
    if (worldRank() == worldSize() - 1) {
      EXPECT_EQ(state.tokens(), T);
      const Tensor<double, 3> got =
          layer.forward(next, next, std::nullopt, std::nullopt, state);
      EXPECT_LE(relError(got, want, want), 1e-10) << (decay ? "decay" : "no decay");
    }
  }
}

/// On ranks other than 0, failed assertions, named by rank (rank 0 prints the whole report).
class RankFailures : public ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: %s\n", worldRank(),
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.summary());
  }
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (worldRank() != 0) {
    // One report per run: rank 0's; the others' failures still fail the run (exit code).
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailures);
  }
  const int status = RUN_ALL_TESTS();
  MPI_Finalize();
  return status;
}
