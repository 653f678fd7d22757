/// \file
/// Causal attention core (issue 8, W3 to W5): token-level causal attention (chunk 1, a window
/// covering the whole sequence, no decay: the prefix-sum path) through
/// KernelAttention::attend on projected heads [1, T, 8, 64]; the exact causal softmax
/// baseline `W3/softmax/T`; and streaming decode, one token per call.
///
/// W3: relu, no projection (m = d = 64). W4: exp with a projection, m = 256.
/// W5: relu, no projection, after a 4096-token prefix; time per token.

#include <optional>

#include "bench_common.hpp"
#include "flops.hpp"

namespace kattn_bench {
namespace {

constexpr Index kLengths[] = {1024, 4096, 16384, 65536};
/// As for W1: exact softmax stops at 16384 (65536 would take most of a minute per call).
constexpr Index kMaxSoftmax = 16384;
/// W5's prefix, fed in one call before the timed tokens.
constexpr Index kPrefix = 4096;

/// W3/W4: the whole-sequence causal pass of T tokens, into caller memory as W1.
template <typename Map>
void BM_CausalCore(benchmark::State& state, int threads, Index T, int m) {
  kattn::CausalKernelAttention<float, Map> layer(causalConfig<Map>(m, int(T)));
  layer.setThreads(threads);
  const auto q = headsInput(0, T, kHeads, kKeyDim);
  const auto k = headsInput(1, T, kHeads, kKeyDim);
  const auto v = headsInput(2, T, kHeads, kValueDim);
  const double work = flops::causalCore(kBatch, kHeads, T, kKeyDim, double(layer.numFeatures()),
                                        kValueDim, m > 0);
  // Into caller memory allocated (and first touched) once, as the baseline's.
  kattn::Tensor<float, 4> out(kBatch, T, kHeads, kValueDim);
  out.setZero();
  auto attend = [&] {
    layer.attend(q, k, v, std::nullopt, false, kattn::TensorMap<float, 4>(out));
  };
  timeIntoBuffer(state, attend, out.data(), std::size_t(out.size()), double(kBatch * T), work);
}

/**
 * W5: streaming decode with relu features and no projection: a state in `mode`, a
 * kPrefix-token prefix fed in one call (untimed), then one token per timed call
 * (attend(q, k, v, nullopt, state, heads) with [1, 1, 8, 64] heads, into one buffer). Items =
 * tokens, so the time per iteration is the time per token. The tokens cycle through 64
 * different inputs. `reused`: the state first decodes a sequence as long as the timed one and
 * is reset(), as a server reuses a state for its next sequence.
 */
void BM_StreamingDecode(benchmark::State& state, int threads, kattn::StreamingMode mode,
                        bool reused = false) {
  kattn::CausalKernelAttention<float, kattn::Relu> layer(
      causalConfig<kattn::Relu>(0, kattn::kUnboundedWindow));
  layer.setThreads(threads);
  kattn::StreamingState<float> stream = layer.makeState(kBatch, mode);
  auto prefix = [&] {
    layer.attend(headsInput(0, kPrefix, kHeads, kKeyDim), headsInput(1, kPrefix, kHeads, kKeyDim),
                 headsInput(2, kPrefix, kHeads, kValueDim), std::nullopt, stream);
  };
  prefix();
  // Tokens after the prefix: rows kPrefix + i of the input streams.
  constexpr Index kDistinct = 64;
  const float* qd = headsInput(0, kPrefix + kDistinct, kHeads, kKeyDim).data();
  const float* kd = headsInput(1, kPrefix + kDistinct, kHeads, kKeyDim).data();
  const float* vd = headsInput(2, kPrefix + kDistinct, kHeads, kValueDim).data();
  auto token = [&](const float* base, Index i, Index h) {
    return kattn::ConstTensorMap<float, 4>(base + (kPrefix + i) * kHeads * h, 1, 1, kHeads, h);
  };
  // Into one output buffer, as a decode loop would: the timed call allocates nothing.
  kattn::Tensor<float, 4> out(kBatch, 1, kHeads, kValueDim);
  auto decode = [&](Index i) {
    layer.attend(token(qd, i, kKeyDim), token(kd, i, kKeyDim), token(vd, i, kValueDim),
                 std::nullopt, stream, kattn::TensorMap<float, 4>(out));
  };
  if (reused) {
    for (benchmark::IterationCount t = 0; t < state.max_iterations; ++t) decode(t % kDistinct);
    stream.reset();
    prefix();
  }
  Index i = 0;
  for (auto _ : state) {
    decode(i);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    i = (i + 1) % kDistinct;
  }
  checkOutput(state, out.data(), std::size_t(out.size()));
  setCounters(state, double(kBatch),
              flops::streamingToken(kBatch, kHeads, kKeyDim, kKeyDim, kValueDim, false));
}

}  // namespace

void registerCausal() {
  for (Index T : kLengths) {
    registerBenchmark(benchName("W3", "kattn", T), Timing{},
                      [T](benchmark::State& state, int threads) {
                        BM_CausalCore<kattn::Relu>(state, threads, T, 0);
                      });
    if (T <= kMaxSoftmax) {
      registerBenchmark(benchName("W3", "softmax", T), Timing{},
                        [T](benchmark::State& state, int threads) {
                          softmaxBenchmark(state, threads, T, true);
                        });
    }
  }
  for (Index T : kLengths) {
    registerBenchmark(benchName("W4", "kattn", T), Timing{},
                      [T](benchmark::State& state, int threads) {
                        BM_CausalCore<kattn::Exp>(state, threads, T, 256);
                      });
  }
  // Exact mode, as the decode: with chunk 1 and an unbounded window it is the same
  // function as the recurrent mode below. A fixed number of tokens, because the exact state
  // may keep per-chunk terms for the window (its memory then grows with the tokens fed).
  Timing exact;
  exact.unit = benchmark::kMicrosecond;
  exact.iterations = 1000;
  registerBenchmark(benchName("W5", "kattn", kPrefix), exact,
                    [](benchmark::State& state, int threads) {
                      BM_StreamingDecode(state, threads, kattn::StreamingMode::Exact);
                    });
  // The same on a state reset() after a sequence as long: the memory for the window's rows
  // was touched before (a fresh state's first touch of about 4.5 KiB a token is the rest).
  registerBenchmark(benchName("W5", "reused", kPrefix), exact,
                    [](benchmark::State& state, int threads) {
                      BM_StreamingDecode(state, threads, kattn::StreamingMode::Exact, true);
                    });
  // The reference's recurrent cache (state += k' v^T per call): the same function here
  // (no decay, nothing dropped), for comparison.
  Timing recurrent;
  recurrent.unit = benchmark::kMicrosecond;
  registerBenchmark(benchName("W5", "recurrent", kPrefix), recurrent,
                    [](benchmark::State& state, int threads) {
                      BM_StreamingDecode(state, threads, kattn::StreamingMode::Recurrent);
                    });
}

}  // namespace kattn_bench
