#pragma once
/// \file
/// \private One call of a layer as its cores see it: the head dims, where the per-head rows come
/// from (the layer's inputs through the dense projections, or heads the caller projected), where
/// the attention heads go (the output projection, or the caller's buffer), the call's
/// projection P, scales, dropout, pool and workspaces. The cores read rows and deliver heads
/// through it, never through the layer.

#include <cmath>
#include <cstdint>
#include <vector>

#include "../masking.hpp"
#include "../parallel.hpp"
#include "../saved_features.hpp"
#include "../tensor.hpp"
#include "../weights.hpp"
#include "dense.hpp"
#include "random_bits.hpp"
#include "schedule.hpp"
#include "workspace.hpp"

namespace kattn {
namespace detail {

/// Per batch row scale s_b (SPEC 1.2): one value for every row, or with scale_by_length one
/// per row. Without scale_by_length it holds no array, so a decode step allocates nothing.
template <typename Scalar>
struct BatchScales {
  Scalar uniform = Scalar(1);
  std::vector<Scalar> rows;  ///< empty: every row's scale is `uniform`
  Scalar operator[](std::size_t b) const { return rows.empty() ? uniform : rows[b]; }
};

/// N heads, d = key_dim, d_v = value_dim.
struct HeadDims {
  Index heads = 1, key_dim = 1, value_dim = 1;
};

/// Where a call's per-head rows come from.
enum class RowSource {
  Projections,  ///< the layer's inputs [B, L, D] through the dense projections
  Heads,        ///< heads the caller projected, [B, L, N h] (attend)
};

/// Where a call's attention heads go.
enum class HeadsSink {
  OutputDense,  ///< through the output projection into y [B, T, O]
  Caller,       ///< as they are, into the caller's heads [B, T, N d_v] (attend)
};

/// A call's inputs after the boundary checks.
template <typename Scalar>
struct CallInputs {
  RowSource source = RowSource::Projections;
  Index B = 0, T = 0, S = 0;
  const Scalar* mask = nullptr;  ///< [B, S], or null for none
  /// RowSource::Projections: query [B, T, D_q], value and key [B, S, D] (key = value when the
  /// caller gave none).
  ConstTensorMap<Scalar, 3> query{nullptr, 0, 0, 0}, value{nullptr, 0, 0, 0},
      key{nullptr, 0, 0, 0};
  /// RowSource::Heads: q [B, T, N d], k [B, S, N d], v [B, S, N d_v].
  const Scalar *q_heads = nullptr, *k_heads = nullptr, *v_heads = nullptr;

  bool givenHeads() const { return source == RowSource::Heads; }
};

/// Which output projection and dropout stream a part of the layer uses: the kernel part, or
/// begin_kernel's softmax part.
template <typename Scalar>
struct OutputPart {
  std::uint64_t stream = 0;
  const Tensor<Scalar, 3>* kernel = nullptr;  ///< [N, d_v, O]
  const Tensor<Scalar, 1>* bias = nullptr;    ///< [O] or empty
};

/// Inverted dropout (SPEC 1.4) whose mask is fixed by (seed, training call, part, b, row,
/// column): no shared generator, so threads and schedules do not change it.
struct Dropout {
  double rate = 0;
  std::int64_t seed = 0;
  std::uint64_t call = 0;
  bool active = false;

  /// Drops entries of heads [L, N d_v] of rows [r0, ...) of batch row b, scaling the rest.
  template <typename Scalar>
  void apply(Matrix<Scalar>& a, std::uint64_t part, Index b, Index r0) const {
    const Scalar keep_scale = Scalar(1.0 / (1.0 - rate));
    const std::uint64_t stream = mixBits(std::uint64_t(seed), call, part, std::uint64_t(b));
    for (Index r = 0; r < a.rows(); ++r)
      for (Index c = 0; c < a.cols(); ++c) {
        const double u =
            uniformFromBits(mixBits(stream, std::uint64_t(r0 + r), std::uint64_t(c), 0));
        a(r, c) = u < rate ? Scalar(0) : a(r, c) * keep_scale;
      }
  }
};

/// Queries, keys or values.
enum class Side { Query, Key, Value };

/// Everything one call's cores need; made by the layer per call.
template <typename Scalar>
struct Pass {
  using Mat = Matrix<Scalar>;
  using ConstMapMat = Eigen::Map<const Mat>;
  using MapMat = Eigen::Map<Mat>;

  // Eigen's TensorMap assigns element by element: the maps are bound at construction only.
  Pass() = default;
  Pass(const CallInputs<Scalar>& inputs, const TensorMap<Scalar, 3>& output)
      : in(inputs), y(output) {}
  Pass(const Pass&) = default;
  Pass& operator=(const Pass&) = delete;

  HeadDims dims;
  CallInputs<Scalar> in;
  HeadsSink sink = HeadsSink::OutputDense;
  TensorMap<Scalar, 3> y{nullptr, 0, 0, 0};  ///< OutputDense: [B, T, O]
  Scalar* heads_out = nullptr;                ///< Caller: [B, T, N d_v]
  const Weights<Scalar>* weights = nullptr;   ///< for RowSource::Projections and OutputDense
  const Mat* projection = nullptr;            ///< this call's P [m, d], or null
  BatchScales<Scalar> scales;                 ///< s_b per batch row (SPEC 1.2)
  const ThreadPool* pool = nullptr;           ///< the layer's pool, or null
  WorkspacePool<Scalar>* workspaces = nullptr;
  CoreForm form = CoreForm::Auto;
  Dropout dropout;
  SavedData<Scalar>* saved = nullptr;  ///< where the low-rank form keeps its features, or null

  /// Features per head.
  Index features() const { return featureDim(dims.key_dim, projection); }

  /// Scaled per-head rows of batch row b: queries [q0, q0 + Lq) into w.qs [Lq, N d], keys
  /// and values [k0, k0 + Lk) into w.ks, w.vs (values only when asked).
  void scaledRows(Index b, Index q0, Index Lq, Index k0, Index Lk, Scalar qscale, Scalar kscale,
                  RowWork<Scalar>& w, const ThreadPool* inner, bool values = true) const {
    const Index Nd = dims.heads * dims.key_dim, Ndv = dims.heads * dims.value_dim;
    if (in.givenHeads()) {
      w.qs = ConstMapMat(in.q_heads + (b * in.T + q0) * Nd, Lq, Nd) * qscale;
      w.ks = ConstMapMat(in.k_heads + (b * in.S + k0) * Nd, Lk, Nd) * kscale;
      if (values) w.vs = ConstMapMat(in.v_heads + (b * in.S + k0) * Ndv, Lk, Ndv);
      return;
    }
    const Weights<Scalar>& W = *weights;
    denseRows(in.query, b, q0, Lq, W.query_kernel, W.query_bias, qscale, w.qs, inner);
    denseRows(in.key, b, k0, Lk, W.key_kernel, W.key_bias, kscale, w.ks, inner);
    if (values) {
      denseRows(in.value, b, k0, Lk, W.value_kernel, W.value_bias, Scalar(1), w.vs, inner);
    }
  }

  /// Rows [r0, r0 + L) of head n of one side of batch row b, times `scale`, into out [L, h].
  void headRows(Side side, Index b, Index n, Index r0, Index L, Scalar scale, Mat& out) const {
    const Index h = side == Side::Value ? dims.value_dim : dims.key_dim;
    if (in.givenHeads()) {
      const Scalar* base = side == Side::Query ? in.q_heads
                           : side == Side::Key ? in.k_heads
                                               : in.v_heads;
      const Index len = side == Side::Query ? in.T : in.S, cols = dims.heads * h;
      out = ConstMapMat(base + (b * len + r0) * cols, L, cols).middleCols(n * h, h) * scale;
      return;
    }
    const Weights<Scalar>& W = *weights;
    const ConstTensorMap<Scalar, 3>& x =
        side == Side::Query ? in.query : side == Side::Key ? in.key : in.value;
    const Tensor<Scalar, 3>& kernel = side == Side::Query ? W.query_kernel
                                      : side == Side::Key ? W.key_kernel
                                                          : W.value_kernel;
    const Tensor<Scalar, 2>& bias = side == Side::Query ? W.query_bias
                                    : side == Side::Key ? W.key_bias
                                                        : W.value_bias;
    denseHeadRows(x, b, r0, L, kernel, bias, n, scale, out);
  }

  /// Delivers heads [L, N d_v] of rows [r0, r0 + L) of batch row b: through the part's
  /// output projection into y, or into the caller's heads.
  void deliver(const Mat& heads, Index b, Index r0, const OutputPart<Scalar>& part,
               const ThreadPool* inner) const {
    if (sink == HeadsSink::Caller) {
      const Index Ndv = heads.cols();
      MapMat(heads_out + (b * in.T + r0) * Ndv, heads.rows(), Ndv) = heads;
      return;
    }
    outputRows(heads, *part.kernel, *part.bias, y, b, r0, inner);
  }

  /// The caller's heads of rows [r0, r0 + L) of batch row b (HeadsSink::Caller only).
  MapMat callerHeads(Index b, Index r0, Index L) const {
    const Index Ndv = dims.heads * dims.value_dim;
    return MapMat(heads_out + (b * in.T + r0) * Ndv, L, Ndv);
  }

  /// Floating-point operations of the call, roughly (only compared with kParallelMinFlops):
  /// the dense projections, the feature products and the low-rank core of every batch row.
  double flops() const {
    const double N = double(dims.heads), d = double(dims.key_dim), dv = double(dims.value_dim);
    const double F = double(features()), rows = double(in.T) + double(in.S);
    double per_row = 2 * N * (F * (dv + 1) + (projection ? F * d : 0.0));
    if (!in.givenHeads()) per_row += 2 * N * double(in.query.dimension(2)) * (d + dv);
    return double(in.B) * rows * per_row;
  }

  /// Runs row(b, inner_pool) for every batch row (forBatchRows with this call's work).
  template <typename Row>
  void forBatchRows(const Row& row) const {
    detail::forBatchRows(in.B, pool, flops(), row);
  }
};

}  // namespace detail
}  // namespace kattn
