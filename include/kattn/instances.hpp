#pragma once
/// \file
/// The explicit instantiations that KATTN_EXTERN_TEMPLATES (layer.hpp, any_layer.hpp) declares
/// extern: the heavy members of every built-in layer and the run-time layer's factory. Include
/// it in one translation unit of a program built with that macro; or define KATTN_INSTANCE
/// to 0, 1, 2 or 3 in four translation units (float/double x bidirectional/causal), which
/// take similar times and build in parallel.

#define KATTN_INSTANTIATING
#include "any_layer.hpp"
#include "layer.hpp"

namespace kattn {

#if !defined(KATTN_INSTANCE) || KATTN_INSTANCE == 0
namespace detail {
// The alignment this library is compiled for (detail/compiled_abi.hpp).
const volatile char KATTN_COMPILED_ABI_SYMBOL = 0;
}  // namespace detail
#endif

#define KATTN_DEFINE_LAYER(S, M, K) KATTN_LAYER_INSTANCE(, S, M, K)
#define KATTN_DEFINE_INSTANCES(S, K)                                                  \
  KATTN_FOR_EACH_BUILTIN_MAP(KATTN_DEFINE_LAYER, S, K)                                \
  template std::unique_ptr<detail::AnyLayerBase<S>> detail::makeAnyLayer<S, K>(        \
      const LayerConfig&);

#if !defined(KATTN_INSTANCE) || KATTN_INSTANCE == 0
KATTN_DEFINE_INSTANCES(float, Bidirectional)
#endif
#if !defined(KATTN_INSTANCE) || KATTN_INSTANCE == 1
KATTN_DEFINE_INSTANCES(float, CausalWindowed)
#endif
#if !defined(KATTN_INSTANCE) || KATTN_INSTANCE == 2
KATTN_DEFINE_INSTANCES(double, Bidirectional)
#endif
#if !defined(KATTN_INSTANCE) || KATTN_INSTANCE == 3
KATTN_DEFINE_INSTANCES(double, CausalWindowed)
#endif

#undef KATTN_DEFINE_INSTANCES
#undef KATTN_DEFINE_LAYER

}  // namespace kattn
