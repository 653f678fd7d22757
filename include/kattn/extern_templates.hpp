#pragma once
/// \file
/// KATTN_EXTERN_TEMPLATES: the explicit-instantiation declarations of the built-in layers'
/// heavy members (instances.hpp defines them). Included by layer.hpp.

namespace kattn {

// Compile-time lever for programs with many translation units: every layer type used is
// otherwise compiled in each of them (most of a build's time). Define KATTN_EXTERN_TEMPLATES in
// every translation unit and include <kattn/instances.hpp> in one (or spread its
// KATTN_INSTANCE parts over several): the built-in layers are compiled once. Not the whole
// class (`template class`): a bidirectional layer cannot instantiate the causal members. The
// members named here are the heavy ones (construction draws the projection, weights come from
// the initializers, the forward pass); the rest are small wrappers around them.
#define KATTN_FOR_EACH_BUILTIN_MAP(X, S, K) \
  X(S, Elu, K) X(S, Relu, K) X(S, Square, K) X(S, Exp, K) X(S, ExpMod, K) X(S, ExpPlus, K) X(S, Identity, K)

#define KATTN_LAYER_INSTANCE(PREFIX, S, M, K)                                                  \
  PREFIX template KernelAttention<S, M, K>::KernelAttention(const LayerConfig&);               \
  PREFIX template void KernelAttention<S, M, K>::setProjection(const Matrix<S>&);              \
  PREFIX template void KernelAttention<S, M, K>::setWeights(Weights<S>);                       \
  PREFIX template void KernelAttention<S, M, K>::initializeWeights(Index, Index,               \
                                                                   std::optional<Index>);      \
  PREFIX template Tensor<S, 3> KernelAttention<S, M, K>::forward(                              \
      const ConstTensorMap<S, 3>&, const ConstTensorMap<S, 3>&,                                \
      const std::optional<ConstTensorMap<S, 3>>&, const std::optional<ConstTensorMap<S, 2>>&,  \
      Training) const;                                                                         \
  PREFIX template Tensor<S, 4> KernelAttention<S, M, K>::attend(                               \
      const ConstTensorMap<S, 4>&, const ConstTensorMap<S, 4>&, const ConstTensorMap<S, 4>&,   \
      const std::optional<ConstTensorMap<S, 2>>&, Training) const;                             \
  PREFIX template Tensor<S, 3> KernelAttention<S, M, K>::newOutput(                            \
      const ConstTensorMap<S, 3>&, const ConstTensorMap<S, 3>&,                                \
      const std::optional<ConstTensorMap<S, 3>>&) const;                                       \
  PREFIX template void KernelAttention<S, M, K>::forwardInto(                                  \
      const ConstTensorMap<S, 3>&, const ConstTensorMap<S, 3>&,                                \
      const std::optional<ConstTensorMap<S, 3>>&, const std::optional<ConstTensorMap<S, 2>>&,  \
      Training, StreamingState<S>*, TensorMap<S, 3>, SavedFeatures<S>*) const;                 \
  PREFIX template void KernelAttention<S, M, K>::run(detail::Pass<S>, Training,                \
                                                     StreamingState<S>*)                       \
      const;

#if defined(KATTN_EXTERN_TEMPLATES) && !defined(KATTN_INSTANTIATING)
#define KATTN_EXTERN_LAYER(S, M, K) KATTN_LAYER_INSTANCE(extern, S, M, K)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, float, Bidirectional)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, float, CausalWindowed)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, double, Bidirectional)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, double, CausalWindowed)
#undef KATTN_EXTERN_LAYER
#endif

}  // namespace kattn
