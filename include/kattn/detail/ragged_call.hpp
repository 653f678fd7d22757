#pragma once
/// \file
/// \private KernelAttention's ragged streaming call (forward(tokens, pool, slots, offsets)):
/// every sequence through the streaming forward with its slot's state, the long ones one
/// after another with their heads on the pool, the short ones side by side. Included at the
/// end of layer.hpp.

#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "../layer.hpp"
#include "../state_pool.hpp"

namespace kattn {
namespace detail {

/// Rows from which a sequence of a ragged call runs alone, its heads on the pool; shorter ones
/// run side by side, one sequence per task, so that one long prompt does not hold up the
/// decode steps and many steps do not each wake the pool.
inline constexpr Index kRaggedLongRows = 64;

/// Refuses offsets that do not describe the call's rows, and slots that do not match them
/// (`slots`: null for a whole-pass call, which has none).
inline void checkRagged(const std::vector<Index>* slots, const std::vector<Index>& offsets,
                        Index total) {
  if (slots && offsets.size() != slots->size() + 1) {
    throw std::invalid_argument("offsets: expected one more entry than slots (" +
                                std::to_string(slots->size() + 1) + "), got " +
                                std::to_string(offsets.size()));
  }
  if (offsets.empty()) throw std::invalid_argument("offsets: empty (expected at least {0})");
  if (offsets.front() != 0 || offsets.back() != total) {
    throw std::invalid_argument("offsets: must start at 0 and end at the token count " +
                                std::to_string(total) + "; got " + std::to_string(offsets.front()) +
                                " and " + std::to_string(offsets.back()));
  }
  for (std::size_t i = 0; i + 1 < offsets.size(); ++i) {
    if (offsets[i + 1] < offsets[i]) {
      throw std::invalid_argument("offsets: must not decrease; offsets[" + std::to_string(i + 1) +
                                  "] = " + std::to_string(offsets[i + 1]) + " < offsets[" +
                                  std::to_string(i) + "] = " + std::to_string(offsets[i]));
    }
  }
}

/// Every check of a ragged streaming call before any slot advances: the slots are in use and
/// of this layer, and in exact mode each sequence brings whole chunks (as a StreamingState's
/// call must). That each slot appears once is CallSlots' check.
template <typename Scalar>
void checkPoolCall(const StatePool<Scalar>& pool, const std::vector<Index>& slots,
                   const std::vector<Index>& offsets, Index heads, Index features,
                   Index value_dim, const CausalWindowed& m) {
  for (std::size_t i = 0; i < slots.size(); ++i) {
    const StreamingState<Scalar>& s = pool.state(slots[i]);
    s.requireCompatible(1, heads, features, value_dim, m.chunk, m.window, m.gamma());
    const Index L = offsets[i + 1] - offsets[i];
    if (s.mode() == StreamingMode::Exact && L % m.chunk != 0 && m.padding != Padding::Right) {
      throw std::invalid_argument(
          "offsets: exact streaming needs whole chunks; sequence " + std::to_string(i) +
          " brings " + std::to_string(L) + (L == 1 ? " token" : " tokens") +
          ", not a multiple of causal_chunk_length " + std::to_string(m.chunk));
    }
  }
}

/// The slots of a ragged call, marked busy for its length (StatePool::beginCall).
template <typename Scalar>
class CallSlots {
 public:
  CallSlots(StatePool<Scalar>& pool, const std::vector<Index>& slots)
      : m_pool(pool), m_slots(slots) {
    pool.beginCall(slots);
  }
  ~CallSlots() { m_pool.endCall(m_slots); }
  CallSlots(const CallSlots&) = delete;
  CallSlots& operator=(const CallSlots&) = delete;

 private:
  StatePool<Scalar>& m_pool;
  const std::vector<Index>& m_slots;
};

/// Runs sequence(i, pool) for every sequence of a ragged call: the long ones one after another
/// with the pool for their heads, then the short ones side by side, one per task, alone.
template <typename Fn>
void forSequences(const std::vector<Index>& offsets, const ThreadPool* pool, const Fn& sequence) {
  const std::size_t n = offsets.size() - 1;
  auto is_long = [&](std::size_t i) { return offsets[i + 1] - offsets[i] >= kRaggedLongRows; };
  for (std::size_t i = 0; i < n; ++i) {
    if (is_long(i)) sequence(i, pool);
  }
  forEach(Index(n), n >= 2 ? pool : nullptr, [&](Index i) {
    if (!is_long(std::size_t(i))) sequence(std::size_t(i), nullptr);
  });
}

}  // namespace detail

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Tokens>
Tensor<Scalar, 2> KernelAttention<Scalar, FeatureMap, Masking>::forward(
    const Tokens& tokens, const std::vector<Index>& offsets) const {
  Tensor<Scalar, 2> out;
  withTokens(tokens, [&](const ConstTensorMap<Scalar, 2>& x) {
    out = newOutput2(x);
    packedInto(x, offsets, TensorMap<Scalar, 2>(out));
  });
  return out;
}

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Tokens>
Tensor<Scalar, 2> KernelAttention<Scalar, FeatureMap, Masking>::forward(
    const Tokens& tokens, StatePool<Scalar>& pool, const std::vector<Index>& slots,
    const std::vector<Index>& offsets) const {
  requireStreaming();
  Tensor<Scalar, 2> out;
  withTokens(tokens, [&](const ConstTensorMap<Scalar, 2>& x) {
    out = newOutput2(x);
    raggedInto(x, pool, slots, offsets, TensorMap<Scalar, 2>(out));
  });
  return out;
}

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Tokens>
void KernelAttention<Scalar, FeatureMap, Masking>::forward(const Tokens& tokens,
                                                           StatePool<Scalar>& pool,
                                                           const std::vector<Index>& slots,
                                                           const std::vector<Index>& offsets,
                                                           TensorMap<Scalar, 2> output) const {
  requireStreaming();
  withTokens(tokens, [&](const ConstTensorMap<Scalar, 2>& x) {
    raggedInto(x, pool, slots, offsets, output);
  });
}

template <typename Scalar, typename FeatureMap, typename Masking>
Tensor<Scalar, 2> KernelAttention<Scalar, FeatureMap, Masking>::newOutput2(
    const ConstTensorMap<Scalar, 2>& x) const {
  buildOnFirstCall(x.dimension(1), x.dimension(1), x.dimension(1));
  const Index total = x.dimension(0), O = outputDimOrThrow();
  checkAllocation(double(total) * double(O), sizeof(Scalar), [&] {
    return "the output [total, O] = " + shapeString(std::array<Index, 2>{total, O});
  });
  return Tensor<Scalar, 2>(total, O);
}

template <typename Scalar, typename FeatureMap, typename Masking>
void KernelAttention<Scalar, FeatureMap, Masking>::raggedInto(
    const ConstTensorMap<Scalar, 2>& tokens, StatePool<Scalar>& pool,
    const std::vector<Index>& slots, const std::vector<Index>& offsets,
    TensorMap<Scalar, 2> output) const {
  requireStreaming();
  const Index total = tokens.dimension(0), D = tokens.dimension(1);
  detail::checkRagged(&slots, offsets, total);
  buildOnFirstCall(D, D, D);
  const ConstTensorMap<Scalar, 3> x(tokens.data(), 1, total, D);
  if (m_drawn_on_first_call) {
    detail::checkFirstCallWidths<Scalar>(x, x, std::nullopt, queryInputDim(), valueInputDim(),
                                         keyInputDim());
  }
  detail::inputsCall<Scalar>(x, x, std::nullopt, std::nullopt, true, queryInputDim(),
                             valueInputDim(), keyInputDim());
  const Index O = outputDimOrThrow();
  checkShape<2>("output", output.dimensions(), {total, O});
  if (m_config.scale_by_length) {
    throw std::invalid_argument("scale_by_length: not supported with a streaming state (no "
                                "causal definition agrees with the whole-sequence pass)");
  }
  detail::checkPoolCall(pool, slots, offsets, m_dims.heads, numFeatures(), m_dims.value_dim,
                        m_masking);
  const detail::CallSlots<Scalar> claimed(pool, slots);
  if (total == 0) return;

  // Each sequence is the streaming forward a StreamingState of its own would run on its rows:
  // the same code on the same numbers, so the same bits. Batching the sequences' projections
  // into one product would not be: Eigen sums a one-row product (a decode step alone) in
  // another order than a row of a larger one, and a row's path through its GEMM kernel
  // depends on its place among the rows (docs/serving.md).
  const ThreadPool* threads = m_pool.get();
  auto sequence = [&](std::size_t i, const ThreadPool* inner) {
    const Index r0 = offsets[i], L = offsets[i + 1] - r0;
    if (L == 0) return;
    const ConstTensorMap<Scalar, 3> xi(tokens.data() + r0 * D, 1, L, D);
    const detail::CallInputs<Scalar> in = detail::inputsCall<Scalar>(
        xi, xi, std::nullopt, std::nullopt, true, queryInputDim(), valueInputDim(),
        keyInputDim());
    detail::Pass<Scalar> pass = newPass(in, TensorMap<Scalar, 3>(output.data() + r0 * O, 1, L, O));
    pass.pool = inner;
    run(pass, false, &pool.callState(slots[i]));
  };
  detail::forSequences(offsets, threads, sequence);
}

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Q, typename K, typename V>
Tensor<Scalar, 3> KernelAttention<Scalar, FeatureMap, Masking>::attend(
    const Q& q, const K& k, const V& v, StatePool<Scalar>& pool, const std::vector<Index>& slots,
    const std::vector<Index>& offsets) const {
  requireStreaming();
  detail::requireCompiledAbi();
  using Buffers = detail::InputBuffers<Scalar>;
  detail::InputViews<Scalar> in(*m_inputs);
  const ConstTensorMap<Scalar, 3> qv = in.template tensor<3>(q, Buffers::kQuery, "q");
  const ConstTensorMap<Scalar, 3> kv = in.template tensor<3>(k, Buffers::kKey, "k");
  const ConstTensorMap<Scalar, 3> vv = in.template tensor<3>(v, Buffers::kValue, "v");
  const std::array<Index, 3> dims{qv.dimension(0), m_dims.heads, m_dims.value_dim};
  checkAllocation(double(dims[0]) * double(dims[1]) * double(dims[2]), sizeof(Scalar),
                  [&] { return "the heads [total, N, d_v] = " + shapeString(dims); });
  Tensor<Scalar, 3> heads(dims);
  raggedHeadsInto(qv, kv, vv, pool, slots, offsets, TensorMap<Scalar, 3>(heads));
  return heads;
}

template <typename Scalar, typename FeatureMap, typename Masking>
void KernelAttention<Scalar, FeatureMap, Masking>::raggedHeadsInto(
    const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& k,
    const ConstTensorMap<Scalar, 3>& v, StatePool<Scalar>& pool, const std::vector<Index>& slots,
    const std::vector<Index>& offsets, TensorMap<Scalar, 3> heads) const {
  requireStreaming();
  const Index total = q.dimension(0), N = m_dims.heads, d = m_dims.key_dim, dv = m_dims.value_dim;
  checkShape<3>("q", q.dimensions(), {-1, N, d});
  checkShape<3>("k", k.dimensions(), {total, N, d});
  checkShape<3>("v", v.dimensions(), {total, N, dv});
  checkShape<3>("heads", heads.dimensions(), {total, N, dv});
  detail::checkRagged(&slots, offsets, total);
  detail::checkPoolCall(pool, slots, offsets, N, numFeatures(), dv, m_masking);
  const detail::CallSlots<Scalar> claimed(pool, slots);
  auto sequence = [&](std::size_t i, const ThreadPool* inner) {
    const Index r0 = offsets[i], L = offsets[i + 1] - r0;
    if (L == 0) return;
    const ConstTensorMap<Scalar, 4> qi(q.data() + r0 * N * d, 1, L, N, d);
    const ConstTensorMap<Scalar, 4> ki(k.data() + r0 * N * d, 1, L, N, d);
    const ConstTensorMap<Scalar, 4> vi(v.data() + r0 * N * dv, 1, L, N, dv);
    detail::Pass<Scalar> pass =
        headsPass(qi, ki, vi, std::nullopt, TensorMap<Scalar, 4>(heads.data() + r0 * N * dv, 1, L,
                                                                 N, dv));
    pass.pool = inner;
    run(pass, false, &pool.callState(slots[i]));
  };
  detail::forSequences(offsets, m_pool.get(), sequence);
}

template <typename Scalar, typename FeatureMap, typename Masking>
void KernelAttention<Scalar, FeatureMap, Masking>::packedInto(
    const ConstTensorMap<Scalar, 2>& tokens, const std::vector<Index>& offsets,
    TensorMap<Scalar, 2> output) const {
  const Index total = tokens.dimension(0), D = tokens.dimension(1);
  detail::checkRagged(nullptr, offsets, total);
  buildOnFirstCall(D, D, D);
  const Index O = outputDimOrThrow();
  checkShape<2>("output", output.dimensions(), {total, O});
  auto sequence = [&](std::size_t i, const ThreadPool* inner) {
    const Index r0 = offsets[i], L = offsets[i + 1] - r0;
    if (L == 0) return;
    const ConstTensorMap<Scalar, 3> xi(tokens.data() + r0 * D, 1, L, D);
    if (m_drawn_on_first_call) {
      detail::checkFirstCallWidths<Scalar>(xi, xi, std::nullopt, queryInputDim(),
                                           valueInputDim(), keyInputDim());
    }
    const detail::CallInputs<Scalar> in = detail::inputsCall<Scalar>(
        xi, xi, std::nullopt, std::nullopt, Masking::causal, queryInputDim(), valueInputDim(),
        keyInputDim());
    detail::Pass<Scalar> pass = newPass(in, TensorMap<Scalar, 3>(output.data() + r0 * O, 1, L, O));
    pass.pool = inner;
    run(pass, false, nullptr);
  };
  detail::forSequences(offsets, m_pool.get(), sequence);
}

}  // namespace kattn
