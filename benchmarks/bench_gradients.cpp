/// \file
/// Gradients (issue 26, G1, G3, G6): a training step's attention work, forward plus backward,
/// beside the forward alone in the same run, so that their ratio is measured under the same
/// load. `<G>/kattn/T` times the forward into caller memory followed by the backward;
/// `<G>/forward/T` times the forward alone. `G1/saved/T` times the forward keeping its
/// features (kattn::SavedFeatures) and the backward reading them: storing against recomputing;
/// `G1/saving/T` the forward keeping them, alone. `G6/saved/T` is G6's storing counterpart.
///
/// G1: W1's core (bench_bidirectional.cpp): attend on projected heads q, k, v [1, T, 8, 64],
/// exp with a projection, m = 256; backward = kattn::attendBackward.
/// G3: W3's causal core (bench_causal.cpp): attend on heads [1, T, 8, 64], relu, no
/// projection, chunks of one token and a window covering the sequence; backward =
/// kattn::attendBackward through the causal backward.
/// G6: W6's whole layer (bench_layer.cpp): forward(x, x) with x [1, T, 512], exp, m = 256,
/// the projections and the output projection; backward = kattn::backward.
///
/// The upstream gradients are fixed inputs. G1 and G3 write the gradients into caller memory,
/// as their forward baseline writes its heads. G6's backward returns fresh gradient tensors
/// (`backward` has no overload into caller memory), so each call pays their first touch,
/// while its forward baseline writes into memory touched once: its ratio errs against the
/// backward.

#include <array>
#include <cmath>
#include <optional>
#include <type_traits>

#include "bench_common.hpp"
#include "flops.hpp"

namespace kattn_bench {
namespace {

constexpr Index kLengths[] = {1024, 4096, 16384};
constexpr Index kModelDim = 512;

/// What a benchmark times: the forward alone (keeping its features or not), or the forward
/// and then the backward, the backward recomputing the features or reading those the forward
/// saved.
enum class Pass { Forward, SavingForward, ForwardBackward, SavedForwardBackward };

/// The implementation name of a pass in benchmark names.
const char* passName(Pass pass) {
  switch (pass) {
    case Pass::Forward: return "forward";
    case Pass::SavingForward: return "saving";
    case Pass::ForwardBackward: return "kattn";
    case Pass::SavedForwardBackward: break;
  }
  return "saved";
}

/// Whether a pass keeps the forward's features.
bool saves(Pass pass) {
  return pass == Pass::SavingForward || pass == Pass::SavedForwardBackward;
}

/// Whether a pass runs the backward.
bool runsBackward(Pass pass) {
  return pass == Pass::ForwardBackward || pass == Pass::SavedForwardBackward;
}

/// timeIntoBuffer for a step whose checked result moves from call to call (a returned
/// gradient tensor): `result()` gives the tensor after the last call.
template <typename Fn, typename Result>
void timeReturned(benchmark::State& state, Fn&& run, Result&& result, double tokens,
                  double flops) {
  if (warmUpWorthIt(flops)) run();
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  const auto& t = result();
  checkOutput(state, t.data(), std::size_t(t.size()));
  setCounters(state, tokens, flops);
}

/// G1/G3: the core of `Map` features (m = 0: no projection), S = T, bidirectional (G1) or
/// causal (G3). The causal count is the bidirectional one (flops.hpp: causality removes no
/// essential work from the linear form, in either direction).
template <typename Map, typename Masking>
void BM_CoreGradients(benchmark::State& state, int threads, Index T, int m, Pass pass) {
  constexpr bool causal = std::is_same_v<Masking, kattn::CausalWindowed>;
  kattn::KernelAttention<float, Map, Masking> layer(causal ? causalConfig<Map>(m, int(T))
                                                           : coreConfig<Map>(m));
  layer.setThreads(threads);
  const auto q = headsInput(0, T, kHeads, kKeyDim);
  const auto k = headsInput(1, T, kHeads, kKeyDim);
  const auto v = headsInput(2, T, kHeads, kValueDim);
  const auto grad = headsInput(3, T, kHeads, kValueDim);
  const double F = double(layer.numFeatures());
  const bool projected = m > 0;
  double work = flops::bidirectionalCore(kBatch, kHeads, T, T, kKeyDim, F, kValueDim, projected);
  if (runsBackward(pass)) {
    work += flops::bidirectionalCoreBackward(kBatch, kHeads, T, T, kKeyDim, F, kValueDim,
                                             projected);
  }
  kattn::Tensor<float, 4> out(kBatch, T, kHeads, kValueDim);
  out.setZero();
  kattn::SavedFeatures<float> features;
  kattn::SavedFeatures<float>* saved = saves(pass) ? &features : nullptr;
  auto forward = [&] {
    layer.attend(q, k, v, std::nullopt, false, kattn::TensorMap<float, 4>(out), saved);
  };
  // A training loop keeps its SavedFeatures from step to step: their buffers are touched
  // first here, as the gradients' are below, not in the timed calls.
  if (saved) forward();
  if (!runsBackward(pass)) {
    timeIntoBuffer(state, forward, out.data(), std::size_t(out.size()), double(kBatch * T), work);
    return;
  }
  kattn::Tensor<float, 4> dq(q.dimensions()), dk(k.dimensions()), dv(v.dimensions());
  dq.setZero();
  dk.setZero();
  dv.setZero();
  auto step = [&] {
    forward();
    kattn::attendBackward(layer, q, k, v, std::nullopt, grad, kattn::TensorMap<float, 4>(dq),
                          kattn::TensorMap<float, 4>(dk), kattn::TensorMap<float, 4>(dv),
                          std::nullopt, saved);
  };
  // The gradient of v is one that every form and map computes in full: its check stands for
  // the backward's.
  timeIntoBuffer(state, step, dv.data(), std::size_t(dv.size()), double(kBatch * T), work);
}

/// G6: W6's layer, self-attention forward(x, x), then kattn::backward.
void BM_LayerGradients(benchmark::State& state, int threads, Index T, Pass pass) {
  kattn::KernelAttention<float, kattn::Exp> layer(coreConfig<kattn::Exp>(256));
  layer.setWeights(layerWeights(kModelDim));
  layer.setThreads(threads);
  const auto x = layerInput(0, T, kModelDim);
  const auto grad = layerInput(11, T, kModelDim);
  const double F = double(layer.numFeatures());
  double work = flops::layer(kBatch, kHeads, T, kModelDim, kKeyDim, F, kValueDim, kModelDim, true);
  if (runsBackward(pass)) {
    work += flops::layerBackward(kBatch, kHeads, T, kModelDim, kKeyDim, F, kValueDim, kModelDim,
                                 true);
  }
  kattn::Tensor<float, 3> out(kBatch, T, kModelDim);
  out.setZero();
  kattn::SavedFeatures<float> features;
  kattn::SavedFeatures<float>* saved = saves(pass) ? &features : nullptr;
  auto forward = [&] {
    layer.forward(x, x, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(out), saved);
  };
  if (saved) forward();  // as in BM_CoreGradients
  if (!runsBackward(pass)) {
    timeIntoBuffer(state, forward, out.data(), std::size_t(out.size()), double(kBatch * T), work);
    return;
  }
  kattn::Gradients<float> grads;
  auto step = [&] {
    forward();
    grads = kattn::backward(layer, x, x, std::nullopt, std::nullopt, grad, std::nullopt, saved);
  };
  timeReturned(state, step, [&]() -> const kattn::Tensor<float, 3>& { return grads.value; },
               double(kBatch * T), work);
}

}  // namespace

/// Length by length, forward and forward plus backward next to each other (the machine's
/// load drifts over minutes).
void registerGradients() {
  for (Index T : kLengths) {
    for (const Pass pass : {Pass::Forward, Pass::SavingForward, Pass::ForwardBackward,
                            Pass::SavedForwardBackward}) {
      registerBenchmark(benchName("G1", passName(pass), T), Timing{},
                        [T, pass](benchmark::State& state, int threads) {
                          BM_CoreGradients<kattn::Exp, kattn::Bidirectional>(state, threads, T, 256, pass);
                        });
    }
  }
  for (Index T : kLengths) {
    for (const Pass pass : {Pass::Forward, Pass::ForwardBackward}) {
      registerBenchmark(benchName("G3", passName(pass), T), Timing{},
                        [T, pass](benchmark::State& state, int threads) {
                          BM_CoreGradients<kattn::Relu, kattn::CausalWindowed>(state, threads, T, 0, pass);
                        });
    }
  }
  for (Index T : kLengths) {
    for (const Pass pass : {Pass::Forward, Pass::ForwardBackward, Pass::SavedForwardBackward}) {
      registerBenchmark(benchName("G6", passName(pass), T), Timing{},
                        [T, pass](benchmark::State& state, int threads) {
                          BM_LayerGradients(state, threads, T, pass);
                        });
    }
  }
}

}  // namespace kattn_bench
