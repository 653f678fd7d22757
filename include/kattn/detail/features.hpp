#pragma once
/// \file
/// \private Features of a block of rows of all heads (SPEC 2): the maps applied per head, the
/// exp maps' largest logit, expplus's pair statistics, and the key padding mask.

#include <algorithm>
#include <cstddef>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../feature_maps.hpp"
#include "bidirectional.hpp"
#include "pass.hpp"
#include "schedule.hpp"
#include "workspace.hpp"

namespace kattn {
namespace detail {

/// Features of one side for every head: x [L, N d] scaled -> out [L, N F], heads spread over
/// the pool. For exp maps the shift is `shift`, or the largest logit of the block over all
/// heads (the reference's per-batch-row maximum when the block is the whole row).
template <typename Map, typename Scalar>
void features(const Map& map, const HeadDims& dims, const Matrix<Scalar>& x,
              const Matrix<Scalar>* P, bool is_query, Matrix<Scalar>& out,
              std::optional<Scalar> shift, const ThreadPool* pool) {
  using Blk = FeatureBlock<Scalar>;
  const Index d = dims.key_dim, F = featureDim(d, P), N = dims.heads;
  out.resize(x.rows(), N * F);
  auto input = [&](Index n) { return FeatureInput<Scalar>{x.middleCols(n * d, d), P, is_query}; };
  if constexpr (feature_map_traits<Map>::max_shifted) {
    forEach(N, pool, [&](Index n) { map.logits(input(n), Blk(out.middleCols(n * F, F))); });
    const Scalar M = shift ? *shift : (out.size() ? out.maxCoeff() : Scalar(0));
    forEach(N, pool, [&](Index n) { map.finish(input(n), Blk(out.middleCols(n * F, F)), M); });
  } else {
    forEach(N, pool, [&](Index n) { map(input(n), Blk(out.middleCols(n * F, F))); });
  }
}

/// Rows of logits maxLogit holds at a time per head (64 KiB at m = 256, float).
inline constexpr Index kLogitRows = 64;

/// The largest logit of one side of a block x [L, N d], over all heads (exp maps' reference
/// shift): one task per head on the pool, each over pieces of kLogitRows rows, so that its
/// logits stay in cache and nothing the size of the block is allocated. On the calling thread
/// this first pass of a long causal exp forward would do the projection products of both
/// sides serially.
template <typename Map, typename Scalar>
Scalar maxLogit(const Map& map, const HeadDims& dims, const Matrix<Scalar>& x,
                const Matrix<Scalar>* P, const ThreadPool* pool) {
  const Index d = dims.key_dim, F = featureDim(d, P), L = x.rows(), N = dims.heads;
  const Scalar lowest = -std::numeric_limits<Scalar>::infinity();
  if (L == 0 || F == 0) return lowest;
  auto headMax = [&](Index n, Matrix<Scalar>& z) {
    Scalar M = lowest;
    for (Index r0 = 0; r0 < L; r0 += kLogitRows) {
      const Index len = std::min(kLogitRows, L - r0);
      map.logits(FeatureInput<Scalar>{x.block(r0, n * d, len, d), P, false},
                 FeatureBlock<Scalar>(z.topRows(len)));
      M = std::max(M, z.topRows(len).maxCoeff());
    }
    return M;
  };
  Scalar M = lowest;
  if (!pool) {
    // One buffer for every head: a streaming decode step of an exp map comes here.
    Matrix<Scalar> z(std::min(L, kLogitRows), F);
    for (Index n = 0; n < N; ++n) M = std::max(M, headMax(n, z));
    return M;
  }
  std::vector<Scalar> head_max(static_cast<std::size_t>(N), lowest);
  forEach(N, pool, [&](Index n) {
    Matrix<Scalar> z(std::min(L, kLogitRows), F);
    head_max[static_cast<std::size_t>(n)] = headMax(n, z);
  });
  for (Scalar m : head_max) M = std::max(M, m);
  return M;
}

/// phi(k)[s] *= mask[s] (SPEC 2, key padding); a null mask keeps every key.
template <typename Scalar>
void maskRows(Matrix<Scalar>& kf, const Scalar* mask_row) {
  if (!mask_row) return;
  for (Index s = 0; s < kf.rows(); ++s)
    if (mask_row[s] != Scalar(1)) kf.row(s) *= mask_row[s];
}

/**
 * Features of `rows` rows of heads [n0, n0 + heads) of one side (queries or keys) into
 * `out` [rows, heads F], for the causal passes that read heads where they are: the caller's
 * heads `given` from row `row` (rows of N d, scaled by r here), else this call's projections
 * `projected` from row `p0` (already scaled). `scaled` takes the scaled copy when one is
 * needed; elementwise maps without a projection scale as they go instead.
 */
template <typename FeatureMap, typename Scalar>
void sideFeatures(const HeadDims& dims, const Scalar* given, const Matrix<Scalar>& projected,
                  Index row, Index p0, Index rows, Index n0, Index heads, Scalar r,
                  const Matrix<Scalar>* P, bool is_query, Matrix<Scalar>& scaled,
                  Matrix<Scalar>& out) {
  using ConstBlk = ConstFeatureBlock<Scalar>;
  const Index N = dims.heads, d = dims.key_dim, F = featureDim(d, P);
  const Scalar s = given ? r : Scalar(1);
  const ConstBlk x = given ? ConstBlk(Eigen::Map<const Matrix<Scalar>>(given + row * N * d, rows,
                                                                       N * d)
                                          .middleCols(n0 * d, heads * d))
                           : ConstBlk(projected.block(p0, n0 * d, rows, heads * d));
  if constexpr (std::is_base_of_v<ElementwiseFeatureMap<FeatureMap>, FeatureMap>) {
    if (!P) {
      out.resize(rows, heads * d);
      for (Index t = 0; t < rows; ++t) {
        if (t + kPrefetchRows < rows) prefetchRow(x.row(t + kPrefetchRows).data(), x.cols());
        out.row(t) = FeatureMap::template f<Scalar>(x.row(t).array() * s).matrix();
      }
      return;
    }
  }
  if (s != Scalar(1)) scaled.noalias() = x * s;
  const ConstBlk y = s != Scalar(1) ? ConstBlk(scaled) : x;
  out.resize(rows, heads * F);
  for (Index h = 0; h < heads; ++h) {
    FeatureMap{}(FeatureInput<Scalar>{y.middleCols(h * d, d), P, is_query},
                 FeatureBlock<Scalar>(out.middleCols(h * F, F)));
  }
}

/// expplus features for the whole batch: coefficients per (b, n) from both sides, queries
/// stabilised per row, keys by the largest u over the whole key tensor (all batch rows, as
/// the reference), which couples the batch rows.
template <typename Map, typename Scalar>
void pairFeatures(const Map& map, const HeadDims& dims, std::vector<RowWork<Scalar>>& rows,
                  const Matrix<Scalar>* P) {
  using Blk = FeatureBlock<Scalar>;
  const Index B = Index(rows.size()), N = dims.heads, d = dims.key_dim, F = P->rows();
  using Coeff = typename Map::template Coefficients<Scalar>;
  std::vector<Coeff> cq(std::size_t(B * N)), ck(std::size_t(B * N));
  Scalar key_max = -std::numeric_limits<Scalar>::infinity();
  for (Index b = 0; b < B; ++b) {
    RowWork<Scalar>& w = rows[std::size_t(b)];
    w.qf.resize(w.qs.rows(), N * F);
    w.kf.resize(w.ks.rows(), N * F);
    for (Index n = 0; n < N; ++n) {
      const auto sq = Map::template statistics<Scalar>(w.qs.middleCols(n * d, d));
      const auto sk = Map::template statistics<Scalar>(w.ks.middleCols(n * d, d));
      cq[std::size_t(b * N + n)] = Map::coefficients(sq, sk, d);
      ck[std::size_t(b * N + n)] = Map::coefficients(sk, sq, d);
      map.logits(FeatureInput<Scalar>{w.ks.middleCols(n * d, d), P, false},
                 Blk(w.kf.middleCols(n * F, F)));
    }
    if (w.kf.size()) key_max = std::max(key_max, w.kf.maxCoeff());
  }
  for (Index b = 0; b < B; ++b) {
    RowWork<Scalar>& w = rows[std::size_t(b)];
    for (Index n = 0; n < N; ++n) {
      const FeatureInput<Scalar> qin{w.qs.middleCols(n * d, d), P, true};
      map.logits(qin, Blk(w.qf.middleCols(n * F, F)));
      map.finish(qin, Blk(w.qf.middleCols(n * F, F)), cq[std::size_t(b * N + n)], Scalar(0));
      map.finish(FeatureInput<Scalar>{w.ks.middleCols(n * d, d), P, false},
                 Blk(w.kf.middleCols(n * F, F)), ck[std::size_t(b * N + n)], key_max);
    }
  }
}

/// Scaled projections of the whole batch, queries by qscale(b) and keys by kscale(b) (the
/// expplus paths, which need all of it).
template <typename Scalar, typename QScale, typename KScale>
std::vector<RowWork<Scalar>> scaledBatch(const Pass<Scalar>& pass, Index q0, Index q1,
                                         const QScale& qscale, const KScale& kscale) {
  std::vector<RowWork<Scalar>> rows(static_cast<std::size_t>(pass.in.B));
  for (Index b = 0; b < pass.in.B; ++b) {
    pass.scaledRows(b, q0, q1 - q0, 0, pass.in.S, qscale(b), kscale(b), rows[std::size_t(b)],
                    pass.pool);
  }
  return rows;
}

}  // namespace detail
}  // namespace kattn
