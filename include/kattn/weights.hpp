#pragma once
/// \file
/// Weights<Scalar>: a layer's trained parameters under the reference's Keras names, their
/// shape checks against a config, and drawing them from the config's initializers.

#include <cstdint>
#include <stdexcept>
#include <string>

#include "config.hpp"
#include "initializers.hpp"
#include "limits.hpp"
#include "tensor.hpp"

namespace kattn {

/**
 * \brief The trained parameters of a layer, under the reference's Keras variable names.
 *
 * Shapes (D_q, D_k, D_v: input dims; N heads; d key_dim; d_v value_dim; O output size):
 * biases are empty tensors when use_bias is false; the `output_softmax_*` pair is used only
 * with begin_kernel > 0.
 */
template <typename Scalar>
struct Weights {
  Tensor<Scalar, 3> query_kernel;           ///< `query/kernel` [D_q, N, d]
  Tensor<Scalar, 2> query_bias;             ///< `query/bias` [N, d]
  Tensor<Scalar, 3> key_kernel;             ///< `key/kernel` [D_k, N, d]
  Tensor<Scalar, 2> key_bias;               ///< `key/bias` [N, d]
  Tensor<Scalar, 3> value_kernel;           ///< `value/kernel` [D_v, N, d_v]
  Tensor<Scalar, 2> value_bias;             ///< `value/bias` [N, d_v]
  Tensor<Scalar, 3> output_kernel;          ///< `attention_output/kernel` [N, d_v, O]
  Tensor<Scalar, 1> output_bias;            ///< `attention_output/bias` [O]
  Tensor<Scalar, 3> output_softmax_kernel;  ///< `attention_output_softmax/kernel` [N, d_v, O]
  Tensor<Scalar, 1> output_softmax_bias;    ///< `attention_output_softmax/bias` [O]
};

/// The same weights in another scalar type (e.g. a float layer from a double one's weights).
template <typename To, typename From>
Weights<To> castWeights(const Weights<From>& w) {
  Weights<To> out;
  out.query_kernel = w.query_kernel.template cast<To>();
  out.query_bias = w.query_bias.template cast<To>();
  out.key_kernel = w.key_kernel.template cast<To>();
  out.key_bias = w.key_bias.template cast<To>();
  out.value_kernel = w.value_kernel.template cast<To>();
  out.value_bias = w.value_bias.template cast<To>();
  out.output_kernel = w.output_kernel.template cast<To>();
  out.output_bias = w.output_bias.template cast<To>();
  out.output_softmax_kernel = w.output_softmax_kernel.template cast<To>();
  out.output_softmax_bias = w.output_softmax_bias.template cast<To>();
  return out;
}

namespace detail {

inline void requireEmpty(const char* name, Index size) {
  if (size != 0) {
    throw std::invalid_argument(std::string(name) +
                                ": use_bias is false, so this tensor must be empty");
  }
}

}  // namespace detail

/**
 * \brief Checks every weight's shape against `config` and the others; returns the output
 * size O. The input dims D_q, D_k, D_v are taken from the kernels.
 * \throws std::invalid_argument naming the tensor, the expected and the actual shape.
 */
template <typename Scalar>
Index checkWeights(const LayerConfig& config, const Weights<Scalar>& w) {
  const Index N = config.num_heads, d = config.key_dim, dv = config.resolvedValueDim();
  checkShape<3>("query/kernel", w.query_kernel.dimensions(), {-1, N, d});
  checkShape<3>("key/kernel", w.key_kernel.dimensions(), {-1, N, d});
  checkShape<3>("value/kernel", w.value_kernel.dimensions(), {-1, N, dv});
  const Index O = config.output_shape ? Index(*config.output_shape) : w.query_kernel.dimension(0);
  checkShape<3>("attention_output/kernel", w.output_kernel.dimensions(), {N, dv, O});
  if (config.use_bias) {
    checkShape<2>("query/bias", w.query_bias.dimensions(), {N, d});
    checkShape<2>("key/bias", w.key_bias.dimensions(), {N, d});
    checkShape<2>("value/bias", w.value_bias.dimensions(), {N, dv});
    checkShape<1>("attention_output/bias", w.output_bias.dimensions(), {O});
  } else {
    detail::requireEmpty("query/bias", w.query_bias.size());
    detail::requireEmpty("key/bias", w.key_bias.size());
    detail::requireEmpty("value/bias", w.value_bias.size());
    detail::requireEmpty("attention_output/bias", w.output_bias.size());
  }
  if (config.begin_kernel > 0) {
    checkShape<3>("attention_output_softmax/kernel", w.output_softmax_kernel.dimensions(),
                  {N, dv, O});
    if (config.use_bias) {
      checkShape<1>("attention_output_softmax/bias", w.output_softmax_bias.dimensions(), {O});
    } else {
      detail::requireEmpty("attention_output_softmax/bias", w.output_softmax_bias.size());
    }
  }
  return O;
}

/**
 * \brief The weights `config`'s kernel_initializer and bias_initializer give, seeded by
 * config.seed (one stream per tensor), for inputs whose last dims are D_q, D_v and D_k: what
 * Keras does when it builds the layer.
 * \throws std::invalid_argument for a negative dim; MemoryLimitError past the memory limit.
 */
template <typename Scalar>
Weights<Scalar> drawWeights(const LayerConfig& config, Index Dq, Index Dv, Index Dk) {
  if (Dq < 0 || Dv < 0 || Dk < 0) {
    throw std::invalid_argument("initializeWeights: input dims must be >= 0, got D_q " +
                                std::to_string(Dq) + ", D_v " + std::to_string(Dv) + ", D_k " +
                                std::to_string(Dk));
  }
  const Index N = config.num_heads, d = config.key_dim, dv = config.resolvedValueDim();
  const Index O = config.output_shape ? Index(*config.output_shape) : Dq;
  const double total = double(N) * (double(Dq + Dk) * d + double(Dv) * dv + 2.0 * dv * O);
  checkAllocation("the initial weights", total, sizeof(Scalar));
  const Initializer& k = config.kernel_initializer;
  const Initializer& b = config.bias_initializer;
  const std::int64_t seed = config.seed;
  Weights<Scalar> w;
  w.query_kernel = Tensor<Scalar, 3>(Dq, N, d);
  w.key_kernel = Tensor<Scalar, 3>(Dk, N, d);
  w.value_kernel = Tensor<Scalar, 3>(Dv, N, dv);
  w.output_kernel = Tensor<Scalar, 3>(N, dv, O);
  initialize(k, w.query_kernel, seed, 0);
  initialize(k, w.key_kernel, seed, 1);
  initialize(k, w.value_kernel, seed, 2);
  initialize(k, w.output_kernel, seed, 3);
  if (config.use_bias) {
    w.query_bias = Tensor<Scalar, 2>(N, d);
    w.key_bias = Tensor<Scalar, 2>(N, d);
    w.value_bias = Tensor<Scalar, 2>(N, dv);
    w.output_bias = Tensor<Scalar, 1>(O);
    initialize(b, w.query_bias, seed, 5);
    initialize(b, w.key_bias, seed, 6);
    initialize(b, w.value_bias, seed, 7);
    initialize(b, w.output_bias, seed, 8);
  }
  if (config.begin_kernel > 0) {
    w.output_softmax_kernel = Tensor<Scalar, 3>(N, dv, O);
    initialize(k, w.output_softmax_kernel, seed, 4);
    if (config.use_bias) {
      w.output_softmax_bias = Tensor<Scalar, 1>(O);
      initialize(b, w.output_softmax_bias, seed, 9);
    }
  }
  return w;
}

}  // namespace kattn
