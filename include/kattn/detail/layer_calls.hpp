#pragma once
/// \file
/// \private The KernelAttention members defined outside the class: the calls' entry points
/// (the input views, the lazy build, newOutput, newHeads, forwardInto, step) and the
/// dispatcher run(). Out of the class so that KATTN_EXTERN_TEMPLATES can keep the heavy ones
/// out of a translation unit; included at the end of layer.hpp.

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>

#include "../layer.hpp"

namespace kattn {

template <typename Scalar, typename FeatureMap, typename Masking>
detail::Pass<Scalar> KernelAttention<Scalar, FeatureMap, Masking>::budgetPass(
    Index B, Index T, Index S, bool heads_given) const {
  const auto source = heads_given ? detail::RowSource::Heads : detail::RowSource::Projections;
  const ConstTensorMap<Scalar, 3> query(nullptr, B, T, queryInputDim());
  detail::Pass<Scalar> pass =
      newPass(detail::CallInputs<Scalar>{source, B, T, S, nullptr, query, query, query},
              TensorMap<Scalar, 3>(nullptr, 0, 0, 0));
  if (heads_given) pass.sink = detail::HeadsSink::Caller;
  pass.projection = m_config.hasProjection() ? &m_projection : nullptr;
  pass.scales = detail::BatchScales<Scalar>{Scalar(m_scale), {}};
  return pass;
}

template <typename Scalar, typename FeatureMap, typename Masking>
detail::Pass<Scalar> KernelAttention<Scalar, FeatureMap, Masking>::newPass(
    const detail::CallInputs<Scalar>& in, const TensorMap<Scalar, 3>& y, Scalar* heads_out) const {
  detail::Pass<Scalar> pass(in, y);
  pass.dims = m_dims;
  pass.weights = &m_weights;
  pass.pool = m_pool.get();
  pass.workspaces = m_workspace.get();
  pass.form = m_form;
  pass.sink = heads_out ? detail::HeadsSink::Caller : detail::HeadsSink::OutputDense;
  pass.heads_out = heads_out;
  return pass;
}

template <typename Scalar, typename FeatureMap, typename Masking>
StreamingState<Scalar> KernelAttention<Scalar, FeatureMap, Masking>::makeState(
    Index batch, std::optional<StreamingMode> mode) const {
  requireStreaming();
  // Only a causal layer has chunks: without the branch a bidirectional layer's misuse would
  // meet "no member chunk" before the static_assert's sentence.
  if constexpr (Masking::causal) {
    const StreamingMode m = mode ? *mode
                                 : (m_config.causal_window_decay ? StreamingMode::Recurrent
                                                                 : StreamingMode::Exact);
    return StreamingState<Scalar>(batch, m_dims.heads, numFeatures(), m_dims.value_dim, m,
                                  m_masking.chunk, m_masking.window, m_masking.gamma());
  } else {
    (void)batch;
    (void)mode;
    return StreamingState<Scalar>();
  }
}

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Query, typename Value, typename Key, typename Mask, typename Body>
void KernelAttention<Scalar, FeatureMap, Masking>::withInputs(const Query& query,
                                                              const Value& value, const Key& key,
                                                              const Mask& mask,
                                                              Body&& body) const {
  detail::requireCompiledAbi();
  using Buffers = detail::InputBuffers<Scalar>;
  detail::InputViews<Scalar> in(*m_inputs);
  const ConstTensorMap<Scalar, 3> q = in.template tensor<3>(query, Buffers::kQuery, "query");
  const ConstTensorMap<Scalar, 3> v =
      detail::sameObject(query, value) ? q : in.template tensor<3>(value, Buffers::kValue, "value");
  body(q, v, in.template optionalTensor<3>(key, Buffers::kKey, "key"),
       in.template optionalTensor<2>(mask, Buffers::kMask, "attention_mask"));
}

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Q, typename K, typename V, typename Mask, typename Body>
void KernelAttention<Scalar, FeatureMap, Masking>::withHeads(const Q& q, const K& k, const V& v,
                                                             const Mask& mask,
                                                             Body&& body) const {
  detail::requireCompiledAbi();
  using Buffers = detail::InputBuffers<Scalar>;
  detail::InputViews<Scalar> in(*m_inputs);
  body(in.template tensor<4>(q, Buffers::kQuery, "q"), in.template tensor<4>(k, Buffers::kKey, "k"),
       in.template tensor<4>(v, Buffers::kValue, "v"),
       in.template optionalTensor<2>(mask, Buffers::kMask, "attention_mask"));
}

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Tokens, typename Body>
void KernelAttention<Scalar, FeatureMap, Masking>::withTokens(const Tokens& tokens,
                                                              Body&& body) const {
  detail::requireCompiledAbi();
  detail::InputViews<Scalar> in(*m_inputs);
  body(in.template tensor<2>(tokens, detail::InputBuffers<Scalar>::kQuery, "tokens"));
}

template <typename Scalar, typename FeatureMap, typename Masking>
template <typename Query, typename Value, typename Out>
void KernelAttention<Scalar, FeatureMap, Masking>::step(const Eigen::MatrixBase<Query>& query,
                                                        const Eigen::MatrixBase<Value>& value,
                                                        StreamingState<Scalar>& state,
                                                        const Eigen::MatrixBase<Out>& out) const {
  requireStreaming();
  detail::requireCompiledAbi();
  using Buffers = detail::InputBuffers<Scalar>;
  // Eigen's convention for an output argument: taken by const reference so that a temporary
  // block (y.topRows(2)) binds to it, and written through the derived object.
  Out& y = const_cast<Out&>(out.derived());
  detail::InputViews<Scalar> in(*m_inputs);
  const ConstTensorMap<Scalar, 3> q = in.tokens(query, Buffers::kQuery, "query");
  const ConstTensorMap<Scalar, 3> v = detail::sameObject(query.derived(), value.derived())
                                          ? q
                                          : in.tokens(value, Buffers::kValue, "value");
  buildOnFirstCall(q.dimension(2), v.dimension(2), v.dimension(2));
  checkShape<2>("step: out", std::array<Index, 2>{y.rows(), y.cols()},
                {q.dimension(0), outputDimOrThrow()});
  const TensorMap<Scalar, 3> rows = in.outputRows(y);
  forwardInto(q, v, std::nullopt, std::nullopt, false, &state, rows);
  in.copyOut(rows, y);
}

template <typename Scalar, typename FeatureMap, typename Masking>
void KernelAttention<Scalar, FeatureMap, Masking>::buildOnFirstCall(Index query_dim,
                                                                    Index value_dim,
                                                                    Index key_dim) const {
  if (hasWeights()) return;
  std::lock_guard<std::mutex> lock(*m_build_mutex);
  if (hasWeights()) return;
  const Weights<Scalar> w = drawWeights<Scalar>(m_config, query_dim, value_dim, key_dim);
  m_drawn_on_first_call = true;
  install(w, w.output_kernel.dimension(2));
}

template <typename Scalar, typename FeatureMap, typename Masking>
Tensor<Scalar, 4> KernelAttention<Scalar, FeatureMap, Masking>::newHeads(Index B, Index T) const {
  const std::array<Index, 4> dims{B, T, m_dims.heads, m_dims.value_dim};
  checkAllocation(double(B) * double(T) * double(m_dims.heads) * double(m_dims.value_dim),
                  sizeof(Scalar), [&] { return "the heads [B, T, N, d_v] = " + shapeString(dims); });
  return Tensor<Scalar, 4>(dims);
}

template <typename Scalar, typename FeatureMap, typename Masking>
Tensor<Scalar, 3> KernelAttention<Scalar, FeatureMap, Masking>::newOutput(
    const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
    const std::optional<ConstTensorMap<Scalar, 3>>& key) const {
  buildOnFirstCall(query.dimension(2), value.dimension(2),
                   key ? key->dimension(2) : value.dimension(2));
  const Index B = query.dimension(0), T = query.dimension(1), O = outputDimOrThrow();
  checkAllocation(double(B) * double(T) * double(O), sizeof(Scalar), [&] {
    return "the output [B, T, O] = " + shapeString(std::array<Index, 3>{B, T, O});
  });
  return Tensor<Scalar, 3>(B, T, O);
}

template <typename Scalar, typename FeatureMap, typename Masking>
void KernelAttention<Scalar, FeatureMap, Masking>::forwardInto(
    const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
    const std::optional<ConstTensorMap<Scalar, 3>>& key,
    const std::optional<ConstTensorMap<Scalar, 2>>& mask, Training training,
    StreamingState<Scalar>* state, TensorMap<Scalar, 3> output,
    SavedFeatures<Scalar>* saved) const {
  buildOnFirstCall(query.dimension(2), value.dimension(2),
                   key ? key->dimension(2) : value.dimension(2));
  const Index O = outputDimOrThrow();
  if (m_drawn_on_first_call) {
    detail::checkFirstCallWidths<Scalar>(query, value, key, queryInputDim(), valueInputDim(),
                                         keyInputDim());
  }
  const detail::CallInputs<Scalar> in = detail::inputsCall<Scalar>(
      query, value, key, mask, Masking::causal, queryInputDim(), valueInputDim(), keyInputDim());
  checkShape<3>("output", output.dimensions(), {in.B, in.T, O});
  detail::Pass<Scalar> pass = newPass(in, output);
  pass.saved = saved ? &detail::savedData(*saved) : nullptr;
  run(pass, training, state);
}

template <typename Scalar, typename FeatureMap, typename Masking>
void KernelAttention<Scalar, FeatureMap, Masking>::run(detail::Pass<Scalar> pass, Training training,
                                                       StreamingState<Scalar>* state) const {
  if constexpr (Masking::causal) {
    if (state) {
      if (m_config.scale_by_length) {
        throw std::invalid_argument("scale_by_length: not supported with a streaming state (no "
                                    "causal definition agrees with the whole-sequence pass)");
      }
      detail::StreamingCore<Scalar, FeatureMap>::check(*state, pass, m_masking, numFeatures());
    }
  }
  pass.scales = detail::batchScales<Scalar>(m_scale, m_config.scale_by_length, pass.in);
  const bool on = training.on(), random_call = on && (m_config.dropout > 0 || m_config.redraw);
  std::uint64_t call = 0;
  if (random_call) call = training.call() ? *training.call() : m_training_calls.value.fetch_add(1);
  Mat redrawn;
  pass.projection = training.call()
                        ? detail::givenCallProjection(m_config, m_projection, on, call, redrawn)
                        : detail::callProjection(m_config, m_projection, on, call, redrawn);
  pass.dropout = detail::Dropout{m_config.dropout, m_config.seed, call, on && m_config.dropout > 0};
  if (pass.saved) {
    pass.saved->holds = false;
    pass.saved->call = random_call ? std::optional<std::uint64_t>(call) : std::nullopt;
  }
  if (pass.in.B == 0 || pass.in.T == 0) return;
  if constexpr (Masking::causal) {
    if (state) {
      detail::StreamingCore<Scalar, FeatureMap>::run(pass, *state);
    } else {
      Core::run(pass, m_masking);
    }
  } else {
    Core::run(pass, m_config.begin_kernel, m_config.is_short_seq);
  }
}

}  // namespace kattn
