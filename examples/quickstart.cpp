// quickstart: configure a kernel attention layer and run one forward. Without loaded weights
// the layer draws them from its Keras initializers (glorot_uniform kernels, zero biases),
// seeded by cfg.seed, on its first forward; a real model calls setWeights (or
// kattn::io::loadWeights, see load_keras_weights.cpp) first.

#include <cstdio>

#include <kattn/kattn.hpp>

int main() {
  kattn::LayerConfig cfg;                  // the reference's Keras option names
  cfg.num_heads = 8;
  cfg.key_dim = 64;
  cfg.feature_transform = "exp";           // FAVOR+ positive random features
  cfg.num_random_features = 256;
  cfg.seed = 7;                            // same seed, same projection as TensorFlow
  kattn::KernelAttention<float, kattn::Exp> layer(cfg);

  kattn::Tensor<float, 3> x(2, 1000, 512);           // [B, T, D]
  x.setRandom();
  kattn::Tensor<float, 3> y = layer.forward(x, x);   // self-attention: y [B, T, D]
  std::printf("output shape [%ld, %ld, %ld]\n", long(y.dimension(0)), long(y.dimension(1)),
              long(y.dimension(2)));
  return y.dimension(2) == 512 ? 0 : 1;
}
