#pragma once
/// \file
/// Loads a layer's weights (and projection) from a safetensors file under the reference's
/// Keras variable names; saves them back.

#include <optional>
#include <string>

#include "../config.hpp"
#include "../layer.hpp"
#include "safetensors.hpp"

namespace kattn {
namespace io {

/**
 * \brief The layer weights stored in `file` under their Keras names (`query/kernel`, ...).
 *
 * Biases are read when `config.use_bias`, the `attention_output_softmax/...` pair when
 * `config.begin_kernel > 0`. Shapes are checked against the config here and again, against
 * each other, by KernelAttention::setWeights.
 * \throws std::runtime_error naming a missing tensor or a tensor of the wrong shape.
 */
template <typename Scalar>
Weights<Scalar> loadWeights(const SafeTensors& file, const LayerConfig& config) {
  const Index N = config.num_heads, d = config.key_dim, dv = config.resolvedValueDim();
  Weights<Scalar> w;
  w.query_kernel = file.tensor<Scalar, 3>("query/kernel", {-1, N, d});
  w.key_kernel = file.tensor<Scalar, 3>("key/kernel", {-1, N, d});
  w.value_kernel = file.tensor<Scalar, 3>("value/kernel", {-1, N, dv});
  w.output_kernel = file.tensor<Scalar, 3>("attention_output/kernel", {N, dv, -1});
  const Index O = w.output_kernel.dimension(2);
  if (config.use_bias) {
    w.query_bias = file.tensor<Scalar, 2>("query/bias", {N, d});
    w.key_bias = file.tensor<Scalar, 2>("key/bias", {N, d});
    w.value_bias = file.tensor<Scalar, 2>("value/bias", {N, dv});
    w.output_bias = file.tensor<Scalar, 1>("attention_output/bias", {O});
  }
  if (config.begin_kernel > 0) {
    w.output_softmax_kernel = file.tensor<Scalar, 3>("attention_output_softmax/kernel", {N, dv, O});
    if (config.use_bias) {
      w.output_softmax_bias = file.tensor<Scalar, 1>("attention_output_softmax/bias", {O});
    }
  }
  return w;
}

/// The `projection_matrix` [m, key_dim] in `file`, if there is one.
template <typename Scalar>
std::optional<Matrix<Scalar>> loadProjection(const SafeTensors& file, const LayerConfig& config) {
  if (!file.contains("projection_matrix")) return std::nullopt;
  const Tensor<Scalar, 2> p = file.tensor<Scalar, 2>(
      "projection_matrix", {Index(config.num_random_features), Index(config.key_dim)});
  return Matrix<Scalar>(Eigen::Map<const Matrix<Scalar>>(p.data(), p.dimension(0), p.dimension(1)));
}

/// Adds `w` to `out` under the Keras names (empty tensors are skipped).
template <typename Scalar>
void addWeights(SafeTensorsWriter& out, const Weights<Scalar>& w) {
  auto add = [&](const char* name, const auto& t) {
    if (t.size()) out.add(name, t);
  };
  add("query/kernel", w.query_kernel);
  add("query/bias", w.query_bias);
  add("key/kernel", w.key_kernel);
  add("key/bias", w.key_bias);
  add("value/kernel", w.value_kernel);
  add("value/bias", w.value_bias);
  add("attention_output/kernel", w.output_kernel);
  add("attention_output/bias", w.output_bias);
  add("attention_output_softmax/kernel", w.output_softmax_kernel);
  add("attention_output_softmax/bias", w.output_softmax_bias);
}

}  // namespace io
}  // namespace kattn
