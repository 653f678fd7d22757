#pragma once
/// \file
/// \private Bidirectional attention kernels on one head: low-rank, explicit T x S and the
/// short-sequence softmax. Inputs are features q' [T, F], k' [S, F] (masked rows zeroed) and
/// values v [S, d_v]; output a [T, d_v].

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

#include "../feature_maps.hpp"
#include "../tensor.hpp"

namespace kattn {
namespace detail {

/// The stabiliser added to every normaliser (the reference's _NUMERIC_STABLER).
inline constexpr double kNormaliserEps = 1e-6;

template <typename Scalar>
using ConstBlock = ConstFeatureBlock<Scalar>;
template <typename Scalar>
using Block = FeatureBlock<Scalar>;

/// Asks for the cache lines of `n` numbers from `p` ahead of their use, for walks over one
/// head's rows inside rows of all heads (d numbers, then a jump of N d), which the hardware
/// prefetchers follow poorly: without it the causal pass's relu features of one head waited
/// on those loads most of their time (benchmarks/README.md).
template <typename Scalar>
inline void prefetchRow(const Scalar* p, Index n) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  for (std::size_t at = 0; at < std::size_t(n) * sizeof(Scalar); at += 64) {
    __builtin_prefetch(c + at);
  }
#else
  (void)p;
  (void)n;
#endif
}

/// Rows ahead that the walks over one head's rows prefetch.
inline constexpr Index kPrefetchRows = 8;

/// out.row(t) /= den(t), row by row: the rows are contiguous, so this streams through memory
/// (a column-wise broadcast would walk a row-major block column by column).
template <typename Scalar>
void divideRows(Block<Scalar> out, const Vector<Scalar>& den) {
  for (Index t = 0; t < out.rows(); ++t) out.row(t) /= den(t);
}

/// a_t = (q'_t KV) / (q'_t z + eps) with KV = k'^T v, z = k'^T 1. O((T + S) F d_v).
template <typename Scalar>
void lowRankAttention(const ConstBlock<Scalar>& qf, const ConstBlock<Scalar>& kf,
                      const ConstBlock<Scalar>& v, Block<Scalar> out) {
  const Matrix<Scalar> kv = kf.transpose() * v;                    // [F, d_v]
  const Vector<Scalar> z = kf.colwise().sum().transpose();         // [F]
  const Vector<Scalar> den = (qf * z).array() + Scalar(kNormaliserEps);
  out.noalias() = qf * kv;
  divideRows<Scalar>(out, den);
}

/// The same function through the explicit T x S score matrix. O(T S (F + d_v)).
template <typename Scalar>
void explicitAttention(const ConstBlock<Scalar>& qf, const ConstBlock<Scalar>& kf,
                       const ConstBlock<Scalar>& v, Block<Scalar> out) {
  const Matrix<Scalar> scores = qf * kf.transpose();                // [T, S]
  const Vector<Scalar> den = scores.rowwise().sum().array() + Scalar(kNormaliserEps);
  out.noalias() = scores * v;
  divideRows<Scalar>(out, den);
}

/// How much fewer multiply-adds the explicit form must need to be chosen: its T x S matrix
/// and row-wise passes run at a lower rate than the low-rank form's products (measured with
/// kattn_bench's W1 and W2 forced forms; benchmarks/README.md).
inline constexpr double kExplicitAdvantage = 0.5;

/// Multiply-adds of each form, the explicit one weighted by kExplicitAdvantage: it wins only
/// for short sequences (for T = S and F = d_v = 64, below about 32 positions).
inline bool explicitIsCheaper(Index T, Index S, Index F, Index dv) {
  const double lowrank = double(S) * F * (dv + 1) + double(T) * F * (dv + 1) + double(T) * dv;
  const double expl = double(T) * S * F + double(T) * S * (dv + 1) + double(T) * dv;
  return expl < kExplicitAdvantage * lowrank;
}

/// SPEC 3.1: a_t = sum_s softmax_s(q'_t . k'_s) v_s over the kept keys (keep[s] != 0); a row
/// with no kept key gets zeros. `keep` may be null (all kept).
template <typename Scalar>
void shortSoftmaxAttention(const ConstBlock<Scalar>& qf, const ConstBlock<Scalar>& kf,
                           const ConstBlock<Scalar>& v, const Scalar* keep, Block<Scalar> out) {
  Matrix<Scalar> scores = qf * kf.transpose();                      // [T, S]
  const Index S = scores.cols();
  bool any_kept = keep == nullptr;
  if (keep) {
    for (Index s = 0; s < S; ++s) {
      if (keep[s] == Scalar(0)) {
        scores.col(s).setConstant(-std::numeric_limits<Scalar>::infinity());
      } else {
        any_kept = true;
      }
    }
  }
  if (!any_kept || S == 0) {
    out.setZero();
    return;
  }
  for (Index t = 0; t < scores.rows(); ++t) {
    const Scalar mx = scores.row(t).maxCoeff();
    scores.row(t) = (scores.row(t).array() - mx).exp().matrix();
    scores.row(t) /= scores.row(t).sum();
  }
  out.noalias() = scores * v;
}

}  // namespace detail
}  // namespace kattn
