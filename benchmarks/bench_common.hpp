#pragma once
/// \file
/// What every kattn_bench benchmark shares: the shapes (issue 8), deterministic
/// inputs, names `<workload>/<implementation>/<T>` with a `.../threads:1` twin, the `flops`
/// and items counters, and registration.

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <kattn/kattn.hpp>

namespace kattn_bench {

using kattn::Index;

/// The setup for every workload unless it says otherwise: one batch row, 8 heads,
/// d = d_v = 64, float32.
inline constexpr Index kBatch = 1;
inline constexpr Index kHeads = 8;
inline constexpr Index kKeyDim = 64;
inline constexpr Index kValueDim = 64;

/// Threads of the plain-named benchmarks (the two); each also runs with one thread
/// under `<name>/threads:1`.
inline constexpr int kThreads = 2;

/// Google Benchmark appends "/real_time" to every name (we time wall-clock, see
/// registerBenchmark), and "/iterations:n" where the count is fixed;
/// `--benchmark_filter=W1/kattn/16384` selects by the prefix all the same.

/**
 * `count` floats of input stream `stream` (0, 1, 2, ... for q, k, v, weights), uniform on
 * [-sqrt 3, sqrt 3] (mean 0, variance 1, like projected activations). Value i of a stream is
 * fixed (a hash of stream and i), so every run and every length sees the same data, and a
 * length-T input is the first T rows of the longest one. The buffers live for the whole run,
 * generated (and first touched) outside any timed region. The pointer stays valid until the
 * next call for the same stream with a larger count.
 */
inline const float* inputData(int stream, std::size_t count) {
  static std::vector<std::vector<float>> buffers;
  if (buffers.size() <= std::size_t(stream)) buffers.resize(std::size_t(stream) + 1);
  std::vector<float>& buf = buffers[std::size_t(stream)];
  const std::size_t old = buf.size();
  if (count > old) {
    buf.resize(count);
    for (std::size_t i = old; i < count; ++i) {
      // splitmix64 of (stream, i): 24 random bits to a float in [-1, 1), times sqrt(3).
      std::uint64_t z = (std::uint64_t(stream) << 48) ^ std::uint64_t(i);
      z += 0x9e3779b97f4a7c15ULL;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      z ^= z >> 31;
      const float u = float(z >> 40) * (1.0f / 8388608.0f) - 1.0f;
      buf[i] = u * 1.7320508f;
    }
  }
  return buf.data();
}

/// A [B, L, N, h] per-head input (q, k or v for KernelAttention::attend) from stream `stream`.
inline kattn::ConstTensorMap<float, 4> headsInput(int stream, Index L, Index N, Index h,
                                                  Index B = kBatch) {
  return kattn::ConstTensorMap<float, 4>(inputData(stream, std::size_t(B * L * N * h)), B, L, N,
                                         h);
}

/// A [B, L, D] layer input from stream `stream`.
inline kattn::ConstTensorMap<float, 3> layerInput(int stream, Index L, Index D,
                                                  Index B = kBatch) {
  return kattn::ConstTensorMap<float, 3>(inputData(stream, std::size_t(B * L * D)), B, L, D);
}

/// The cores' layer: kHeads heads of kKeyDim (values kValueDim), `Map` features, m random
/// features (0: no projection).
template <typename Map>
kattn::LayerConfig coreConfig(int m) {
  kattn::LayerConfig config;
  config.num_heads = int(kHeads);
  config.key_dim = int(kKeyDim);
  config.value_dim = int(kValueDim);
  config.feature_transform = Map::name;
  config.num_random_features = m;
  return config;
}

/// coreConfig made token-level causal: chunk 1, window `window` (chunks), no decay.
template <typename Map>
kattn::LayerConfig causalConfig(int m, int window) {
  kattn::LayerConfig config = coreConfig<Map>(m);
  config.use_causal_windowed = true;
  config.causal_chunk_length = 1;
  config.causal_window_length = window;
  return config;
}

/// A tensor of the given shape from input stream `stream`, scaled by `scale`.
template <int Rank>
kattn::Tensor<float, Rank> randomTensor(int stream, const std::array<Index, Rank>& dims,
                                        float scale) {
  kattn::Tensor<float, Rank> t(dims);
  const float* src = inputData(stream, std::size_t(t.size()));
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = scale * src[i];
  return t;
}

/// W6's weights (bench_layer.cpp, and G6): D = O = model_dim, kHeads heads, scaled by
/// 1/sqrt(fan-in) so that activations stay of order one (Glorot-like), biases small.
inline kattn::Weights<float> layerWeights(Index model_dim) {
  const float in_scale = 1.0f / std::sqrt(float(model_dim));
  const float out_scale = 1.0f / std::sqrt(float(kHeads * kValueDim));
  kattn::Weights<float> w;
  w.query_kernel = randomTensor<3>(3, {model_dim, kHeads, kKeyDim}, in_scale);
  w.key_kernel = randomTensor<3>(4, {model_dim, kHeads, kKeyDim}, in_scale);
  w.value_kernel = randomTensor<3>(5, {model_dim, kHeads, kValueDim}, in_scale);
  w.output_kernel = randomTensor<3>(6, {kHeads, kValueDim, model_dim}, out_scale);
  w.query_bias = randomTensor<2>(7, {kHeads, kKeyDim}, 0.1f);
  w.key_bias = randomTensor<2>(8, {kHeads, kKeyDim}, 0.1f);
  w.value_bias = randomTensor<2>(9, {kHeads, kValueDim}, 0.1f);
  w.output_bias = randomTensor<1>(10, {model_dim}, 0.1f);
  return w;
}

/**
 * What is wrong with a benchmark's output, or null when nothing obvious is: a value that is
 * not finite, or all values zero (impossible for these inputs: every output row is a weighted
 * average of values with positive weights). A broken kernel then reports an error instead of a
 * time. Not a correctness test (tests/ compare against the reference); a guard against timing
 * a kernel that skips its work.
 */
inline const char* outputProblem(const float* p, std::size_t n) {
  bool nonzero = false;
  for (std::size_t i = 0; i < n; ++i) {
    if (!std::isfinite(p[i])) return "output has a non-finite value";
    nonzero = nonzero || p[i] != 0.0f;
  }
  return nonzero || n == 0 ? nullptr : "output is all zeros";
}

/// Reports outputProblem(p, n), if any, as the benchmark's error.
inline void checkOutput(benchmark::State& state, const float* p, std::size_t n) {
  if (const char* problem = outputProblem(p, n)) state.SkipWithError(problem);
}

/// Work below this many essential FLOPs (about 0.1-0.2 s on the machine) gets one
/// untimed call first (thread wake-up, first touch of the layer's buffers); heavier work is
/// timed from its first call, its warm-up costs being small beside it.
inline bool warmUpWorthIt(double flops) { return flops < 2e10; }

/// `flops` counter: essential FLOPs per iteration (flops.hpp), reported as a rate (GFLOP/s in
/// the console, FLOP/s in JSON); items: tokens per iteration, as items_per_second.
inline void setCounters(benchmark::State& state, double tokens, double flops) {
  state.SetItemsProcessed(std::int64_t(tokens * double(state.iterations())));
  state.counters["flops"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

/**
 * The timed loop of a benchmark whose `run()` writes n floats at `out`, caller memory allocated
 * (and first touched) once: the warm-up call where warmUpWorthIt(flops), one call per
 * iteration, then the output check and the counters (`tokens` and `flops` per call).
 */
template <typename Fn>
void timeIntoBuffer(benchmark::State& state, Fn&& run, const float* out, std::size_t n,
                    double tokens, double flops) {
  if (warmUpWorthIt(flops)) run();
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(out);
    benchmark::ClobberMemory();
  }
  checkOutput(state, out, n);
  setCounters(state, tokens, flops);
}

/// How one benchmark is timed. The measuring time is Google Benchmark's (--benchmark_min_time,
/// default 0.5 s; a call longer than that is measured once): set per benchmark it would be
/// appended to every name.
struct Timing {
  benchmark::TimeUnit unit = benchmark::kMillisecond;
  /// A fixed number of iterations instead (0: by the minimum time). Appears in the name.
  std::int64_t iterations = 0;
};

/**
 * Registers `fn(state, threads)` twice: as `name` with kThreads threads and as
 * `name/threads:1` with one. Both report wall-clock time (UseRealTime), so the rates count
 * the work of every thread of the pool, not the CPU time of the calling thread.
 */
template <typename Fn>
void registerBenchmark(const std::string& name, Timing timing, Fn fn) {
  for (int threads : {kThreads, 1}) {
    const std::string full = threads == kThreads ? name : name + "/threads:1";
    benchmark::internal::Benchmark* b = benchmark::RegisterBenchmark(
        full.c_str(), [fn, threads](benchmark::State& state) { fn(state, threads); });
    b->UseRealTime()->Unit(timing.unit);
    if (timing.iterations > 0) b->Iterations(timing.iterations);
  }
}

/// `<workload>/<implementation>/<T>`.
inline std::string benchName(const char* workload, const char* implementation, Index T) {
  return std::string(workload) + "/" + implementation + "/" + std::to_string(T);
}

/// Exact softmax attention of all heads (bench_bidirectional.cpp), the baseline of W1 and W3.
void softmaxBenchmark(benchmark::State& state, int threads, Index T, bool causal);

// Each bench_<topic>.cpp registers its benchmarks; bench_main.cpp calls these in this order.
void registerGemm();
void registerBidirectional();
void registerCausal();
void registerLayer();
void registerGradients();
void registerMemory();
void registerFloor();
void registerServing();

}  // namespace kattn_bench
