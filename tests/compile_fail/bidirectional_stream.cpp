// Must not compile: a streaming state needs a causal layer.
#include <kattn/kattn.hpp>

int main() {
  kattn::LayerConfig c;
  c.feature_transform = "relu";
  const kattn::KernelAttention<float, kattn::Relu> layer(c);
  auto state = layer.makeState(1);
  (void)state;
}
