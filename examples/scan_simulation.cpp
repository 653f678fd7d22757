// scan_simulation: the causal half of sequence-parallel attention (docs/distributed.md),
// simulated on P = 1,024 ranks in one process, without MPI.
//
// The sequence is cut into P slices of whole chunks, one per rank. Each rank feeds its slice
// into a fresh exact state; an exclusive scan of these states under kattn::combine, in the
// Hillis-Steele order an MPI implementation runs (ceil(log2 P) rounds, each state sent as
// StreamingState::save() bytes), gives every rank the state of the tokens before its slice;
// each rank then feeds its slice again from that prefix. The concatenated outputs are compared
// with the single-process whole pass (layer.forward on the whole sequence), in float64 and in
// float32 with the same weights, for an unbounded window and for a finite window with and
// without decay. A plain left-to-right scan runs beside the tree for comparison, and the
// scan's final state is compared with that of one stream fed every token.
//
// Errors are max |output - reference| / max |reference| over the whole output. Exits non-zero
// when one exceeds the tolerances below. `scan_simulation [ranks]` simulates another P (the
// tokens per rank stay 8).

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
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

constexpr Index kDefaultRanks = 1024;
constexpr Index kTokensPerRank = 8;
constexpr int kChunk = 2;  // tokens per chunk: a slice is 4 chunks
// 8 heads of 16 rather than 64: a state is then 16 times smaller, so that the 10 rounds of
// 1,023 combines fit the run time at -O1; the sizes of 8 heads of 64 are printed at the end.
constexpr int kHeads = 8, kKeyDim = 16;
constexpr Index kModelDim = 64;
constexpr int kFiniteWindow = 6;  // chunks: a slice's first chunk sees into two ranks before
constexpr double kTolerance64 = 1e-10, kAgreement64 = 1e-12, kTolerance32 = 1e-5;

struct WindowKind {
  const char* name;
  int window;
  std::optional<double> decay;
};

/// max |a - ref| / max |ref| over n numbers, in double.
template <typename A, typename B>
double relError(const A* a, const B* ref, Index n) {
  double err = 0, scale = 0;
  for (Index i = 0; i < n; ++i) {
    err = std::max(err, std::abs(double(a[i]) - double(ref[i])));
    scale = std::max(scale, std::abs(double(ref[i])));
  }
  return err / scale;
}

template <typename A, typename B, int R>
double relError(const kattn::Tensor<A, R>& a, const kattn::Tensor<B, R>& ref) {
  return relError(a.data(), ref.data(), ref.size());
}

/**
 * Rank r's partial becomes the state of slices 0..r: the Hillis-Steele inclusive scan, as P
 * ranks run it. In round j (distance d = 2^j) every rank r >= d receives rank r - d's partial
 * of the round before, as bytes, and puts it in front of its own: combine(received, own).
 * Returns the largest message in bytes.
 */
template <typename S>
std::size_t treeScan(std::vector<State<S>>& partial) {
  std::size_t largest = 0;
  const Index P = Index(partial.size());
  for (Index d = 1; d < P; d *= 2) {
    // From the last rank down, so that rank r - d still holds its partial of the round before
    // when rank r reads it: the order of one round's simultaneous exchange.
    for (Index r = P - 1; r >= d; --r) {
      const std::string message = partial[std::size_t(r - d)].toBytes();
      largest = std::max(largest, message.size());
      partial[std::size_t(r)] =
          kattn::combine(State<S>::fromBytes(message), partial[std::size_t(r)]);
    }
  }
  return largest;
}

/// Rows [r L, (r + 1) L) of x [1, T, D] (B = 1, so a slice is contiguous).
template <typename S>
kattn::ConstTensorMap<S, 3> slice(const kattn::Tensor<S, 3>& x, Index r, Index L) {
  return kattn::ConstTensorMap<S, 3>(x.data() + r * L * x.dimension(2), 1, L, x.dimension(2));
}

template <typename S>
kattn::TensorMap<S, 3> slice(kattn::Tensor<S, 3>& y, Index r, Index L) {
  return kattn::TensorMap<S, 3>(y.data() + r * L * y.dimension(2), 1, L, y.dimension(2));
}

struct Result {
  double tree = 0;             // tree-scan outputs against the whole pass of this precision
  double tree64 = 0;           // ... against the float64 whole pass
  double sequential64 = 0;     // sequential-scan outputs against the float64 whole pass
  double tree_sequential = 0;  // the two scans' outputs against each other
  double state = 0;            // final scanned state against one stream fed every token
  std::size_t largest_message = 0, final_bytes = 0;
  // The window sums (kv, then kSum) of the final scanned state and of the stream, in double.
  kattn::Tensor<double, 4> kv_scanned, kv_stream;
  kattn::Tensor<double, 3> z_scanned, z_stream;
};

/// The larger of the relative errors of window sums kv and z against ref_kv and ref_z.
double sumsError(const kattn::Tensor<double, 4>& kv, const kattn::Tensor<double, 3>& z,
                 const kattn::Tensor<double, 4>& ref_kv, const kattn::Tensor<double, 3>& ref_z) {
  return std::max(relError(kv, ref_kv), relError(z, ref_z));
}

/// The simulation for one layer: the scans over the ranks' states and the outputs they give.
template <typename S>
Result simulate(const Layer<S>& layer, Index P, const kattn::Tensor<S, 3>& x,
                const kattn::Tensor<S, 3>& whole, const kattn::Tensor<double, 3>& whole64) {
  const Index L = kTokensPerRank;
  const auto fresh = [&] { return layer.makeState(1, kattn::StreamingMode::Exact); };
  const auto feed = [&](Index r, State<S>& state, kattn::TensorMap<S, 3> out) {
    layer.forward(slice(x, r, L), slice(x, r, L), std::nullopt, std::nullopt, state, out);
  };

  std::vector<State<S>> own(std::size_t(P), fresh());
  kattn::Tensor<S, 3> scratch(1, L, layer.outputDim());
  for (Index r = 0; r < P; ++r) feed(r, own[std::size_t(r)], kattn::TensorMap<S, 3>(scratch));

  Result res;
  std::vector<State<S>> partial = own;
  res.largest_message = treeScan(partial);
  kattn::Tensor<S, 3> tree(whole.dimensions());
  for (Index r = 0; r < P; ++r) {
    // The exclusive prefix: one more message, from the neighbour before.
    State<S> prefix = r == 0 ? fresh() : State<S>::fromBytes(partial[std::size_t(r - 1)].toBytes());
    feed(r, prefix, slice(tree, r, L));
  }

  kattn::Tensor<S, 3> sequential(whole.dimensions());
  State<S> running = fresh();
  for (Index r = 0; r < P; ++r) {
    State<S> prefix = running;
    feed(r, prefix, slice(sequential, r, L));
    running = kattn::combine(running, own[std::size_t(r)]);
  }

  res.tree = relError(tree, whole);
  res.tree64 = relError(tree, whole64);
  res.sequential64 = relError(sequential, whole64);
  res.tree_sequential = relError(tree, sequential);

  // The final state: its window sums, and what it gives the tokens after the sequence (here
  // the first ones again; enough of them to read every chunk of a finite window).
  const State<S>& scanned = partial.back();
  State<S> stream = fresh();
  layer.forward(x, x, std::nullopt, std::nullopt, stream);
  res.final_bytes = scanned.toBytes().size();
  res.kv_scanned = scanned.kv().template cast<double>();
  res.z_scanned = scanned.kSum().template cast<double>();
  res.kv_stream = stream.kv().template cast<double>();
  res.z_stream = stream.kSum().template cast<double>();
  res.state = sumsError(res.kv_scanned, res.z_scanned, res.kv_stream, res.z_stream);
  State<S> a = scanned, b = stream;
  const auto next = slice(x, 0, 2 * kFiniteWindow * kChunk);
  const kattn::Tensor<S, 3> after_scan = layer.forward(next, next, std::nullopt, std::nullopt, a);
  const kattn::Tensor<S, 3> after_stream = layer.forward(next, next, std::nullopt, std::nullopt, b);
  res.state = std::max(res.state, relError(after_scan, after_stream));
  if (scanned.tokens() != P * L) res.state = std::numeric_limits<double>::infinity();
  return res;
}

kattn::LayerConfig config(int heads, int key_dim, const WindowKind& kind) {
  kattn::LayerConfig c;
  c.num_heads = heads;
  c.key_dim = key_dim;
  c.feature_transform = "relu";
  c.num_random_features = 0;
  c.use_causal_windowed = true;
  c.causal_chunk_length = kChunk;
  c.causal_window_length = kind.window;
  c.causal_window_decay = kind.decay;
  c.seed = 17;
  return c;
}

/// Bytes of the largest state a scan over slices of `len` tokens sends, for 8 heads of 64
/// (F = d_v = 64), B = 1, float: a slice's own state or two slices' combined.
std::size_t productionBytes(const WindowKind& kind, Index len) {
  Layer<float> layer(config(8, 64, kind));
  layer.setThreads(1);
  layer.initializeWeights(64, 64);
  std::mt19937 gen(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  kattn::Tensor<float, 3> x(1, len, 64);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  State<float> a = layer.makeState(1, kattn::StreamingMode::Exact), b = a;
  layer.forward(x, x, std::nullopt, std::nullopt, a);
  layer.forward(x, x, std::nullopt, std::nullopt, b);
  return std::max(a.toBytes().size(), kattn::combine(a, b).toBytes().size());
}

}  // namespace

int run(Index P) {
  const WindowKind kinds[] = {{"unbounded", kattn::kUnboundedWindow, std::nullopt},
                              {"W=6", kFiniteWindow, std::nullopt},
                              {"W=6 g=0.9", kFiniteWindow, 0.9}};
  const Index T = P * kTokensPerRank;
  kattn::Tensor<double, 3> x64(1, T, kModelDim);  // [B, T, D]
  std::mt19937 gen(5);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (Index i = 0; i < x64.size(); ++i) x64.data()[i] = normal(gen);
  const kattn::Tensor<float, 3> x32 = x64.cast<float>();

  int rounds = 0;
  while ((Index(1) << rounds) < P) ++rounds;
  std::printf("P = %ld ranks, %ld tokens each (T = %ld), chunk %d, relu, %d heads of %d, no "
              "projection, D = %ld, B = 1; %d scan rounds\n\n",
              long(P), long(kTokensPerRank), long(T), kChunk, kHeads, kKeyDim,
              long(kModelDim), rounds);
  bool ok = true;
  std::vector<std::string> outputs, states;
  char line[200];
  for (const WindowKind& kind : kinds) {
    Layer<double> l64(config(kHeads, kKeyDim, kind));
    l64.setThreads(1);
    l64.initializeWeights(kModelDim, kModelDim);
    Layer<float> l32(config(kHeads, kKeyDim, kind));
    l32.setThreads(1);
    l32.setWeights(kattn::castWeights<float>(l64.weights()));
    const kattn::Tensor<double, 3> whole64 = l64.forward(x64, x64);
    const kattn::Tensor<float, 3> whole32 = l32.forward(x32, x32);

    const Result r64 = simulate(l64, P, x64, whole64, whole64);
    const Result r32 = simulate(l32, P, x32, whole32, whole64);
    for (const Result* r : {&r64, &r32}) {
      const bool f64 = r == &r64;
      std::snprintf(line, sizeof(line), "%-10s %-3s %10.2e %10.2e %10.2e %10.2e %10.2e",
                    kind.name, f64 ? "f64" : "f32", r->tree, r->tree64, r->sequential64,
                    f64 ? 0.0 : relError(whole32, whole64), r->tree_sequential);
      outputs.emplace_back(line);
      // The float64 stream is the reference of both precisions' final states.
      std::snprintf(line, sizeof(line), "%-10s %-3s %10.2e %10.2e %10.2e %9zu %9zu", kind.name,
                    f64 ? "f64" : "f32", r->state,
                    sumsError(r->kv_scanned, r->z_scanned, r64.kv_stream, r64.z_stream),
                    sumsError(r->kv_stream, r->z_stream, r64.kv_stream, r64.z_stream),
                    r->largest_message, r->final_bytes);
      states.emplace_back(line);
    }
    ok = ok && r64.tree <= kTolerance64 && r64.sequential64 <= kTolerance64 &&
         r64.tree_sequential <= kAgreement64 && r64.state <= kTolerance64;
    ok = ok && r32.tree <= kTolerance32 && r32.tree64 <= kTolerance32 &&
         r32.sequential64 <= kTolerance32 && r32.tree_sequential <= kTolerance32 &&
         r32.state <= kTolerance32;
  }
  std::printf("Outputs (max |error| / max |reference|):\n%-14s %10s %10s %10s %10s %10s\n", "",
              "tree/whole", "tree/f64", "seq/f64", "whole/f64", "tree/seq");
  for (const auto& l : outputs) std::printf("%s\n", l.c_str());
  std::printf("tree/whole: the tree scan's outputs against the whole pass of the same precision;\n"
              "tree/f64, seq/f64, whole/f64: the tree scan's, the sequential scan's and the whole\n"
              "pass's against the float64 whole pass; tree/seq: the two scans' against each "
              "other.\n\n");
  std::printf("Final state and messages:\n%-14s %10s %10s %10s %9s %9s\n", "", "scan/strm",
              "scan/f64", "strm/f64", "max msg", "final");
  for (const auto& l : states) std::printf("%s\n", l.c_str());
  std::printf("scan/strm: the tree scan's final state against one stream fed every token of the\n"
              "same precision (window sums kv and kSum, and the outputs of %d more tokens);\n"
              "scan/f64, strm/f64: the window sums of the scan's final state and of that stream\n"
              "against the float64 stream's; max msg, final: bytes of the largest state sent in\n"
              "the tree scan and of the final state.\n\n",
              int(2 * kFiniteWindow * kChunk));

  const Index shorter = kTokensPerRank, longer = 2 * kFiniteWindow * kChunk;
  std::printf("Largest state a scan sends for 8 heads of 64 (F = d_v = 64), B = 1, float, in "
              "bytes,\nfor slices of %ld and of %ld chunks:\n",
              long(shorter / kChunk), long(longer / kChunk));
  for (const WindowKind& kind : kinds) {
    std::printf("  %-10s %9zu %9zu\n", kind.name, productionBytes(kind, shorter),
                productionBytes(kind, longer));
  }
  std::printf("\n%s\n", ok ? "all within tolerance" : "OUT OF TOLERANCE");
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  const Index P = argc > 1 ? Index(std::atol(argv[1])) : kDefaultRanks;
  if (P < 1) {
    std::fprintf(stderr, "usage: scan_simulation [ranks >= 1]\n");
    return 2;
  }
  try {
    return run(P);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "scan_simulation: %s\n", e.what());
    return 1;
  }
}
