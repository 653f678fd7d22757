#pragma once
/// \file
/// \private How a call's work goes to the thread pool: fixed row slices, head tasks, batch rows,
/// and the threshold below which a call stays on the calling thread. Every split here is a
/// function of the shapes alone, never of the thread count, so results do not depend on it.

#include <algorithm>

#include "../parallel.hpp"
#include "../tensor.hpp"

namespace kattn {
namespace detail {

/// Runs fn(i) for i in [0, n) on the pool, or serially without one.
template <typename Fn>
void forEach(Index n, const ThreadPool* pool, const Fn& fn) {
  if (pool) {
    pool->parallelFor(n, fn);
  } else {
    for (Index i = 0; i < n; ++i) fn(i);
  }
}

/// Rows of one slice of forRowSlices.
inline constexpr Index kSliceRows = 256;

/// Runs fn(first_row, rows) over fixed slices of [0, L), on the pool when there is one. The
/// slices do not depend on the number of threads, so neither do the results: Eigen's GEMM
/// blocking, and with it the summation order, depends on the row count of a product.
template <typename Fn>
void forRowSlices(Index L, const ThreadPool* pool, const Fn& fn) {
  const Index slices = (L + kSliceRows - 1) / kSliceRows;
  if (slices <= 1) {
    fn(Index(0), L);
    return;
  }
  forEach(slices, pool, [&](Index i) {
    const Index s0 = i * kSliceRows;
    fn(s0, std::min(kSliceRows, L - s0));
  });
}

/**
 * Runs fn(n) for every head n in [0, N) on the pool, taking the heads in the order 0, h, 1,
 * h + 1, ... (h = ceil(N / 2)), so that the heads that run at the same time are far apart,
 * for the causal passes' head tasks. Neighbouring heads write neighbouring columns of the
 * same rows of the output and keep neighbouring states; run side by side on two cores they
 * slow each other down (benchmarks/README.md), while the same pass in two processes at once
 * runs at full speed in each. The bidirectional explicit form's head tasks did not gain, so
 * they keep the head order.
 */
template <typename Fn>
void forEachHead(Index N, const ThreadPool* pool, const Fn& fn) {
  const Index h = (N + 1) / 2;
  forEach(N, pool, [&](Index i) { fn(i % 2 == 0 ? i / 2 : h + i / 2); });
}

/// Work below which a call runs on the calling thread alone: waking the pool's threads
/// costs some 5-20 microseconds, the time of about a million floating-point operations, so
/// a one-token decode step or a tiny batch is faster without them.
inline constexpr double kParallelMinFlops = 1e6;

/// The pool a call of `flops` operations should use: none when it is too small to share.
inline const ThreadPool* poolFor(const ThreadPool* pool, double flops) {
  return pool && pool->threads() > 1 && flops >= kParallelMinFlops ? pool : nullptr;
}

/// Runs row(b, inner_pool) for every batch row: across batch rows when there are at least
/// as many as threads (each row then runs serially), else row by row with the pool inside;
/// on the calling thread alone when the call's work (`flops`) is too small to share.
template <typename Row>
void forBatchRows(Index B, const ThreadPool* layer_pool, double flops, const Row& row) {
  const ThreadPool* pool = poolFor(layer_pool, flops);
  if (pool && B >= pool->threads()) {
    pool->parallelFor(B, [&](Index b) { row(b, nullptr); });
  } else {
    for (Index b = 0; b < B; ++b) row(b, pool);
  }
}

}  // namespace detail
}  // namespace kattn
