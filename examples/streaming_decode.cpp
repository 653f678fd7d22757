// streaming_decode: token-by-token decoding with a StreamingState, as a generator would run a
// causal layer, checked against the whole-sequence forward; the state is saved to bytes in
// the middle of the stream and a restored copy continues bit for bit.
//
// The layer: relu features, causal windowed attention with chunks of one token and a window
// of 32 tokens (each token sees itself and the 31 before it), no decay. Without a decay a
// streaming state is in exact mode (SPEC 3.5): decoding reproduces the whole-sequence pass
// for any window, dropping tokens as they leave it.
//
// Exits non-zero if the streamed outputs differ from the whole-sequence outputs by more than
// 1e-5 (max |diff| / max |whole|), or if the restored continuation is not bit-identical.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <random>
#include <string>

#include <kattn/kattn.hpp>

namespace {

using kattn::Index;

constexpr Index kBatch = 2, kLength = 96, kModelDim = 64, kHeads = 4, kKeyDim = 16;
constexpr double kTolerance = 1e-5;

/// Token t of every batch row: [B, D].
kattn::Matrix<float> token(const kattn::Tensor<float, 3>& x, Index t) {
  kattn::Matrix<float> m(x.dimension(0), x.dimension(2));
  for (Index b = 0; b < m.rows(); ++b)
    for (Index j = 0; j < m.cols(); ++j) m(b, j) = x(b, t, j);
  return m;
}

}  // namespace

int run() {
  kattn::LayerConfig config;
  config.num_heads = int(kHeads);
  config.key_dim = int(kKeyDim);
  config.feature_transform = "relu";
  config.num_random_features = 64;
  config.seed = 3;
  config.use_causal_windowed = true;
  config.causal_chunk_length = 1;
  config.causal_window_length = 32;  // in chunks, i.e. tokens here
  kattn::KernelAttention<float, kattn::Relu, kattn::CausalWindowed> layer(config);
  // A stand-in for trained weights: the layer's initializers (glorot_uniform kernels, zero
  // biases), seeded by config.seed.
  layer.initializeWeights(/*query_dim=*/kModelDim, /*value_dim=*/kModelDim);

  kattn::Tensor<float, 3> x(kBatch, kLength, kModelDim);  // [B, T, D]
  std::mt19937 gen(5);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);

  // The whole sequence at once: what training or a prompt pass computes.
  const kattn::Tensor<float, 3> whole = layer.forward(x, x);

  // Decoding: one token per call. The state carries the attention window across calls.
  kattn::StreamingState<float> state = layer.makeState(kBatch);
  if (state.mode() != kattn::StreamingMode::Exact) {
    std::fprintf(stderr, "expected an exact-mode state for a layer without decay\n");
    return 1;
  }
  kattn::Tensor<float, 3> streamed(kBatch, kLength, kModelDim);
  const Index middle = kLength / 2;
  std::string saved;
  kattn::Matrix<float> y(kBatch, kModelDim);  // one step's output, reused: no allocation per step
  for (Index t = 0; t < kLength; ++t) {
    if (t == middle) saved = state.toBytes();  // e.g. to disk, or to another process
    layer.step(token(x, t), state, y);
    for (Index b = 0; b < kBatch; ++b)
      for (Index o = 0; o < kModelDim; ++o) streamed(b, t, o) = y(b, o);
  }

  // Continue from the saved bytes in a fresh state: the same outputs, bit for bit.
  kattn::StreamingState<float> restored = kattn::StreamingState<float>::fromBytes(saved);
  Index differing = 0;
  for (Index t = middle; t < kLength; ++t) {
    layer.step(token(x, t), restored, y);
    for (Index b = 0; b < kBatch; ++b)
      for (Index o = 0; o < kModelDim; ++o) {
        const float a = y(b, o), s = streamed(b, t, o);
        differing += std::memcmp(&a, &s, sizeof(float)) != 0;
      }
  }

  double max_diff = 0, max_whole = 0;
  for (Index i = 0; i < whole.size(); ++i) {
    max_diff = std::max(max_diff, double(std::abs(streamed.data()[i] - whole.data()[i])));
    max_whole = std::max(max_whole, double(std::abs(whole.data()[i])));
  }
  const double rel = max_diff / max_whole;
  std::printf("decoded %ld tokens x %ld batch rows one at a time (window %d tokens)\n",
              long(kLength), long(kBatch), config.causal_window_length);
  std::printf("streamed vs whole-sequence forward: max |diff| / max |whole| = %.2e "
              "(tolerance %.0e)\n", rel, kTolerance);
  std::printf("state saved after %ld tokens: %zu bytes; restored continuation: %s\n",
              long(middle), saved.size(),
              differing == 0 ? "bit-identical" : "DIFFERS");
  if (!(rel <= kTolerance) || differing != 0) {
    std::fprintf(stderr, "streaming_decode: FAILED (%ld values of the restored continuation "
                 "differ)\n", long(differing));
    return 1;
  }
  return 0;
}

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "streaming_decode: FAILED: %s\n", e.what());
    return 1;
  }
}
