#pragma once
/// \file
/// \private What the backward entry points (gradients.hpp) share: a layer's core backward
/// call and its training draws, the dropout of the heads' gradients, and the checks of their
/// arguments (finite, disjoint, saved features that fit).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../layer.hpp"
#include "../saved_features.hpp"
#include "../tensor.hpp"
#include "../training.hpp"
#include "backward_core.hpp"
#include "call_checks.hpp"
#include "causal_backward.hpp"

namespace kattn {
namespace detail {

/// Throws std::invalid_argument naming `what` at its first non-finite entry.
template <typename Scalar>
void requireFinite(const char* what, const Scalar* p, Index n) {
  if (Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(p, n).allFinite()) return;
  for (Index i = 0; i < n; ++i) {
    if (!std::isfinite(p[i])) {
      throw std::invalid_argument(std::string(what) + ": expected finite values, got " +
                                  numberString(double(p[i])) + " at flat index " +
                                  std::to_string(i));
    }
  }
}

/// The core backward call of `layer` for B rows of T queries and S keys, without data.
/// \throws std::invalid_argument where the causal forward would: S != T, or a T that breaks
/// the chunks without padding.
template <typename Scalar, typename FeatureMap, typename Masking>
CoreGradCall<Scalar> gradCall(const KernelAttention<Scalar, FeatureMap, Masking>& layer,
                              Index B, Index T, Index S, const Scalar* mask) {
  static_assert(has_feature_backward_v<FeatureMap>,
                "kattn's backward knows the derivatives of the seven built-in feature maps only.");
  const LayerConfig& c = layer.config();
  if constexpr (Masking::causal) {
    if (S != T) {
      throw std::invalid_argument("k: causal attention needs as many keys as queries (T = " +
                                  std::to_string(T) + ", S = " + std::to_string(S) + ")");
    }
    (void)layer.masking().leadingPad(T);
  }
  CoreGradCall<Scalar> call;
  call.dims = HeadDims{layer.numHeads(), layer.keyDim(), layer.valueDim()};
  call.B = B;
  call.T = T;
  call.S = S;
  call.mask = mask;
  CallInputs<Scalar> in;
  in.B = B;
  in.T = T;
  in.S = S;
  in.mask = mask;
  call.scales = batchScales<Scalar>(c.resolvedScale(), c.scale_by_length, in);
  call.projection = c.hasProjection() ? &layer.projection() : nullptr;
  call.form = layer.coreForm();
  call.begin_kernel = c.begin_kernel;
  call.is_short_seq = c.is_short_seq;
  call.pool = layer.threadPool().get();
  return call;
}

/// The core backward of `layer`'s masking.
template <typename Scalar, typename FeatureMap, typename Masking>
void layerCoreBackward(const KernelAttention<Scalar, FeatureMap, Masking>& layer,
                       const CoreGradCall<Scalar>& call) {
  if constexpr (Masking::causal) {
    causalCoreBackward<FeatureMap>(call, layer.masking());
  } else {
    (void)layer;
    coreBackward<FeatureMap>(call);
  }
}

/**
 * Sets `call`'s projection to that of the forward call `training` (nullopt: inference, the
 * layer's own) and returns its dropout, as KernelAttention::run draws them. A redrawn
 * projection goes into `redrawn`, which must outlive `call`.
 * \throws std::invalid_argument naming training_call for a number redraw cannot take.
 */
template <typename Scalar, typename FeatureMap, typename Masking>
Dropout trainingDraws(const KernelAttention<Scalar, FeatureMap, Masking>& layer,
                      const std::optional<TrainingCall>& training, CoreGradCall<Scalar>& call,
                      Matrix<Scalar>& redrawn) {
  if (!training) return Dropout{};
  const LayerConfig& c = layer.config();
  call.projection = givenCallProjection(c, layer.projection(), true, training->number, redrawn);
  return Dropout{c.dropout, c.seed, training->number, c.dropout > 0};
}

/// "training call 5" or "a call without draws" (the forward's draws of a SavedFeatures).
inline std::string drawsString(const std::optional<std::uint64_t>& call) {
  return call ? "training call " + std::to_string(*call) : std::string("a call without draws");
}

/**
 * The saved features for a backward of B rows of T queries and S keys given `training`, or
 * null when they hold none.
 * \throws std::invalid_argument naming saved when they are of other shapes, and
 *         training_call when they are of a call with other draws (dropout mask, projection).
 */
template <typename Scalar, typename FeatureMap, typename Masking>
const SavedData<Scalar>* checkedSaved(const KernelAttention<Scalar, FeatureMap, Masking>& layer,
                                      const SavedFeatures<Scalar>& saved, Index B, Index T,
                                      Index S, const std::optional<TrainingCall>& training) {
  const SavedData<Scalar>& s = savedData(saved);
  if (!s.holds) return nullptr;
  const std::array<Index, 5> got{s.B, s.T, s.S, s.heads, s.features};
  const std::array<Index, 5> want{B, T, S, layer.numHeads(), layer.numFeatures()};
  if (got != want || s.value_dim != layer.valueDim()) {
    throw std::invalid_argument("saved: features of a call with [B, T, S, N, F] = " +
                                shapeString(got) + ", this backward's are " +
                                shapeString(want));
  }
  const LayerConfig& c = layer.config();
  const bool draws = training && (c.dropout > 0 || c.redraw);
  const std::optional<std::uint64_t> call =
      draws ? std::optional<std::uint64_t>(training->number) : std::nullopt;
  if (call != s.call) {
    throw std::invalid_argument("training_call: the saved features are of " +
                                drawsString(s.call) + ", this backward is of " +
                                drawsString(call));
  }
  return &s;
}

/**
 * Multiplies rows x [B T, N d_v] (heads, or their gradients) by the forward call's dropout
 * mask, whose entries are 0 or 1 / (1 - rate): inverted dropout is linear, so the heads'
 * gradient goes through the mask the heads went through. The mask is the forward's because
 * the (part, batch row, row, column) are: begin_kernel's softmax rows [0, K) are part 1, the
 * other rows part 0 (the cores' OutputPart::stream; the causal core's rows are all part 0).
 */
template <typename Scalar>
void applyDropout(const Dropout& dropout, Matrix<Scalar>& x, Index B, Index T, Index K) {
  if (!dropout.active) return;
  Matrix<Scalar> rows;
  for (Index b = 0; b < B; ++b) {
    if (K > 0) {
      rows = x.middleRows(b * T, K);
      dropout.apply(rows, 1, b, 0);
      x.middleRows(b * T, K) = rows;
    }
    rows = x.middleRows(b * T + K, T - K);
    dropout.apply(rows, 0, b, K);
    x.middleRows(b * T + K, T - K) = rows;
  }
}

/// A named span of numbers, for requireDisjoint.
template <typename Scalar>
struct Span {
  const char* name;
  const Scalar* data;
  Index size;
};

/// Throws std::invalid_argument naming the two tensors when an output span overlaps an input
/// span or another output: a backward reads its inputs while it writes its outputs.
template <typename Scalar>
void requireDisjoint(std::initializer_list<Span<Scalar>> inputs,
                     std::initializer_list<Span<Scalar>> outputs) {
  auto overlap = [](const Span<Scalar>& a, const Span<Scalar>& b) {
    if (!a.data || !b.data || a.size == 0 || b.size == 0) return false;
    const std::less<const Scalar*> before;
    return before(a.data, b.data + b.size) && before(b.data, a.data + a.size);
  };
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    auto clash = [&](const Span<Scalar>& other) {
      if (!overlap(*o, other)) return;
      throw std::invalid_argument(std::string(o->name) + ": overlaps " + other.name +
                                  " in memory; the gradients need memory of their own");
    };
    for (const Span<Scalar>& in : inputs) clash(in);
    for (auto p = outputs.begin(); p != o; ++p) clash(*p);
  }
}

/// A zeroed tensor of the given dims.
template <typename Scalar, int Rank>
Tensor<Scalar, Rank> zeros(const std::array<Index, Rank>& dims) {
  Tensor<Scalar, Rank> t(dims);
  t.setZero();
  return t;
}

}  // namespace detail

}  // namespace kattn
