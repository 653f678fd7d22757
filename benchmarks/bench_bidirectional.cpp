/// \file
/// Bidirectional attention core (issue 8, W1 and W2): KernelAttention::attend on projected
/// heads q, k, v [1, T, 8, 64] (T = S), feature maps included, with the form the cost model
/// picks (`kattn`) and with each form forced (`explicit`, `lowrank`, target 7); and the exact
/// softmax baseline `W1/softmax/T`.
///
/// W1: exp features with a projection, m = 256. W2: relu features, no projection (m = d = 64).

#include <cmath>
#include <optional>

#include "bench_common.hpp"
#include "flops.hpp"
#include "softmax_reference.hpp"

namespace kattn_bench {
namespace {

/// W1 and W2 lengths: the issue's {256, 1024, 4096, 16384, 65536} plus {64, 128, 512} for
/// the cost model (target 7).
constexpr Index kLengths[] = {64, 128, 256, 512, 1024, 4096, 16384, 65536};
/// The forced explicit form costs O(T^2 (m + d_v)): its essential FLOPs (flops.hpp) are 5.5
/// (W1) and 16 (W2) times the low-rank form's at T = 1024, 20 and 64 times at 4096, so beyond
/// 1024 it cannot be the faster form, and measuring it would only add half a minute of T^2
/// work to the suite.
constexpr Index kMaxExplicit = 1024;
/// Exact softmax is O(T^2 d): T = 16384 already takes seconds per call, 65536 would take
/// about a minute per call and thread count, so the baseline stops here.
constexpr Index kMaxSoftmax = 16384;

/// W1/W2 core of `Map` features (m = 0: no projection) in form `form`, written into caller
/// memory (the attend overload that allocates its result would add the first touch of a fresh
/// [T, N d_v] tensor to every call).
template <typename Map>
void BM_BidirectionalCore(benchmark::State& state, int threads, Index T, int m,
                          kattn::CoreForm form) {
  kattn::KernelAttention<float, Map> layer(coreConfig<Map>(m));
  layer.setThreads(threads);
  layer.setCoreForm(form);
  const auto q = headsInput(0, T, kHeads, kKeyDim);
  const auto k = headsInput(1, T, kHeads, kKeyDim);
  const auto v = headsInput(2, T, kHeads, kValueDim);

  const bool projected = m > 0;
  const double F = double(layer.numFeatures());
  const double work =
      form == kattn::CoreForm::Explicit
          ? flops::explicitCore(kBatch, kHeads, T, T, kKeyDim, F, kValueDim, projected)
          : flops::bidirectionalCore(kBatch, kHeads, T, T, kKeyDim, F, kValueDim, projected);
  // Into caller memory allocated (and first touched) once, as the baseline's.
  kattn::Tensor<float, 4> out(kBatch, T, kHeads, kValueDim);
  out.setZero();
  auto attend = [&] {
    layer.attend(q, k, v, std::nullopt, false, kattn::TensorMap<float, 4>(out));
  };
  timeIntoBuffer(state, attend, out.data(), std::size_t(out.size()), double(kBatch * T), work);
}

/**
 * Exact softmax attention of all heads, q, k, v [1, T, 8, 64] as for kattn, through the
 * blocked online-softmax kernel of examples/softmax_reference.hpp: heads spread over a
 * kattn::ThreadPool of the same size (8 heads on 2 threads: balanced), each head's query
 * blocks run serially on its thread. The output is caller memory, allocated once.
 */
void BM_Softmax(benchmark::State& state, int threads, Index T, bool causal) {
  using ConstMap = Eigen::Map<const kattn::Matrix<float>>;
  using Map = Eigen::Map<kattn::Matrix<float>>;
  const kattn::ThreadPool pool(threads);
  const Index S = T, N = kHeads, d = kKeyDim, dv = kValueDim;
  const ConstMap q(headsInput(0, T, N, d).data(), T, N * d);
  const ConstMap k(headsInput(1, S, N, d).data(), S, N * d);
  const ConstMap v(headsInput(2, S, N, dv).data(), S, N * dv);
  kattn::Tensor<float, 4> out_tensor(kBatch, T, N, dv);
  Map out(out_tensor.data(), T, N * dv);
  const float scale = 1.0f / std::sqrt(float(d));
  auto attention = [&] {
    pool.parallelFor(N, [&](Index n) {
      kattn_examples::softmaxAttention<float>(q.middleCols(n * d, d), k.middleCols(n * d, d),
                                              v.middleCols(n * dv, dv), scale, causal,
                                              out.middleCols(n * dv, dv));
    });
  };
  const double work = flops::softmaxAttention(kBatch, N, T, S, d, dv, causal);
  timeIntoBuffer(state, attention, out.data(), std::size_t(out.size()), double(kBatch * T),
                 work);
}

/// One workload's forms at length T: kattn (cost model), lowrank, explicit.
template <typename Map>
void registerForms(const char* workload, Index T, int m) {
  const struct {
    const char* name;
    kattn::CoreForm form;
  } forms[] = {{"kattn", kattn::CoreForm::Auto},
               {"lowrank", kattn::CoreForm::LowRank},
               {"explicit", kattn::CoreForm::Explicit}};
  for (const auto& f : forms) {
    if (f.form == kattn::CoreForm::Explicit && T > kMaxExplicit) continue;
    const kattn::CoreForm form = f.form;
    registerBenchmark(benchName(workload, f.name, T), Timing{},
                      [T, m, form](benchmark::State& state, int threads) {
                        BM_BidirectionalCore<Map>(state, threads, T, m, form);
                      });
  }
}

}  // namespace

/// Registered length by length, so that the forms and the baseline compared in a target run
/// next to each other (the machine's load drifts over minutes).
void registerBidirectional() {
  for (Index T : kLengths) {
    registerForms<kattn::Exp>("W1", T, 256);
    if (T <= kMaxSoftmax) {
      registerBenchmark(benchName("W1", "softmax", T), Timing{},
                        [T](benchmark::State& state, int threads) {
                          BM_Softmax(state, threads, T, false);
                        });
    }
  }
  for (Index T : kLengths) registerForms<kattn::Relu>("W2", T, 0);
}

/// The causal softmax baseline, for bench_causal.cpp.
void softmaxBenchmark(benchmark::State& state, int threads, Index T, bool causal) {
  BM_Softmax(state, threads, T, causal);
}

}  // namespace kattn_bench
