/// \file
/// `MEM/kattn/1000000`, target 6 of issue 8: the heap the causal path needs at T = 1,000,000
/// beyond its inputs and outputs. The shape is the long-sequence case of the causal issue
/// (issue 3): a whole layer forward(x, x) into caller memory, 4 heads, d = d_v = 32, exp
/// features with a projection (m = 64), model dim 128, chunk 1, a window covering the whole
/// sequence, no decay, float32. Reported as the counter `peak_heap_MiB` (and the time).
///
/// How it is measured: this binary replaces malloc and its relatives with thin wrappers
/// around glibc's own (`__libc_malloc` and so on) which, while a measurement is on, add up
/// the usable size of every block allocated and freed and keep the peak of the sum. Eigen's
/// matrices and tensors (aligned_malloc calls malloc), std containers (operator new calls
/// malloc) and the pool's worker threads all go through them. With the measurement off they
/// cost one relaxed atomic load per call. The input, the output, the weights and the layer
/// (with its thread pool) exist before the measurement starts, so the peak is the working set
/// of the forward: buffers, features, states, whatever it allocates. Thread stacks are
/// mmap'd by pthreads, not heap, and not counted (they are fixed per thread).
///
/// Without glibc, or under a sanitizer (which replaces malloc itself), the benchmark reports
/// an error instead of a number.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <utility>
#include <vector>

#include "bench_common.hpp"
#include "flops.hpp"

#if defined(__GLIBC__)
#include <malloc.h>
#define KATTN_BENCH_HEAP_COUNT 1
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#undef KATTN_BENCH_HEAP_COUNT
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#undef KATTN_BENCH_HEAP_COUNT
#endif
#endif

#ifdef KATTN_BENCH_HEAP_COUNT

namespace {

std::atomic<bool> g_counting{false};
std::atomic<std::int64_t> g_current{0};
std::atomic<std::int64_t> g_peak{0};

bool counting() { return g_counting.load(std::memory_order_relaxed); }

void countAllocation(void* p) {
  if (!p || !counting()) return;
  const auto n = std::int64_t(malloc_usable_size(p));
  const std::int64_t now = g_current.fetch_add(n, std::memory_order_relaxed) + n;
  std::int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void countFree(void* p) {
  if (!p || !counting()) return;
  g_current.fetch_sub(std::int64_t(malloc_usable_size(p)), std::memory_order_relaxed);
}

}  // namespace

// glibc's allocator under its internal names (exported since glibc 2.2.5).
extern "C" {
void* __libc_malloc(std::size_t size);
void __libc_free(void* p);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* p, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);
void* __libc_valloc(std::size_t size);
void* __libc_pvalloc(std::size_t size);

void* malloc(std::size_t size) noexcept {
  void* p = __libc_malloc(size);
  countAllocation(p);
  return p;
}

void free(void* p) noexcept {
  countFree(p);
  __libc_free(p);
}

void* calloc(std::size_t count, std::size_t size) noexcept {
  void* p = __libc_calloc(count, size);
  countAllocation(p);
  return p;
}

void* realloc(void* p, std::size_t size) noexcept {
  if (!counting()) return __libc_realloc(p, size);
  const auto old = std::int64_t(p ? malloc_usable_size(p) : 0);
  void* q = __libc_realloc(p, size);
  if (!q && size != 0) return q;  // failed: p is untouched
  g_current.fetch_sub(old, std::memory_order_relaxed);
  countAllocation(q);
  return q;
}

void* memalign(std::size_t alignment, std::size_t size) noexcept {
  void* p = __libc_memalign(alignment, size);
  countAllocation(p);
  return p;
}

void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  return memalign(alignment, size);
}

int posix_memalign(void** out, std::size_t alignment, std::size_t size) noexcept {
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  void* p = memalign(alignment, size);
  if (!p && size != 0) return ENOMEM;
  *out = p;
  return 0;
}

void* valloc(std::size_t size) noexcept {
  void* p = __libc_valloc(size);
  countAllocation(p);
  return p;
}

void* pvalloc(std::size_t size) noexcept {
  void* p = __libc_pvalloc(size);
  countAllocation(p);
  return p;
}
}  // extern "C"

#endif  // KATTN_BENCH_HEAP_COUNT

namespace kattn_bench {
namespace {

constexpr Index kLongT = 1000000;
constexpr Index kLongHeads = 4, kLongDim = 32, kLongModel = 128;
constexpr int kLongFeatures = 64;

kattn::Tensor<float, 3> scaledTensor(int stream, Index a, Index b, Index c, float scale) {
  kattn::Tensor<float, 3> t(a, b, c);
  const float* src = inputData(stream, std::size_t(t.size()));
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = scale * src[i];
  return t;
}

void BM_LongCausalMemory(benchmark::State& state, int threads) {
#ifndef KATTN_BENCH_HEAP_COUNT
  state.SkipWithError("heap counting needs glibc's allocator and no sanitizer");
  for (auto _ : state) {
  }
  (void)threads;
#else
  kattn::LayerConfig config;
  config.num_heads = int(kLongHeads);
  config.key_dim = int(kLongDim);
  config.feature_transform = kattn::Exp::name;
  config.num_random_features = kLongFeatures;
  config.use_causal_windowed = true;
  config.causal_chunk_length = 1;
  config.causal_window_length = int(kLongT);
  kattn::CausalKernelAttention<float, kattn::Exp> layer(config);
  const float in_scale = 1.0f / std::sqrt(float(kLongModel));
  const float out_scale = 1.0f / std::sqrt(float(kLongHeads * kLongDim));
  kattn::Weights<float> w;
  w.query_kernel = scaledTensor(3, kLongModel, kLongHeads, kLongDim, in_scale);
  w.key_kernel = scaledTensor(4, kLongModel, kLongHeads, kLongDim, in_scale);
  w.value_kernel = scaledTensor(5, kLongModel, kLongHeads, kLongDim, in_scale);
  w.output_kernel = scaledTensor(6, kLongHeads, kLongDim, kLongModel, out_scale);
  w.query_bias = kattn::Tensor<float, 2>(kLongHeads, kLongDim);
  w.key_bias = kattn::Tensor<float, 2>(kLongHeads, kLongDim);
  w.value_bias = kattn::Tensor<float, 2>(kLongHeads, kLongDim);
  w.output_bias = kattn::Tensor<float, 1>(kLongModel);
  w.query_bias.setZero();
  w.key_bias.setZero();
  w.value_bias.setZero();
  w.output_bias.setZero();
  layer.setWeights(std::move(w));
  layer.setThreads(threads);

  // x [1, T, 128]: the first 65536 x 512 values of stream 0 (W1's q) repeated; local, so its
  // 512 MB go back when the benchmark ends.
  const std::size_t n = std::size_t(kLongT * kLongModel), period = std::size_t(65536 * 512);
  const float* src = inputData(0, period);
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = src[i % period];
  const kattn::ConstTensorMap<float, 3> xm(x.data(), 1, kLongT, kLongModel);
  kattn::Tensor<float, 3> out(1, kLongT, kLongModel);
  out.setZero();  // first touch outside the timed region

  std::int64_t peak = 0;
  for (auto _ : state) {
    g_current.store(0);
    g_peak.store(0);
    g_counting.store(true);
    layer.forward(xm, xm, std::nullopt, std::nullopt, false,
                  kattn::TensorMap<float, 3>(out.data(), 1, kLongT, kLongModel));
    g_counting.store(false);
    peak = std::max(peak, g_peak.load());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  checkOutput(state, out.data(), std::size_t(out.size()));
  setCounters(state, double(kLongT),
              flops::layer(1, kLongHeads, kLongT, kLongModel, kLongDim, kLongFeatures, kLongDim,
                           kLongModel, true));
  state.counters["peak_heap_MiB"] = double(peak) / double(1 << 20);
  state.counters["io_MiB"] = double(2 * n * sizeof(float)) / double(1 << 20);
#endif
}

}  // namespace

void registerMemory() {
  // One call takes seconds, so Google Benchmark measures one iteration.
  registerBenchmark(benchName("MEM", "kattn", kLongT), Timing{}, BM_LongCausalMemory);
}

}  // namespace kattn_bench
