#pragma once
/// \file
/// \private The core of the CausalWindowed policy (SPEC 3.3): chunked prefix sums with window,
/// decay and padding over a whole sequence, block by block, each head's state fed by
/// causalProcess. Streaming calls (detail/streaming_pass.hpp) run the same head kernels on a
/// StreamingState's heads.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../feature_maps.hpp"
#include "../masking.hpp"
#include "causal_chunks.hpp"
#include "causal_state.hpp"
#include "causal_tokens.hpp"
#include "features.hpp"
#include "low_rank.hpp"
#include "memory_budget.hpp"
#include "pass.hpp"
#include "schedule.hpp"
#include "workspace.hpp"

namespace kattn {
namespace detail {

/// The causal core for feature map FeatureMap.
template <typename Scalar, typename FeatureMap>
struct CausalCore {
  using Mat = Matrix<Scalar>;
  using MapMat = Eigen::Map<Mat>;
  using ConstMapMat = Eigen::Map<const Mat>;
  using ConstBlk = ConstFeatureBlock<Scalar>;
  using Traits = feature_map_traits<FeatureMap>;
  using HeadState = CausalHeadState<Scalar>;

  /// The kernel's parameters for a whole pass over T positions.
  static CausalParams wholePassParams(const CausalWindowed& m, Index T) {
    CausalParams p;
    p.chunk = m.chunk;
    p.window = m.window;
    p.gamma = m.gamma();
    const Index chunks = (T + m.leadingPad(T) + p.chunk - 1) / p.chunk;
    p.sliding = p.window < chunks;
    return p;
  }

  /// Rows per block of the whole pass: whole chunks, enough rows to keep the products
  /// efficient, few enough that a block's projections and features stay small.
  static Index blockRows(Index C) {
    const Index target = 2048;
    return C >= target ? C : C * (target / C);
  }

  /// Causal kernel of every head of one block (features in w), state per head in `st`.
  static void heads(const Pass<Scalar>& pass, const CausalParams& p, HeadState* st,
                    RowWork<Scalar>& w, Index lead, const ThreadPool* inner) {
    const Index N = pass.dims.heads, dv = pass.dims.value_dim, F = w.qf.cols() / N;
    w.heads.resize(w.qf.rows(), N * dv);
    forEachHead(N, inner, [&](Index n) {
      causalProcess<Scalar>(p, st[n], w.qf.middleCols(n * F, F), w.kf.middleCols(n * F, F),
                            w.vs.middleCols(n * dv, dv), lead, w.heads.middleCols(n * dv, dv));
    });
  }

  /**
   * Features, mask and causal kernel of every head of rows [r0, r0 + L) of batch row b, one
   * task per head, for the maps that need no shift over the whole row: each task reads its
   * head's rows where they are (the caller's heads, scaled by r here; else the block's
   * projections in w, already scaled) and writes its heads to `out` [L, N d_v]. No copy of
   * a whole block runs on one thread, and a head's data stay in its core's cache.
   */
  static void fusedHeads(const Pass<Scalar>& pass, const CausalParams& p, HeadState* st, Index b,
                         Index r0, Index L, Index lead, Scalar r, RowWork<Scalar>& w,
                         Eigen::Ref<Mat> out, const ThreadPool* inner) {
    const CallInputs<Scalar>& in = pass.in;
    const Index N = pass.dims.heads, dv = pass.dims.value_dim;
    if (L == 1 && !inner) {
      step(pass, p, st, b, r0, r, w, out);
      return;
    }
    const Mat* P = pass.projection;
    const Scalar* mask_row = in.mask ? in.mask + b * in.T + r0 : nullptr;
    // Each task walks its head's rows in pieces of whole chunks, about kStreamRows rows, so
    // that a piece's scaled rows and features stay in the core's cache.
    const Index C = p.chunk;
    const Index piece = C >= kStreamRows ? C : C * (kStreamRows / C);
    auto head = [&](Index n, RowWork<Scalar>& t) {
      for (Index p0 = 0; p0 < L;) {
        const Index len = std::min(L - p0, p0 == 0 ? piece - lead : piece);
        const Index row = b * in.T + r0 + p0;  // first row of the piece in the caller's heads
        const ConstBlk v = in.givenHeads()
                               ? ConstBlk(ConstMapMat(in.v_heads + row * N * dv, len, N * dv)
                                              .middleCols(n * dv, dv))
                               : ConstBlk(w.vs.block(p0, n * dv, len, dv));
        sideFeatures<FeatureMap>(pass.dims, in.q_heads, w.qs, row, p0, len, n, 1, r, P, true,
                                 t.qs, t.qf);
        sideFeatures<FeatureMap>(pass.dims, in.k_heads, w.ks, row, p0, len, n, 1, r, P, false,
                                 t.ks, t.kf);
        maskRows(t.kf, mask_row ? mask_row + p0 : nullptr);
        causalProcess<Scalar>(p, st[n], t.qf, t.kf, v, p0 == 0 ? lead : 0,
                              out.block(p0, n * dv, len, dv));
        p0 += len;
      }
    };
    if (inner) {
      forEachHead(N, inner, [&](Index n) {
        Workspace<Scalar> ws(*pass.workspaces);
        head(n, *ws);
      });
    } else {
      // One workspace for all heads: a decode step is a few microseconds, and taking the
      // workspace pool's lock per head would be a good part of it.
      Workspace<Scalar> ws(*pass.workspaces);
      for (Index n = 0; n < N; ++n) head(n, *ws);
    }
  }

  /**
   * fusedHeads for a decode step (one row of batch row b) on the calling thread: scaling,
   * features and key mask go over the row of all heads at once (per head they would be a good
   * part of a step), then the one-token kernel (or the sliding window's one-token chunk) runs
   * per head. Features go in w.qf and w.kf, which the fused pass leaves unused; a scaled copy
   * of the caller's heads in w.qs and w.ks, which hold projections only when the caller gave
   * none.
   */
  static void step(const Pass<Scalar>& pass, const CausalParams& p, HeadState* st, Index b,
                   Index r0, Scalar r, RowWork<Scalar>& w, Eigen::Ref<Mat> out) {
    const CallInputs<Scalar>& in = pass.in;
    const Index N = pass.dims.heads, dv = pass.dims.value_dim, F = pass.features();
    const Mat* P = pass.projection;
    const Index row = b * in.T + r0;
    const ConstBlk v = in.givenHeads() ? ConstBlk(ConstMapMat(in.v_heads + row * N * dv, 1, N * dv))
                                       : ConstBlk(w.vs.topRows(1));
    sideFeatures<FeatureMap>(pass.dims, in.q_heads, w.qs, row, 0, 1, 0, N, r, P, true, w.qs, w.qf);
    sideFeatures<FeatureMap>(pass.dims, in.k_heads, w.ks, row, 0, 1, 0, N, r, P, false, w.ks, w.kf);
    maskRows(w.kf, in.mask ? in.mask + row : nullptr);
    for (Index n = 0; n < N; ++n) {
      const auto q = w.qf.middleCols(n * F, F), k = w.kf.middleCols(n * F, F);
      if (p.sliding) {
        causalSlidingChunk<Scalar>(p, st[n], q, k, v.middleCols(n * dv, dv),
                                   out.middleCols(n * dv, dv));
      } else {
        causalToken<Scalar>(Scalar(p.gamma), st[n], q, k, v.middleCols(n * dv, dv),
                            out.middleCols(n * dv, dv));
      }
    }
  }

  /// Where the fused pass of rows [r0, r0 + L) writes its heads: straight into the caller's
  /// heads (unless dropout must go over them first), else into w.heads.
  static Eigen::Ref<Mat> target(const Pass<Scalar>& pass, Index b, Index r0, Index L,
                                RowWork<Scalar>& w) {
    if (pass.sink == HeadsSink::Caller && !pass.dropout.active) return pass.callerHeads(b, r0, L);
    w.heads.resize(L, pass.dims.heads * pass.dims.value_dim);
    return w.heads;
  }

  /// The exp maps' shifts of batch row b (SPEC 2): the largest query and key logits of the
  /// whole row, over all heads, in a first pass over its blocks.
  static std::pair<Scalar, Scalar> rowShifts(const Pass<Scalar>& pass, Index b, Index first,
                                             Index block, Scalar r, RowWork<Scalar>& w,
                                             const ThreadPool* inner) {
    const Index T = pass.in.T;
    Scalar mq = -std::numeric_limits<Scalar>::infinity(), mk = mq;
    for (Index r0 = 0; r0 < T;) {
      const Index L = std::min(T - r0, r0 == 0 ? first : block);
      pass.scaledRows(b, r0, L, r0, L, r, r, w, inner, false);
      mq = std::max(mq, maxLogit(FeatureMap{}, pass.dims, w.qs, pass.projection, inner));
      mk = std::max(mk, maxLogit(FeatureMap{}, pass.dims, w.ks, pass.projection, inner));
      r0 += L;
    }
    return {mq, mk};
  }

  /// Dropout over a block's heads, then their delivery (output projection or caller's heads).
  static void finishBlock(const Pass<Scalar>& pass, RowWork<Scalar>& w, Index b, Index r0,
                          const ThreadPool* inner) {
    const Weights<Scalar>* wt = pass.weights;
    const OutputPart<Scalar> out{0, wt ? &wt->output_kernel : nullptr,
                                 wt ? &wt->output_bias : nullptr};
    if (pass.dropout.active) pass.dropout.apply(w.heads, 0, b, r0);
    pass.deliver(w.heads, b, r0, out, inner);
  }

  /// Whether the whole pass writes every head straight into the caller's heads, in one block
  /// per batch row: a block bounds the memory of its projections and heads, and attend into
  /// caller memory has neither, so one pass of the pool per row, not one per block with every
  /// thread waiting at each block's end for the slowest head.
  static bool inPlace(const Pass<Scalar>& pass) {
    return !Traits::max_shifted && pass.in.givenHeads() && pass.sink == HeadsSink::Caller &&
           !pass.dropout.active;
  }

  /// Rows of the whole pass's blocks over T positions with `lead` padding rows first.
  static Index passBlockRows(const Pass<Scalar>& pass, Index C, Index T, Index lead) {
    return inPlace(pass) ? std::max(blockRows(C), (T + lead + C - 1) / C * C) : blockRows(C);
  }

  /**
   * The working memory of the whole pass. Per batch row in flight: each head's state (sums,
   * and the sliding window's chunks and suffix sums), and a block's projections, features and
   * heads, as far as the path keeps them (the fused path reads given heads where they are and
   * writes them in place); per thread: a head's piece of scaled rows and features, or the exp
   * maps' logits, and the kernels' scratch. expplus holds the whole batch's projections and
   * features.
   */
  static Budget budget(const Pass<Scalar>& pass, const CausalWindowed& masking) {
    const CausalParams p = wholePassParams(masking, pass.in.T);
    const Index T = pass.in.T, lead = masking.leadingPad(T), C = p.chunk;
    const double N = double(pass.dims.heads), d = double(pass.dims.key_dim);
    const double dv = double(pass.dims.value_dim), F = double(pass.features());
    const Concurrency at_once = concurrencyOf(pass.pool, pass.flops(), pass.in.B);
    Budget b(sizeof(Scalar));
    if (p.sliding) {
      // The window's chunks (rows or terms) and, once it slides, up to W suffix sums, for
      // every head of the batch rows that may run at once.
      WindowLoad w;
      w.features = F;
      w.value_dim = dv;
      w.chunks = double((T + lead + C - 1) / C);
      w.chunk = C;
      w.window = p.window;
      w.rows = p.compact_ring;
      const double layer_threads = pass.pool ? double(pass.pool->threads()) : 1.0;
      const double rows = std::min(double(pass.in.B), layer_threads);
      const Index W = p.window;
      b.add(w.numbers(double(HeadState::kRingBlock)) * N * rows,
            [=] { return "the causal window of " + std::to_string(W) + " chunks"; });
    } else {
      b.add(at_once.rows * N * F * (dv + 1));
    }
    const double block = double(std::min(passBlockRows(pass, C, T, lead), T + lead));
    if (Traits::pair_statistics && pass.projection) {
      // expplus's statistics need the whole batch's projections and features at once.
      return b.add(double(pass.in.B) * double(T) * N * (2 * d + 2 * F + 2 * dv) +
                       at_once.threads * kernelScratch(pass, C),
                   [=] { return "the whole batch's projections and features (expplus)"; });
    }
    return b.add(blockNumbers(pass, C, block, at_once), [=] {
      return "the causal pass's blocks of " + std::to_string(Index(block)) + " rows";
    });
  }

  /// Numbers the head kernels of one task may hold for chunks of C rows: causalGroup's masked
  /// scores and scaled rows (none of L x L for one chunk that takes the low-rank form), a
  /// sliding chunk's term, causalTokens' weighted keys, and the products' packing.
  static double kernelScratch(const Pass<Scalar>& pass, Index C) {
    const double F = double(pass.features()), dv = double(pass.dims.value_dim);
    const double group = double(groupRows(C));
    if (group == double(C) && group * (F + dv) > 2 * F * dv) {
      return group + gemmPacking(F, group, dv);  // a normaliser and k'^T v
    }
    return group * group + group * (F + 2 * dv + 2) + F * (dv + 1) + 4 * F +
           gemmPacking(group, F, dv);
  }

  /// Numbers of a pass over blocks of `block` rows: per batch row in flight, a block's
  /// projections, features and heads as far as the path keeps them (the fused path reads given
  /// heads where they are and writes in place); per thread, a head's piece of scaled rows and
  /// features, or the exp maps' logits and the features' projection, and the kernels' scratch.
  static double blockNumbers(const Pass<Scalar>& pass, Index C, double block,
                             const Concurrency& at_once) {
    const double N = double(pass.dims.heads), d = double(pass.dims.key_dim);
    const double dv = double(pass.dims.value_dim), F = double(pass.features());
    const double piece = double(C >= kStreamRows ? C : C * (kStreamRows / C));
    double per_row = 0, per_thread = kernelScratch(pass, C) + densePacking(pass);
    if (Traits::max_shifted) {
      per_row = block * N * (2 * d + dv + 2 * F + dv);
      per_thread += double(kLogitRows) * F + gemmPacking(block, d, F);
    } else {
      per_row = (pass.in.givenHeads() ? 0.0 : block * N * (2 * d + dv)) +
                (inPlace(pass) ? 0.0 : block * N * dv);
      per_thread += std::min(piece, block) * 2 * (d + F) + gemmPacking(piece, d, F);
    }
    return at_once.rows * per_row + at_once.threads * per_thread;
  }

  /// The whole pass over every batch row (SPEC 3.3).
  static void run(const Pass<Scalar>& pass, const CausalWindowed& masking) {
    const CallInputs<Scalar>& in = pass.in;
    const Index N = pass.dims.heads, dv = pass.dims.value_dim, F = pass.features(), T = in.T;
    const Mat* P = pass.projection;
    const CausalParams params = wholePassParams(masking, T);
    const Index lead = masking.leadingPad(T);
    budget(pass, masking).check();
    if constexpr (Traits::pair_statistics) {
      if (P) {
        // expplus sees the whole sequence (its coefficients use future positions, as in the
        // reference): features of the whole batch first, then the causal kernel.
        auto sqrt_scale = [&](Index b) { return std::sqrt(pass.scales[std::size_t(b)]); };
        std::vector<RowWork<Scalar>> rows = scaledBatch(pass, 0, T, sqrt_scale, sqrt_scale);
        pairFeatures(FeatureMap{}, pass.dims, rows, P);
        for (Index b = 0; b < in.B; ++b) {
          RowWork<Scalar>& w = rows[std::size_t(b)];
          maskRows(w.kf, in.mask ? in.mask + b * T : nullptr);
          std::vector<HeadState> st(static_cast<std::size_t>(N));
          for (auto& h : st) h.reset(F, dv);
          heads(pass, params, st.data(), w, lead, pass.pool);
          finishBlock(pass, w, b, 0, pass.pool);
        }
        return;
      }
    }
    const Index block = passBlockRows(pass, params.chunk, T, lead);
    pass.forBatchRows([&](Index b, const ThreadPool* inner) {
      const Scalar r = std::sqrt(pass.scales[std::size_t(b)]);
      std::vector<HeadState> st(static_cast<std::size_t>(N));
      for (auto& h : st) h.reset(F, dv);
      Workspace<Scalar> ws(*pass.workspaces);
      RowWork<Scalar>& w = *ws;
      // Blocks hold whole chunks; the first holds C - lead real rows of its first chunk.
      const Index first = std::min(T, block - lead);
      auto blockLength = [&](Index r0) { return std::min(T - r0, r0 == 0 ? first : block); };
      // The exp maps shift by the largest logit of the whole row (SPEC 2): with more than one
      // block that needs a first pass over the logits.
      std::optional<Scalar> q_shift, k_shift;
      if constexpr (Traits::max_shifted) {
        if (first < T) std::tie(q_shift, k_shift) = rowShifts(pass, b, first, block, r, w, inner);
      }
      for (Index r0 = 0; r0 < T; r0 += blockLength(r0)) {
        const Index L = blockLength(r0), block_lead = r0 == 0 ? lead : 0;
        if constexpr (!Traits::max_shifted) {
          if (!in.givenHeads()) pass.scaledRows(b, r0, L, r0, L, r, r, w, inner);
          Eigen::Ref<Mat> out = target(pass, b, r0, L, w);
          fusedHeads(pass, params, st.data(), b, r0, L, block_lead, r, w, out, inner);
          if (pass.dropout.active || pass.sink != HeadsSink::Caller) {
            finishBlock(pass, w, b, r0, inner);
          }
          continue;
        }
        pass.scaledRows(b, r0, L, r0, L, r, r, w, inner);
        features(FeatureMap{}, pass.dims, w.qs, P, true, w.qf, q_shift, inner);
        features(FeatureMap{}, pass.dims, w.ks, P, false, w.kf, k_shift, inner);
        maskRows(w.kf, in.mask ? in.mask + b * T + r0 : nullptr);
        heads(pass, params, st.data(), w, block_lead, inner);
        finishBlock(pass, w, b, r0, inner);
      }
    });
  }
};

}  // namespace detail
}  // namespace kattn
