// quickstart: configure a kernel attention layer, give it weights, run one forward.

#include <cmath>
#include <cstdio>
#include <random>

#include <kattn/kattn.hpp>

namespace {

/// Weights as an untrained Keras layer has them: kernels from N(0, 1/fan_in) (seeded), zero
/// biases. A real model loads its trained weights instead (kattn/io/safetensors.hpp).
kattn::Weights<float> randomWeights(kattn::Index D, kattn::Index N, kattn::Index d,
                                    kattn::Index O, unsigned seed) {
  std::mt19937 gen(seed);
  auto fill = [&](auto& t, kattn::Index fan_in) {
    std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(float(fan_in)));
    for (kattn::Index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  };
  kattn::Weights<float> w;
  w.query_kernel.resize(D, N, d);   // [D_q, N, d]
  w.key_kernel.resize(D, N, d);     // [D_k, N, d]
  w.value_kernel.resize(D, N, d);   // [D_v, N, d_v]
  w.output_kernel.resize(N, d, O);  // [N, d_v, O]
  fill(w.query_kernel, D);
  fill(w.key_kernel, D);
  fill(w.value_kernel, D);
  fill(w.output_kernel, N * d);
  w.query_bias.resize(N, d);
  w.key_bias.resize(N, d);
  w.value_bias.resize(N, d);
  w.output_bias.resize(O);
  w.query_bias.setZero();
  w.key_bias.setZero();
  w.value_bias.setZero();
  w.output_bias.setZero();
  return w;
}

}  // namespace

int main() {
  kattn::LayerConfig cfg;                  // the reference's Keras option names
  cfg.num_heads = 8;
  cfg.key_dim = 64;
  cfg.feature_transform = "exp";           // FAVOR+ positive random features
  cfg.num_random_features = 256;
  cfg.seed = 7;                            // same seed, same projection as TensorFlow
  kattn::KernelAttention<float, kattn::Exp> layer(cfg);
  layer.setWeights(randomWeights(/*D=*/512, /*N=*/8, /*d=*/64, /*O=*/512, /*seed=*/0));

  kattn::Tensor<float, 3> x(2, 1000, 512);           // [B, T, D]
  x.setRandom();
  kattn::Tensor<float, 3> y = layer.forward(x, x);   // self-attention: y [B, T, D]
  std::printf("output shape [%ld, %ld, %ld]\n", long(y.dimension(0)), long(y.dimension(1)),
              long(y.dimension(2)));
  return 0;
}
