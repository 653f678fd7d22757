// Must not compile: forward takes Eigen tensors, not containers.
#include <vector>

#include <kattn/kattn.hpp>

int main() {
  kattn::LayerConfig c;
  c.feature_transform = "relu";
  const kattn::KernelAttention<float, kattn::Relu> layer(c);
  const std::vector<float> x(8);
  layer.forward(x, x);
}
