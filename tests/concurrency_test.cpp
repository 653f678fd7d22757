// Concurrency and determinism of the layer (layer.hpp, any_layer.hpp, parallel.hpp).
//
// What is shared between concurrent forwards on one const layer, and why it is safe:
// - the configuration, weights and projection: read only;
// - the ThreadPool (a shared_ptr): parallelFor is re-entrant, each call waits only for its
//   own tasks and works on them itself;
// - the workspace free list: guarded by a mutex, buffers are handed out whole;
// - the training-call counter (dropout stream and redraw index): one atomic fetch_add per
//   training call, so concurrent training calls get distinct indices; which thread gets which
//   index depends on scheduling, the set of results does not.
// Each call has its own inputs, outputs and (causal) StreamingState.
//
// Checked here: 8 threads x many calls give the single-threaded results bit for bit (typed
// and run-time layers, bidirectional exp with a projection, causal relu with both streaming
// modes, pool of 2 threads and no pool); training calls from 8 threads give the same set of
// outputs as the same number of sequential calls; and inference results do not depend on the
// number of threads (1, 2, 8). scripts/test.sh runs it under ThreadSanitizer (clang suite).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <kattn/kattn.hpp>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "test_support.hpp"

namespace {

using kattn::Index;
using Tensor1 = kattn::Tensor<float, 1>;
using Tensor2 = kattn::Tensor<float, 2>;
using Tensor3 = kattn::Tensor<float, 3>;
using CMap2 = kattn::ConstTensorMap<float, 2>;

constexpr int kThreads = 8;

using Rng = kattn_test::FloatRng;
using kattn_test::cols;
using kattn_test::randomTensor;
using kattn_test::rows;
using kattn_test::view;

kattn::Weights<float> randomWeights(Rng& r, const kattn::LayerConfig& c, Index Dq, Index Dk,
                                    Index Dv) {
  const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim();
  const Index O = c.output_shape ? *c.output_shape : Dq;
  kattn::Weights<float> w;
  w.query_kernel = randomTensor<3>(r, 1.0f / std::sqrt(float(Dq)), Dq, N, d);
  w.key_kernel = randomTensor<3>(r, 1.0f / std::sqrt(float(Dk)), Dk, N, d);
  w.value_kernel = randomTensor<3>(r, 1.0f / std::sqrt(float(Dv)), Dv, N, dv);
  w.output_kernel = randomTensor<3>(r, 1.0f / std::sqrt(float(N * dv)), N, dv, O);
  if (c.use_bias) {
    w.query_bias = randomTensor<2>(r, 0.1f, N, d);
    w.key_bias = randomTensor<2>(r, 0.1f, N, d);
    w.value_bias = randomTensor<2>(r, 0.1f, N, dv);
    w.output_bias = randomTensor<1>(r, 0.1f, O);
  }
  if (c.begin_kernel > 0) {
    w.output_softmax_kernel = randomTensor<3>(r, 1.0f / std::sqrt(float(N * dv)), N, dv, O);
    if (c.use_bias) w.output_softmax_bias = randomTensor<1>(r, 0.1f, O);
  }
  return w;
}

/// The bytes of a tensor with its shape: equal strings mean bit-identical tensors.
std::string bytesOf(const Tensor3& t) {
  std::string s(reinterpret_cast<const char*>(t.dimensions().data()), 3 * sizeof(Index));
  s.append(reinterpret_cast<const char*>(t.data()), std::size_t(t.size()) * sizeof(float));
  return s;
}

bool bitEqual(const Tensor3& a, const Tensor3& b) { return bytesOf(a) == bytesOf(b); }

/// One forward problem. For causal layers S = T, and `split` lists the lengths of the
/// streaming calls (whole chunks) that cover T.
struct Problem {
  Tensor3 query, value, key;
  std::optional<Tensor2> mask;
  std::vector<Index> split;
};

Problem makeProblem(Rng& r, Index B, Index T, Index S, Index D, bool with_mask,
                    std::vector<Index> split = {}) {
  Problem p;
  p.query = randomTensor<3>(r, 1.0f, B, T, D);
  p.value = randomTensor<3>(r, 1.0f, B, S, D);
  p.key = randomTensor<3>(r, 1.0f, B, S, D);
  if (with_mask) {
    Tensor2 m(B, S);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = r.intIn(0, 4) == 0 ? 0.0f : 1.0f;
    p.mask = m;
  }
  p.split = std::move(split);
  return p;
}

std::optional<CMap2> maskOf(const Problem& p) {
  if (!p.mask) return std::nullopt;
  return CMap2(p.mask->data(), p.mask->dimensions());
}

/// Whether a layer type can take a streaming state (the run-time layer decides at run time).
template <typename Layer>
struct can_stream : std::true_type {};
template <typename S, typename F, typename M>
struct can_stream<kattn::KernelAttention<S, F, M>>
    : std::bool_constant<M::causal && !kattn::feature_map_traits<F>::bidirectional_only> {};

/// Everything one problem produces: the whole forward, then (causal, when a split is given)
/// each streaming call's output, all as byte strings.
template <typename Layer>
std::vector<std::string> runProblem(const Layer& layer, const Problem& p,
                                    const std::vector<Problem>& calls) {
  std::vector<std::string> out;
  out.push_back(bytesOf(layer.forward(view(p.query), view(p.value), view(p.key), maskOf(p))));
  if constexpr (can_stream<Layer>::value) {
    if (p.split.empty()) return out;
    auto state = layer.makeState(p.query.dimension(0));
    for (const Problem& c : calls) {
      out.push_back(
          bytesOf(layer.forward(view(c.query), view(c.value), view(c.key), maskOf(c), state)));
    }
  }
  return out;
}

/// The streaming calls of a problem, cut along its split.
std::vector<Problem> streamingCalls(const Problem& p) {
  std::vector<Problem> calls;
  Index r0 = 0;
  for (Index L : p.split) {
    Problem c;
    c.query = rows(p.query, r0, L);
    c.value = rows(p.value, r0, L);
    c.key = rows(p.key, r0, L);
    if (p.mask) c.mask = cols(*p.mask, r0, L);
    calls.push_back(std::move(c));
    r0 += L;
  }
  return calls;
}

/**
 * Runs every problem once on one thread with setThreads(1) (the expected results), then from
 * kThreads threads at once, `rounds` problems per thread, each thread starting at another
 * problem, first with the layer's own pool of 2 threads and then with setThreads(1); every
 * result must equal the expected one bit for bit.
 */
template <typename Layer>
void expectConcurrentEqualsSequential(Layer& layer, const std::vector<Problem>& problems,
                                      int rounds) {
  std::vector<std::vector<Problem>> calls;
  for (const Problem& p : problems) calls.push_back(streamingCalls(p));
  layer.setThreads(1);
  std::vector<std::vector<std::string>> expected;
  for (std::size_t i = 0; i < problems.size(); ++i) {
    expected.push_back(runProblem(layer, problems[i], calls[i]));
  }
  for (int pool_threads : {2, 1}) {
    layer.setThreads(pool_threads);
    const Layer& shared = layer;
    std::atomic<int> mismatches{0}, runs{0}, errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        try {
          for (int i = 0; i < rounds; ++i) {
            const std::size_t j = std::size_t(t + i) % problems.size();
            if (runProblem(shared, problems[j], calls[j]) != expected[j]) ++mismatches;
            ++runs;
          }
        } catch (...) {
          ++errors;
        }
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(errors.load(), 0) << "pool of " << pool_threads;
    EXPECT_EQ(runs.load(), kThreads * rounds) << "pool of " << pool_threads;
    EXPECT_EQ(mismatches.load(), 0) << "pool of " << pool_threads;
  }
}

kattn::LayerConfig bidirectionalExpConfig() {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 8;
  c.value_dim = 6;
  c.feature_transform = "exp";
  c.num_random_features = 16;
  c.seed = 17;
  c.begin_kernel = 0;
  return c;
}

kattn::LayerConfig causalReluConfig(std::optional<double> decay) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 8;
  c.feature_transform = "relu";
  c.num_random_features = 12;
  c.seed = 5;
  c.use_causal_windowed = true;
  c.causal_chunk_length = 2;
  c.causal_window_length = 3;
  c.causal_window_decay = decay;
  return c;
}

constexpr Index kDim = 10;  // D_q = D_k = D_v

/// Bidirectional problems: short (explicit form), long (low-rank form over several 256-row
/// blocks), with and without a mask, B from 1 to 3.
std::vector<Problem> bidirectionalProblems() {
  Rng r(101);
  std::vector<Problem> ps;
  ps.push_back(makeProblem(r, 1, 5, 7, kDim, false));
  ps.push_back(makeProblem(r, 2, 40, 33, kDim, true));
  ps.push_back(makeProblem(r, 3, 300, 520, kDim, true));
  ps.push_back(makeProblem(r, 2, 260, 9, kDim, false));
  ps.push_back(makeProblem(r, 1, 1, 600, kDim, true));
  return ps;
}

/// Causal problems with their streaming splits (whole chunks of 2).
std::vector<Problem> causalProblems() {
  Rng r(202);
  std::vector<Problem> ps;
  ps.push_back(makeProblem(r, 1, 8, 8, kDim, false, {2, 4, 2}));
  ps.push_back(makeProblem(r, 2, 30, 30, kDim, true, {10, 2, 18}));
  ps.push_back(makeProblem(r, 3, 64, 64, kDim, true, {64}));
  ps.push_back(makeProblem(r, 2, 300, 300, kDim, false, {2, 2, 200, 96}));
  return ps;
}

template <typename Layer>
Layer makeLayer(const kattn::LayerConfig& c, std::uint64_t seed) {
  Layer layer(c);
  Rng r(seed);
  layer.setWeights(randomWeights(r, c, kDim, kDim, kDim));
  return layer;
}

constexpr int kRounds = 12;

TEST(Concurrency, TypedBidirectionalExpMatchesSingleThreaded) {
  auto layer = makeLayer<kattn::KernelAttention<float, kattn::Exp>>(bidirectionalExpConfig(), 1);
  expectConcurrentEqualsSequential(layer, bidirectionalProblems(), kRounds);
}

TEST(Concurrency, AnyBidirectionalExpMatchesSingleThreaded) {
  auto layer = makeLayer<kattn::AnyKernelAttention<float>>(bidirectionalExpConfig(), 1);
  expectConcurrentEqualsSequential(layer, bidirectionalProblems(), kRounds);
}

TEST(Concurrency, TypedBidirectionalWithBeginKernelMatchesSingleThreaded) {
  kattn::LayerConfig c = bidirectionalExpConfig();
  c.begin_kernel = 3;
  auto layer = makeLayer<kattn::KernelAttention<float, kattn::Exp>>(c, 2);
  expectConcurrentEqualsSequential(layer, bidirectionalProblems(), kRounds / 2);
}

TEST(Concurrency, TypedCausalReluExactStreamingMatchesSingleThreaded) {
  auto layer = makeLayer<kattn::CausalKernelAttention<float, kattn::Relu>>(
      causalReluConfig(std::nullopt), 3);
  expectConcurrentEqualsSequential(layer, causalProblems(), kRounds);
}

TEST(Concurrency, AnyCausalReluRecurrentStreamingMatchesSingleThreaded) {
  auto layer = makeLayer<kattn::AnyKernelAttention<float>>(causalReluConfig(0.9), 3);
  expectConcurrentEqualsSequential(layer, causalProblems(), kRounds);
}

TEST(Concurrency, CausalExpStreamingMatchesSingleThreaded) {
  // exp streaming keeps a running maximum in each caller's state: nothing shared.
  kattn::LayerConfig c = causalReluConfig(std::nullopt);
  c.feature_transform = "exp";
  auto layer = makeLayer<kattn::CausalKernelAttention<float, kattn::Exp>>(c, 4);
  expectConcurrentEqualsSequential(layer, causalProblems(), kRounds / 2);
}

// ---- training: dropout and redraw from several threads ---------------------------------------

/**
 * kThreads threads make `per_thread` training calls each on one layer; a fresh layer makes
 * the same number of calls in sequence. Each training call takes the next call index (which
 * fixes its dropout stream and its redrawn projection), so the two multisets of outputs must
 * be equal, and all outputs distinct.
 */
template <typename Layer>
void expectTrainingSetsEqual(const kattn::LayerConfig& c, const Problem& p, int per_thread) {
  Layer concurrent = makeLayer<Layer>(c, 9);
  Layer sequential = makeLayer<Layer>(c, 9);
  concurrent.setThreads(2);
  sequential.setThreads(1);
  auto call = [&](const Layer& layer) {
    return bytesOf(layer.forward(view(p.query), view(p.value), view(p.key), maskOf(p), true));
  };
  const int total = kThreads * per_thread;
  std::map<std::string, int> expected;
  for (int i = 0; i < total; ++i) ++expected[call(sequential)];
  EXPECT_EQ(int(expected.size()), total) << "training calls should all differ";

  std::vector<std::vector<std::string>> got(kThreads);
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  const Layer& shared = concurrent;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      try {
        for (int i = 0; i < per_thread; ++i) got[std::size_t(t)].push_back(call(shared));
      } catch (...) {
        ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  std::map<std::string, int> actual;
  for (const auto& v : got)
    for (const auto& s : v) ++actual[s];
  EXPECT_TRUE(actual == expected)
      << "the outputs of concurrent training calls are not those of sequential calls";
  // Inference afterwards is unaffected by the training calls (no shared state changed).
  EXPECT_TRUE(bitEqual(concurrent.forward(view(p.query), view(p.value), view(p.key), maskOf(p)),
                       sequential.forward(view(p.query), view(p.value), view(p.key), maskOf(p))));
}

TEST(Concurrency, TrainingDropoutAndRedrawBidirectional) {
  kattn::LayerConfig c = bidirectionalExpConfig();
  c.dropout = 0.3;
  c.redraw = true;
  c.begin_kernel = 2;
  Rng r(303);
  const Problem p = makeProblem(r, 2, 20, 30, kDim, true);
  expectTrainingSetsEqual<kattn::KernelAttention<float, kattn::Exp>>(c, p, 6);
  expectTrainingSetsEqual<kattn::AnyKernelAttention<float>>(c, p, 6);
}

TEST(Concurrency, TrainingDropoutAndRedrawCausal) {
  kattn::LayerConfig c = causalReluConfig(0.8);
  c.dropout = 0.25;
  c.redraw = true;
  Rng r(404);
  const Problem p = makeProblem(r, 2, 24, 24, kDim, true);
  expectTrainingSetsEqual<kattn::CausalKernelAttention<float, kattn::Relu>>(c, p, 6);
  expectTrainingSetsEqual<kattn::AnyKernelAttention<float>>(c, p, 6);
}

TEST(Concurrency, TrainingDropoutOnlyNoRedraw) {
  kattn::LayerConfig c = bidirectionalExpConfig();
  c.dropout = 0.5;
  Rng r(505);
  const Problem p = makeProblem(r, 3, 17, 11, kDim, false);
  expectTrainingSetsEqual<kattn::KernelAttention<float, kattn::Exp>>(c, p, 5);
}

// ---- determinism across thread counts ---------------------------------------------------------

constexpr Index kDetDim = 24;

// Under ThreadSanitizer (the clang suite of scripts/test.sh) the causal sequences are cut to 2100 tokens, still
// more than one 2048-row block of the whole pass, to keep that run within a few minutes.
#if defined(__SANITIZE_THREAD__)
constexpr bool kUnderTsan = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
constexpr bool kUnderTsan = true;
#else
constexpr bool kUnderTsan = false;
#endif
#else
constexpr bool kUnderTsan = false;
#endif
constexpr Index kLongCausal = kUnderTsan ? 2100 : 5000;

kattn::LayerConfig determinismConfig(const std::string& map) {
  kattn::LayerConfig c;
  c.num_heads = 3;
  c.key_dim = 16;
  c.value_dim = 12;
  c.feature_transform = map;
  c.num_random_features = 32;
  c.seed = 23;
  return c;
}

/// forward with setThreads(1), (2), (8): bit-identical outputs; returns the first one.
template <typename Layer>
void expectSameForThreadCounts(const kattn::LayerConfig& c, Index B, Index T) {
  Layer layer(c);
  Rng r(std::uint64_t(1000 + B * 7 + T));
  layer.setWeights(randomWeights(r, c, kDetDim, kDetDim, kDetDim));
  const Problem p = makeProblem(r, B, T, T, kDetDim, true);
  std::optional<Tensor3> first;
  for (int threads : {1, 2, 8}) {
    layer.setThreads(threads);
    Tensor3 y = layer.forward(view(p.query), view(p.value), view(p.key), maskOf(p));
    bool finite = true;
    for (Index i = 0; i < y.size(); ++i) finite = finite && std::isfinite(y.data()[i]);
    EXPECT_TRUE(finite) << c.feature_transform << " B=" << B << " T=" << T;
    if (!first) {
      first = y;
    } else {
      EXPECT_TRUE(bitEqual(*first, y))
          << c.feature_transform << " B=" << B << " T=" << T << ": setThreads(" << threads
          << ") differs from setThreads(1)";
    }
  }
}

TEST(Determinism, BidirectionalAcrossThreadCounts) {
  for (Index B : {1, 3})
    for (Index T : {100, 1000, 5000}) {
      expectSameForThreadCounts<kattn::KernelAttention<float, kattn::Exp>>(determinismConfig("exp"),
                                                                           B, T);
      expectSameForThreadCounts<kattn::KernelAttention<float, kattn::Relu>>(
          determinismConfig("relu"), B, T);
    }
}

TEST(Determinism, CausalAcrossThreadCounts) {
  for (Index B : {1, 3})
    for (int regime : {0, 1, 2}) {
      const int C = regime == 2 ? 3 : 1;
      kattn::LayerConfig c = determinismConfig("exp");
      c.use_causal_windowed = true;
      c.causal_chunk_length = C;
      // C = 1: a window shorter than the sequence (the sliding-window regime), and one
      // covering it (the token-blocked prefix kernel); C = 3: a window covering it, with
      // decay (the grouped prefix regime), and right padding (5000 and 2100 are not multiples
      // of 3).
      c.causal_window_length = regime == 0 ? 8 : 8192;
      if (C == 3) {
        c.causal_window_decay = 0.97;
        c.causal_padding = "right";
      }
      expectSameForThreadCounts<kattn::CausalKernelAttention<float, kattn::Exp>>(c, B, kLongCausal);
      c.feature_transform = "relu";
      expectSameForThreadCounts<kattn::CausalKernelAttention<float, kattn::Relu>>(c, B,
                                                                                  kLongCausal);
    }
}

// Ragged calls on different slots of one StatePool from several threads at once (what
// docs/serving.md allows), each on a layer sharing its thread pool: every slot's rows equal
// the same calls made one after another.
TEST(Concurrency, RaggedCallsOnDifferentSlotsOfOnePool) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 8;
  c.feature_transform = "exp";
  c.num_random_features = 16;
  c.use_causal_windowed = true;
  c.causal_chunk_length = 1;
  c.causal_window_length = 6;
  kattn::CausalKernelAttention<float, kattn::Exp> layer(c);
  layer.setThreads(2);
  layer.initializeWeights(12, 12);
  constexpr int kThreads = 3, kCalls = 12;
  Rng r(41);
  // Thread t owns slots 2t and 2t + 1; call i brings a prompt piece to one, a step to the other.
  std::vector<Tensor2> inputs;
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kCalls; ++i) inputs.push_back(randomTensor<2>(r, 0.5f, 9, 12));
  }
  auto run = [&](kattn::StatePool<float>& pool, const std::vector<Index>& slots, int t) {
    std::vector<Tensor2> out;
    for (int i = 0; i < kCalls; ++i) {
      out.push_back(layer.forward(inputs[std::size_t(t * kCalls + i)], pool,
                                  {slots[std::size_t(2 * t)], slots[std::size_t(2 * t + 1)]},
                                  {0, i % 2 ? 8 : 1, 9}));
    }
    return out;
  };
  auto serial_pool = layer.makePool(2 * kThreads), shared_pool = layer.makePool(2 * kThreads);
  std::vector<Index> serial_slots, shared_slots;
  for (int s = 0; s < 2 * kThreads; ++s) {
    serial_slots.push_back(serial_pool.acquire());
    shared_slots.push_back(shared_pool.acquire());
  }
  std::vector<std::vector<Tensor2>> want, got(kThreads);
  for (int t = 0; t < kThreads; ++t) want.push_back(run(serial_pool, serial_slots, t));
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] { got[std::size_t(t)] = run(shared_pool, shared_slots, t); });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kCalls; ++i) {
      const Tensor2& a = got[std::size_t(t)][std::size_t(i)];
      const Tensor2& b = want[std::size_t(t)][std::size_t(i)];
      ASSERT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())), 0)
          << "thread " << t << ", call " << i;
    }
  }
}

}  // namespace
