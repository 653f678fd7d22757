#pragma once
/// \file
/// \private The dense (Keras EinsumDense) projections of the layer: inputs to per-head rows
/// (SPEC 1.1) and heads to outputs (SPEC 1.5), as GEMMs over all heads at once.

#include <algorithm>

#include "../tensor.hpp"
#include "schedule.hpp"

namespace kattn {
namespace detail {

/// out = factor (x[b, r0:r0+L, :] W + bias) as [L, N h]; W is a [D, N, h] kernel read as
/// [D, N h] (one GEMM for all heads), in fixed row slices on the pool.
template <typename Scalar>
void denseRows(const ConstTensorMap<Scalar, 3>& x, Index b, Index r0, Index L,
               const Tensor<Scalar, 3>& kernel, const Tensor<Scalar, 2>& bias, Scalar factor,
               Matrix<Scalar>& out, const ThreadPool* pool) {
  using ConstMapMat = Eigen::Map<const Matrix<Scalar>>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  const Index D = x.dimension(2), cols = kernel.dimension(1) * kernel.dimension(2);
  out.resize(L, cols);
  const ConstMapMat W(kernel.data(), D, cols);
  forRowSlices(L, pool, [&](Index s0, Index len) {
    const ConstMapMat xb(x.data() + (b * x.dimension(1) + r0 + s0) * D, len, D);
    auto o = out.middleRows(s0, len);
    o.noalias() = xb * W;
    if (bias.size()) o.rowwise() += Eigen::Map<const RowVec>(bias.data(), cols);
    if (factor != Scalar(1)) o *= factor;
  });
}

/// denseRows for head n alone: out [L, h] = factor (x[b, r0:r0+L, :] W[:, n, :] + bias[n]).
template <typename Scalar>
void denseHeadRows(const ConstTensorMap<Scalar, 3>& x, Index b, Index r0, Index L,
                   const Tensor<Scalar, 3>& kernel, const Tensor<Scalar, 2>& bias, Index n,
                   Scalar factor, Matrix<Scalar>& out) {
  using ConstMapMat = Eigen::Map<const Matrix<Scalar>>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  const Index h = kernel.dimension(2), cols = kernel.dimension(1) * h, D = x.dimension(2);
  if (D == 0) {
    out.setZero(L, h);  // an empty input row projects to the bias alone (the kernel is empty)
  } else {
    const ConstMapMat xb(x.data() + (b * x.dimension(1) + r0) * D, L, D);
    out.noalias() = xb * ConstMapMat(kernel.data(), D, cols).middleCols(n * h, h);
  }
  if (bias.size()) out.rowwise() += Eigen::Map<const RowVec>(bias.data() + n * h, h);
  if (factor != Scalar(1)) out *= factor;
}

/// y[b, r0:r0+L, :] = a Wo + bo for heads a [L, N d_v] and Wo [N, d_v, O] read as [N d_v, O].
template <typename Scalar>
void outputRows(const Matrix<Scalar>& a, const Tensor<Scalar, 3>& kernel,
                const Tensor<Scalar, 1>& bias, const TensorMap<Scalar, 3>& y, Index b, Index r0,
                const ThreadPool* pool) {
  using ConstMapMat = Eigen::Map<const Matrix<Scalar>>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  const Index O = y.dimension(2);
  const ConstMapMat W(kernel.data(), a.cols(), O);
  forRowSlices(a.rows(), pool, [&](Index s0, Index len) {
    Eigen::Map<Matrix<Scalar>> out(y.data() + (b * y.dimension(1) + r0 + s0) * O, len, O);
    out.noalias() = a.middleRows(s0, len) * W;
    if (bias.size()) out.rowwise() += Eigen::Map<const RowVec>(bias.data(), O);
  });
}

/// Columns of one slice of productColumns.
inline constexpr Index kSliceColumns = 64;

/// out = lhs rhs, or out += lhs rhs when `accumulate`, the rows of lhs and out in the fixed
/// slices of forRowSlices on the pool (for the backward's projections and input gradients).
template <typename Lhs, typename Rhs, typename Out>
void productRows(const Lhs& lhs, const Rhs& rhs, Out&& out, bool accumulate,
                 const ThreadPool* pool) {
  forRowSlices(lhs.rows(), pool, [&](Index s0, Index len) {
    auto o = out.middleRows(s0, len);
    if (accumulate) {
      o.noalias() += lhs.middleRows(s0, len) * rhs;
    } else {
      o.noalias() = lhs.middleRows(s0, len) * rhs;
    }
  });
}

/// out = lhs^T rhs (a sum over all rows, as a weight's gradient x^T dh), or out += when
/// `accumulate`, in fixed slices of kSliceColumns columns of rhs and out on the pool: a
/// split of the sum over rows would need a reduction whose order followed the thread count.
template <typename Lhs, typename Rhs, typename Out>
void productColumns(const Lhs& lhs, const Rhs& rhs, Out&& out, bool accumulate,
                    const ThreadPool* pool) {
  const Index cols = rhs.cols(), slices = (cols + kSliceColumns - 1) / kSliceColumns;
  auto slice = [&](Index i) {
    const Index c0 = i * kSliceColumns, len = std::min(kSliceColumns, cols - c0);
    auto o = out.middleCols(c0, len);
    if (accumulate) {
      o.noalias() += lhs.transpose() * rhs.middleCols(c0, len);
    } else {
      o.noalias() = lhs.transpose() * rhs.middleCols(c0, len);
    }
  };
  if (slices <= 1) {
    if (cols > 0) slice(0);
    return;
  }
  forEach(slices, pool, slice);
}

}  // namespace detail
}  // namespace kattn
