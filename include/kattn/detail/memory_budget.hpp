#pragma once
/// \file
/// \private What each path of a call holds beyond its inputs and outputs, in numbers of
/// Scalar, gathered in one place and checked against the memory limit (limits.hpp) before the
/// path allocates anything: tasks on the pool must not throw.

#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "../limits.hpp"
#include "causal_state.hpp"
#include "pass.hpp"

namespace kattn {
namespace detail {

/// The buffers of one path: a sum of named counts of numbers, described lazily.
class Budget {
 public:
  Budget(std::size_t element_size, std::function<std::string()> describe)
      : m_element_size(element_size), m_describe(std::move(describe)) {}

  /// Adds `count` numbers.
  Budget& add(double count) {
    m_numbers += count;
    return *this;
  }
  double numbers() const { return m_numbers; }
  double bytes() const { return m_numbers * double(m_element_size); }
  /// Throws MemoryLimitError naming the path when the buffers exceed the limit.
  void check() const { checkAllocation(m_numbers, m_element_size, m_describe); }

 private:
  std::size_t m_element_size;
  std::function<std::string()> m_describe;
  double m_numbers = 0;
};

/// Threads a pass may run on at once.
inline double threadsOf(const ThreadPool* pool) { return pool ? double(pool->threads()) : 1.0; }

/// The bidirectional core for Tq queries. The quadratic forms (the short path's softmax, the
/// explicit form) hold a [T, S] score matrix per thread and a batch row's projections and
/// features; expplus (`pair`) the whole batch's. The low-rank form streams keys and queries
/// in blocks: a block of rows, values and features per task, and up to kKeyGroups partial
/// sums per head in its key pass, beside the heads [T, N d_v].
template <typename Scalar>
Budget bidirectionalBudget(const Pass<Scalar>& pass, Index Tq, bool short_path, bool quadratic,
                           bool pair, Index stream_rows, Index key_groups) {
  const double N = double(pass.dims.heads), d = double(pass.dims.key_dim);
  const double dv = double(pass.dims.value_dim), F = double(pass.features());
  const double S = double(pass.in.S), threads = threadsOf(pass.pool);
  if (quadratic) {
    // The score matrices are the one large buffer of a short call: refused on their own,
    // with a message that names them.
    Budget scores(sizeof(Scalar), [=] {
      return std::string(short_path ? "the short-sequence path's" : "the explicit form's") +
             " attention matrices [T, S] = [" + std::to_string(Tq) + ", " +
             std::to_string(pass.in.S) + "], one per thread";
    });
    scores.add(double(Tq) * S * threads).check();
  }
  Budget b(sizeof(Scalar), [=] {
    return "the working buffers of " + std::to_string(Tq) + " queries and " +
           std::to_string(pass.in.S) + " keys";
  });
  const bool whole_rows = quadratic || pair;
  if (whole_rows) {
    const double batch = pair ? double(pass.in.B) : 1.0;
    b.add(batch * (double(Tq) + S) * N * (2 * d + 2 * F + dv));
  } else {
    b.add(double(Tq) * N * dv);
    b.add(threads * double(stream_rows) * (F + d + dv));
    b.add(N * double(key_groups) * F * (dv + 1));
  }
  return b;
}

/// The whole causal pass's sliding window: the window's chunks (rows or terms) and, once it
/// slides, up to W suffix sums, for every head of the batch rows that run at once.
template <typename Scalar>
Budget causalWindowBudget(const Pass<Scalar>& pass, const CausalParams& p, Index chunks) {
  Budget b(sizeof(Scalar), [=] {
    return "the causal window of " + std::to_string(p.window) + " chunks";
  });
  if (!p.sliding) return b;
  const double at_once = std::min(double(pass.in.B), threadsOf(pass.pool));
  const double per_head = CausalHeadState<Scalar>::windowNumbers(
      double(pass.features()), double(pass.dims.value_dim), 0, 0, 0, double(chunks), p.chunk,
      p.window, p.compact_ring);
  return b.add(per_head * double(pass.dims.heads) * at_once);
}

/// One streaming call of T tokens: its projections and features.
template <typename Scalar>
Budget streamingCallBudget(const Pass<Scalar>& pass) {
  const Index T = pass.in.T;
  Budget b(sizeof(Scalar), [=] {
    return "one streaming call's projections and features (" + std::to_string(T) + " tokens)";
  });
  return b.add(double(T) * double(pass.dims.heads) *
               double(3 * pass.dims.key_dim + 3 * pass.features() + 2 * pass.dims.value_dim));
}

}  // namespace detail
}  // namespace kattn
