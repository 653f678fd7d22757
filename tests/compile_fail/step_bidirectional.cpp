// Must not compile: a decode step needs a causal layer.
#include <kattn/kattn.hpp>

int main() {
  kattn::LayerConfig c;
  c.feature_transform = "relu";
  const kattn::KernelAttention<float, kattn::Relu> layer(c);
  kattn::StreamingState<float> state;
  Eigen::MatrixXf x(1, 4), y(1, 4);
  layer.step(x, state, y);
}
