#pragma once
/// \file
/// \private The bidirectional core's low-rank form (SPEC 3.2) streamed over blocks of keys and
/// queries, reading rows through the call's Pass: nothing of sequence length but the heads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <vector>

#include "../assert.hpp"
#include "../feature_maps.hpp"
#include "bidirectional.hpp"
#include "pass.hpp"
#include "schedule.hpp"
#include "workspace.hpp"

namespace kattn {
namespace detail {

/// Rows per block of the streamed passes: large enough for efficient products, small enough
/// that a block's rows and features stay in cache.
inline constexpr Index kStreamRows = 256;

/// Key groups per head of the streamed low-rank pass: its key pass runs as heads x groups
/// tasks, so that a pool's threads share the work evenly even when they run at different
/// speeds. A function of S alone, like the summation order it fixes.
inline constexpr Index kKeyGroups = 4;

/// Key groups of a key pass over S keys in blocks of kStreamRows.
inline Index keyGroups(Index S) {
  return std::min(kKeyGroups, (S + kStreamRows - 1) / kStreamRows);
}

/**
 * Adds keys [first, last) of head n of batch row b to the sums KV [F, d_v] and z [F], in
 * blocks of kStreamRows: features of the scaled keys (times r), the key mask, then
 * KV += phi(k)^T v and z += phi(k)^T 1. For the exp maps the sums stay relative to `shift`,
 * the largest key logit seen so far, raised (and the sums rescaled) when a block exceeds it.
 */
template <typename Map, typename Scalar>
void accumulateKeys(const Map& map, const Pass<Scalar>& pass, Index b, Index n, Index first,
                    Index last, Scalar r, Matrix<Scalar>& kv, Vector<Scalar>& z, Scalar& shift,
                    RowWork<Scalar>& ws) {
  using Blk = FeatureBlock<Scalar>;
  const Matrix<Scalar>* P = pass.projection;
  const Index F = pass.features(), L = kStreamRows;
  const Scalar* mask_row = pass.in.mask ? pass.in.mask + b * pass.in.S : nullptr;
  KATTN_ASSERT(kv.rows() == F && kv.cols() == pass.dims.value_dim && z.size() == F);
  KATTN_ASSERT(first >= 0 && first <= last && last <= pass.in.S);
  Matrix<Scalar>& x = ws.x;
  Matrix<Scalar>& v = ws.v;
  Matrix<Scalar>& f = ws.f;
  for (Index s0 = first; s0 < last; s0 += L) {
    const Index len = std::min(L, last - s0);
    pass.headRows(Side::Key, b, n, s0, len, r, x);
    pass.headRows(Side::Value, b, n, s0, len, Scalar(1), v);
    f.resize(len, F);
    const FeatureInput<Scalar> fin{x, P, false};
    SavedData<Scalar>* saved = pass.saved;
    if constexpr (feature_map_traits<Map>::max_shifted) {
      map.logits(fin, Blk(f));
      const Scalar m = f.maxCoeff();
      if (m > shift) {
        if (std::isfinite(shift)) {
          const Scalar c = std::exp(shift - m);
          kv *= c;
          z *= c;
        }
        shift = m;
      }
      map.finish(fin, Blk(f), shift);
      if (saved) {
        const Index i = (b * pass.dims.heads + n) * saved->keyBlocks() + s0 / L;
        saved->kshift(i) = shift;
        saved->kmax(i) = m;
      }
    } else {
      map(fin, Blk(f));
    }
    if (saved) Eigen::Map<Matrix<Scalar>>(saved->keyFeatures(b, n, s0), len, F) = f;
    if (mask_row) {
      for (Index s = 0; s < len; ++s)
        if (mask_row[s0 + s] != Scalar(1)) f.row(s) *= mask_row[s0 + s];
    }
    kv.noalias() += f.transpose() * v;
    z.noalias() += f.colwise().sum().transpose();
  }
}

/// The key sums of one batch row in a low-rank pass: partial sums of key group g of head n at
/// n G + g (G = groups), each relative to its own running shift (exp maps); after
/// lowRankKeys a head's total and shift are at n G.
template <typename Scalar>
struct KeyGroupSums {
  Index groups = 1;
  std::vector<Matrix<Scalar>> kv;
  std::vector<Vector<Scalar>> z;
  std::vector<Scalar> shift;

  /// Adds head n's groups into its first, in group order, each brought to their common
  /// maximum (exp maps). Non-finite logits leave the shifts alone, so NaN and Inf still reach
  /// every output, as in one running sum.
  void addGroups(Index n, bool shifted) {
    const std::size_t h0 = std::size_t(n * groups);
    Scalar M = -std::numeric_limits<Scalar>::infinity();
    if (shifted) {
      for (Index g = 0; g < groups; ++g) M = std::max(M, shift[h0 + std::size_t(g)]);
    }
    auto weight = [&](std::size_t i) {
      return shifted && std::isfinite(M) && std::isfinite(shift[i]) ? std::exp(shift[i] - M)
                                                                     : Scalar(1);
    };
    const Scalar c0 = weight(h0);
    if (c0 != Scalar(1)) {
      kv[h0] *= c0;
      z[h0] *= c0;
    }
    for (Index g = 1; g < groups; ++g) {
      const std::size_t i = h0 + std::size_t(g);
      const Scalar c = weight(i);
      kv[h0].noalias() += c * kv[i];
      z[h0].noalias() += c * z[i];
    }
    if (shifted) shift[h0] = M;
  }
};

/// The key pass of a low-rank pass over batch row b: keyGroups(S) groups of whole key blocks
/// per head, one task each, added per head in group order by the last of its groups to finish
/// (a function of S alone, like the summation order it fixes).
template <typename Map, typename Scalar>
KeyGroupSums<Scalar> lowRankKeys(const Map& map, const Pass<Scalar>& pass, Index b, Scalar r,
                                 const ThreadPool* pool) {
  const Index N = pass.dims.heads, S = pass.in.S, L = kStreamRows;
  const Index G = keyGroups(S), k_blocks = (S + L - 1) / L;
  KeyGroupSums<Scalar> sums;
  sums.groups = G;
  sums.kv.resize(std::size_t(N * G));
  sums.z.resize(sums.kv.size());
  sums.shift.assign(sums.kv.size(), -std::numeric_limits<Scalar>::infinity());
  const auto groups_left = std::make_unique<std::atomic<Index>[]>(std::size_t(N));
  for (Index n = 0; n < N; ++n) groups_left[std::size_t(n)] = G;
  forEach(N * G, pool, [&](Index task) {
    const Index n = task / G, g = task % G;
    const std::size_t h = static_cast<std::size_t>(task);
    Workspace<Scalar> ws(*pass.workspaces);
    sums.kv[h].setZero(pass.features(), pass.dims.value_dim);
    sums.z[h].setZero(pass.features());
    const Index first = g * k_blocks / G * L, last = std::min(S, (g + 1) * k_blocks / G * L);
    accumulateKeys(map, pass, b, n, first, last, r, sums.kv[h], sums.z[h], sums.shift[h], *ws);
    // The last group of a head to finish adds them up; acq_rel makes the others' sums
    // visible to it.
    if (G > 1 && groups_left[std::size_t(n)].fetch_sub(1, std::memory_order_acq_rel) == 1) {
      sums.addGroups(n, feature_map_traits<Map>::max_shifted);
    }
  });
  return sums;
}

/**
 * SPEC 3.2 in the low-rank form without materialising any sequence-long feature matrix:
 * lowRankKeys sums the keys per head, then one task per head and query block reads the sums
 * out into heads [Tq, N d_v].
 *
 * The exp maps' reference shift (the largest logit over the whole batch row and all heads)
 * only matters through the eps of the normaliser: with features computed under any shifts
 * mq, mk instead of the reference's Mq, Mk, a_t = q'KV / (q'z + eps e^(Mq - mq) e^(Mk - mk))
 * exactly. So each key group uses a running maximum (rescaling its sums when it grows), the
 * groups of a head are brought to their common maximum when added, and queries use a
 * per-block maximum; the normalisation waits until Mq and Mk are known.
 */
template <typename Map, typename Scalar>
void lowRankPass(const Map& map, const Pass<Scalar>& pass, Index b, Index q0, Index q1, Scalar sb,
                 Eigen::Ref<Matrix<Scalar>> heads, const ThreadPool* pool) {
  using Mat = Matrix<Scalar>;
  using Blk = FeatureBlock<Scalar>;
  constexpr bool shifted = feature_map_traits<Map>::max_shifted;
  const Index N = pass.dims.heads, dv = pass.dims.value_dim, F = pass.features(), Tq = q1 - q0;
  const Index L = kStreamRows, q_blocks = (Tq + L - 1) / L;
  const Scalar r = std::sqrt(sb), eps = Scalar(kNormaliserEps);
  const KeyGroupSums<Scalar> sums = lowRankKeys(map, pass, b, r, pool);
  const Index G = sums.groups;
  SavedData<Scalar>* saved = pass.saved;
  if (saved) {
    for (Index n = 0; n < N; ++n) {
      const std::size_t h = static_cast<std::size_t>(n * G);
      const Index i = b * N + n;
      Eigen::Map<Mat>(saved->kv.data() + i * F * dv, F, dv) = sums.kv[h];
      saved->z.segment(i * F, F) = sums.z[h];
      if (shifted) saved->kv_shift(i) = sums.shift[h];
    }
  }
  Mat den(shifted ? Tq : 0, N);       // q'z per (row, head), exp maps only
  Mat mq(shifted ? q_blocks : 0, N);  // shift of each query block and head
  forEach(N * q_blocks, pool, [&](Index task) {
    const Index n = task / q_blocks, j = task % q_blocks, t0 = j * L;
    const std::size_t h = static_cast<std::size_t>(n * G);
    Workspace<Scalar> ws(*pass.workspaces);
    Mat& f = ws->f;
    const Index len = std::min(L, Tq - t0);
    pass.headRows(Side::Query, b, n, q0 + t0, len, r, ws->x);
    f.resize(len, F);
    const FeatureInput<Scalar> fin{ws->x, pass.projection, true};
    auto out = heads.block(t0, n * dv, len, dv);
    if constexpr (shifted) {
      map.logits(fin, Blk(f));
      const Scalar m = f.maxCoeff();
      mq(j, n) = m;
      map.finish(fin, Blk(f), m);
      if (saved) saved->qshift((b * N + n) * q_blocks + j) = m;
      out.noalias() = f * sums.kv[h];
      den.block(t0, n, len, 1).noalias() = f * sums.z[h];
    } else {
      map(fin, Blk(f));
      out.noalias() = f * sums.kv[h];
      Vector<Scalar>& d = ws->d;
      d.noalias() = f * sums.z[h];
      for (Index t = 0; t < len; ++t) out.row(t) /= d(t) + eps;
    }
    if (saved) Eigen::Map<Mat>(saved->queryFeatures(b, n, t0), len, F) = f;
  });
  if constexpr (shifted) {
    Scalar Mk = -std::numeric_limits<Scalar>::infinity();
    for (Index n = 0; n < N; ++n) Mk = std::max(Mk, sums.shift[std::size_t(n * G)]);
    const Scalar Mq = Tq ? mq.maxCoeff() : Scalar(0);
    Mat eps_eff(q_blocks, N);  // eps e^(Mq - mq) e^(Mk - mk): underflowing features give 0,
    for (Index j = 0; j < q_blocks; ++j)   // as in the reference
      for (Index n = 0; n < N; ++n) {
        const Scalar mkn = sums.shift[std::size_t(n * G)];
        const Scalar key_part = std::isfinite(mkn) ? Mk - mkn : 0;
        eps_eff(j, n) = eps * std::exp(Mq - mq(j, n) + key_part);
      }
    forRowSlices(Tq, pool, [&](Index s0, Index len) {
      for (Index t = s0; t < s0 + len; ++t)
        for (Index n = 0; n < N; ++n)
          heads.block(t, n * dv, 1, dv) /= den(t, n) + eps_eff(t / L, n);
    });
  }
}

}  // namespace detail
}  // namespace kattn
