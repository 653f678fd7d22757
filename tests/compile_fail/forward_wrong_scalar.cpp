// Must not compile: a float layer given a double tensor (no silent change of precision).
#include <kattn/kattn.hpp>

int main() {
  kattn::LayerConfig c;
  c.feature_transform = "relu";
  const kattn::KernelAttention<float, kattn::Relu> layer(c);
  const Eigen::Tensor<double, 3> x(1, 2, 4);
  layer.forward(x, x);
}
