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

/// A tensor of the given shape from input stream `stream`, scaled by `scale`.
template <int Rank>
kattn::Tensor<float, Rank> randomTensor(int stream, const std::array<Index, Rank>& dims,
                                        float scale) {
  kattn::Tensor<float, Rank> t(dims);
  const float* src = inputData(stream, std::size_t(t.size()));
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = scale * src[i];
  return t;
}

/// Random weights for D = O = kModelDim, scaled by 1/sqrt(fan-in) so that activations stay
/// of order one (Glorot-like), biases small.
kattn::Weights<float> randomWeights() {
  const float in_scale = 1.0f / std::sqrt(float(kModelDim));
  const float out_scale = 1.0f / std::sqrt(float(kHeads * kValueDim));
  kattn::Weights<float> w;
  w.query_kernel = randomTensor<3>(3, {kModelDim, kHeads, kKeyDim}, in_scale);
  w.key_kernel = randomTensor<3>(4, {kModelDim, kHeads, kKeyDim}, in_scale);
  w.value_kernel = randomTensor<3>(5, {kModelDim, kHeads, kValueDim}, in_scale);
  w.output_kernel = randomTensor<3>(6, {kHeads, kValueDim, kModelDim}, out_scale);
  w.query_bias = randomTensor<2>(7, {kHeads, kKeyDim}, 0.1f);
  w.key_bias = randomTensor<2>(8, {kHeads, kKeyDim}, 0.1f);
  w.value_bias = randomTensor<2>(9, {kHeads, kValueDim}, 0.1f);
  w.output_bias = randomTensor<1>(10, {kModelDim}, 0.1f);
  return w;
}

/// forward(x, x) of a layer of `Map` features with `Masking`; m = 0: no projection.
template <typename Map, typename Masking>
void BM_Layer(benchmark::State& state, int threads, Index T, int m) {
  kattn::LayerConfig config;
  config.num_heads = int(kHeads);
  config.key_dim = int(kKeyDim);
  config.value_dim = int(kValueDim);
  config.feature_transform = Map::name;
  config.num_random_features = m;
  if constexpr (Masking::causal) {
    config.use_causal_windowed = true;
    config.causal_chunk_length = 1;
    config.causal_window_length = int(T);
  }
  kattn::KernelAttention<float, Map, Masking> layer(config);
  layer.setWeights(randomWeights());
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
