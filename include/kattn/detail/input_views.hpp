#pragma once
/// \file
/// \private The layer's inputs as row-major views: a row-major tensor or map goes in as it is;
/// a column-major tensor, a tensor expression or a matrix that is not a packed row-major block
/// is evaluated into buffers the layer reuses from call to call.

#include <array>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "../limits.hpp"
#include "../tensor.hpp"

namespace kattn {
namespace detail {

/// True for the types whose memory is already a packed row-major tensor of Index dimensions.
template <typename T>
struct RowMajorStorage : std::false_type {};
template <typename S, int R>
struct RowMajorStorage<Eigen::Tensor<S, R, Eigen::RowMajor, Index>> : std::true_type {};
template <typename S, int R, int Options, template <class> class Pointer>
struct RowMajorStorage<Eigen::TensorMap<Eigen::Tensor<S, R, Eigen::RowMajor, Index>, Options,
                                        Pointer>> : std::true_type {};
template <typename S, int R, int Options, template <class> class Pointer>
struct RowMajorStorage<Eigen::TensorMap<const Eigen::Tensor<S, R, Eigen::RowMajor, Index>,
                                        Options, Pointer>> : std::true_type {};

/// The buffers of one call's evaluated inputs (and of an output that is not a packed row-major
/// block), grown to the largest call seen and kept.
template <typename Scalar>
struct InputBuffers {
  enum Slot { kQuery, kKey, kValue, kMask, kOutput, kSlots };
  std::array<std::vector<Scalar>, kSlots> slots;
};

/// The layer's free list of InputBuffers; shared by copies of the layer (scratch space only).
template <typename Scalar>
struct InputBufferPool {
  std::mutex mutex;
  std::vector<std::unique_ptr<InputBuffers<Scalar>>> free;
};

/// One call's views of its inputs. Borrows an InputBuffers from the pool at the first input
/// that needs a copy, and returns it on destruction: a call whose inputs are all row-major
/// tensors takes no lock and allocates nothing.
template <typename Scalar>
class InputViews {
 public:
  using Slot = typename InputBuffers<Scalar>::Slot;

  explicit InputViews(InputBufferPool<Scalar>& pool) : m_pool(pool) {}
  ~InputViews() {
    if (!m_buffers) return;
    std::lock_guard<std::mutex> lock(m_pool.mutex);
    m_pool.free.push_back(std::move(m_buffers));
  }
  InputViews(const InputViews&) = delete;
  InputViews& operator=(const InputViews&) = delete;

  /// `x` (any rank-`Rank` Eigen tensor, map or expression of this Scalar) as a row-major view.
  template <int Rank, typename X>
  ConstTensorMap<Scalar, Rank> tensor(const X& x, Slot slot, const char* name) {
    static_assert(std::is_base_of_v<Eigen::TensorBase<X, Eigen::ReadOnlyAccessors>, X>,
                  "kattn: this argument must be an Eigen tensor, tensor map or tensor "
                  "expression (Eigen/CXX11/Tensor).");
    using Traits = Eigen::internal::traits<X>;
    static_assert(int(Traits::NumDimensions) == Rank,
                  "kattn: a tensor argument has the wrong rank: forward takes rank-3 inputs "
                  "[B, T, D], attend rank-4 heads [B, T, N, d], masks rank 2 [B, S].");
    static_assert(std::is_same_v<std::remove_const_t<typename Traits::Scalar>, Scalar>,
                  "kattn: a tensor argument's scalar type is not the layer's: convert it with "
                  ".template cast<Scalar>() (kattn does not change precision silently).");
    if constexpr (RowMajorStorage<X>::value) {
      return ConstTensorMap<Scalar, Rank>(x.data(), x.dimensions());
    } else {
      const Eigen::DefaultDevice device;
      const Eigen::TensorEvaluator<const X, Eigen::DefaultDevice> evaluator(x, device);
      std::array<Index, Rank> dims{};
      for (int i = 0; i < Rank; ++i) dims[std::size_t(i)] = Index(evaluator.dimensions()[i]);
      Scalar* data = buffer(slot, dims, name);
      TensorMap<Scalar, Rank> row_major(data, dims);
      if constexpr (int(Traits::Layout) == int(Eigen::ColMajor)) {
        // The column-major expression read with its axes reversed is a row-major one; the
        // shuffle puts the axes back.
        std::array<int, Rank> reverse{};
        for (int i = 0; i < Rank; ++i) reverse[std::size_t(i)] = Rank - 1 - i;
        row_major = x.swap_layout().shuffle(reverse);
      } else {
        row_major = x;
      }
      return ConstTensorMap<Scalar, Rank>(data, dims);
    }
  }

  /// An optional tensor argument: absent for std::nullopt or an empty std::optional.
  template <int Rank, typename X>
  std::optional<ConstTensorMap<Scalar, Rank>> optionalTensor(const X& x, Slot slot,
                                                             const char* name) {
    if constexpr (std::is_same_v<X, std::nullopt_t>) {
      return std::nullopt;
    } else if constexpr (IsOptional<X>::value) {
      if (!x) return std::nullopt;
      return tensor<Rank>(*x, slot, name);
    } else {
      return tensor<Rank>(x, slot, name);
    }
  }

  /// A matrix [B, D] of one token per row as the tensor [B, 1, D].
  template <typename X>
  ConstTensorMap<Scalar, 3> tokens(const Eigen::MatrixBase<X>& x, Slot slot, const char* name) {
    static_assert(std::is_same_v<typename X::Scalar, Scalar>,
                  "kattn: the matrix's scalar type is not the layer's: convert it with "
                  ".template cast<Scalar>().");
    if constexpr (bool(int(X::Flags) & Eigen::DirectAccessBit)) {
      if (packedRows(x.derived())) {
        return ConstTensorMap<Scalar, 3>(x.derived().data(), x.rows(), 1, x.cols());
      }
    }
    Scalar* data = buffer(slot, std::array<Index, 2>{x.rows(), x.cols()}, name);
    Eigen::Map<Matrix<Scalar>>(data, x.rows(), x.cols()) = x;
    return ConstTensorMap<Scalar, 3>(data, x.rows(), 1, x.cols());
  }

  /// Where a call writes the rows that go to the matrix `out` [B, O]: `out` itself when its
  /// rows are packed, else a buffer that `copyOut` then assigns to it.
  template <typename Out>
  TensorMap<Scalar, 3> outputRows(Out& out) {
    if constexpr (bool(int(Out::Flags) & Eigen::DirectAccessBit)) {
      if (packedRows(out)) return TensorMap<Scalar, 3>(out.data(), out.rows(), 1, out.cols());
    }
    Scalar* data = buffer(InputBuffers<Scalar>::kOutput,
                          std::array<Index, 2>{out.rows(), out.cols()}, "output");
    return TensorMap<Scalar, 3>(data, out.rows(), 1, out.cols());
  }

  template <typename Out>
  static void copyOut(const TensorMap<Scalar, 3>& rows, Out& out) {
    if (rows.data() == dataOf(out)) return;
    out = Eigen::Map<const Matrix<Scalar>>(rows.data(), out.rows(), out.cols());
  }

 private:
  template <typename T>
  struct IsOptional : std::false_type {};
  template <typename T>
  struct IsOptional<std::optional<T>> : std::true_type {};

  /// Rows of unit column stride, one after another: the memory of a row-major [B, D].
  template <typename X>
  static bool packedRows(const X& x) {
    return (x.cols() <= 1 || x.colStride() == 1) && (x.rows() <= 1 || x.rowStride() == x.cols());
  }

  template <typename X>
  static const Scalar* dataOf(const X& x) {
    if constexpr (bool(int(X::Flags) & Eigen::DirectAccessBit)) {
      return x.data();
    } else {
      return nullptr;
    }
  }

  template <std::size_t Rank>
  Scalar* buffer(Slot slot, const std::array<Index, Rank>& dims, const char* name) {
    double count = 1;
    for (const Index n : dims) count *= double(n);
    checkAllocation(count, sizeof(Scalar), [&] {
      return std::string("a row-major copy of the ") + name + " " + shapeString(dims);
    });
    if (!m_buffers) {
      std::lock_guard<std::mutex> lock(m_pool.mutex);
      if (!m_pool.free.empty()) {
        m_buffers = std::move(m_pool.free.back());
        m_pool.free.pop_back();
      }
    }
    if (!m_buffers) m_buffers = std::make_unique<InputBuffers<Scalar>>();
    std::vector<Scalar>& v = m_buffers->slots[std::size_t(slot)];
    if (v.size() < std::size_t(count)) v.resize(std::size_t(count));
    return v.data();
  }

  InputBufferPool<Scalar>& m_pool;
  std::unique_ptr<InputBuffers<Scalar>> m_buffers;
};

/// Whether two arguments are one object (self-attention's `forward(x, x)`: one copy, not two).
template <typename A, typename B>
bool sameObject(const A& a, const B& b) {
  if constexpr (std::is_same_v<A, B>) {
    return &a == &b;
  } else {
    (void)a;
    (void)b;
    return false;
  }
}

}  // namespace detail
}  // namespace kattn
