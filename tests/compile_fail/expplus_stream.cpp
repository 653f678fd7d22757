// Must not compile: expplus uses whole-sequence statistics, so it cannot stream.
#include <kattn/kattn.hpp>

int main() {
  kattn::LayerConfig c;
  c.feature_transform = "expplus";
  c.use_causal_windowed = true;
  const kattn::KernelAttention<float, kattn::ExpPlus, kattn::CausalWindowed> layer(c);
  auto state = layer.makeState(1);
  (void)state;
}
