// Must not compile: forward takes rank-3 inputs [B, T, D].
#include <kattn/kattn.hpp>

int main() {
  kattn::LayerConfig c;
  c.feature_transform = "relu";
  const kattn::KernelAttention<float, kattn::Relu> layer(c);
  const kattn::Tensor<float, 2> x(2, 4);
  layer.forward(x, x);
}
