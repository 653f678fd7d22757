// Uses the public API as a consumer would: config, layer, weights, forward.
//
// With KATTN_CONSUMER_WIRING_ONLY (the add_subdirectory build), it checks that the target
// gives the headers and Eigen, and stops before a layer: a layer's forward takes some 45 s to
// compile on a 2-core machine, and the find_package build already runs one.
#include <kattn/kattn.hpp>

#include <cstdio>

int main() {
#ifdef KATTN_CONSUMER_WIRING_ONLY
  kattn::LayerConfig config;
  config.num_heads = 2;
  config.key_dim = 4;
  config.validate();
  const kattn::Tensor<float, 3> x(1, 5, 6);
  std::printf("consumer (wiring): [%ld, %ld, %ld]\n", long(x.dimension(0)), long(x.dimension(1)),
              long(x.dimension(2)));
  return 0;
#else
  kattn::LayerConfig config;
  config.num_heads = 2;
  config.key_dim = 4;
  config.feature_transform = "relu";
  config.num_random_features = 8;
  kattn::KernelAttention<float, kattn::Relu> layer(config);
  kattn::Weights<float> w;
  const int D = 6;
  w.query_kernel = kattn::Tensor<float, 3>(D, 2, 4);
  w.key_kernel = kattn::Tensor<float, 3>(D, 2, 4);
  w.value_kernel = kattn::Tensor<float, 3>(D, 2, 4);
  w.output_kernel = kattn::Tensor<float, 3>(2, 4, D);
  w.query_bias = kattn::Tensor<float, 2>(2, 4);
  w.key_bias = kattn::Tensor<float, 2>(2, 4);
  w.value_bias = kattn::Tensor<float, 2>(2, 4);
  w.output_bias = kattn::Tensor<float, 1>(D);
  for (auto* t : {&w.query_kernel, &w.key_kernel, &w.value_kernel, &w.output_kernel}) t->setRandom();
  for (auto* t : {&w.query_bias, &w.key_bias, &w.value_bias}) t->setZero();
  w.output_bias.setZero();
  layer.setWeights(w);
  kattn::Tensor<float, 3> x(1, 5, D);
  x.setRandom();
  const kattn::Tensor<float, 3> y = layer.forward(x, x);
  std::printf("consumer: output [%ld, %ld, %ld]\n%s\n", long(y.dimension(0)),
              long(y.dimension(1)), long(y.dimension(2)), kattn::buildInfo().toString().c_str());
  return y.dimension(1) == 5 && y.dimension(2) == D ? 0 : 1;
#endif
}
