/// \file
/// The whole layer (issue 8, W6 and W6c): forward(x, x) with x [1, T, 512], the q, k and v
/// projections to 8 heads of 64, the core and the output projection back to 512, random
/// weights with biases.
///
/// W6: bidirectional, exp with a projection, m = 256. W6c: causal (chunk 1, whole-sequence
/// window, no decay), relu, no projection.

#include <array>
#include <cmath>
#include <optional>

#include "bench_common.hpp"
#include "flops.hpp"

namespace kattn_bench {
namespace {

constexpr Index kLengths[] = {1024, 16384};
constexpr Index kModelDim = 512;

/// forward(x, x) of a layer of `Map` features with `Masking`; m = 0: no projection.
template <typename Map, typename Masking>
void BM_Layer(benchmark::State& state, int threads, Index T, int m) {
  kattn::KernelAttention<float, Map, Masking> layer(Masking::causal ? causalConfig<Map>(m, int(T))
                                                                   : coreConfig<Map>(m));
  layer.setWeights(layerWeights(kModelDim));
  layer.setThreads(threads);
  const auto x = layerInput(0, T, kModelDim);
  const double work = flops::layer(kBatch, kHeads, T, kModelDim, kKeyDim,
                                   double(layer.numFeatures()), kValueDim, kModelDim, m > 0);
  // Into caller memory allocated (and first touched) once.
  kattn::Tensor<float, 3> out(kBatch, T, kModelDim);
  out.setZero();
  auto forward = [&] {
    layer.forward(x, x, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(out));
  };
  timeIntoBuffer(state, forward, out.data(), std::size_t(out.size()), double(kBatch * T), work);
}

}  // namespace

void registerLayer() {
  for (Index T : kLengths) {
    registerBenchmark(benchName("W6", "kattn", T), Timing{},
                      [T](benchmark::State& state, int threads) {
                        BM_Layer<kattn::Exp, kattn::Bidirectional>(state, threads, T, 256);
                      });
  }
  for (Index T : kLengths) {
    registerBenchmark(benchName("W6c", "kattn", T), Timing{},
                      [T](benchmark::State& state, int threads) {
                        BM_Layer<kattn::Relu, kattn::CausalWindowed>(state, threads, T, 0);
                      });
  }
}

}  // namespace kattn_bench
