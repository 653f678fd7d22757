#pragma once
/// \file
/// \private The working memory of a call, described once per path (each core's `budget`, next
/// to the code that allocates it) as named parts in numbers of Scalar. A part is checked
/// against the memory limit (limits.hpp) before the path allocates anything, since tasks on the
/// pool must not throw; the sum of the parts is what KernelAttention::workingBytes reports and
/// what tests/memory_budget_test.cpp compares with the heap's measured peak.

#include <algorithm>
#include <array>
#include <cstddef>
#include <functional>
#include <string>
#include <utility>

#include "../assert.hpp"
#include "../limits.hpp"
#include "../parallel.hpp"
#include "pass.hpp"
#include "schedule.hpp"

namespace kattn {
namespace detail {

/// Bytes a call allocates besides its buffers: the pool's task closures, the vectors that
/// hold per-head sums and shifts, a state's bookkeeping.
inline constexpr double kBookkeepingBytes = 16384;

/// Numbers Eigen's GEMM may pack for a product [m x k] * [k x n]: copies of blocks of both
/// operands, on the heap once they pass EIGEN_STACK_ALLOCATION_LIMIT; at most both whole.
inline double gemmPacking(double m, double k, double n) { return m * k + k * n; }

/// The buffers of one path: parts of so many numbers of `element_size` bytes each, and the
/// call's bookkeeping.
class Budget {
 public:
  explicit Budget(std::size_t element_size)
      : m_element_size(element_size), m_total(kBookkeepingBytes / double(element_size)) {}

  /// A part the memory limit checks on its own, described (only when refused) by `describe`.
  Budget& add(double numbers, std::function<std::string()> describe) {
    KATTN_ASSERT(m_count < kMaxChecked);
    m_total += numbers;
    m_checked[m_count++] = {numbers, std::move(describe)};
    return *this;
  }
  /// A part counted in the total but not checked on its own: scratch small next to the
  /// checked parts (a refused call names those).
  Budget& add(double numbers) {
    m_total += numbers;
    return *this;
  }

  /// Throws MemoryLimitError naming the first checked part over the limit.
  void check() const {
    for (std::size_t i = 0; i < m_count; ++i) {
      checkAllocation(m_checked[i].numbers, m_element_size, m_checked[i].describe);
    }
  }
  /// Numbers of all parts at once.
  double numbers() const { return m_total; }
  double bytes() const { return m_total * double(m_element_size); }

  /// The budget of two steps that run one after the other: the parts of both are checked, and
  /// the total is the larger one.
  static Budget sequence(Budget a, const Budget& b) {
    for (std::size_t i = 0; i < b.m_count; ++i) {
      KATTN_ASSERT(a.m_count < kMaxChecked);
      a.m_checked[a.m_count++] = b.m_checked[i];
    }
    a.m_total = std::max(a.m_total, b.m_total);
    return a;
  }

 private:
  struct Part {
    double numbers;
    std::function<std::string()> describe;
  };

  // In place, not a vector: a decode step describes its budget too, and allocates nothing.
  static constexpr std::size_t kMaxChecked = 4;
  std::size_t m_element_size;
  std::array<Part, kMaxChecked> m_checked{};
  std::size_t m_count = 0;
  double m_total;
};

/// Where a call's work runs: threads working at once and batch rows in flight at once
/// (forBatchRows: all threads on one row, or one row per thread when B allows).
struct Concurrency {
  double threads = 1;
  double rows = 1;
};

/// Concurrency of a call of `flops` operations over B batch rows on `pool`.
inline Concurrency concurrencyOf(const ThreadPool* pool, double flops, Index B) {
  const ThreadPool* p = poolFor(pool, flops);
  Concurrency c;
  c.threads = p ? double(p->threads()) : 1.0;
  c.rows = p && B >= p->threads() ? c.threads : 1.0;
  return c;
}

/// What one thread may pack at once for the call's dense projections: a slice of input rows
/// times a projection kernel (rows from the layer's inputs), or a slice of heads times the
/// output kernel.
template <typename Scalar>
double densePacking(const Pass<Scalar>& pass) {
  const double N = double(pass.dims.heads);
  const double h = double(std::max(pass.dims.key_dim, pass.dims.value_dim));
  const double rows = double(kSliceRows);
  double packing = 0;
  if (!pass.in.givenHeads()) {
    const double D = double(std::max({pass.in.query.dimension(2), pass.in.key.dimension(2),
                                      pass.in.value.dimension(2)}));
    packing = gemmPacking(rows, D, N * h);
  }
  if (pass.sink == HeadsSink::OutputDense && pass.weights) {
    const double O = double(pass.weights->output_kernel.dimension(2));
    packing = std::max(packing, gemmPacking(rows, N * double(pass.dims.value_dim), O));
  }
  return packing;
}

}  // namespace detail
}  // namespace kattn
