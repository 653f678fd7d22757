/// \file
/// Serving many streams (issue 24, W7): S streams of W5's layer (relu, no projection, 8 heads
/// of 64, a recurrent state of constant size) after 4096 tokens of history each, every stream
/// advancing one token a call, on heads the caller projected:
///
/// - `W7/pool/S`: one ragged attend(q, k, v, pool, slots, offsets) of S rows;
/// - `W7/loop/S`: attend(q, k, v, nullopt, state) on S separate StreamingStates in turn;
/// - `W7mix/pool/64`: 60 decode steps and 4 prompt pieces of 512 tokens in one ragged call.
///
/// Items are stream-tokens, so items_per_second is tokens per second; `state_bytes` is the
/// state a call reads and writes (S states of 8 x (64 x 64 + 64) floats), and `W7/memcpy/S`
/// copies that many bytes: the memory system's floor for one call.

#include <cstring>
#include <optional>
#include <vector>

#include "bench_common.hpp"
#include "flops.hpp"

namespace kattn_bench {
namespace {

constexpr Index kHistory = 4096;
constexpr Index kMixPrompt = 512, kMixPrompts = 4;

kattn::LayerConfig servingConfig() {
  kattn::LayerConfig config;
  config.num_heads = int(kHeads);
  config.key_dim = int(kKeyDim);
  config.value_dim = int(kValueDim);
  config.feature_transform = "relu";
  config.num_random_features = 0;
  config.use_causal_windowed = true;
  config.causal_chunk_length = 1;
  config.causal_window_length = kattn::kUnboundedWindow;
  return config;
}

/// Rows [r0, r0 + L) of input stream `stream` as [L, N, h] heads.
kattn::ConstTensorMap<float, 3> rows(int stream, Index r0, Index L, Index h) {
  return kattn::ConstTensorMap<float, 3>(
      inputData(stream, std::size_t((r0 + L) * kHeads * h)) + r0 * kHeads * h, L, kHeads, h);
}

/// Per-stream bytes of a recurrent state: kv and z of every head.
double stateBytes(Index streams) {
  return double(streams) * double(kHeads) * double(kKeyDim * kValueDim + kKeyDim) * 4.0;
}

/// `streams` slots (or states), each after kHistory tokens (untimed).
void BM_Serving(benchmark::State& state, int threads, Index streams, bool pool_call,
                Index prompts) {
  kattn::CausalKernelAttention<float, kattn::Relu> layer(servingConfig());
  layer.setThreads(threads);
  const auto mode = kattn::StreamingMode::Recurrent;
  auto pool = layer.makePool(streams, mode);
  std::vector<kattn::StreamingState<float>> states;
  std::vector<Index> slots;
  const auto hq = rows(0, 0, kHistory, kKeyDim), hk = rows(1, 0, kHistory, kKeyDim),
             hv = rows(2, 0, kHistory, kValueDim);
  for (Index s = 0; s < streams; ++s) {
    if (pool_call) {
      slots.push_back(pool.acquire());
      layer.attend(hq, hk, hv, pool, {slots.back()}, {0, kHistory});
    } else {
      states.push_back(layer.makeState(1, mode));
      const auto h4 = [](const kattn::ConstTensorMap<float, 3>& t) {
        return kattn::ConstTensorMap<float, 4>(t.data(), 1, t.dimension(0), t.dimension(1),
                                               t.dimension(2));
      };
      layer.attend(h4(hq), h4(hk), h4(hv), std::nullopt, states.back());
    }
  }
  // One call's rows: a decode token per stream, or a prompt piece for the first `prompts`.
  std::vector<Index> offsets{0};
  for (Index s = 0; s < streams; ++s) {
    offsets.push_back(offsets.back() + (s < prompts ? kMixPrompt : 1));
  }
  const Index total = offsets.back();
  const auto q = rows(0, kHistory, total, kKeyDim), k = rows(1, kHistory, total, kKeyDim),
             v = rows(2, kHistory, total, kValueDim);
  kattn::Tensor<float, 3> last;       // the pool call's heads
  kattn::Tensor<float, 4> last_loop;  // the loop's last stream's
  auto call = [&] {
    if (pool_call) {
      last = layer.attend(q, k, v, pool, slots, offsets);
      return;
    }
    for (Index s = 0; s < streams; ++s) {
      const auto one = [&](const kattn::ConstTensorMap<float, 3>& t) {
        return kattn::ConstTensorMap<float, 4>(t.data() + s * t.dimension(1) * t.dimension(2), 1,
                                               1, t.dimension(1), t.dimension(2));
      };
      last_loop = layer.attend(one(q), one(k), one(v), std::nullopt, states[std::size_t(s)]);
    }
  };
  call();
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(last.data());
    benchmark::DoNotOptimize(last_loop.data());
    benchmark::ClobberMemory();
  }
  if (pool_call) {
    checkOutput(state, last.data(), std::size_t(last.size()));
  } else {
    checkOutput(state, last_loop.data(), std::size_t(last_loop.size()));
  }
  setCounters(state, double(total),
              double(total) * flops::streamingToken(1, kHeads, kKeyDim, kKeyDim, kValueDim, false));
  state.counters["state_bytes"] = stateBytes(streams);
}

/// `W7/memcpy/S`: copying S streams' state bytes to another buffer, the machine's floor for a
/// call that reads and writes every state once (items: S, as the pool's).
void BM_StateCopy(benchmark::State& state, Index streams) {
  const std::size_t n = std::size_t(stateBytes(streams) / sizeof(float));
  std::vector<float> from(inputData(3, n), inputData(3, n) + n), to(n, 0.0f);
  for (auto _ : state) {
    std::memcpy(to.data(), from.data(), n * sizeof(float));
    benchmark::DoNotOptimize(to.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(std::int64_t(streams) * std::int64_t(state.iterations()));
  state.SetBytesProcessed(std::int64_t(2 * n * sizeof(float)) * std::int64_t(state.iterations()));
}

}  // namespace

void registerServing() {
  Timing timing;
  timing.unit = benchmark::kMicrosecond;
  for (const Index streams : {Index(64), Index(256)}) {
    registerBenchmark(benchName("W7", "pool", streams), timing,
                      [streams](benchmark::State& state, int threads) {
                        BM_Serving(state, threads, streams, true, 0);
                      });
    registerBenchmark(benchName("W7", "loop", streams), timing,
                      [streams](benchmark::State& state, int threads) {
                        BM_Serving(state, threads, streams, false, 0);
                      });
    benchmark::RegisterBenchmark(benchName("W7", "memcpy", streams).c_str(),
                                 [streams](benchmark::State& state) {
                                   BM_StateCopy(state, streams);
                                 })
        ->Unit(benchmark::kMicrosecond);
  }
  registerBenchmark(benchName("W7mix", "pool", 64), timing,
                    [](benchmark::State& state, int threads) {
                      BM_Serving(state, threads, 64, true, kMixPrompts);
                    });
}

}  // namespace kattn_bench
