// Each path's description of its working memory (the cores' `budget`, reported by
// KernelAttention::workingBytes and checked part by part against the memory limit) against the
// heap's measured peak during the call: never below it, and at most twice it. The peak is read
// through AddressSanitizer's allocator hooks, so the test runs in the sanitizer build (the test
// command's first build) and is skipped elsewhere.

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstddef>
#include <functional>
#include <optional>
#include <string>

#include <kattn/kattn.hpp>

#if defined(__SANITIZE_ADDRESS__)
#define KATTN_TEST_HEAP_HOOKS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KATTN_TEST_HEAP_HOOKS 1
#endif
#endif

#ifdef KATTN_TEST_HEAP_HOOKS
// The sanitizer runtime's allocator interface (sanitizer/allocator_interface.h, which not
// every compiler installs beside its runtime).
extern "C" {
int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void*,
                                                                  std::size_t),
                                              void (*free_hook)(const volatile void*));
std::size_t __sanitizer_get_allocated_size(const volatile void* p);
}
#endif

namespace {

using kattn::Index;

// Bytes allocated and not yet freed since the measurement began, and their peak. Every thread
// allocates through the hooks (the pool's workers included).
std::atomic<bool> g_measuring{false};
std::atomic<long long> g_now{0}, g_peak{0}, g_allocations{0};

#ifdef KATTN_TEST_HEAP_HOOKS
extern "C" void onMalloc(const volatile void*, std::size_t size) {
  if (!g_measuring.load(std::memory_order_relaxed)) return;
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  const long long now = g_now.fetch_add((long long)size, std::memory_order_relaxed) + (long long)size;
  long long peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}
extern "C" void onFree(const volatile void* p) {
  if (!g_measuring.load(std::memory_order_relaxed)) return;
  g_now.fetch_sub((long long)__sanitizer_get_allocated_size(p),
                  std::memory_order_relaxed);
}
const int g_hooks = __sanitizer_install_malloc_and_free_hooks(onMalloc, onFree);
#endif

/// The heap's peak, in bytes above its level at the start, while `fn` runs.
double peakBytes(const std::function<void()>& fn) {
  g_now = 0;
  g_peak = 0;
  g_allocations = 0;
  g_measuring = true;
  fn();
  g_measuring = false;
  return double(g_peak.load());
}

kattn::Tensor<float, 3> inputs(Index B, Index T, Index D) {
  kattn::Tensor<float, 3> x(B, T, D);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = float((i * 7919) % 1000) / 1000.0f - 0.5f;
  return x;
}

kattn::LayerConfig config(const char* map, int m) {
  kattn::LayerConfig c;
  c.num_heads = 4;
  c.key_dim = 32;
  c.feature_transform = map;
  c.num_random_features = m;
  return c;
}

/// estimate in [peak, 2 peak], and both printed for the record.
void expectCovers(double estimate, double peak, const std::string& what) {
  EXPECT_GE(estimate, peak) << what;
  EXPECT_LE(estimate, 2 * peak) << what;
  std::printf("%-40s estimate %10.0f bytes, measured peak %10.0f bytes (%.2fx)\n", what.c_str(),
              estimate, peak, estimate / peak);
}

/// The estimate of a forward of `layer` on x against its measured peak.
template <typename Layer>
void expectBudgetHolds(Layer& layer, Index B, Index T, const std::string& what) {
  const Index D = 64;
  layer.setThreads(2);
  layer.initializeWeights(D, D);
  const kattn::Tensor<float, 3> x = inputs(B, T, D);
  kattn::Tensor<float, 3> y(B, T, layer.outputDim());
  const double estimate = layer.workingBytes(B, T, T);
  const double peak = peakBytes([&] {
    layer.forward(x, x, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(y));
  });
  expectCovers(estimate, peak, what);
}

class MemoryBudget : public ::testing::Test {
 protected:
  void SetUp() override {
#ifndef KATTN_TEST_HEAP_HOOKS
    GTEST_SKIP() << "needs AddressSanitizer's allocator hooks (the sanitizer build)";
#endif
  }
};

TEST_F(MemoryBudget, BidirectionalLowRank) {
  kattn::KernelAttention<float, kattn::Relu> relu(config("relu", 64));
  expectBudgetHolds(relu, 2, 2048, "bidirectional low-rank relu");
  kattn::KernelAttention<float, kattn::Exp> exp(config("exp", 64));
  expectBudgetHolds(exp, 1, 2048, "bidirectional low-rank exp");
}

TEST_F(MemoryBudget, BidirectionalQuadratic) {
  kattn::KernelAttention<float, kattn::Relu> explicit_form(config("relu", 0));
  explicit_form.setCoreForm(kattn::CoreForm::Explicit);
  expectBudgetHolds(explicit_form, 2, 512, "bidirectional explicit");
  auto c = config("elu", 0);
  c.is_short_seq = true;
  kattn::KernelAttention<float, kattn::Elu> short_path(c);
  expectBudgetHolds(short_path, 1, 512, "short-sequence softmax");
  kattn::KernelAttention<float, kattn::ExpPlus> expplus(config("expplus", 64));
  expectBudgetHolds(expplus, 2, 1024, "bidirectional expplus");
}

TEST_F(MemoryBudget, Causal) {
  auto c = config("relu", 0);
  c.use_causal_windowed = true;
  c.causal_chunk_length = 1;
  c.causal_window_length = 1 << 20;
  kattn::CausalKernelAttention<float, kattn::Relu> prefix(c);
  expectBudgetHolds(prefix, 1, 4096, "causal prefix sums");
  c.causal_chunk_length = 4;
  c.causal_window_length = 8;
  kattn::CausalKernelAttention<float, kattn::Relu> sliding(c);
  expectBudgetHolds(sliding, 2, 4096, "causal sliding window");
  auto e = config("exp", 64);
  e.use_causal_windowed = true;
  e.causal_chunk_length = 2;
  e.causal_window_length = 1 << 20;
  kattn::CausalKernelAttention<float, kattn::Exp> exp(e);
  expectBudgetHolds(exp, 1, 4096, "causal exp (two blocks)");
}

TEST_F(MemoryBudget, Streaming) {
  auto c = config("relu", 64);
  c.use_causal_windowed = true;
  c.causal_chunk_length = 2;
  c.causal_window_length = 64;
  const Index D = 64, T = 512;
  const kattn::Tensor<float, 3> x = inputs(1, T, D);
  for (const auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
    // A fresh layer each time: its workspaces would otherwise come from the first run.
    kattn::CausalKernelAttention<float, kattn::Relu> layer(c);
    layer.setThreads(2);
    layer.initializeWeights(D, D);
    kattn::Tensor<float, 3> y(1, T, layer.outputDim());
    auto state = layer.makeState(1, mode);
    const double estimate = layer.workingBytes(state, T);
    const double peak = peakBytes([&] {
      layer.forward(x, x, std::nullopt, std::nullopt, state, kattn::TensorMap<float, 3>(y));
    });
    expectCovers(estimate, peak,
                 mode == kattn::StreamingMode::Exact ? "streaming exact" : "streaming recurrent");
  }
}

// A decode loop of steps: once the state's window has filled, no step allocates, whether x and
// out are packed row-major (used in place) or column-major (through the layer's buffers).
TEST_F(MemoryBudget, DecodeStepsAllocateNothing) {
  auto c = config("relu", 64);
  c.use_causal_windowed = true;
  c.causal_chunk_length = 1;
  c.causal_window_length = 8;
  const Index B = 3, D = 64;
  for (const auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
    for (const int threads : {1, 2}) {
      kattn::CausalKernelAttention<float, kattn::Relu> layer(c);
      layer.setThreads(threads);
      layer.initializeWeights(D, D);
      auto state = layer.makeState(B, mode);
      kattn::Matrix<float> x = kattn::Matrix<float>::Random(B, D), y(B, layer.outputDim());
      Eigen::MatrixXf x_col = x, y_col(B, layer.outputDim());
      // Warm-up: the calls of these shapes, and the window filled and rebuilt once.
      for (int t = 0; t < 2 * c.causal_window_length; ++t) {
        layer.step(x, state, y);
        layer.step(x_col, state, y_col);
      }
      peakBytes([&] {
        for (int t = 0; t < 20; ++t) {
          layer.step(x, state, y);
          layer.step(x_col, state, y_col);
        }
      });
      EXPECT_EQ(g_allocations.load(), 0)
          << (mode == kattn::StreamingMode::Exact ? "exact" : "recurrent") << ", " << threads
          << " threads";
    }
  }
}

/// The causal backward holds no buffer that grows with T (issue 26): at T = 10^5 and 10^6 the
/// heap's peak during attendBackward, less the gradients it returns, stays under 4 MiB,
/// where one number per row and head would be 8 MB at 10^6 and a T x F x d_v tensor gigabytes.
TEST_F(MemoryBudget, CausalBackwardIsBoundedInT) {
  struct Shape {
    int chunk, window;
    std::optional<double> decay;
    const char* padding;
  };
  for (const Shape& sh : {Shape{4, 3, 0.9, "left"}, Shape{1, kattn::kUnboundedWindow, {}, "none"}}) {
    kattn::LayerConfig c = config("relu", 8);
    c.num_heads = 2;
    c.key_dim = 4;
    c.value_dim = 4;
    c.use_causal_windowed = true;
    c.causal_chunk_length = sh.chunk;
    c.causal_window_length = sh.window;
    c.causal_window_decay = sh.decay;
    c.causal_padding = sh.padding;
    kattn::CausalKernelAttention<float, kattn::Relu> layer(c);
    layer.setThreads(1);
    for (Index T : {Index(100000), Index(1000000) + 1}) {
      kattn::Tensor<float, 4> q(1, T, 2, 4), k(1, T, 2, 4), v(1, T, 2, 4), g(1, T, 2, 4);
      for (auto* t : {&q, &k, &v, &g}) {
        for (Index i = 0; i < t->size(); ++i) t->data()[i] = float((i * 7919) % 1000) / 1000.0f;
      }
      std::optional<kattn::HeadGradients<float>> hg;
      const double peak =
          peakBytes([&] { hg = kattn::attendBackward(layer, q, k, v, std::nullopt, g); });
      const double returned = double(hg->q.size() + hg->k.size() + hg->v.size()) * sizeof(float);
      std::printf("causal backward C=%d T=%lld: heap peak %.2f MiB, of it gradients %.2f MiB\n",
                  sh.chunk, (long long)T, peak / (1 << 20), returned / (1 << 20));
      EXPECT_LT(peak - returned, 4.0 * (1 << 20)) << "C = " << sh.chunk << ", T = " << T;
    }
  }
}

}  // namespace
