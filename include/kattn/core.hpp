#pragma once
/// \file
/// The attention cores on heads the caller projected, with a state in and a state out: the
/// building blocks of serving many sequences, splitting a sequence across processes, and
/// gradients (docs/architecture.md).
///
/// - Bidirectional (SPEC 3.2): `summarizeKeys` gives the key side of a set of keys (a
///   KeySummary); summaries of disjoint key sets `combine`; `readout` gives the heads of any
///   queries from a summary. Summaries of pieces of the keys, combined, read out the same
///   heads as `attend` on the whole sequence (up to rounding), for every map but expplus,
///   whose key features depend on statistics of the queries.
/// - Causal (SPEC 3.3): `KernelAttention::attend(q, k, v, mask, state)` runs the core from the
///   state a StreamingState holds and leaves the state after the call in it; in exact mode,
///   pieces of whole chunks fed in order give the whole pass's heads. `combine(earlier,
///   later)` (streaming.hpp) joins the states of consecutive pieces, each fed from a fresh
///   state: the exclusive scan of a sequence split across workers.
///
/// The exp maps' shifts: each side's features are exp(logit - shift). The whole pass shifts
/// by the largest logit of the batch row (SPEC 2); a piece sees only its own logits. The shifts
/// cancel in attention except in the eps of the normaliser, so the key side keeps its shift
/// apart (KeySummary::shift, StreamingState::keyShift), and the query side takes the whole
/// sequence's shift from the caller (`queryShift` of all queries, or of the pieces combined by
/// max) to match the whole pass to rounding.

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "detail/features.hpp"
#include "detail/low_rank.hpp"
#include "detail/pass.hpp"
#include "key_summary.hpp"
#include "layer.hpp"

namespace kattn {

namespace detail {

/// T in a context that takes no part in deduction (C++20's std::type_identity_t): arguments
/// that convert (a map to an optional map) then deduce nothing.
template <typename T>
struct TypeIdentity {
  using type = T;
};
template <typename T>
using NoDeduce = typename TypeIdentity<T>::type;

/// A Pass over heads given by the caller, for the core functions below.
template <typename Scalar, typename FeatureMap>
Pass<Scalar> corePass(const KernelAttention<Scalar, FeatureMap, Bidirectional>& layer, Index B,
                      Index T, Index S, const Scalar* mask, WorkspacePool<Scalar>& workspaces) {
  static_assert(!feature_map_traits<FeatureMap>::pair_statistics,
                "expplus's key features depend on statistics of the queries: its key side has "
                "no summary of its own.");
  const LayerConfig& c = layer.config();
  if (c.scale_by_length) {
    throw std::invalid_argument("scale_by_length: the core functions take no whole-sequence mask "
                                "sums; scale the heads instead");
  }
  if (c.is_short_seq || c.begin_kernel > 0) {
    throw std::invalid_argument(std::string(c.is_short_seq ? "is_short_seq" : "begin_kernel") +
                                ": the key summary is the kernel path's (SPEC 3.2); the softmax "
                                "over kernel scores has none");
  }
  Pass<Scalar> pass;
  pass.dims = HeadDims{layer.numHeads(), layer.keyDim(), layer.valueDim()};
  pass.in.source = RowSource::Heads;
  pass.in.B = B;
  pass.in.T = T;
  pass.in.S = S;
  pass.in.mask = mask;
  pass.projection = c.hasProjection() ? &layer.projection() : nullptr;
  pass.pool = layer.threadPool().get();
  pass.workspaces = &workspaces;
  return pass;
}

}  // namespace detail

/**
 * \brief The key side of the layer's bidirectional kernel attention over keys k [B, S, N, d],
 * values v [B, S, N, d_v] and an optional key mask [B, S]: per (b, n), KV = sum_s phi(k_s)^T v_s
 * and z = sum_s phi(k_s), with the features the layer's forward would use (scale, projection,
 * map; exp maps relative to the keys' largest logit).
 * \throws std::invalid_argument on a shape error, or for a layer with scale_by_length,
 *         is_short_seq or begin_kernel (paths without a key summary).
 * \note O(B N S F (d + d_v)); holds one block of rows per head task.
 */
template <typename Scalar, typename FeatureMap>
KeySummary<Scalar> summarizeKeys(const KernelAttention<Scalar, FeatureMap, Bidirectional>& layer,
                                 const ConstTensorMap<Scalar, 4>& k,
                                 const ConstTensorMap<Scalar, 4>& v,
                                 const std::optional<ConstTensorMap<detail::NoDeduce<Scalar>, 2>>&
                                     mask = std::nullopt) {
  const Index B = k.dimension(0), S = k.dimension(1), N = layer.numHeads();
  checkShape<4>("k", k.dimensions(), {-1, -1, N, layer.keyDim()});
  checkShape<4>("v", v.dimensions(), {B, S, N, layer.valueDim()});
  if (mask) checkShape<2>("attention_mask", mask->dimensions(), {B, S});
  detail::WorkspacePool<Scalar> workspaces;
  detail::Pass<Scalar> pass =
      detail::corePass(layer, B, 0, S, mask ? mask->data() : nullptr, workspaces);
  pass.in.k_heads = k.data();
  pass.in.v_heads = v.data();
  KeySummary<Scalar> out(B, N, layer.numFeatures(), layer.valueDim());
  const Scalar r = std::sqrt(Scalar(layer.config().resolvedScale()));
  const ThreadPool* pool = detail::poolFor(pass.pool, pass.flops());
  detail::forEach(B * N, pool, [&](Index task) {
    const Index b = task / N, n = task % N;
    detail::Workspace<Scalar> ws(workspaces);
    detail::accumulateKeys(FeatureMap{}, pass, b, n, 0, S, r, out.kv(b, n), out.z(b, n),
                           out.shift(b, n), *ws);
  });
  return out;
}

/**
 * \brief The exp maps' shift of every batch row of q [B, T, N, d] (queries, or keys): its
 * largest logit over all positions and heads (SPEC 2). The shift of a sequence split into
 * pieces is the largest of its pieces' shifts. For the other maps, zeros (they take none).
 */
template <typename Scalar, typename FeatureMap, typename Masking>
std::vector<Scalar> queryShift(const KernelAttention<Scalar, FeatureMap, Masking>& layer,
                               const ConstTensorMap<Scalar, 4>& q) {
  const Index B = q.dimension(0), T = q.dimension(1), N = layer.numHeads(), d = layer.keyDim();
  checkShape<4>("q", q.dimensions(), {-1, -1, N, d});
  std::vector<Scalar> out(std::size_t(B), Scalar(0));
  if constexpr (feature_map_traits<FeatureMap>::max_shifted) {
    const detail::HeadDims dims{N, d, layer.valueDim()};
    const Matrix<Scalar>* P = layer.config().hasProjection() ? &layer.projection() : nullptr;
    const Scalar r = std::sqrt(Scalar(layer.config().resolvedScale()));
    for (Index b = 0; b < B; ++b) {
      const Matrix<Scalar> x =
          Eigen::Map<const Matrix<Scalar>>(q.data() + b * T * N * d, T, N * d) * r;
      out[std::size_t(b)] = detail::maxLogit(FeatureMap{}, dims, x, P, layer.threadPool().get());
    }
  }
  return out;
}

/**
 * \brief Heads [B, T, N, d_v] of queries q [B, T, N, d] attending to the keys of `summary`:
 * a_t = q'_t KV / (q'_t z + eps e^(Mk - shift)), as the layer's bidirectional kernel path.
 * \param layer the layer whose feature map, projection and scale apply
 * \param q [B, T, N, d], the projected queries
 * \param summary the keys' KV and z (summarizeKeys, combine)
 * \param heads [B, T, N, d_v], written
 * \param query_shift the exp maps' query shift per batch row (queryShift of the whole
 *        sequence); absent: that of these queries, as when they are the whole sequence.
 * \throws std::invalid_argument on a shape error or a summary of another shape.
 */
template <typename Scalar, typename FeatureMap>
void readout(const KernelAttention<Scalar, FeatureMap, Bidirectional>& layer,
             const ConstTensorMap<Scalar, 4>& q, const KeySummary<Scalar>& summary,
             TensorMap<Scalar, 4> heads,
             const std::optional<std::vector<detail::NoDeduce<Scalar>>>& query_shift =
                 std::nullopt) {
  using Mat = Matrix<Scalar>;
  constexpr bool shifted = feature_map_traits<FeatureMap>::max_shifted;
  const Index B = q.dimension(0), T = q.dimension(1), N = layer.numHeads();
  const Index F = layer.numFeatures(), dv = layer.valueDim();
  checkShape<4>("q", q.dimensions(), {-1, -1, N, layer.keyDim()});
  checkShape<4>("heads", heads.dimensions(), {B, T, N, dv});
  if (summary.batch() != B || summary.heads() != N || summary.features() != F ||
      summary.valueDim() != dv) {
    throw std::invalid_argument("summary: expected a key summary for [B, N, F, d_v] = [" +
                                std::to_string(B) + ", " + std::to_string(N) + ", " +
                                std::to_string(F) + ", " + std::to_string(dv) + "]");
  }
  if (query_shift && Index(query_shift->size()) != B) {
    throw std::invalid_argument("query_shift: expected " + std::to_string(B) +
                                " shifts (one per batch row), got " +
                                std::to_string(query_shift->size()));
  }
  detail::WorkspacePool<Scalar> workspaces;
  detail::Pass<Scalar> pass = detail::corePass(layer, B, T, 0, static_cast<const Scalar*>(nullptr), workspaces);
  pass.in.q_heads = q.data();
  const std::vector<Scalar> Mq = query_shift ? *query_shift : queryShift(layer, q);
  const Scalar r = std::sqrt(Scalar(layer.config().resolvedScale()));
  const Scalar eps = Scalar(detail::kNormaliserEps);
  const Index L = detail::kStreamRows, blocks = (T + L - 1) / L;
  const ThreadPool* pool = detail::poolFor(pass.pool, pass.flops());
  detail::forEach(B * N * blocks, pool, [&](Index task) {
    const Index b = task / (N * blocks), n = task / blocks % N, t0 = task % blocks * L;
    const Index len = std::min(L, T - t0);
    Scalar eps_eff = eps;
    if constexpr (shifted) {
      Scalar Mk = -std::numeric_limits<Scalar>::infinity();
      for (Index h = 0; h < N; ++h) Mk = std::max(Mk, summary.shift(b, h));
      const Scalar own = summary.shift(b, n);
      if (std::isfinite(own)) eps_eff = eps * std::exp(Mk - own);
    }
    detail::Workspace<Scalar> ws(workspaces);
    pass.headRows(detail::Side::Query, b, n, t0, len, r, ws->x);
    Mat& f = ws->f;
    f.resize(len, F);
    const FeatureInput<Scalar> fin{ws->x, pass.projection, true};
    if constexpr (shifted) {
      FeatureMap{}.logits(fin, FeatureBlock<Scalar>(f));
      FeatureMap{}.finish(fin, FeatureBlock<Scalar>(f), Mq[std::size_t(b)]);
    } else {
      FeatureMap{}(fin, FeatureBlock<Scalar>(f));
    }
    Eigen::Map<Mat, 0, Eigen::OuterStride<>> out(heads.data() + (b * T + t0) * N * dv + n * dv,
                                                 len, dv, Eigen::OuterStride<>(N * dv));
    out.noalias() = f * summary.kv(b, n);
    Vector<Scalar>& den = ws->d;
    den.noalias() = f * summary.z(b, n);
    for (Index t = 0; t < len; ++t) out.row(t) /= den(t) + eps_eff;
  });
}

}  // namespace kattn
