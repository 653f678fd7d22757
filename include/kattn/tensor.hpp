#pragma once
/// \file
/// Row-major Eigen tensor aliases used at kattn's public boundary, and shape checks.

#include <array>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

namespace kattn {

/// Index type of every kattn tensor (Eigen's default, signed).
using Index = Eigen::Index;

/// Owning row-major tensor, the layout of numpy/TF: `[B, T, D]` has D contiguous.
template <typename Scalar, int Rank>
using Tensor = Eigen::Tensor<Scalar, Rank, Eigen::RowMajor, Index>;

/// Mutable view of caller memory laid out as a row-major tensor (no copy).
template <typename Scalar, int Rank>
using TensorMap = Eigen::TensorMap<Tensor<Scalar, Rank>>;

/// Read-only view of caller memory; an owning `Tensor` converts to it implicitly.
template <typename Scalar, int Rank>
using ConstTensorMap = Eigen::TensorMap<const Tensor<Scalar, Rank>>;

/// Row-major dynamic matrix, the per-head working type of the kernels.
template <typename Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic column vector.
template <typename Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// Read-only view of a row-major tensor held elsewhere (a `Tensor`, a `TensorMap` or a
/// `ConstTensorMap`). A column-major tensor is refused at compile time: its data read as
/// row-major would be another tensor.
template <typename Scalar, int Rank, typename T>
ConstTensorMap<Scalar, Rank> constView(const T& t) {
  static_assert(int(T::Layout) == int(Eigen::RowMajor),
                "kattn reads row-major tensors (Eigen::RowMajor, as numpy and TF lay them out), "
                "and this one is column-major (Eigen's default): copy it into a kattn::Tensor "
                "first, x.swap_layout().shuffle(Eigen::array<int, 3>{2, 1, 0}) for rank 3.");
  return ConstTensorMap<Scalar, Rank>(t.data(), t.dimensions());
}

/// Formats a shape as `[2, 3, 4]` for error messages.
template <typename Dims>
std::string shapeString(const Dims& dims) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < static_cast<std::size_t>(dims.size()); ++i) {
    os << (i ? ", " : "") << dims[i];
  }
  os << ']';
  return os.str();
}

/// Throws `std::invalid_argument` naming `what` unless `dims` equals `expected`.
/// A negative entry in `expected` accepts any size on that axis.
template <int Rank, typename Dims>
void checkShape(const std::string& what, const Dims& dims, const std::array<Index, Rank>& expected) {
  bool ok = static_cast<int>(dims.size()) == Rank;
  for (int i = 0; ok && i < Rank; ++i) {
    ok = expected[i] < 0 || dims[i] == expected[i];
  }
  if (!ok) {
    std::ostringstream os;
    os << what << ": expected shape [";
    for (int i = 0; i < Rank; ++i) {
      os << (i ? ", " : "");
      if (expected[i] < 0) os << '*'; else os << expected[i];
    }
    os << "], got " << shapeString(dims);
    throw std::invalid_argument(os.str());
  }
}

}  // namespace kattn
