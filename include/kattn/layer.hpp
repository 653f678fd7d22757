#pragma once
/// \file
/// KernelAttention<Scalar, FeatureMap, Masking>: the reference layer as a composition of its
/// parts: weights (weights.hpp), dense projections (detail/dense.hpp), the masking policy's
/// core (masking.hpp: Bidirectional or CausalWindowed, each with its Core), dropout, and a
/// short dispatcher. docs/architecture.md draws the parts.

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "detail/bidirectional_core.hpp"
#include "detail/call_checks.hpp"
#include "detail/causal_core.hpp"
#include "detail/compiled_abi.hpp"
#include "detail/input_views.hpp"
#include "detail/pass.hpp"
#include "detail/streaming_pass.hpp"
#include "detail/workspace.hpp"
#include "feature_maps.hpp"
#include "limits.hpp"
#include "masking.hpp"
#include "parallel.hpp"
#include "projection.hpp"
#include "saved_features.hpp"
#include "state_pool.hpp"
#include "streaming.hpp"
#include "tensor.hpp"
#include "training.hpp"
#include "weights.hpp"

namespace kattn {

/**
 * \brief Kernel (Performer / linear-transformer) attention, numerically the reference's
 * `tfm.nlp.layers.KernelAttention` (SPEC.md), for one attention block.
 *
 * \tparam Scalar float or double (all arithmetic in Scalar).
 * \tparam FeatureMap a feature map functor (feature_maps.hpp): Elu, Relu, Square, Exp,
 *         ExpMod, ExpPlus, Identity, or your own type meeting the same contract.
 * \tparam Masking Bidirectional (default) or CausalWindowed.
 *
 * Construct from a LayerConfig (validated; std::invalid_argument names the option), give the
 * weights (`setWeights`) and, optionally, a projection (default: the reference's, from seed),
 * then call `forward`. A const layer may be used from many threads at once.
 *
 * \code
 * kattn::LayerConfig cfg;
 * cfg.num_heads = 8; cfg.key_dim = 64; cfg.feature_transform = "exp";
 * kattn::KernelAttention<float, kattn::Exp> layer(cfg);
 * layer.setWeights(weights);
 * kattn::Tensor<float, 3> y = layer.forward(x, x);   // [B, T, O]
 * \endcode
 */
template <typename Scalar, typename FeatureMap, typename Masking = Bidirectional>
class KernelAttention {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "KernelAttention computes in float or double.");
  static_assert(is_feature_map_v<FeatureMap, Scalar>,
                "FeatureMap must have a static `name` and a call operator taking "
                "(const FeatureInput<Scalar>&, FeatureBlock<Scalar>); see feature_maps.hpp.");
  using Traits = feature_map_traits<FeatureMap>;
  using Mat = Matrix<Scalar>;
  using Core = typename Masking::template Core<Scalar, FeatureMap>;

 public:
  /// float or double.
  using scalar_type = Scalar;
  /// The feature map phi (feature_maps.hpp).
  using feature_map_type = FeatureMap;
  /// Bidirectional or CausalWindowed.
  using masking_type = Masking;

  /// Validates `config` (SPEC 5) and, with num_random_features > 0, draws the reference's
  /// projection from `config.seed`. \throws std::invalid_argument naming the bad option.
  /// A config that leaves feature_transform at its default ("exp") takes the map's name;
  /// another built-in name than the map's is a contradiction and throws.
  explicit KernelAttention(const LayerConfig& config)
      : m_config(detail::configForMap(config, FeatureMap::name)),
        m_masking((m_config.validate(), Masking::fromConfig(config))),
        m_dims{config.num_heads, config.key_dim, config.resolvedValueDim()},
        m_scale(config.resolvedScale()),
        m_projection(detail::layerProjection<Scalar>(config)) {}

  /// The validated config; feature_transform is the map's name.
  const LayerConfig& config() const { return m_config; }
  /// The masking's parameters, from the config.
  const Masking& masking() const { return m_masking; }
  /// Features per head: m with a projection, key_dim without.
  Index numFeatures() const { return m_config.featureDim(); }
  /// The projection P [m, d] (empty without one).
  const Mat& projection() const { return m_projection; }
  /// The weights (empty tensors until hasWeights()).
  const Weights<Scalar>& weights() const { return m_weights; }
  /// Whether weights were set, initialized or built by a first forward.
  bool hasWeights() const { return m_has_weights.value.load(std::memory_order_acquire); }
  /// Heads N, key_dim d and value_dim d_v.
  Index numHeads() const { return m_dims.heads; }
  /// key_dim d.
  Index keyDim() const { return m_dims.key_dim; }
  /// value_dim d_v.
  Index valueDim() const { return m_dims.value_dim; }

  /// Replaces the projection, e.g. by one saved with a model. \pre P is [m, key_dim].
  void setProjection(const Mat& P) {
    if (!m_config.hasProjection()) {
      throw std::invalid_argument(
          "projection_matrix: the layer has num_random_features <= 0 (no projection)");
    }
    checkShape<2>("projection_matrix", std::array<Index, 2>{P.rows(), P.cols()},
                  {m_config.num_random_features, m_dims.key_dim});
    m_projection = P;
  }

  /**
   * Sets every weight after checking its shape against the config and the others.
   * The input dims D_q, D_k, D_v are taken from the kernels.
   * \throws std::invalid_argument naming the tensor, the expected and the actual shape.
   */
  void setWeights(Weights<Scalar> w) {
    const Index O = checkWeights(m_config, w);
    m_drawn_on_first_call = false;
    install(std::move(w), O);
  }

  /**
   * \brief Draws every weight from the config's kernel_initializer and bias_initializer,
   * seeded by config.seed, for inputs whose last dims are D_q, D_v and D_k (default D_v): what
   * Keras does when it builds the layer. A forward() on a layer without weights does this
   * itself, from its inputs' dims, on its first call.
   */
  void initializeWeights(Index query_dim, Index value_dim,
                         std::optional<Index> key_dim = std::nullopt) {
    const Weights<Scalar> w =
        drawWeights<Scalar>(m_config, query_dim, value_dim, key_dim ? *key_dim : value_dim);
    m_drawn_on_first_call = false;
    install(w, w.output_kernel.dimension(2));
  }

  /// Runs later forwards on `pool` (shared; null: on the calling thread only). The default is
  /// defaultThreadPool(), one thread per core. Results do not depend on the pool.
  void setThreadPool(std::shared_ptr<const ThreadPool> pool) { m_pool = std::move(pool); }
  /// Shorthand for setThreadPool with a new pool of `threads` threads (1: the caller only).
  void setThreads(int threads) { m_pool = std::make_shared<ThreadPool>(threads); }
  /// The pool forwards run on (null: the calling thread only).
  const std::shared_ptr<const ThreadPool>& threadPool() const { return m_pool; }

  /// Forces one form of the bidirectional kernel path (for benchmarks and tests); Auto, the
  /// default, lets the cost model pick. Both forms compute the same function.
  void setCoreForm(CoreForm form) { m_form = form; }
  /// The form setCoreForm chose (Auto unless set).
  CoreForm coreForm() const { return m_form; }
  /// The number the next training call with dropout or redraw takes from the layer's counter
  /// (its dropout mask and redrawn projection derive from it; docs/training.md).
  std::uint64_t trainingCalls() const { return m_training_calls.value.load(); }
  /// Takes the counter's next number, for a forward given it (TrainingCall) and its backward:
  /// safe when several threads call the layer, where reading trainingCalls() first is not.
  std::uint64_t takeTrainingCall() const { return m_training_calls.value.fetch_add(1); }
  /// Sets trainingCalls(): to replay call k, or to resume from a checkpoint. Not during calls.
  void setTrainingCalls(std::uint64_t next) { m_training_calls.value.store(next); }

  /**
   * \brief The working memory, in bytes, that a forward over B rows of T queries and S keys
   * holds beyond its inputs and output (attend into caller memory with `heads_given`), on this
   * layer's pool: the sum of the parts that the memory limit checks one by one.
   * \throws std::invalid_argument where forward would (a causal T that breaks its chunks).
   */
  double workingBytes(Index B, Index T, Index S, bool heads_given = false) const {
    detail::Pass<Scalar> pass = budgetPass(B, T, S, heads_given);
    if constexpr (Masking::causal) {
      return Core::budget(pass, m_masking).bytes();
    } else {
      return Core::budget(pass, m_config.begin_kernel, m_config.is_short_seq).bytes();
    }
  }

  /// workingBytes of a streaming call of T tokens with `state` (causal layers).
  double workingBytes(const StreamingState<Scalar>& state, Index T, bool heads_given = false) const {
    requireStreaming();
    detail::Pass<Scalar> pass = budgetPass(state.batch(), T, T, heads_given);
    using Streaming = detail::StreamingCore<Scalar, FeatureMap>;
    return Streaming::budget(state, pass, Streaming::callParams(state, T)).bytes();
  }

  /// D_q, D_v, D_k expected by forward (after setWeights).
  Index queryInputDim() const { return m_weights.query_kernel.dimension(0); }
  /// D_v.
  Index valueInputDim() const { return m_weights.value_kernel.dimension(0); }
  /// D_k.
  Index keyInputDim() const { return m_weights.key_kernel.dimension(0); }
  /// O, the last dim of the output.
  Index outputDim() const { return m_out_dim; }

  /**
   * \brief One forward pass over whole sequences.
   * \param query [B, T, D_q]
   * \param value [B, S, D_v]
   * \param key [B, S, D_k]; absent (std::nullopt): the value input is also the key input
   * \param attention_mask [B, S], 1 attend, 0 padding (other values scale the key features)
   * \param training false, or training mode (dropout, redraw): true or a TrainingCall{k}
   * \return [B, T, O]
   * \throws std::invalid_argument naming the tensor on any shape error
   *
   * Each input is any Eigen tensor, tensor map or tensor expression of the layer's Scalar, of
   * either layout, or a `std::optional` of one. Row-major tensors and maps (kattn::Tensor,
   * kattn::ConstTensorMap) are read in place; other inputs are first evaluated into row-major
   * buffers that the layer keeps for its next calls (docs/layer.md, "Inputs").
   * \note Bidirectional cost O(B N (T + S) F (d + d_v)); causal likewise, plus O(T C) per head
   *       for the intra-chunk products.
   */
  template <typename Query, typename Value, typename Key = std::nullopt_t,
            typename Mask = std::nullopt_t>
  Tensor<Scalar, 3> forward(const Query& query, const Value& value, const Key& key = std::nullopt,
                            const Mask& attention_mask = std::nullopt,
                            Training training = false) const {
    Tensor<Scalar, 3> out;
    withInputs(query, value, key, attention_mask, [&](const auto& q, const auto& v,
                                                      const auto& k, const auto& m) {
      out = newOutput(q, v, k);
      forwardInto(q, v, k, m, training, nullptr, TensorMap<Scalar, 3>(out));
    });
    return out;
  }

  /// As `forward`, writing into caller memory `output` [B, T, O]. With `saved`, also keeps
  /// the call's features there for kattn::backward (SavedFeatures).
  template <typename Query, typename Value, typename Key, typename Mask>
  void forward(const Query& query, const Value& value, const Key& key,
               const Mask& attention_mask, Training training, TensorMap<Scalar, 3> output,
               SavedFeatures<Scalar>* saved = nullptr) const {
    withInputs(query, value, key, attention_mask, [&](const auto& q, const auto& v,
                                                      const auto& k, const auto& m) {
      forwardInto(q, v, k, m, training, nullptr, output, saved);
    });
  }

  /**
   * \brief A fresh streaming state for `batch` rows (causal layers only).
   * \param batch the number of sequences the state carries
   * \param mode Recurrent (the reference's decayed cache; the default when a decay is
   *        configured) or Exact (the whole-sequence pass for any C, W, decay; the default
   *        without decay).
   */
  StreamingState<Scalar> makeState(Index batch,
                                   std::optional<StreamingMode> mode = std::nullopt) const;

  /**
   * \brief One streaming call: the next T tokens of every batch row (query [B, T, D_q], value
   * [B, T, D_v], key [B, T, D_k] or std::nullopt, mask [B, T] or std::nullopt for these
   * tokens), updating `state`. Inputs as for the whole-sequence forward. Inference only.
   * \throws std::invalid_argument for a state of another shape or layer, a call that breaks a
   * chunk in exact mode, or scale_by_length.
   */
  template <typename Query, typename Value, typename Key, typename Mask>
  Tensor<Scalar, 3> forward(const Query& query, const Value& value, const Key& key,
                            const Mask& attention_mask, StreamingState<Scalar>& state) const {
    requireStreaming();
    Tensor<Scalar, 3> out;
    withInputs(query, value, key, attention_mask, [&](const auto& q, const auto& v,
                                                      const auto& k, const auto& m) {
      out = newOutput(q, v, k);
      forwardInto(q, v, k, m, false, &state, TensorMap<Scalar, 3>(out));
    });
    return out;
  }

  /// As the streaming `forward`, writing into caller memory `output` [B, T, O]: a decode loop
  /// that reuses its output buffer allocates nothing per call.
  template <typename Query, typename Value, typename Key, typename Mask>
  void forward(const Query& query, const Value& value, const Key& key, const Mask& attention_mask,
               StreamingState<Scalar>& state, TensorMap<Scalar, 3> output) const {
    requireStreaming();
    withInputs(query, value, key, attention_mask, [&](const auto& q, const auto& v,
                                                      const auto& k, const auto& m) {
      forwardInto(q, v, k, m, false, &state, output);
    });
  }

  /**
   * \brief Self-attention over packed sequences of different lengths, each attending to
   * itself only: `tokens` [total, D] (any rank-2 Eigen tensor or expression), sequence i's
   * rows offsets[i] to offsets[i+1]. Returns [total, O], sequence i's rows bit for bit those
   * of forward() on it alone. Inference.
   */
  template <typename Tokens>
  Tensor<Scalar, 2> forward(const Tokens& tokens, const std::vector<Index>& offsets) const;

  /// A pool of `capacity` streaming slots (state_pool.hpp), each as makeState(1, mode) makes.
  StatePool<Scalar> makePool(Index capacity, std::optional<StreamingMode> mode =
                                                 std::nullopt) const {
    requireStreaming();
    return StatePool<Scalar>(capacity, makeState(1, mode));
  }

  /**
   * \brief A ragged streaming call of self-attention: the new tokens of many sequences packed
   * in `tokens` [total, D] (any rank-2 Eigen tensor or expression), sequence i's rows
   * offsets[i] to offsets[i+1] advancing `pool`'s slot slots[i]. Any mix of decode steps and
   * prompt pieces, no padding; each sequence attends to itself only. Returns [total, O].
   *
   * A sequence's rows are, bit for bit, those a StreamingState of its own fed the same tokens
   * gives, whatever the other sequences of the call and the thread count (docs/serving.md).
   * \throws std::invalid_argument for offsets, slots or widths that do not fit, before any
   * slot advances; std::logic_error for a slot used twice at once.
   */
  template <typename Tokens>
  Tensor<Scalar, 2> forward(const Tokens& tokens, StatePool<Scalar>& pool,
                            const std::vector<Index>& slots,
                            const std::vector<Index>& offsets) const;

  /// The ragged call into caller memory `output` [total, O].
  template <typename Tokens>
  void forward(const Tokens& tokens, StatePool<Scalar>& pool, const std::vector<Index>& slots,
               const std::vector<Index>& offsets, TensorMap<Scalar, 2> output) const;

  /// The ragged call of attend(): heads the caller projected, q [total, N, d], k [total, N, d]
  /// and v [total, N, d_v] (any rank-3 Eigen tensors), sequences and slots as for the ragged
  /// forward. Returns the heads [total, N, d_v].
  template <typename Q, typename K, typename V>
  Tensor<Scalar, 3> attend(const Q& q, const K& k, const V& v, StatePool<Scalar>& pool,
                           const std::vector<Index>& slots,
                           const std::vector<Index>& offsets) const;

  /**
   * \brief One decode step of self-attention: the next token of every batch row, `x` [B, D],
   * into `out` [B, O] (causal layers). Equal to the streaming forward of x as [B, 1, D].
   *
   * `x` and `out` are any Eigen matrices, maps or blocks (`out` writable); a packed row-major
   * x or out is used in place, any other goes through a buffer the layer keeps. Once the layer
   * has made a call of these shapes, a step allocates nothing.
   */
  template <typename X, typename Out>
  void step(const Eigen::MatrixBase<X>& x, StreamingState<Scalar>& state,
            const Eigen::MatrixBase<Out>& out) const {
    requireStreaming();
    step(x, x, state, out);
  }

  /// step() with separate query [B, D_q] and value [B, D_v] tokens (the value is the key).
  template <typename Query, typename Value, typename Out>
  void step(const Eigen::MatrixBase<Query>& query, const Eigen::MatrixBase<Value>& value,
            StreamingState<Scalar>& state, const Eigen::MatrixBase<Out>& out) const;

  /**
   * \brief The attention core alone, on heads the caller projected (e.g. after rotary position
   * embeddings, or from a fused QKV projection): scaling, feature maps, masking, attention
   * and, in training, dropout; no dense layers, so no weights are needed. Inputs as for
   * forward, of rank 4.
   * \param q [B, T, N, d]
   * \param k [B, S, N, d]
   * \param v [B, S, N, d_v]
   * \param attention_mask [B, S] or std::nullopt
   * \param training as for forward(): false, true or a TrainingCall
   * \return heads [B, T, N, d_v] (with begin_kernel: the softmax part's rows first)
   */
  template <typename Q, typename K, typename V, typename Mask = std::nullopt_t>
  Tensor<Scalar, 4> attend(const Q& q, const K& k, const V& v,
                           const Mask& attention_mask = std::nullopt,
                           Training training = false) const {
    Tensor<Scalar, 4> heads;
    withHeads(q, k, v, attention_mask, [&](const auto& qh, const auto& kh, const auto& vh,
                                           const auto& m) {
      heads = newHeads(qh.dimension(0), qh.dimension(1));
      run(headsPass(qh, kh, vh, m, TensorMap<Scalar, 4>(heads)), training, nullptr);
    });
    return heads;
  }

  /// As attend(), writing into caller memory `heads` [B, T, N, d_v] (no allocation of the
  /// result: a server reusing its buffers avoids the first-touch cost of fresh pages). With
  /// `saved`, also keeps the call's features there for attendBackward (SavedFeatures).
  /// (Not for a StatePool in the mask's place: that is the ragged attend, whose braced slot
  /// and offset lists would otherwise also fit `training` and `heads`.)
  template <typename Q, typename K, typename V, typename Mask,
            typename = std::enable_if_t<!std::is_same_v<Mask, StatePool<Scalar>>>>
  void attend(const Q& q, const K& k, const V& v, const Mask& attention_mask, Training training,
              TensorMap<Scalar, 4> heads, SavedFeatures<Scalar>* saved = nullptr) const {
    withHeads(q, k, v, attention_mask, [&](const auto& qh, const auto& kh, const auto& vh,
                                           const auto& m) {
      detail::Pass<Scalar> pass = headsPass(qh, kh, vh, m, heads);
      pass.saved = saved ? &detail::savedData(*saved) : nullptr;
      run(pass, training, nullptr);
    });
  }

  /// attend() for one streaming call (causal layers): the next T tokens' heads.
  template <typename Q, typename K, typename V, typename Mask>
  Tensor<Scalar, 4> attend(const Q& q, const K& k, const V& v, const Mask& attention_mask,
                           StreamingState<Scalar>& state) const {
    requireStreaming();
    Tensor<Scalar, 4> heads;
    withHeads(q, k, v, attention_mask, [&](const auto& qh, const auto& kh, const auto& vh,
                                           const auto& m) {
      heads = newHeads(qh.dimension(0), qh.dimension(1));
      run(headsPass(qh, kh, vh, m, TensorMap<Scalar, 4>(heads)), false, &state);
    });
    return heads;
  }

  /// attend() for one streaming call, writing into caller memory `heads` [B, T, N, d_v].
  template <typename Q, typename K, typename V, typename Mask>
  void attend(const Q& q, const K& k, const V& v, const Mask& attention_mask,
              StreamingState<Scalar>& state, TensorMap<Scalar, 4> heads) const {
    requireStreaming();
    withHeads(q, k, v, attention_mask, [&](const auto& qh, const auto& kh, const auto& vh,
                                           const auto& m) {
      run(headsPass(qh, kh, vh, m, heads), false, &state);
    });
  }

 private:
  /// The compile-time checks of every streaming entry point (a sentence instead of a template
  /// error deep inside the pass).
  static constexpr void requireStreaming() {
    static_assert(Masking::causal,
                  "A streaming state needs a causal layer: use kattn::CausalWindowed masking.");
    static_assert(!Traits::bidirectional_only,
                  "This feature map uses whole-sequence statistics (expplus) and cannot stream.");
  }

  /// Calls `body(q, v, k, mask)` with row-major views of forward's inputs (self-attention's
  /// forward(x, x) evaluates x once); defined in detail/layer_calls.hpp.
  template <typename Query, typename Value, typename Key, typename Mask, typename Body>
  void withInputs(const Query& query, const Value& value, const Key& key, const Mask& mask,
                  Body&& body) const;
  /// Calls `body(q, k, v, mask)` with row-major views of attend's inputs.
  template <typename Q, typename K, typename V, typename Mask, typename Body>
  void withHeads(const Q& q, const K& k, const V& v, const Mask& mask, Body&& body) const;
  /// Calls `body(x)` with a row-major view of a ragged call's tokens.
  template <typename Tokens, typename Body>
  void withTokens(const Tokens& tokens, Body&& body) const;

  /// The ragged call's output [total, O], within the memory limit.
  Tensor<Scalar, 2> newOutput2(const ConstTensorMap<Scalar, 2>& x) const;

  /// The packed whole-pass call after its input view (detail/ragged_call.hpp).
  void packedInto(const ConstTensorMap<Scalar, 2>& x, const std::vector<Index>& offsets,
                  TensorMap<Scalar, 2> output) const;

  /// The ragged call on heads after its input views, into heads [total, N, d_v].
  void raggedHeadsInto(const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& k,
                       const ConstTensorMap<Scalar, 3>& v, StatePool<Scalar>& pool,
                       const std::vector<Index>& slots, const std::vector<Index>& offsets,
                       TensorMap<Scalar, 3> heads) const;

  /// The ragged call after its input views (detail/ragged_call.hpp).
  void raggedInto(const ConstTensorMap<Scalar, 2>& x, StatePool<Scalar>& pool,
                  const std::vector<Index>& slots, const std::vector<Index>& offsets,
                  TensorMap<Scalar, 2> output) const;

  /// Keras's lazy build: the first forward of a layer without weights draws them from the
  /// initializers for its inputs' dims (once, whichever thread gets there first).
  void buildOnFirstCall(Index query_dim, Index value_dim, Index key_dim) const;

  /// Publishes checked weights; the flag's release pairs with hasWeights()'s acquire.
  void install(Weights<Scalar> w, Index O) const {
    m_weights = std::move(w);
    m_out_dim = O;
    m_has_weights.value.store(true, std::memory_order_release);
  }

  Index outputDimOrThrow() const {
    if (!hasWeights()) {
      throw std::logic_error("KernelAttention::forward: no weights set (call setWeights first)");
    }
    return m_out_dim;
  }

  /// The owning forward's output [B, T, O], within the memory limit (after the lazy build,
  /// which fixes O).
  Tensor<Scalar, 3> newOutput(const ConstTensorMap<Scalar, 3>& query,
                              const ConstTensorMap<Scalar, 3>& value,
                              const std::optional<ConstTensorMap<Scalar, 3>>& key) const;

  /// The owning attend()'s heads [B, T, N, d_v], within the memory limit.
  Tensor<Scalar, 4> newHeads(Index B, Index T) const;

  /// forward(): the lazy build, the input checks, then run().
  void forwardInto(const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
                   const std::optional<ConstTensorMap<Scalar, 3>>& key,
                   const std::optional<ConstTensorMap<Scalar, 2>>& mask, Training training,
                   StreamingState<Scalar>* state, TensorMap<Scalar, 3> output,
                   SavedFeatures<Scalar>* saved = nullptr) const;

  /// The call of attend() after its boundary checks (detail/call_checks.hpp).
  detail::Pass<Scalar> headsPass(const ConstTensorMap<Scalar, 4>& q,
                                 const ConstTensorMap<Scalar, 4>& k,
                                 const ConstTensorMap<Scalar, 4>& v,
                                 const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                                 const TensorMap<Scalar, 4>& heads) const {
    return newPass(detail::headsCall<Scalar>(q, k, v, mask, heads, m_dims, Masking::causal),
                   TensorMap<Scalar, 3>(nullptr, 0, 0, 0), heads.data());
  }

  /// A call of these sizes without data, for workingBytes.
  detail::Pass<Scalar> budgetPass(Index B, Index T, Index S, bool heads_given) const;

  /// A call of this layer: its inputs, and where its heads go (through the output projection
  /// into y, or into the caller's `heads_out`).
  detail::Pass<Scalar> newPass(const detail::CallInputs<Scalar>& in,
                               const TensorMap<Scalar, 3>& y, Scalar* heads_out = nullptr) const;

  /// Everything after the input checks, for forward and attend: scales, the call's projection
  /// and dropout, then the masking policy's core. Defined after the class, not inline, so that
  /// KATTN_EXTERN_TEMPLATES can keep it out of a translation unit.
  void run(detail::Pass<Scalar> pass, Training training, StreamingState<Scalar>* state) const;

  LayerConfig m_config;
  Masking m_masking;
  detail::HeadDims m_dims;
  double m_scale = 1.0;
  Mat m_projection;
  // Mutable for Keras's lazy build on a first const forward (buildOnFirstCall), which writes
  // them once under m_build_mutex before publishing m_has_weights.
  mutable Weights<Scalar> m_weights;
  mutable Index m_out_dim = 0;
  mutable bool m_drawn_on_first_call = false;  // the input widths are the first call's
  mutable detail::CopyableAtomic<bool> m_has_weights;
  std::shared_ptr<std::mutex> m_build_mutex = std::make_shared<std::mutex>();
  mutable detail::CopyableAtomic<std::uint64_t> m_training_calls;  // trainingCalls()
  std::shared_ptr<const ThreadPool> m_pool = defaultThreadPool();
  CoreForm m_form = CoreForm::Auto;
  // Reusable buffers; shared by copies of the layer (they are only scratch space).
  std::shared_ptr<detail::WorkspacePool<Scalar>> m_workspace =
      std::make_shared<detail::WorkspacePool<Scalar>>();
  std::shared_ptr<detail::InputBufferPool<Scalar>> m_inputs =
      std::make_shared<detail::InputBufferPool<Scalar>>();
};

/// Short aliases for the common instantiations.
template <typename Scalar, typename FeatureMap>
using CausalKernelAttention = KernelAttention<Scalar, FeatureMap, CausalWindowed>;

}  // namespace kattn

#include "detail/layer_calls.hpp"
#include "detail/ragged_call.hpp"
#include "extern_templates.hpp"
