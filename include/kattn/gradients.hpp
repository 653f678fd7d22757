#pragma once
/// \file
/// Gradients of the layer (docs/training.md), bidirectional or causal, in inference or
/// training mode: `backward` for the whole layer, `attendBackward` for the core on heads the
/// caller projected. Both recompute the forward from its inputs, so nothing but the inputs
/// needs to be kept between forward and backward, unless attend() kept its features in a
/// SavedFeatures for attendBackward to read; the causal core's backward holds, beyond inputs
/// and outputs, memory bounded in T (detail/causal_backward.hpp).
///
/// Conventions (the reference's TensorFlow graph, differentiated): the random projection is a
/// constant; expplus's coefficients A, B, D are constants (TF's stop_gradient); the exp
/// maps' largest-logit shifts and expplus's stabilisers are differentiated, the gradient of a
/// maximum going to where it is taken (split evenly between ties, as tf.reduce_max's); relu's
/// derivative at 0 is 0; the key mask multiplies the key features and gets no gradient; the
/// scale (also with scale_by_length, which depends on the mask alone) is a constant.
/// Training mode takes the forward call's number (TrainingCall), which fixes its dropout mask
/// and redrawn projection: the gradient passes through the mask the heads went through.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "core.hpp"
#include "detail/backward_core.hpp"
#include "detail/call_checks.hpp"
#include "detail/causal_backward.hpp"
#include "detail/dense.hpp"
#include "detail/grad_calls.hpp"
#include "layer.hpp"
#include "saved_features.hpp"
#include "tensor.hpp"
#include "training.hpp"
#include "weights.hpp"

namespace kattn {

/// One tensor under its Keras name, flattened (row-major) with its shape.
template <typename Scalar>
struct NamedTensor {
  std::string name;                 ///< e.g. `query/kernel`
  std::vector<Index> shape;         ///< e.g. [D_q, N, d]
  ConstTensorMap<Scalar, 1> values; ///< the entries, row-major; points into the owner
};

/**
 * \brief The gradients of a loss with respect to a layer's inputs and weights.
 *
 * `weights` has the shapes of the layer's weights (biases empty when use_bias is false; the
 * `output_softmax_*` pair only with begin_kernel > 0).
 */
template <typename Scalar>
struct Gradients {
  Tensor<Scalar, 3> query;  ///< [B, T, D_q]
  Tensor<Scalar, 3> value;  ///< [B, S, D_v]; with no separate key input it includes the key's
  Tensor<Scalar, 3> key;    ///< [B, S, D_k]; empty when the forward had no separate key input
  Weights<Scalar> weights;  ///< under the layer's weight names
  bool has_biases = true;         ///< use_bias: the bias gradients are part of named()
  bool has_softmax_part = false;  ///< begin_kernel > 0: attention_output_softmax/* are

  /// The weight gradients under their Keras names (`query/kernel`, ...), in Weights' order;
  /// the views point into this object.
  std::vector<NamedTensor<Scalar>> named() const {
    std::vector<NamedTensor<Scalar>> out;
    auto add = [&](const char* name, const auto& t) {
      std::vector<Index> shape;
      for (int i = 0; i < int(t.NumDimensions); ++i) shape.push_back(t.dimension(i));
      out.push_back(NamedTensor<Scalar>{name, shape, ConstTensorMap<Scalar, 1>(t.data(), t.size())});
    };
    const Weights<Scalar>& w = weights;
    add("query/kernel", w.query_kernel);
    if (has_biases) add("query/bias", w.query_bias);
    add("key/kernel", w.key_kernel);
    if (has_biases) add("key/bias", w.key_bias);
    add("value/kernel", w.value_kernel);
    if (has_biases) add("value/bias", w.value_bias);
    add("attention_output/kernel", w.output_kernel);
    if (has_biases) add("attention_output/bias", w.output_bias);
    if (has_softmax_part) {
      add("attention_output_softmax/kernel", w.output_softmax_kernel);
      if (has_biases) add("attention_output_softmax/bias", w.output_softmax_bias);
    }
    return out;
  }
};


/// The gradients of a loss with respect to the heads given to attend().
template <typename Scalar>
struct HeadGradients {
  Tensor<Scalar, 4> q;  ///< [B, T, N, d]
  Tensor<Scalar, 4> k;  ///< [B, S, N, d]
  Tensor<Scalar, 4> v;  ///< [B, S, N, d_v]
};

/**
 * \brief The backward of attend(): the gradients of a loss with respect to the heads q, k, v,
 * given its gradient with respect to attend's output heads, written into caller memory (a
 * training loop that reuses its buffers does not pay fresh pages' first touch every step).
 * \param layer the layer whose attend() ran: bidirectional (map, projection, scale,
 *        begin_kernel, is_short_seq) or causal (also chunks, window, decay, padding)
 * \param q [B, T, N, d]
 * \param k [B, S, N, d]
 * \param v [B, S, N, d_v]
 * \param attention_mask [B, S] or std::nullopt, as given to attend()
 * \param grad_heads [B, T, N, d_v], d loss / d heads; finite
 * \param grad_q [B, T, N, d], overwritten with d loss / d q
 * \param grad_k [B, S, N, d], overwritten with d loss / d k
 * \param grad_v [B, S, N, d_v], overwritten with d loss / d v
 * \param training_call std::nullopt for an attend() in inference mode; for one in training
 *        mode, its number (TrainingCall): the backward then uses that call's redrawn
 *        projection and dropout mask. Any number fits a layer without dropout and redraw
 *        (its training calls draw nothing, so they are its inference calls).
 * \param saved null, or what the attend() of these inputs kept (SavedFeatures): its features
 *        are read instead of recomputed when it holds any
 * \throws std::invalid_argument naming the tensor on a shape error, a non-finite grad_heads or
 *         a gradient whose memory overlaps an input's or another gradient's,
 *         and where attend() would (scale_by_length without a fitting mask; causal: S != T,
 *         or T not a multiple of the chunk without padding); naming training_call for a
 *         number beyond redrawProjection's (with redraw), or another than `saved`'s call;
 *         naming saved for features of other shapes.
 * \note Recomputes the forward's features unless `saved` holds them. Cost three to five
 *       forwards (docs/training.md, "Cost"), O(B N (T + S) F (d + d_v)) in the low-rank and
 *       causal forms; beyond its
 *       inputs and outputs it holds O(F d_v) and a block of rows per head task (the explicit
 *       and short forms: a [T, S] matrix, as their forwards).
 *       Causal: per head task a block of rows and the window's chunk terms, O(W F d_v) for a
 *       window of W chunks shorter than the sequence, else O(F d_v); nothing grows with T.
 *       In training mode with dropout, also the dropped grad_heads, [B, T, N, d_v].
 */
template <typename Scalar, typename FeatureMap, typename Masking>
void attendBackward(const KernelAttention<Scalar, FeatureMap, Masking>& layer,
                    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& q,
                    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& k,
                    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& v,
                    const std::optional<ConstTensorMap<detail::NoDeduce<Scalar>, 2>>& attention_mask,
                    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& grad_heads,
                    TensorMap<detail::NoDeduce<Scalar>, 4> grad_q,
                    TensorMap<detail::NoDeduce<Scalar>, 4> grad_k,
                    TensorMap<detail::NoDeduce<Scalar>, 4> grad_v,
                    const std::optional<TrainingCall>& training_call = std::nullopt,
                    const SavedFeatures<detail::NoDeduce<Scalar>>* saved = nullptr) {
  const Index N = layer.numHeads(), d = layer.keyDim(), dv = layer.valueDim();
  const Index B = q.dimension(0), T = q.dimension(1), S = k.dimension(1);
  checkShape<4>("q", q.dimensions(), {-1, -1, N, d});
  checkShape<4>("k", k.dimensions(), {B, -1, N, d});
  checkShape<4>("v", v.dimensions(), {B, S, N, dv});
  if (attention_mask) checkShape<2>("attention_mask", attention_mask->dimensions(), {B, S});
  checkShape<4>("grad_heads", grad_heads.dimensions(), {B, T, N, dv});
  checkShape<4>("grad_q", grad_q.dimensions(), {B, T, N, d});
  checkShape<4>("grad_k", grad_k.dimensions(), {B, S, N, d});
  checkShape<4>("grad_v", grad_v.dimensions(), {B, S, N, dv});
  detail::requireDisjoint<Scalar>(
      {{"q", q.data(), q.size()}, {"k", k.data(), k.size()}, {"v", v.data(), v.size()},
       {"attention_mask", attention_mask ? attention_mask->data() : nullptr,
        attention_mask ? attention_mask->size() : 0},
       {"grad_heads", grad_heads.data(), grad_heads.size()}},
      {{"grad_q", grad_q.data(), grad_q.size()}, {"grad_k", grad_k.data(), grad_k.size()},
       {"grad_v", grad_v.data(), grad_v.size()}});
  detail::requireFinite("grad_heads", grad_heads.data(), grad_heads.size());
  detail::CoreGradCall<Scalar> call =
      detail::gradCall(layer, B, T, S, attention_mask ? attention_mask->data() : nullptr);
  Matrix<Scalar> redrawn, dropped_grad;
  const detail::Dropout dropout = detail::trainingDraws(layer, training_call, call, redrawn);
  if (saved) call.saved = detail::checkedSaved(layer, *saved, B, T, S, training_call);
  call.grad = grad_heads.data();
  if (dropout.active) {
    dropped_grad = Eigen::Map<const Matrix<Scalar>>(grad_heads.data(), B * T, N * dv);
    detail::applyDropout(dropout, dropped_grad, B, T, std::min<Index>(call.begin_kernel, T));
    call.grad = dropped_grad.data();
  }
  // The causal backward overwrites dk and dv; the bidirectional one adds to all three.
  grad_q.setZero();
  if constexpr (!Masking::causal) {
    grad_k.setZero();
    grad_v.setZero();
  }
  call.q = q.data();
  call.k = k.data();
  call.v = v.data();
  call.dq = grad_q.data();
  call.dk = grad_k.data();
  call.dv = grad_v.data();
  detail::layerCoreBackward(layer, call);
}

/// attendBackward returning new tensors (HeadGradients): the overload above into memory it
/// allocates.
template <typename Scalar, typename FeatureMap, typename Masking>
HeadGradients<Scalar> attendBackward(
    const KernelAttention<Scalar, FeatureMap, Masking>& layer,
    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& q,
    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& k,
    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& v,
    const std::optional<ConstTensorMap<detail::NoDeduce<Scalar>, 2>>& attention_mask,
    const ConstTensorMap<detail::NoDeduce<Scalar>, 4>& grad_heads,
    const std::optional<TrainingCall>& training_call = std::nullopt,
    const SavedFeatures<detail::NoDeduce<Scalar>>* saved = nullptr) {
  const Index N = layer.numHeads(), d = layer.keyDim(), dv = layer.valueDim();
  // Shapes first, so that a wrong tensor is named before anything is allocated for it.
  checkShape<4>("q", q.dimensions(), {-1, -1, N, d});
  checkShape<4>("k", k.dimensions(), {q.dimension(0), -1, N, d});
  const Index B = q.dimension(0), T = q.dimension(1), S = k.dimension(1);
  HeadGradients<Scalar> out;
  out.q = Tensor<Scalar, 4>(B, T, N, d);
  out.k = Tensor<Scalar, 4>(B, S, N, d);
  out.v = Tensor<Scalar, 4>(B, S, N, dv);
  attendBackward(layer, q, k, v, attention_mask, grad_heads, TensorMap<Scalar, 4>(out.q),
                 TensorMap<Scalar, 4>(out.k), TensorMap<Scalar, 4>(out.v), training_call, saved);
  return out;
}

/**
 * \brief The backward of the layer's forward: the gradients of a loss with respect to the
 * inputs and every weight, given its gradient with respect to the output.
 * \param layer a bidirectional or causal layer with weights
 * \param query [B, T, D_q]
 * \param value [B, S, D_v]
 * \param key [B, S, D_k], or std::nullopt when the value input is also the key input (its
 *        gradient is then added into the value's)
 * \param attention_mask [B, S] or std::nullopt
 * \param grad_output [B, T, O], d loss / d output; finite
 * \param training_call std::nullopt for a forward in inference mode (training = false); for
 *        one in training mode, its number (the TrainingCall it was given, or trainingCalls()
 *        read just before it): the backward then uses that call's redrawn projection and
 *        dropout mask, and advances no counter. Any number fits a layer without dropout and
 *        redraw.
 * \param saved null, or what the forward of these inputs kept (SavedFeatures): the core's
 *        features are read instead of recomputed when it holds any
 * \throws std::invalid_argument naming the tensor where forward would, for a grad_output of
 *         another shape, or a non-finite one, and naming training_call for a number beyond
 *         redrawProjection's (with redraw) or another than `saved`'s call, and saved for
 *         features of other shapes; std::logic_error for a layer without weights.
 * \note Recomputes the forward from the inputs (docs/training.md), the core's features
 *       unless `saved` holds them: beyond the inputs, the gradients and the output-sized
 *       grad_output it holds the projected heads q, k, v, the attention heads and their
 *       gradients, O(B (T + S) N (d + d_v)), plus the core's work.
 */
template <typename Scalar, typename FeatureMap, typename Masking>
Gradients<Scalar> backward(
    const KernelAttention<Scalar, FeatureMap, Masking>& layer,
    const ConstTensorMap<detail::NoDeduce<Scalar>, 3>& query,
    const ConstTensorMap<detail::NoDeduce<Scalar>, 3>& value,
    const std::optional<ConstTensorMap<detail::NoDeduce<Scalar>, 3>>& key,
    const std::optional<ConstTensorMap<detail::NoDeduce<Scalar>, 2>>& attention_mask,
    const ConstTensorMap<detail::NoDeduce<Scalar>, 3>& grad_output,
    const std::optional<TrainingCall>& training_call = std::nullopt,
    const SavedFeatures<detail::NoDeduce<Scalar>>* saved = nullptr) {
  using Mat = Matrix<Scalar>;
  using CMap = Eigen::Map<const Mat>;
  using MapMat = Eigen::Map<Mat>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  if (!layer.hasWeights()) {
    throw std::logic_error("backward: the layer has no weights (setWeights, initializeWeights "
                           "or a first forward)");
  }
  const Weights<Scalar>& W = layer.weights();
  const LayerConfig& c = layer.config();
  const detail::CallInputs<Scalar> in = detail::inputsCall<Scalar>(
      query, value, key, attention_mask, Masking::causal, layer.queryInputDim(), layer.valueInputDim(),
      layer.keyInputDim());
  const Index B = in.B, T = in.T, S = in.S, O = layer.outputDim();
  const Index N = layer.numHeads(), Nd = N * layer.keyDim(), Ndv = N * layer.valueDim();
  checkShape<3>("grad_output", grad_output.dimensions(), {B, T, O});
  detail::requireFinite("grad_output", grad_output.data(), grad_output.size());
  detail::CoreGradCall<Scalar> call = detail::gradCall(layer, B, T, S, in.mask);
  Mat redrawn;
  const detail::Dropout dropout = detail::trainingDraws(layer, training_call, call, redrawn);
  if (saved) call.saved = detail::checkedSaved(layer, *saved, B, T, S, training_call);

  // Every dense product runs on the layer's pool, in slices fixed by the shapes
  // (detail/dense.hpp), so that the gradients do not depend on the thread count.
  const ThreadPool* pool = layer.threadPool().get();
  // The forward's projections (x W + b, rows of all heads).
  auto project = [&](const ConstTensorMap<Scalar, 3>& x, const Tensor<Scalar, 3>& kernel,
                     const Tensor<Scalar, 2>& bias, Index cols) {
    const Index rows = x.dimension(0) * x.dimension(1), D = x.dimension(2);
    Mat out(rows, cols);
    detail::productRows(CMap(x.data(), rows, D), CMap(kernel.data(), D, cols), out, false, pool);
    if (bias.size()) out.rowwise() += Eigen::Map<const RowVec>(bias.data(), cols);
    return out;
  };
  const Mat qh = project(in.query, W.query_kernel, W.query_bias, Nd);
  const Mat kh = project(in.key, W.key_kernel, W.key_bias, Nd);
  const Mat vh = project(in.value, W.value_kernel, W.value_bias, Ndv);

  // Output projection: rows t < K went through the softmax part's kernel.
  const Index K = std::min<Index>(c.begin_kernel, T);
  const CMap dy(grad_output.data(), B * T, O);
  const CMap wo(W.output_kernel.data(), Ndv, O);
  const CMap wos(W.output_softmax_kernel.data(), K > 0 ? Ndv : 0, O);
  Mat da(B * T, Ndv);
  for (Index b = 0; b < B; ++b) {
    if (K > 0) {
      detail::productRows(dy.middleRows(b * T, K), wos.transpose(), da.middleRows(b * T, K),
                          false, pool);
    }
    detail::productRows(dy.middleRows(b * T + K, T - K), wo.transpose(),
                        da.middleRows(b * T + K, T - K), false, pool);
  }
  detail::applyDropout(dropout, da, B, T, K);

  Mat heads = Mat::Zero(B * T, Ndv), dq = Mat::Zero(B * T, Nd), dk = Mat::Zero(B * S, Nd),
      dv = Mat::Zero(B * S, Ndv);
  call.q = qh.data();
  call.k = kh.data();
  call.v = vh.data();
  call.grad = da.data();
  call.dq = dq.data();
  call.dk = dk.data();
  call.dv = dv.data();
  call.heads = heads.data();
  detail::layerCoreBackward(layer, call);
  detail::applyDropout(dropout, heads, B, T, K);  // the output projection saw them dropped

  Gradients<Scalar> g;
  g.has_biases = c.use_bias;
  g.has_softmax_part = c.begin_kernel > 0;
  // d Wo = a^T dY and d bo = 1^T dY over the rows of each part.
  auto outputPart = [&](Index r0, Index r1, Tensor<Scalar, 3>& kernel, Tensor<Scalar, 1>& bias) {
    kernel = detail::zeros<Scalar, 3>({N, layer.valueDim(), O});
    MapMat dw(kernel.data(), Ndv, O);
    RowVec db = RowVec::Zero(O);
    for (Index b = 0; b < B; ++b) {
      if (r1 <= r0) break;
      detail::productColumns(heads.middleRows(b * T + r0, r1 - r0),
                             dy.middleRows(b * T + r0, r1 - r0), dw, true, pool);
      db += dy.middleRows(b * T + r0, r1 - r0).colwise().sum();
    }
    if (c.use_bias) {
      bias = Tensor<Scalar, 1>(O);
      MapMat(bias.data(), 1, O) = db;
    }
  };
  outputPart(K, T, g.weights.output_kernel, g.weights.output_bias);
  if (c.begin_kernel > 0) {
    outputPart(0, K, g.weights.output_softmax_kernel, g.weights.output_softmax_bias);
  }

  // Input projections: d W = x^T dh, d b = 1^T dh, d x = dh W^T.
  auto dense = [&](const ConstTensorMap<Scalar, 3>& x, const Tensor<Scalar, 3>& kernel,
                   const Mat& dh, Tensor<Scalar, 3>& dkernel, Tensor<Scalar, 2>& dbias,
                   Tensor<Scalar, 3>& dx, bool add) {
    const Index rows = x.dimension(0) * x.dimension(1), D = x.dimension(2), cols = dh.cols();
    dkernel = Tensor<Scalar, 3>(kernel.dimensions());
    detail::productColumns(CMap(x.data(), rows, D), dh, MapMat(dkernel.data(), D, cols), false,
                           pool);
    if (c.use_bias) {
      dbias = Tensor<Scalar, 2>(kernel.dimension(1), kernel.dimension(2));
      MapMat(dbias.data(), 1, cols) = dh.colwise().sum();
    }
    if (!add) dx = Tensor<Scalar, 3>(x.dimension(0), x.dimension(1), D);
    detail::productRows(dh, CMap(kernel.data(), D, cols).transpose(), MapMat(dx.data(), rows, D),
                        add, pool);
  };
  dense(in.query, W.query_kernel, dq, g.weights.query_kernel, g.weights.query_bias, g.query,
        false);
  dense(in.value, W.value_kernel, dv, g.weights.value_kernel, g.weights.value_bias, g.value,
        false);
  if (key) {
    dense(in.key, W.key_kernel, dk, g.weights.key_kernel, g.weights.key_bias, g.key, false);
  } else {
    dense(in.key, W.key_kernel, dk, g.weights.key_kernel, g.weights.key_bias, g.value, true);
  }
  return g;
}

}  // namespace kattn
