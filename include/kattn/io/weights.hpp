#pragma once
/// \file
/// Loads a layer's weights (and projection) from a safetensors file, under the reference's
/// Keras variable names or any other WeightNaming (PyTorch's nn.Linear layout included);
/// saves them back.

#include <algorithm>
#include <array>
#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>

#include "../config.hpp"
#include "../layer.hpp"
#include "safetensors.hpp"
#include "weight_naming.hpp"

namespace kattn {
namespace io {

namespace detail {

/// " (Keras query/kernel, torch_linear layout)" when the file's name or layout is not the
/// Keras one; nothing otherwise, since the name alone then says it.
inline std::string variableNote(const WeightNaming& naming, const char* variable) {
  const WeightNaming::Entry& e = naming.entry(variable);
  if (naming.prefix().empty() && e.name == variable && e.layout == WeightLayout::Keras) return "";
  return std::string(" (Keras ") + variable + ", " + layoutName(e.layout) + " layout)";
}

/// Product of `shape[first, last)`, or -1 (any size) when one of them is -1.
template <std::size_t Rank>
Index product(const std::array<Index, Rank>& shape, std::size_t first, std::size_t last) {
  Index p = 1;
  for (std::size_t i = first; i < last; ++i) {
    if (shape[i] < 0) return -1;
    p *= shape[i];
  }
  return p;
}

/**
 * Keras variable `variable` [keras_shape] (-1: any size) from `file`, under `naming`. Its
 * first `in_axes` axes are an nn.Linear's input features, the others its output features
 * (1 for the q/k/v kernels, 2 for the output kernels, 0 for biases): what TorchLinear
 * transposes. An axis of any size must be alone on its side.
 */
template <typename Scalar, std::size_t Rank>
Tensor<Scalar, int(Rank)> readWeight(const SafeTensors& file, const WeightNaming& naming,
                                     const char* variable, std::array<Index, Rank> keras_shape,
                                     std::size_t in_axes) {
  const WeightNaming::Entry& entry = naming.entry(variable);
  const std::string name = naming.fileName(variable);
  const std::string note = variableNote(naming, variable);
  if (!file.contains(name)) {
    throw std::runtime_error("missing tensor '" + printable(name) + "' in " + file.sourceName() +
                             note);
  }
  const std::vector<Index>& got = file.info(name).shape;
  const auto mismatch = [&](const std::string& expected, const std::string& meaning) {
    throw std::runtime_error(file.sourceName() + ": tensor '" + printable(name) + "'" + note +
                             ": expected shape " + expected + meaning + ", got " +
                             shapeString(got));
  };
  if (entry.layout == WeightLayout::Keras) {
    bool ok = got.size() == Rank;
    for (std::size_t i = 0; ok && i < Rank; ++i) ok = keras_shape[i] < 0 || got[i] == keras_shape[i];
    if (!ok) mismatch(expectedShapeString(keras_shape), "");
    return file.tensor<Scalar, int(Rank)>(name);
  }

  // TorchLinear: a weight [out, in] holds the kernel's transpose; a bias [out] the bias.
  const Index in = product(keras_shape, 0, in_axes);
  const Index out = product(keras_shape, in_axes, Rank);
  const std::string meaning =
      " (the nn.Linear layout of Keras " + expectedShapeString(keras_shape) + ")";
  Tensor<Scalar, int(Rank)> keras;
  if (in_axes == 0) {
    const std::array<Index, 1> want{out};
    if (got.size() != 1 || got[0] != out) mismatch(expectedShapeString(want), meaning);
    const Tensor<Scalar, 1> bias = file.tensor<Scalar, 1>(name);
    keras = Tensor<Scalar, int(Rank)>(keras_shape);
    std::copy(bias.data(), bias.data() + bias.size(), keras.data());
    return keras;
  }
  const std::array<Index, 2> want{out, in};
  if (got.size() != 2 || (out >= 0 && got[0] != out) || (in >= 0 && got[1] != in)) {
    mismatch(expectedShapeString(want), meaning);
  }
  // The one axis of any size is alone on its side: it takes that side's size in the file.
  for (std::size_t i = 0; i < Rank; ++i) {
    if (keras_shape[i] < 0) keras_shape[i] = i < in_axes ? got[1] : got[0];
  }
  const Tensor<Scalar, 2> weight = file.tensor<Scalar, 2>(name);
  keras = Tensor<Scalar, int(Rank)>(keras_shape);
  Eigen::Map<Matrix<Scalar>>(keras.data(), got[1], got[0]) =
      Eigen::Map<const Matrix<Scalar>>(weight.data(), got[0], got[1]).transpose();
  return keras;
}

/// Adds `t` [Keras shape] to `out` as `variable` under `naming` (see readWeight for `in_axes`).
template <typename Scalar, int Rank>
void addWeight(SafeTensorsWriter& out, const WeightNaming& naming, const char* variable,
               const Tensor<Scalar, Rank>& t, std::size_t in_axes) {
  if (t.size() == 0) return;
  const std::string name = naming.fileName(variable);
  if (naming.entry(variable).layout == WeightLayout::Keras) {
    out.add(name, t);
    return;
  }
  Index in = 1;
  for (std::size_t i = 0; i < in_axes; ++i) in *= t.dimension(Index(i));
  const Index features = t.size() / in;
  if (in_axes == 0) {
    out.add(name, ConstTensorMap<Scalar, 1>(t.data(), features));
    return;
  }
  Tensor<Scalar, 2> weight(features, in);
  Eigen::Map<Matrix<Scalar>>(weight.data(), features, in) =
      Eigen::Map<const Matrix<Scalar>>(t.data(), in, features).transpose();
  out.add(name, weight);
}

}  // namespace detail

/**
 * \brief The layer weights stored in `file` under `naming` (by default the Keras names
 * `query/kernel`, ...).
 *
 * Biases are read when `config.use_bias`, the `attention_output_softmax/...` pair when
 * `config.begin_kernel > 0`. Tensors in WeightLayout::TorchLinear are transposed and reshaped
 * to the Keras shapes, exactly (no arithmetic). Shapes are checked against the config here
 * and again, against each other, by KernelAttention::setWeights.
 * \throws std::runtime_error naming a missing tensor or a tensor of the wrong shape under
 *         the file's name, with the Keras variable it stands for and, for TorchLinear, the
 *         nn.Linear shape expected.
 */
template <typename Scalar>
Weights<Scalar> loadWeights(const SafeTensors& file, const LayerConfig& config,
                            const WeightNaming& naming = WeightNaming::keras()) {
  const Index N = config.num_heads, d = config.key_dim, dv = config.resolvedValueDim();
  using detail::readWeight;
  using A3 = std::array<Index, 3>;
  using A2 = std::array<Index, 2>;
  using A1 = std::array<Index, 1>;
  Weights<Scalar> w;
  w.query_kernel = readWeight<Scalar>(file, naming, "query/kernel", A3{-1, N, d}, 1);
  w.key_kernel = readWeight<Scalar>(file, naming, "key/kernel", A3{-1, N, d}, 1);
  w.value_kernel = readWeight<Scalar>(file, naming, "value/kernel", A3{-1, N, dv}, 1);
  w.output_kernel = readWeight<Scalar>(file, naming, "attention_output/kernel", A3{N, dv, -1}, 2);
  const Index O = w.output_kernel.dimension(2);
  if (config.use_bias) {
    w.query_bias = readWeight<Scalar>(file, naming, "query/bias", A2{N, d}, 0);
    w.key_bias = readWeight<Scalar>(file, naming, "key/bias", A2{N, d}, 0);
    w.value_bias = readWeight<Scalar>(file, naming, "value/bias", A2{N, dv}, 0);
    w.output_bias = readWeight<Scalar>(file, naming, "attention_output/bias", A1{O}, 0);
  }
  if (config.begin_kernel > 0) {
    w.output_softmax_kernel =
        readWeight<Scalar>(file, naming, "attention_output_softmax/kernel", A3{N, dv, O}, 2);
    if (config.use_bias) {
      w.output_softmax_bias =
          readWeight<Scalar>(file, naming, "attention_output_softmax/bias", A1{O}, 0);
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

/// Adds `w` to `out` under `naming` (by default the Keras names), in each entry's layout;
/// empty tensors are skipped.
template <typename Scalar>
void addWeights(SafeTensorsWriter& out, const Weights<Scalar>& w,
                const WeightNaming& naming = WeightNaming::keras()) {
  using detail::addWeight;
  addWeight(out, naming, "query/kernel", w.query_kernel, 1);
  addWeight(out, naming, "query/bias", w.query_bias, 0);
  addWeight(out, naming, "key/kernel", w.key_kernel, 1);
  addWeight(out, naming, "key/bias", w.key_bias, 0);
  addWeight(out, naming, "value/kernel", w.value_kernel, 1);
  addWeight(out, naming, "value/bias", w.value_bias, 0);
  addWeight(out, naming, "attention_output/kernel", w.output_kernel, 2);
  addWeight(out, naming, "attention_output/bias", w.output_bias, 0);
  addWeight(out, naming, "attention_output_softmax/kernel", w.output_softmax_kernel, 2);
  addWeight(out, naming, "attention_output_softmax/bias", w.output_softmax_bias, 0);
}

}  // namespace io
}  // namespace kattn
