#pragma once
/// \file
/// \private The core of the Bidirectional policy (SPEC 3.1, 3.2): for one call, features of
/// queries and keys, the key mask, and attention by the short-sequence softmax, the explicit
/// T x S form or the streamed low-rank form (the cost model picks between the last two), then
/// dropout and delivery of the heads. begin_kernel's softmax part runs here too.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <optional>
#include <vector>

#include "../feature_maps.hpp"
#include "bidirectional.hpp"
#include "features.hpp"
#include "low_rank.hpp"
#include "memory_budget.hpp"
#include "pass.hpp"
#include "schedule.hpp"
#include "workspace.hpp"

namespace kattn {
namespace detail {

/// The bidirectional core for feature map FeatureMap.
template <typename Scalar, typename FeatureMap>
struct BidirectionalCore {
  using Mat = Matrix<Scalar>;

  /// Whether the kernel form of `pass` for Tq queries goes through the T x S matrix.
  static bool usesExplicit(const Pass<Scalar>& pass, Index Tq) {
    return pass.form == CoreForm::Auto
               ? explicitIsCheaper(Tq, pass.in.S, pass.features(), pass.dims.value_dim)
               : pass.form == CoreForm::Explicit;
  }

  /**
   * The working memory of a call: its parts run one after the other, so the larger of
   * theirs. A quadratic part (the short path's softmax, the explicit form) holds a [T, S]
   * score matrix and a normaliser per thread, and a batch row's projections, features and
   * heads per row in flight (expplus: the whole batch's); the low-rank form holds the key sums
   * of each head's groups, the heads when they do not go straight to the caller, the exp
   * maps' normalisers, and a block of rows, values and features per thread.
   */
  static Budget budget(const Pass<Scalar>& pass, Index begin_kernel, bool is_short_seq) {
    const Index K = std::min<Index>(begin_kernel, pass.in.T);
    Budget b(sizeof(Scalar));
    if (K > 0) b = partBudget(pass, K, true, false, false);
    if (K < pass.in.T) {
      constexpr bool pair = feature_map_traits<FeatureMap>::pair_statistics;
      constexpr bool shifted = feature_map_traits<FeatureMap>::max_shifted;
      b = Budget::sequence(b, partBudget(pass, pass.in.T - K, is_short_seq,
                                         pair && pass.projection, shifted));
    }
    return b;
  }

  /// The working memory of a part of Tq queries (budget).
  static Budget partBudget(const Pass<Scalar>& pass, Index Tq, bool short_path, bool pair,
                           bool shifted) {
    const double N = double(pass.dims.heads), d = double(pass.dims.key_dim);
    const double dv = double(pass.dims.value_dim), F = double(pass.features());
    const double T = double(Tq), S = double(pass.in.S);
    const Index keys = pass.in.S;
    const Concurrency at_once = concurrencyOf(pass.pool, pass.flops(), pass.in.B);
    const bool quadratic = short_path || usesExplicit(pass, Tq);
    Budget b(sizeof(Scalar));
    if (pass.in.S == 0) return b.add(at_once.rows * T * N * dv);
    if (quadratic) {
      b.add(at_once.threads * T * (S + 1), [=] {
        return std::string(short_path ? "the short-sequence path's" : "the explicit form's") +
               " attention matrices [T, S] = [" + std::to_string(Tq) + ", " +
               std::to_string(keys) + "], one per thread";
      });
    }
    auto describe = [=] {
      return "the working buffers of " + std::to_string(Tq) + " queries and " +
             std::to_string(keys) + " keys";
    };
    if (quadratic || pair) {
      // Per thread, the largest product in flight: the features' projection, the scores, and
      // the scores (or, for the low-rank form of a whole row, the key sums) times the values.
      const double product =
          std::max({pass.projection ? gemmPacking(std::max(T, S), d, F) : 0.0,
                    quadratic ? std::max(gemmPacking(T, F, S), gemmPacking(T, S, dv))
                              : std::max(gemmPacking(F, S, dv), gemmPacking(T, F, dv)),
                    densePacking(pass)});
      const double rows = pair ? double(pass.in.B) : at_once.rows;
      return b.add(rows * (T + S) * N * (d + F + dv), describe).add(at_once.threads * product);
    }
    const double L = double(kStreamRows), G = double(keyGroups(pass.in.S));
    const bool own_heads = pass.sink != HeadsSink::Caller || pass.dropout.active;
    const double per_row = (own_heads ? T * N * dv : 0.0) + N * G * F * (dv + 1) +
                           (shifted ? T * N + 2 * std::ceil(T / L) * N : 0.0);
    const double product = std::max({gemmPacking(L, d, F), gemmPacking(F, L, dv), densePacking(pass)});
    return b.add(at_once.rows * per_row + at_once.threads * L * (d + dv + F + 1), describe)
        .add(at_once.threads * product);
  }

  /// The whole call: query rows [0, K) by begin_kernel's softmax part (identity features,
  /// its own output projection and dropout stream), the rest by the configured map.
  static void run(const Pass<Scalar>& pass, Index begin_kernel, bool is_short_seq) {
    // Refuse before any buffer exists (tasks on the pool must not throw).
    budget(pass, begin_kernel, is_short_seq).check();
    const Weights<Scalar>* w = pass.weights;
    const Index K = std::min<Index>(begin_kernel, pass.in.T);
    if (K > 0) {
      const OutputPart<Scalar> softmax{1, w ? &w->output_softmax_kernel : nullptr,
                                       w ? &w->output_softmax_bias : nullptr};
      part(Identity{}, true, pass, 0, K, softmax);
    }
    if (K < pass.in.T) {
      const OutputPart<Scalar> kernel{0, w ? &w->output_kernel : nullptr,
                                      w ? &w->output_bias : nullptr};
      part(FeatureMap{}, is_short_seq, pass, K, pass.in.T, kernel);
    }
  }

  /// One part of the layer: query rows [q0, q1) through `map`, then dropout and delivery.
  template <typename Map>
  static void part(const Map& map, bool short_path, const Pass<Scalar>& pass, Index q0, Index q1,
                   const OutputPart<Scalar>& out) {
    constexpr bool pair = feature_map_traits<Map>::pair_statistics;
    const Mat* P = pass.projection;
    const bool quadratic = short_path || usesExplicit(pass, q1 - q0);
    auto finish = [&](RowWork<Scalar>& w, Index b, const ThreadPool* inner) {
      if (pass.dropout.active) pass.dropout.apply(w.heads, out.stream, b, q0);
      pass.deliver(w.heads, b, q0, out, inner);
    };
    if (pass.in.S == 0) {
      // No keys: every sum over keys is empty, so the heads are zero and the output is the
      // bias (and the per-head column blocks of 0-row matrices are never formed).
      pass.forBatchRows([&](Index b, const ThreadPool* inner) {
        Workspace<Scalar> ws(*pass.workspaces);
        ws->heads.setZero(q1 - q0, pass.dims.heads * pass.dims.value_dim);
        pass.deliver(ws->heads, b, q0, out, inner);
      });
      return;
    }
    if constexpr (pair) {
      if (P) {
        // expplus's statistics need the whole batch. The short path scales only the queries,
        // by s; the kernel path both sides by sqrt(s).
        auto qscale = [&](Index b) {
          const Scalar s = pass.scales[std::size_t(b)];
          return short_path ? s : std::sqrt(s);
        };
        auto kscale = [&](Index b) {
          return short_path ? Scalar(1) : std::sqrt(pass.scales[std::size_t(b)]);
        };
        std::vector<RowWork<Scalar>> rows = scaledBatch(pass, q0, q1, qscale, kscale);
        pairFeatures(map, pass.dims, rows, P);
        for (Index b = 0; b < pass.in.B; ++b) {
          attendRow(short_path, pass, b, rows[std::size_t(b)], pass.pool);
          finish(rows[std::size_t(b)], b, pass.pool);
        }
        return;
      }
    }
    const Index Tq = q1 - q0, Ndv = pass.dims.heads * pass.dims.value_dim;
    SavedData<Scalar>* saved = quadratic ? nullptr : pass.saved;
    if (saved) {
      saved->allocate(pass.in.B, pass.in.T, pass.in.S, pass.dims.heads, pass.features(),
                      pass.dims.value_dim, q0, kStreamRows,
                      feature_map_traits<Map>::max_shifted);
    }
    pass.forBatchRows([&](Index b, const ThreadPool* inner) {
      Workspace<Scalar> ws(*pass.workspaces);
      RowWork<Scalar>& w = *ws;
      const Scalar sb = pass.scales[std::size_t(b)];
      if (quadratic) {
        const Scalar qscale = short_path ? sb : std::sqrt(sb);
        const Scalar kscale = short_path ? Scalar(1) : std::sqrt(sb);
        pass.scaledRows(b, q0, Tq, 0, pass.in.S, qscale, kscale, w, inner);
        features(map, pass.dims, w.qs, P, true, w.qf, std::optional<Scalar>(), inner);
        features(map, pass.dims, w.ks, P, false, w.kf, std::optional<Scalar>(), inner);
        attendRow(short_path, pass, b, w, inner);
      } else if (pass.sink == HeadsSink::Caller) {
        auto target = pass.callerHeads(b, q0, Tq);
        lowRankPass(map, pass, b, q0, q1, sb, Eigen::Ref<Mat>(target), inner);
        if (!pass.dropout.active) return;
        w.heads = target;
        pass.dropout.apply(w.heads, out.stream, b, q0);
        target = w.heads;
        return;
      } else {
        w.heads.resize(Tq, Ndv);
        lowRankPass(map, pass, b, q0, q1, sb, Eigen::Ref<Mat>(w.heads), inner);
      }
      finish(w, b, inner);
    });
    if (saved) saved->holds = true;
  }

  /// Mask and attention of one batch row from its features (w.qf, w.kf) and values (w.vs),
  /// into w.heads: the short-sequence softmax or the kernel form the cost model picks.
  static void attendRow(bool short_path, const Pass<Scalar>& pass, Index b, RowWork<Scalar>& w,
                        const ThreadPool* inner) {
    const Index N = pass.dims.heads, dv = pass.dims.value_dim, Tq = w.qf.rows();
    const Index F = w.qf.cols() / N;
    const Scalar* mask_row = pass.in.mask ? pass.in.mask + b * pass.in.S : nullptr;
    maskRows(w.kf, mask_row);
    w.heads.resize(Tq, N * dv);
    const bool use_explicit = usesExplicit(pass, Tq);
    forEach(N, inner, [&](Index n) {
      const auto q = w.qf.middleCols(n * F, F);
      const auto k = w.kf.middleCols(n * F, F);
      const auto v = w.vs.middleCols(n * dv, dv);
      auto a = w.heads.middleCols(n * dv, dv);
      if (short_path) {
        shortSoftmaxAttention<Scalar>(q, k, v, mask_row, a);
      } else if (use_explicit) {
        explicitAttention<Scalar>(q, k, v, a);
      } else {
        lowRankAttention<Scalar>(q, k, v, a);
      }
    });
  }
};

}  // namespace detail
}  // namespace kattn
