#pragma once
/// \file
/// \private A streaming call (SPEC 3.4, 3.5): the next T tokens of every batch row through the
/// causal head kernels, from the state a StreamingState holds to the state it holds after.
/// The state is reached only through its narrow interface (streaming.hpp).

#include <cmath>
#include <limits>
#include <optional>
#include <algorithm>
#include <string>

#include "../config.hpp"
#include "../feature_maps.hpp"
#include "../masking.hpp"
#include "../streaming.hpp"
#include "causal_core.hpp"
#include "features.hpp"
#include "memory_budget.hpp"
#include "pass.hpp"

namespace kattn {
namespace detail {

/// Streaming calls for feature map FeatureMap.
template <typename Scalar, typename FeatureMap>
struct StreamingCore {
  using Mat = Matrix<Scalar>;
  using Core = CausalCore<Scalar, FeatureMap>;
  using Traits = feature_map_traits<FeatureMap>;

  /// Refuses a call this state cannot take: another layer's state (of `features` features per
  /// head), or a call that breaks a chunk in exact mode.
  static void check(const StreamingState<Scalar>& s, const Pass<Scalar>& pass,
                    const CausalWindowed& m, Index features) {
    s.requireCompatible(pass.in.B, pass.dims.heads, features, pass.dims.value_dim,
                        m.chunk, m.window, m.gamma());
    if (s.mode() == StreamingMode::Exact && pass.in.T % m.chunk != 0 &&
        m.padding != Padding::Right) {
      const Index T = pass.in.T;
      throw std::invalid_argument("query: exact streaming needs calls of whole chunks; a call of " +
                                  std::to_string(T) + (T == 1 ? " token" : " tokens") +
                                  " is not a multiple of causal_chunk_length " +
                                  std::to_string(m.chunk));
    }
  }

  /// The kernel's parameters for a call of T tokens: in recurrent mode the whole call is one
  /// chunk, as in the reference's cache; in exact mode the layer's chunks in a sliding window.
  static CausalParams callParams(const StreamingState<Scalar>& s, Index T) {
    CausalParams p;
    p.gamma = s.decay();
    if (s.mode() == StreamingMode::Recurrent) {
      p.chunk = T;
      p.sliding = false;
    } else {
      p.chunk = s.chunk();
      p.window = s.window();
      // An unbounded window never drops a chunk: the state is its running sums alone, as in
      // the whole pass's fixed window.
      p.sliding = s.window() < kUnboundedWindow;
      // A rescaled state (exp maps) keeps its ring as terms: the matrices save() writes.
      p.compact_ring = p.sliding && !Traits::max_shifted;
    }
    return p;
  }

  /**
   * The working memory of a call: in exact mode what the state's window may hold after it
   * (its chunks as rows or terms, a call that finishes the last call's chunk, and once the
   * window slides its suffix sums), and the call's projections, features and heads.
   */
  static Budget budget(const StreamingState<Scalar>& s, const Pass<Scalar>& pass,
                       const CausalParams& p) {
    const Index T = pass.in.T, C = p.chunk, W = p.window;
    Budget b(sizeof(Scalar));
    if (p.sliding && pass.in.B > 0) {
      // Every head holds the same chunks.
      const auto& h = s.headStates(0)[0];
      const double call_chunks = double((T + C - 1) / C + (C > 1 ? 1 : 0));
      const WindowLoad load = h.load(call_chunks, C, W, p.compact_ring);
      const double numbers = load.numbers(double(CausalHeadState<Scalar>::kRingBlock));
      const double chunks = std::min(double(W), double(h.windowChunks()) + call_chunks);
      b.add(numbers * double(pass.in.B) * double(pass.dims.heads), [=] {
        return "the exact streaming window of " + std::to_string(Index(chunks)) + " chunks";
      });
    }
    const Concurrency at_once = concurrencyOf(pass.pool, pass.flops(), pass.in.B);
    return b.add(Core::blockNumbers(pass, C, double(T), at_once), [=] {
      return "one streaming call's projections and features (" + std::to_string(T) + " tokens)";
    });
  }

  /// One call: `state` advances by the pass's T tokens and their heads are delivered.
  static void run(const Pass<Scalar>& pass, StreamingState<Scalar>& state) {
    const CallInputs<Scalar>& in = pass.in;
    const Index T = in.T;
    const CausalParams params = callParams(state, T);
    budget(state, pass, params).check();
    const Mat* P = pass.projection;
    pass.forBatchRows([&](Index b, const ThreadPool* inner) {
      const Scalar r = std::sqrt(pass.scales[std::size_t(b)]);
      Workspace<Scalar> ws(*pass.workspaces);
      RowWork<Scalar>& w = *ws;
      CausalHeadState<Scalar>* heads = state.headStates(b);
      if constexpr (!Traits::max_shifted) {
        if (!in.givenHeads()) pass.scaledRows(b, 0, T, 0, T, r, r, w, inner);
        Eigen::Ref<Mat> out = Core::target(pass, b, 0, T, w);
        Core::fusedHeads(pass, params, heads, b, 0, T, 0, r, w, out, inner);
        if (pass.sink != HeadsSink::Caller) Core::finishBlock(pass, w, b, 0, inner);
        return;
      }
      pass.scaledRows(b, 0, T, 0, T, r, r, w, inner);
      std::optional<Scalar> k_shift;
      if constexpr (Traits::max_shifted) {
        // The state stays relative to the running maximum of key logits, rescaled when it
        // grows (online-softmax style), so that the shifts cancel between calls.
        k_shift = state.raiseKeyShift(b, maxLogit(FeatureMap{}, pass.dims, w.ks, P, inner));
      }
      features(FeatureMap{}, pass.dims, w.qs, P, true, w.qf, state.queryShift(b), inner);
      features(FeatureMap{}, pass.dims, w.ks, P, false, w.kf, k_shift, inner);
      maskRows(w.kf, in.mask ? in.mask + b * T : nullptr);
      Core::heads(pass, params, heads, w, 0, inner);
      Core::finishBlock(pass, w, b, 0, inner);
    });
    state.endCall(T);
  }
};

}  // namespace detail
}  // namespace kattn
