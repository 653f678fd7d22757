#pragma once
/// \file
/// KernelAttention<Scalar, FeatureMap, Masking>: the reference layer (dense projections,
/// scaling, feature maps, attention core, dropout, output projection, begin_kernel).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "detail/bidirectional.hpp"
#include "detail/causal.hpp"
#include "detail/random_bits.hpp"
#include "feature_maps.hpp"
#include "initializers.hpp"
#include "limits.hpp"
#include "masking.hpp"
#include "parallel.hpp"
#include "projection.hpp"
#include "streaming.hpp"
#include "tensor.hpp"

namespace kattn {

/// How the bidirectional kernel path (SPEC 3.2) is computed: through the explicit T x S
/// matrix, the low-rank state, or whichever a cost model says is cheaper (Auto).
enum class CoreForm { Auto, Explicit, LowRank };

/**
 * \brief The trained parameters of a layer, under the reference's Keras variable names.
 *
 * Shapes (D_q, D_k, D_v: input dims; N heads; d key_dim; d_v value_dim; O output size):
 * biases are empty tensors when use_bias is false; the `output_softmax_*` pair is used only
 * with begin_kernel > 0.
 */
template <typename Scalar>
struct Weights {
  Tensor<Scalar, 3> query_kernel;           ///< `query/kernel` [D_q, N, d]
  Tensor<Scalar, 2> query_bias;             ///< `query/bias` [N, d]
  Tensor<Scalar, 3> key_kernel;             ///< `key/kernel` [D_k, N, d]
  Tensor<Scalar, 2> key_bias;               ///< `key/bias` [N, d]
  Tensor<Scalar, 3> value_kernel;           ///< `value/kernel` [D_v, N, d_v]
  Tensor<Scalar, 2> value_bias;             ///< `value/bias` [N, d_v]
  Tensor<Scalar, 3> output_kernel;          ///< `attention_output/kernel` [N, d_v, O]
  Tensor<Scalar, 1> output_bias;            ///< `attention_output/bias` [O]
  Tensor<Scalar, 3> output_softmax_kernel;  ///< `attention_output_softmax/kernel` [N, d_v, O]
  Tensor<Scalar, 1> output_softmax_bias;    ///< `attention_output_softmax/bias` [O]
};

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
  using MapMat = Eigen::Map<Mat>;
  using ConstMapMat = Eigen::Map<const Mat>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using Blk = FeatureBlock<Scalar>;
  using ConstBlock = ConstFeatureBlock<Scalar>;

 public:
  using scalar_type = Scalar;
  using feature_map_type = FeatureMap;
  using masking_type = Masking;

  /// Validates `config` (SPEC 5) and, with num_random_features > 0, draws the reference's
  /// projection from `config.seed`. \throws std::invalid_argument naming the bad option.
  explicit KernelAttention(const LayerConfig& config)
      : m_config(config), m_masking((config.validate(), Masking::fromConfig(config))) {
    checkFeatureTransformName();
    m_heads = config.num_heads;
    m_key_dim = config.key_dim;
    m_value_dim = config.resolvedValueDim();
    m_scale = config.resolvedScale();
    if (config.hasProjection()) {
      checkAllocation("the projection [num_random_features, key_dim] = [" +
                          std::to_string(config.num_random_features) + ", " +
                          std::to_string(config.key_dim) + "]",
                      double(config.num_random_features) * double(config.key_dim),
                      sizeof(Scalar));
      m_projection = randomProjection<Scalar>(config.num_random_features, config.key_dim,
                                              config.seed);
    }
  }

  const LayerConfig& config() const { return m_config; }
  const Masking& masking() const { return m_masking; }
  /// Features per head: m with a projection, key_dim without.
  Index numFeatures() const { return m_config.featureDim(); }
  /// The projection P [m, d] (empty without one).
  const Mat& projection() const { return m_projection; }
  const Weights<Scalar>& weights() const { return m_weights; }
  /// Whether weights were set, initialized or built by a first forward.
  bool hasWeights() const { return m_has_weights.value.load(std::memory_order_acquire); }

  /// Replaces the projection, e.g. by one saved with a model. \pre P is [m, key_dim].
  void setProjection(const Mat& P) {
    if (!m_config.hasProjection()) {
      throw std::invalid_argument(
          "projection_matrix: the layer has num_random_features <= 0 (no projection)");
    }
    checkShape<2>("projection_matrix", std::array<Index, 2>{P.rows(), P.cols()},
                  {m_config.num_random_features, m_key_dim});
    m_projection = P;
  }

  /**
   * Sets every weight after checking its shape against the config and the others.
   * The input dims D_q, D_k, D_v are taken from the kernels.
   * \throws std::invalid_argument naming the tensor, the expected and the actual shape.
   */
  void setWeights(Weights<Scalar> w) {
    const Index N = m_heads, d = m_key_dim, dv = m_value_dim;
    checkShape<3>("query/kernel", w.query_kernel.dimensions(), {-1, N, d});
    checkShape<3>("key/kernel", w.key_kernel.dimensions(), {-1, N, d});
    checkShape<3>("value/kernel", w.value_kernel.dimensions(), {-1, N, dv});
    const Index O = m_config.output_shape ? Index(*m_config.output_shape)
                                          : w.query_kernel.dimension(0);
    checkShape<3>("attention_output/kernel", w.output_kernel.dimensions(), {N, dv, O});
    if (m_config.use_bias) {
      checkShape<2>("query/bias", w.query_bias.dimensions(), {N, d});
      checkShape<2>("key/bias", w.key_bias.dimensions(), {N, d});
      checkShape<2>("value/bias", w.value_bias.dimensions(), {N, dv});
      checkShape<1>("attention_output/bias", w.output_bias.dimensions(), {O});
    } else {
      requireEmpty("query/bias", w.query_bias.size());
      requireEmpty("key/bias", w.key_bias.size());
      requireEmpty("value/bias", w.value_bias.size());
      requireEmpty("attention_output/bias", w.output_bias.size());
    }
    if (m_config.begin_kernel > 0) {
      checkShape<3>("attention_output_softmax/kernel", w.output_softmax_kernel.dimensions(),
                    {N, dv, O});
      if (m_config.use_bias) {
        checkShape<1>("attention_output_softmax/bias", w.output_softmax_bias.dimensions(), {O});
      } else {
        requireEmpty("attention_output_softmax/bias", w.output_softmax_bias.size());
      }
    }
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
    const Weights<Scalar> w = drawWeights(query_dim, value_dim, key_dim ? *key_dim : value_dim);
    install(w, w.output_kernel.dimension(2));
  }

  /// Runs later forwards on `pool` (shared; null: on the calling thread only). The default is
  /// defaultThreadPool(), one thread per core. Results do not depend on the pool.
  void setThreadPool(std::shared_ptr<const ThreadPool> pool) { m_pool = std::move(pool); }
  /// Shorthand for setThreadPool with a new pool of `threads` threads (1: the caller only).
  void setThreads(int threads) { m_pool = std::make_shared<ThreadPool>(threads); }
  const std::shared_ptr<const ThreadPool>& threadPool() const { return m_pool; }

  /// Forces one form of the bidirectional kernel path (for benchmarks and tests); Auto, the
  /// default, lets the cost model pick. Both forms compute the same function.
  void setCoreForm(CoreForm form) { m_form = form; }

  /// D_q, D_v, D_k expected by forward (after setWeights).
  Index queryInputDim() const { return m_weights.query_kernel.dimension(0); }
  Index valueInputDim() const { return m_weights.value_kernel.dimension(0); }
  Index keyInputDim() const { return m_weights.key_kernel.dimension(0); }
  /// O, the last dim of the output.
  Index outputDim() const { return m_out_dim; }

  /**
   * \brief One forward pass over whole sequences.
   * \param query [B, T, D_q]
   * \param value [B, S, D_v]
   * \param key [B, S, D_k]; absent: the value input is also the key input (D_k = D_v)
   * \param attention_mask [B, S], 1 attend, 0 padding (other values scale the key features)
   * \param training dropout and redraw act only when true
   * \return [B, T, O]
   * \throws std::invalid_argument naming the tensor on any shape error
   * \note Bidirectional cost O(B N (T + S) F (d + d_v)); causal likewise, plus O(T C) per head
   *       for the intra-chunk products.
   */
  Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& query,
                            const ConstTensorMap<Scalar, 3>& value,
                            const std::optional<ConstTensorMap<Scalar, 3>>& key = std::nullopt,
                            const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask =
                                std::nullopt,
                            bool training = false) const {
    Tensor<Scalar, 3> out = newOutput(query, value, key);
    forwardInto(query, value, key, attention_mask, training, nullptr, TensorMap<Scalar, 3>(out));
    return out;
  }

  /// As `forward`, writing into caller memory `output` [B, T, O].
  void forward(const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
               const std::optional<ConstTensorMap<Scalar, 3>>& key,
               const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask, bool training,
               TensorMap<Scalar, 3> output) const {
    forwardInto(query, value, key, attention_mask, training, nullptr, output);
  }

  /**
   * \brief A fresh streaming state for `batch` rows (causal layers only).
   * \param mode Recurrent (the reference's decayed cache; the default when a decay is
   *        configured) or Exact (the whole-sequence pass for any C, W, decay; the default
   *        without decay).
   */
  StreamingState<Scalar> makeState(Index batch, std::optional<StreamingMode> mode =
                                                    std::nullopt) const {
    requireStreaming();
    const StreamingMode m = mode ? *mode
                                 : (m_config.causal_window_decay ? StreamingMode::Recurrent
                                                                 : StreamingMode::Exact);
    return StreamingState<Scalar>(batch, m_heads, numFeatures(), m_value_dim, m,
                                  m_masking.chunk, m_masking.window, m_masking.gamma());
  }

  /**
   * \brief One streaming call: the next T tokens of every batch row (query [B, T, D_q], value
   * [B, T, D_v], key [B, T, D_k] or absent, mask [B, T] for these tokens), updating `state`.
   * Inference only. \throws std::invalid_argument for a state of another shape or layer, a
   * call that breaks a chunk in exact mode, or scale_by_length.
   */
  Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& query,
                            const ConstTensorMap<Scalar, 3>& value,
                            const std::optional<ConstTensorMap<Scalar, 3>>& key,
                            const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask,
                            StreamingState<Scalar>& state) const {
    requireStreaming();
    Tensor<Scalar, 3> out = newOutput(query, value, key);
    forwardInto(query, value, key, attention_mask, false, &state, TensorMap<Scalar, 3>(out));
    return out;
  }

  /// As the streaming `forward`, writing into caller memory `output` [B, T, O]: a decode loop
  /// that reuses its output buffer allocates nothing per call.
  void forward(const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
               const std::optional<ConstTensorMap<Scalar, 3>>& key,
               const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask,
               StreamingState<Scalar>& state, TensorMap<Scalar, 3> output) const {
    requireStreaming();
    forwardInto(query, value, key, attention_mask, false, &state, output);
  }

  /**
   * \brief The attention core alone, on heads the caller projected (e.g. after rotary position
   * embeddings, or from a fused QKV projection): scaling, feature maps, masking, attention
   * and, in training, dropout; no dense layers, so no weights are needed.
   * \param q [B, T, N, d], \param k [B, S, N, d], \param v [B, S, N, d_v]
   * \param attention_mask [B, S] or absent
   * \return heads [B, T, N, d_v] (with begin_kernel: the softmax part's rows first)
   */
  Tensor<Scalar, 4> attend(const ConstTensorMap<Scalar, 4>& q, const ConstTensorMap<Scalar, 4>& k,
                           const ConstTensorMap<Scalar, 4>& v,
                           const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask =
                               std::nullopt,
                           bool training = false) const {
    Tensor<Scalar, 4> heads = newHeads(q.dimension(0), q.dimension(1));
    attend(q, k, v, attention_mask, training, TensorMap<Scalar, 4>(heads));
    return heads;
  }

  /// As attend(), writing into caller memory `heads` [B, T, N, d_v] (no allocation of the
  /// result: a server reusing its buffers avoids the first-touch cost of fresh pages).
  void attend(const ConstTensorMap<Scalar, 4>& q, const ConstTensorMap<Scalar, 4>& k,
              const ConstTensorMap<Scalar, 4>& v,
              const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask, bool training,
              TensorMap<Scalar, 4> heads) const {
    const Inputs in = checkHeads(q, k, v, attention_mask, heads);
    run(in, training, nullptr, TensorMap<Scalar, 3>(nullptr, 0, 0, 0));
  }

  /// attend() for one streaming call (causal layers): the next T tokens' heads.
  Tensor<Scalar, 4> attend(const ConstTensorMap<Scalar, 4>& q, const ConstTensorMap<Scalar, 4>& k,
                           const ConstTensorMap<Scalar, 4>& v,
                           const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask,
                           StreamingState<Scalar>& state) const {
    requireStreaming();
    Tensor<Scalar, 4> heads = newHeads(q.dimension(0), q.dimension(1));
    attend(q, k, v, attention_mask, state, TensorMap<Scalar, 4>(heads));
    return heads;
  }

  /// attend() for one streaming call, writing into caller memory `heads` [B, T, N, d_v].
  void attend(const ConstTensorMap<Scalar, 4>& q, const ConstTensorMap<Scalar, 4>& k,
              const ConstTensorMap<Scalar, 4>& v,
              const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask,
              StreamingState<Scalar>& state, TensorMap<Scalar, 4> heads) const {
    requireStreaming();
    const Inputs in = checkHeads(q, k, v, attention_mask, heads);
    run(in, false, &state, TensorMap<Scalar, 3>(nullptr, 0, 0, 0));
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

  // Per batch row inputs, gathered once per forward.
  struct Inputs {
    ConstTensorMap<Scalar, 3> query, value, key;
    const Scalar* mask;  // [B, S] or null
    Index B, T, S;
    // attend(): per-head rows given by the caller ([B, T, N d], [B, S, N d], [B, S, N d_v])
    // instead of the dense projections, and heads [B, T, N d_v] returned instead of outputs.
    const Scalar* q_heads = nullptr;
    const Scalar* k_heads = nullptr;
    const Scalar* v_heads = nullptr;
    Scalar* heads_out = nullptr;
  };

  static void requireEmpty(const char* name, Index size) {
    if (size != 0) {
      throw std::invalid_argument(std::string(name) +
                                  ": use_bias is false, so this tensor must be empty");
    }
  }

  void checkFeatureTransformName() const {
    bool builtin = false;
    for (const char* n : kFeatureTransforms) builtin = builtin || std::string(n) == FeatureMap::name;
    if (builtin && m_config.feature_transform != FeatureMap::name) {
      throw std::invalid_argument("feature_transform: the config says \"" +
                                  m_config.feature_transform + "\" but the layer type uses \"" +
                                  FeatureMap::name + "\"");
    }
  }

  /// Keras's lazy build: the first forward of a layer without weights draws them from the
  /// initializers for its inputs' dims (once, whichever thread gets there first).
  void buildOnFirstCall(Index query_dim, Index value_dim, Index key_dim) const {
    if (hasWeights()) return;
    std::lock_guard<std::mutex> lock(*m_build_mutex);
    if (hasWeights()) return;
    const Weights<Scalar> w = drawWeights(query_dim, value_dim, key_dim);
    install(w, w.output_kernel.dimension(2));
  }

  /// The weights the initializers give for these input dims (stream per tensor).
  Weights<Scalar> drawWeights(Index Dq, Index Dv, Index Dk) const {
    if (Dq < 0 || Dv < 0 || Dk < 0) {
      throw std::invalid_argument("initializeWeights: input dims must be >= 0, got D_q " +
                                  std::to_string(Dq) + ", D_v " + std::to_string(Dv) +
                                  ", D_k " + std::to_string(Dk));
    }
    const Index N = m_heads, d = m_key_dim, dv = m_value_dim;
    const Index O = m_config.output_shape ? Index(*m_config.output_shape) : Dq;
    const double total = double(N) * (double(Dq + Dk) * d + double(Dv) * dv + 2.0 * dv * O);
    checkAllocation("the initial weights", total, sizeof(Scalar));
    const Initializer& k = m_config.kernel_initializer;
    const Initializer& b = m_config.bias_initializer;
    const std::int64_t seed = m_config.seed;
    Weights<Scalar> w;
    w.query_kernel = Tensor<Scalar, 3>(Dq, N, d);
    w.key_kernel = Tensor<Scalar, 3>(Dk, N, d);
    w.value_kernel = Tensor<Scalar, 3>(Dv, N, dv);
    w.output_kernel = Tensor<Scalar, 3>(N, dv, O);
    initialize(k, w.query_kernel, seed, 0);
    initialize(k, w.key_kernel, seed, 1);
    initialize(k, w.value_kernel, seed, 2);
    initialize(k, w.output_kernel, seed, 3);
    if (m_config.use_bias) {
      w.query_bias = Tensor<Scalar, 2>(N, d);
      w.key_bias = Tensor<Scalar, 2>(N, d);
      w.value_bias = Tensor<Scalar, 2>(N, dv);
      w.output_bias = Tensor<Scalar, 1>(O);
      initialize(b, w.query_bias, seed, 5);
      initialize(b, w.key_bias, seed, 6);
      initialize(b, w.value_bias, seed, 7);
      initialize(b, w.output_bias, seed, 8);
    }
    if (m_config.begin_kernel > 0) {
      w.output_softmax_kernel = Tensor<Scalar, 3>(N, dv, O);
      initialize(k, w.output_softmax_kernel, seed, 4);
      if (m_config.use_bias) {
        w.output_softmax_bias = Tensor<Scalar, 1>(O);
        initialize(b, w.output_softmax_bias, seed, 9);
      }
    }
    return w;
  }

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
                              const std::optional<ConstTensorMap<Scalar, 3>>& key) const {
    buildOnFirstCall(query.dimension(2), value.dimension(2),
                     key ? key->dimension(2) : value.dimension(2));
    const Index B = query.dimension(0), T = query.dimension(1), O = outputDimOrThrow();
    checkAllocation(double(B) * double(T) * double(O), sizeof(Scalar), [&] {
      return "the output [B, T, O] = " + shapeString(std::array<Index, 3>{B, T, O});
    });
    return Tensor<Scalar, 3>(B, T, O);
  }

  /// The owning attend()'s heads [B, T, N, d_v], within the memory limit.
  Tensor<Scalar, 4> newHeads(Index B, Index T) const {
    const std::array<Index, 4> dims{B, T, m_heads, m_value_dim};
    checkAllocation(double(B) * double(T) * double(m_heads) * double(m_value_dim), sizeof(Scalar),
                    [&] { return "the heads [B, T, N, d_v] = " + shapeString(dims); });
    return Tensor<Scalar, 4>(dims);
  }

  Inputs checkInputs(const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
                     const std::optional<ConstTensorMap<Scalar, 3>>& key,
                     const std::optional<ConstTensorMap<Scalar, 2>>& mask) const {
    const Index B = query.dimension(0), T = query.dimension(1), S = value.dimension(1);
    checkShape<3>("query", query.dimensions(), {-1, -1, queryInputDim()});
    checkShape<3>("value", value.dimensions(), {B, -1, valueInputDim()});
    if (key) {
      checkShape<3>("key", key->dimensions(), {B, S, keyInputDim()});
    } else if (keyInputDim() != valueInputDim()) {
      throw std::invalid_argument("key: absent, so the value input is the key input, but "
                                  "key/kernel expects last dim " + std::to_string(keyInputDim()) +
                                  " and value has " + std::to_string(valueInputDim()));
    }
    if (mask) checkShape<2>("attention_mask", mask->dimensions(), {B, S});
    if (Masking::causal && S != T) {
      throw std::invalid_argument("value: causal attention needs as many keys as queries (T = " +
                                  std::to_string(T) + "), got S = " + std::to_string(S));
    }
    return Inputs{query, value, key ? *key : value, mask ? mask->data() : nullptr, B, T, S};
  }

  Inputs checkHeads(const ConstTensorMap<Scalar, 4>& q, const ConstTensorMap<Scalar, 4>& k,
                    const ConstTensorMap<Scalar, 4>& v,
                    const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                    const TensorMap<Scalar, 4>& heads) const {
    const Index B = q.dimension(0), T = q.dimension(1), S = k.dimension(1);
    checkShape<4>("heads", heads.dimensions(), {B, T, m_heads, m_value_dim});
    checkShape<4>("q", q.dimensions(), {-1, -1, m_heads, m_key_dim});
    checkShape<4>("k", k.dimensions(), {B, -1, m_heads, m_key_dim});
    checkShape<4>("v", v.dimensions(), {B, S, m_heads, m_value_dim});
    if (mask) checkShape<2>("attention_mask", mask->dimensions(), {B, S});
    if (Masking::causal && S != T) {
      throw std::invalid_argument("k: causal attention needs as many keys as queries (T = " +
                                  std::to_string(T) + "), got S = " + std::to_string(S));
    }
    const ConstTensorMap<Scalar, 3> none(nullptr, 0, 0, 0);
    Inputs in{none, none, none, mask ? mask->data() : nullptr, B, T, S};
    in.q_heads = q.data();
    in.k_heads = k.data();
    in.v_heads = v.data();
    in.heads_out = heads.data();
    return in;
  }

  /// Per batch row scale s_b (SPEC 1.2).
  std::vector<Scalar> batchScales(const Inputs& in) const {
    std::vector<Scalar> s(std::size_t(in.B), Scalar(m_scale));
    if (!m_config.scale_by_length) return s;
    if (!in.mask) {
      throw std::invalid_argument("attention_mask: scale_by_length needs a mask (none given)");
    }
    for (Index b = 0; b < in.B; ++b) {
      Scalar total = 0;
      for (Index j = 0; j < in.S; ++j) total += in.mask[b * in.S + j];
      if (!(total >= Scalar(1))) {
        throw std::invalid_argument("attention_mask: scale_by_length needs every row to sum to at "
                                    "least 1; row " + std::to_string(b) + " sums to " +
                                    std::to_string(double(total)));
      }
      s[std::size_t(b)] = Scalar(m_scale) * std::log(total) / std::log(Scalar(512));
    }
    return s;
  }

  // ---- building blocks --------------------------------------------------------------------

  /// Runs fn(first_row, rows) over fixed slices of [0, L), on the pool when there is one. The
  /// slices do not depend on the number of threads, so neither do the results: Eigen's GEMM
  /// blocking, and with it the summation order, depends on the row count of a product.
  template <typename Fn>
  static void forRowSlices(Index L, const ThreadPool* pool, const Fn& fn) {
    constexpr Index kSliceRows = 256;
    const Index slices = (L + kSliceRows - 1) / kSliceRows;
    if (slices <= 1) {
      fn(Index(0), L);
      return;
    }
    forEach(slices, pool, [&](Index i) {
      const Index s0 = i * kSliceRows;
      fn(s0, std::min(kSliceRows, L - s0));
    });
  }

  /// Runs fn(i) for i in [0, n) on the pool, or serially without one.
  template <typename Fn>
  static void forEach(Index n, const ThreadPool* pool, const Fn& fn) {
    if (pool) {
      pool->parallelFor(n, fn);
    } else {
      for (Index i = 0; i < n; ++i) fn(i);
    }
  }

  /**
   * Runs fn(n) for every head n in [0, N) on the pool, taking the heads in the order 0, h, 1,
   * h + 1, ... (h = ceil(N / 2)), so that the heads that run at the same time are far apart,
   * for the causal passes' head tasks. Neighbouring heads write neighbouring columns of the
   * same rows of the output and keep neighbouring states; running them side by side on two
   * cores slowed both by about 1.4x (kattn_bench W3/16384 on 2 threads: 16.3 ms in head
   * order, 13.8 ms in this order; the same pass in two processes at once runs at full speed
   * in each). The bidirectional explicit form's head tasks did not gain (W2 at T = 256 and
   * 1024 within noise or slower), so they keep the head order.
   */
  template <typename Fn>
  static void forEachHead(Index N, const ThreadPool* pool, const Fn& fn) {
    const Index h = (N + 1) / 2;
    forEach(N, pool, [&](Index i) { fn(i % 2 == 0 ? i / 2 : h + i / 2); });
  }

  /// out = factor (x[b, r0:r0+L, :] W + bias) as [L, N h]; W is a [D, N, h] kernel read as
  /// [D, N h] (one GEMM for all heads).
  static void dense(const ConstTensorMap<Scalar, 3>& x, Index b, Index r0, Index L,
                    const Tensor<Scalar, 3>& kernel, const Tensor<Scalar, 2>& bias, Scalar factor,
                    Mat& out, const ThreadPool* pool) {
    const Index D = x.dimension(2), cols = kernel.dimension(1) * kernel.dimension(2);
    out.resize(L, cols);
    const ConstMapMat W(kernel.data(), D, cols);
    forRowSlices(L, pool, [&](Index s0, Index len) {
      const ConstMapMat xb(x.data() + (b * x.dimension(1) + r0 + s0) * D, len, D);
      auto o = out.middleRows(s0, len);
      o.noalias() = xb * W;
      if (bias.size()) o.rowwise() += Eigen::Map<const RowVec>(bias.data(), cols);
      if (factor != Scalar(1)) o *= factor;
    });
  }

  /// Buffers of one batch row's pipeline.
  struct RowWork {
    Mat qs, ks, vs, qf, kf, heads;
    Mat x, v, f;  // per-head blocks of the streamed passes
    Vector<Scalar> d;
  };

  /// A RowWork borrowed from the layer's free list and returned on destruction: forwards of
  /// the same shapes reuse their buffers instead of paying for fresh pages every call.
  class Workspace {
   public:
    explicit Workspace(const KernelAttention& layer) : m_layer(layer) {
      std::lock_guard<std::mutex> lock(layer.m_workspace->mutex);
      auto& free = layer.m_workspace->free;
      if (!free.empty()) {
        m_work = std::move(free.back());
        free.pop_back();
      } else {
        m_work = std::make_unique<RowWork>();
      }
    }
    ~Workspace() {
      std::lock_guard<std::mutex> lock(m_layer.m_workspace->mutex);
      m_layer.m_workspace->free.push_back(std::move(m_work));
    }
    Workspace(const Workspace&) = delete;
    Workspace& operator=(const Workspace&) = delete;
    RowWork& operator*() const { return *m_work; }

   private:
    const KernelAttention& m_layer;
    std::unique_ptr<RowWork> m_work;
  };

  /// Scaled per-head rows of batch row b: queries [q0, q0 + Lq) into w.qs [Lq, N d], keys
  /// and values [k0, k0 + Lk) into w.ks, w.vs (values only when asked).
  void projectRows(const Inputs& in, Index b, Index q0, Index Lq, Index k0, Index Lk,
                   Scalar qscale, Scalar kscale, RowWork& w, const ThreadPool* pool,
                   bool values = true) const {
    const Index Nd = m_heads * m_key_dim, Ndv = m_heads * m_value_dim;
    if (in.q_heads) {
      w.qs = ConstMapMat(in.q_heads + (b * in.T + q0) * Nd, Lq, Nd) * qscale;
      w.ks = ConstMapMat(in.k_heads + (b * in.S + k0) * Nd, Lk, Nd) * kscale;
      if (values) w.vs = ConstMapMat(in.v_heads + (b * in.S + k0) * Ndv, Lk, Ndv);
      return;
    }
    dense(in.query, b, q0, Lq, m_weights.query_kernel, m_weights.query_bias, qscale, w.qs, pool);
    dense(in.key, b, k0, Lk, m_weights.key_kernel, m_weights.key_bias, kscale, w.ks, pool);
    if (values) {
      dense(in.value, b, k0, Lk, m_weights.value_kernel, m_weights.value_bias, Scalar(1), w.vs,
            pool);
    }
  }

  /// Delivers heads [L, N d_v] of rows [r0, r0 + L) of batch row b: through the output
  /// projection (kernel, bias) into `output`, or as heads for attend().
  void emit(const Inputs& in, const Mat& heads, Index b, Index r0, const Tensor<Scalar, 3>& kernel,
            const Tensor<Scalar, 1>& bias, TensorMap<Scalar, 3>& output,
            const ThreadPool* pool) const {
    if (in.heads_out) {
      const Index Ndv = heads.cols();
      MapMat(in.heads_out + (b * in.T + r0) * Ndv, heads.rows(), Ndv) = heads;
      return;
    }
    outputDense(heads, kernel, bias, output, b, r0, pool);
  }

  /// y = a Wo + bo for heads a [L, N d_v], written to output rows [r0, r0 + L) of batch row b.
  void outputDense(const Mat& a, const Tensor<Scalar, 3>& kernel, const Tensor<Scalar, 1>& bias,
                   TensorMap<Scalar, 3>& output, Index b, Index r0, const ThreadPool* pool) const {
    const Index O = m_out_dim;
    const ConstMapMat W(kernel.data(), a.cols(), O);
    forRowSlices(a.rows(), pool, [&](Index s0, Index len) {
      MapMat y(output.data() + (b * output.dimension(1) + r0 + s0) * O, len, O);
      y.noalias() = a.middleRows(s0, len) * W;
      if (bias.size()) y.rowwise() += Eigen::Map<const RowVec>(bias.data(), O);
    });
  }

  /// Inverted dropout on heads [L, N d_v] of rows [r0, ...) of batch row b; the stream is
  /// fixed by (seed, training call, part, b, row, column), so it needs no shared generator.
  void dropout(Mat& a, std::uint64_t call, std::uint64_t part, Index b, Index r0) const {
    const double rate = m_config.dropout;
    const Scalar keep_scale = Scalar(1.0 / (1.0 - rate));
    const std::uint64_t stream =
        detail::mixBits(std::uint64_t(m_config.seed), call, part, std::uint64_t(b));
    for (Index r = 0; r < a.rows(); ++r)
      for (Index c = 0; c < a.cols(); ++c) {
        const double u = detail::uniformFromBits(
            detail::mixBits(stream, std::uint64_t(r0 + r), std::uint64_t(c), 0));
        a(r, c) = u < rate ? Scalar(0) : a(r, c) * keep_scale;
      }
  }

  /// Features of one side for every head: x [L, N d] scaled -> out [L, N F], heads spread over
  /// the pool. For exp maps the shift is `shift`, or the largest logit of the block over all
  /// heads (the reference's per-batch-row maximum when the block is the whole row).
  template <typename Map>
  void features(const Map& map, const Mat& x, const Mat* P, bool is_query, Mat& out,
                std::optional<Scalar> shift, const ThreadPool* pool) const {
    const Index d = m_key_dim, F = featureDim(d, P);
    out.resize(x.rows(), m_heads * F);
    auto input = [&](Index n) { return FeatureInput<Scalar>{x.middleCols(n * d, d), P, is_query}; };
    if constexpr (feature_map_traits<Map>::max_shifted) {
      forEach(m_heads, pool, [&](Index n) { map.logits(input(n), Blk(out.middleCols(n * F, F))); });
      const Scalar M = shift ? *shift : (out.size() ? out.maxCoeff() : Scalar(0));
      forEach(m_heads, pool,
              [&](Index n) { map.finish(input(n), Blk(out.middleCols(n * F, F)), M); });
    } else {
      forEach(m_heads, pool, [&](Index n) { map(input(n), Blk(out.middleCols(n * F, F))); });
    }
  }

  /// Rows of logits maxLogit holds at a time per head (64 KiB at m = 256, float).
  static constexpr Index kLogitRows = 64;

  /// The largest logit of one side of a block, over all heads (exp maps' reference shift):
  /// one task per head on the pool, each over pieces of kLogitRows rows, so that its logits
  /// stay in cache and nothing the size of the block is allocated. Run on the calling thread
  /// with a block's logits in one matrix, this first pass of a long causal exp forward did the
  /// projection products of both sides serially: kattn_bench W4's two-thread speed-up was
  /// 1.25-1.49 (W4/4096 on two threads: 190 ms then, 143 ms with head tasks).
  template <typename Map>
  Scalar maxLogit(const Map& map, const Mat& x, const Mat* P, const ThreadPool* pool) const {
    const Index d = m_key_dim, F = featureDim(d, P), L = x.rows();
    const Scalar lowest = -std::numeric_limits<Scalar>::infinity();
    if (L == 0 || F == 0) return lowest;
    auto headMax = [&](Index n, Mat& z) {
      Scalar M = lowest;
      for (Index r0 = 0; r0 < L; r0 += kLogitRows) {
        const Index len = std::min(kLogitRows, L - r0);
        map.logits(FeatureInput<Scalar>{x.block(r0, n * d, len, d), P, false},
                   Blk(z.topRows(len)));
        M = std::max(M, z.topRows(len).maxCoeff());
      }
      return M;
    };
    Scalar M = lowest;
    if (!pool) {
      // One buffer for every head: a streaming decode step of an exp map comes here.
      Mat z(std::min(L, kLogitRows), F);
      for (Index n = 0; n < m_heads; ++n) M = std::max(M, headMax(n, z));
      return M;
    }
    std::vector<Scalar> head_max(static_cast<std::size_t>(m_heads), lowest);
    forEach(m_heads, pool, [&](Index n) {
      Mat z(std::min(L, kLogitRows), F);
      head_max[static_cast<std::size_t>(n)] = headMax(n, z);
    });
    for (Scalar m : head_max) M = std::max(M, m);
    return M;
  }

  static void maskRows(Mat& kf, const Scalar* mask_row) {
    if (!mask_row) return;
    for (Index s = 0; s < kf.rows(); ++s)
      if (mask_row[s] != Scalar(1)) kf.row(s) *= mask_row[s];
  }

  /// Work below which a call runs on the calling thread alone: waking the pool's threads
  /// costs some 5-20 microseconds, the time of about a million floating-point operations, so
  /// a one-token decode step or a tiny batch is faster without them.
  static constexpr double kParallelMinFlops = 1e6;

  /// Floating-point operations of a call, roughly (only compared with kParallelMinFlops): the
  /// dense projections, the feature products and the low-rank core of every batch row.
  double callFlops(const Inputs& in, Index F) const {
    const double N = double(m_heads), d = double(m_key_dim), dv = double(m_value_dim);
    const double rows = double(in.T) + double(in.S);
    double per_row = 2 * N * (F * (dv + 1) + (m_projection.size() ? F * d : 0.0));
    if (!in.q_heads) per_row += 2 * N * double(in.query.dimension(2)) * (d + dv);
    return double(in.B) * rows * per_row;
  }

  /// Runs row(b, inner_pool) for every batch row: across batch rows when there are at least
  /// as many as threads (each row then runs serially), else row by row with the pool inside;
  /// on the calling thread alone when the call's work (`flops`) is too small to share.
  template <typename Row>
  void forBatchRows(Index B, double flops, const Row& row) const {
    const ThreadPool* pool =
        m_pool && m_pool->threads() > 1 && flops >= kParallelMinFlops ? m_pool.get() : nullptr;
    if (pool && B >= pool->threads()) {
      pool->parallelFor(B, [&](Index b) { row(b, nullptr); });
    } else {
      for (Index b = 0; b < B; ++b) row(b, pool);
    }
  }

  // ---- bidirectional ------------------------------------------------------------------------

  /// Attention heads [q1 - q0, N d_v] of batch row b for query rows [q0, q1), with `map` and
  /// the short-sequence softmax or the kernel form (explicit or low-rank, by cost).
  template <typename Map>
  void bidirectionalRow(const Map& map, bool short_path, const Inputs& in, Index b, Index q0,
                        Index q1, Scalar sb, const Mat* P, RowWork& w,
                        const ThreadPool* pool) const {
    const Index F = featureDim(m_key_dim, P), Tq = q1 - q0;
    const Scalar qscale = short_path ? sb : std::sqrt(sb);
    const Scalar kscale = short_path ? Scalar(1) : std::sqrt(sb);
    projectRows(in, b, q0, Tq, 0, in.S, qscale, kscale, w, pool);
    features(map, w.qs, P, true, w.qf, std::nullopt, pool);
    features(map, w.ks, P, false, w.kf, std::nullopt, pool);
    attendRow(short_path, in, b, F, w, pool);
  }

  /// Mask and attention core of one batch row from its features (w.qf, w.kf, w.vs).
  void attendRow(bool short_path, const Inputs& in, Index b, Index F, RowWork& w,
                 const ThreadPool* pool) const {
    const Index N = m_heads, dv = m_value_dim, Tq = w.qf.rows();
    const Scalar* mask_row = in.mask ? in.mask + b * in.S : nullptr;
    maskRows(w.kf, mask_row);
    w.heads.resize(Tq, N * dv);
    const bool use_explicit = m_form == CoreForm::Auto
                                  ? detail::explicitIsCheaper(Tq, in.S, F, dv)
                                  : m_form == CoreForm::Explicit;
    forEach(N, pool, [&](Index n) {
      const auto q = w.qf.middleCols(n * F, F);
      const auto k = w.kf.middleCols(n * F, F);
      const auto v = w.vs.middleCols(n * dv, dv);
      auto a = w.heads.middleCols(n * dv, dv);
      if (short_path) {
        detail::shortSoftmaxAttention<Scalar>(q, k, v, mask_row, a);
      } else if (use_explicit) {
        detail::explicitAttention<Scalar>(q, k, v, a);
      } else {
        detail::lowRankAttention<Scalar>(q, k, v, a);
      }
    });
  }

  // ---- bidirectional low-rank, streamed over blocks ------------------------------------------

  enum class Side { Query, Key, Value };

  /// Rows [r0, r0 + L) of head n of one side of batch row b, times `scale`: the dense
  /// projection x W[:, n, :] + bias[n], or the caller's heads (attend).
  void headRows(const Inputs& in, Side side, Index b, Index n, Index r0, Index L, Scalar scale,
                Mat& out) const {
    const Index h = side == Side::Value ? m_value_dim : m_key_dim;
    const Index cols = m_heads * h;
    if (in.q_heads) {
      const Scalar* base = side == Side::Query ? in.q_heads : side == Side::Key ? in.k_heads
                                                                                 : in.v_heads;
      const Index len = side == Side::Query ? in.T : in.S;
      out = ConstMapMat(base + (b * len + r0) * cols, L, cols).middleCols(n * h, h) * scale;
      return;
    }
    const ConstTensorMap<Scalar, 3>& x =
        side == Side::Query ? in.query : side == Side::Key ? in.key : in.value;
    const Tensor<Scalar, 3>& kernel = side == Side::Query ? m_weights.query_kernel
                                      : side == Side::Key ? m_weights.key_kernel
                                                          : m_weights.value_kernel;
    const Tensor<Scalar, 2>& bias = side == Side::Query ? m_weights.query_bias
                                    : side == Side::Key ? m_weights.key_bias
                                                        : m_weights.value_bias;
    const Index D = x.dimension(2);
    if (D == 0) {
      out.setZero(L, h);  // an empty input row projects to the bias alone (the kernel is empty)
    } else {
      const ConstMapMat xb(x.data() + (b * x.dimension(1) + r0) * D, L, D);
      out.noalias() = xb * ConstMapMat(kernel.data(), D, cols).middleCols(n * h, h);
    }
    if (bias.size()) {
      out.rowwise() += Eigen::Map<const RowVec>(bias.data() + n * h, h);
    }
    if (scale != Scalar(1)) out *= scale;
  }

  /// Rows per block of the streamed passes: large enough for efficient products, small enough
  /// that a block's rows and features stay in cache.
  static constexpr Index kStreamRows = 256;

  /// Key groups per head of the streamed low-rank pass: its key pass runs as heads x groups
  /// tasks, so that a pool's threads share the work evenly even when they run at different
  /// speeds. A function of S alone, like the summation order it fixes.
  static constexpr Index kKeyGroups = 4;

  /// Key groups of a key pass over S keys in blocks of kStreamRows.
  static Index keyGroups(Index S) {
    return std::min(kKeyGroups, (S + kStreamRows - 1) / kStreamRows);
  }

  /**
   * SPEC 3.2 in the low-rank form without materialising any sequence-long feature matrix:
   * per head, passes over key blocks accumulate KV and z in up to kKeyGroups partial sums
   * (one task each), the partials are added in a fixed order, and one task per head and query
   * block reads them out into heads [Tq, N d_v].
   *
   * The exp maps' reference shift (the largest logit over the whole batch row and all heads)
   * only matters through the eps of the normaliser: with features computed under any shifts
   * mq, mk instead of the reference's Mq, Mk, a_t = q'KV / (q'z + eps e^(Mq - mq) e^(Mk - mk))
   * exactly. So each key group uses a running maximum (rescaling its sums when it grows), the
   * groups of a head are brought to their common maximum when added, and queries use a
   * per-block maximum; the normalisation waits until Mq and Mk are known.
   */
  template <typename Map>
  void lowRankRow(const Map& map, const Inputs& in, Index b, Index q0, Index q1, Scalar sb,
                  const Mat* P, Eigen::Ref<Mat> heads, const ThreadPool* pool) const {
    constexpr bool shifted = feature_map_traits<Map>::max_shifted;
    const Index N = m_heads, dv = m_value_dim, F = featureDim(m_key_dim, P), Tq = q1 - q0;
    const Index S = in.S, L = kStreamRows;
    const Scalar r = std::sqrt(sb);
    const Scalar* mask_row = in.mask ? in.mask + b * S : nullptr;
    const Scalar eps = Scalar(detail::kNormaliserEps);
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    const Index G = keyGroups(S), k_blocks = (S + L - 1) / L;
    // Partial sums of group g of head n at n G + g; the head's total ends up at n G.
    std::vector<Mat> kv(static_cast<std::size_t>(N * G));
    std::vector<Vector<Scalar>> z(kv.size());
    std::vector<Scalar> mk(kv.size(), minus_inf);
    const auto groups_left = std::make_unique<std::atomic<Index>[]>(std::size_t(N));
    for (Index n = 0; n < N; ++n) groups_left[std::size_t(n)] = G;
    const Index q_blocks = (Tq + L - 1) / L;
    Mat den(shifted ? Tq : 0, N);             // q'z per (row, head), exp maps only
    Mat mq(shifted ? q_blocks : 0, N);        // shift of each query block and head

    // Adds head n's groups into its first, in group order, each brought to their common
    // maximum (exp maps). Non-finite logits leave the shifts alone, so NaN and Inf still reach
    // every output, as in one running sum.
    auto addGroups = [&](Index n) {
      const std::size_t h0 = std::size_t(n * G);
      Scalar M = minus_inf;
      if constexpr (shifted) {
        for (Index g = 0; g < G; ++g) M = std::max(M, mk[h0 + std::size_t(g)]);
      }
      auto weight = [&](std::size_t i) {
        return shifted && std::isfinite(M) && std::isfinite(mk[i]) ? std::exp(mk[i] - M)
                                                                   : Scalar(1);
      };
      const Scalar c0 = weight(h0);
      if (c0 != Scalar(1)) {
        kv[h0] *= c0;
        z[h0] *= c0;
      }
      for (Index g = 1; g < G; ++g) {
        const std::size_t i = h0 + std::size_t(g);
        const Scalar c = weight(i);
        kv[h0].noalias() += c * kv[i];
        z[h0].noalias() += c * z[i];
      }
      if constexpr (shifted) mk[h0] = M;
    };

    forEach(N * G, pool, [&](Index task) {
      const Index n = task / G, g = task % G;
      const std::size_t h = static_cast<std::size_t>(task);
      Workspace ws(*this);
      Mat& x = (*ws).x;
      Mat& v = (*ws).v;
      Mat& f = (*ws).f;
      kv[h].setZero(F, dv);
      z[h].setZero(F);
      const Index first = g * k_blocks / G * L, last = std::min(S, (g + 1) * k_blocks / G * L);
      for (Index s0 = first; s0 < last; s0 += L) {
        const Index len = std::min(L, last - s0);
        headRows(in, Side::Key, b, n, s0, len, r, x);
        headRows(in, Side::Value, b, n, s0, len, Scalar(1), v);
        f.resize(len, F);
        const FeatureInput<Scalar> fin{x, P, false};
        if constexpr (shifted) {
          map.logits(fin, Blk(f));
          const Scalar m = f.maxCoeff();
          if (m > mk[h]) {
            if (std::isfinite(mk[h])) {
              const Scalar c = std::exp(mk[h] - m);
              kv[h] *= c;
              z[h] *= c;
            }
            mk[h] = m;
          }
          map.finish(fin, Blk(f), mk[h]);
        } else {
          map(fin, Blk(f));
        }
        if (mask_row) {
          for (Index s = 0; s < len; ++s)
            if (mask_row[s0 + s] != Scalar(1)) f.row(s) *= mask_row[s0 + s];
        }
        kv[h].noalias() += f.transpose() * v;
        z[h].noalias() += f.colwise().sum().transpose();
      }
      // The last group of a head to finish adds them up; acq_rel makes the others' sums
      // visible to it.
      if (G > 1 && groups_left[std::size_t(n)].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        addGroups(n);
      }
    });

    forEach(N * q_blocks, pool, [&](Index task) {
      const Index n = task / q_blocks, j = task % q_blocks, t0 = j * L;
      const std::size_t h = static_cast<std::size_t>(n * G);
      Workspace ws(*this);
      Mat& x = (*ws).x;
      Mat& f = (*ws).f;
      const Index len = std::min(L, Tq - t0);
      headRows(in, Side::Query, b, n, q0 + t0, len, r, x);
      f.resize(len, F);
      const FeatureInput<Scalar> fin{x, P, true};
      auto out = heads.block(t0, n * dv, len, dv);
      if constexpr (shifted) {
        map.logits(fin, Blk(f));
        const Scalar m = f.maxCoeff();
        mq(j, n) = m;
        map.finish(fin, Blk(f), m);
        out.noalias() = f * kv[h];
        den.block(t0, n, len, 1).noalias() = f * z[h];
      } else {
        map(fin, Blk(f));
        out.noalias() = f * kv[h];
        Vector<Scalar>& d = (*ws).d;
        d.noalias() = f * z[h];
        for (Index t = 0; t < len; ++t) out.row(t) /= d(t) + eps;
      }
    });

    if constexpr (shifted) {
      Scalar Mk = minus_inf;
      for (Index n = 0; n < N; ++n) Mk = std::max(Mk, mk[std::size_t(n * G)]);
      const Scalar Mq = Tq ? mq.maxCoeff() : Scalar(0);
      Mat eps_eff(q_blocks, N);  // eps e^(Mq - mq) e^(Mk - mk): underflowing features give 0,
      for (Index j = 0; j < q_blocks; ++j)   // as in the reference
        for (Index n = 0; n < N; ++n) {
          const Scalar mkn = mk[std::size_t(n * G)];
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

  /// expplus features for the whole batch: coefficients per (b, n) from both sides, queries
  /// stabilised per row, keys by the largest u over the whole key tensor (all batch rows, as
  /// the reference), which couples the batch rows.
  template <typename Map>
  void pairFeatures(const Map& map, std::vector<RowWork>& rows, const Mat* P) const {
    const Index B = Index(rows.size()), N = m_heads, d = m_key_dim, F = P->rows();
    using Coeff = typename Map::template Coefficients<Scalar>;
    std::vector<Coeff> cq(std::size_t(B * N)), ck(std::size_t(B * N));
    Scalar key_max = -std::numeric_limits<Scalar>::infinity();
    for (Index b = 0; b < B; ++b) {
      RowWork& w = rows[std::size_t(b)];
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
      RowWork& w = rows[std::size_t(b)];
      for (Index n = 0; n < N; ++n) {
        const FeatureInput<Scalar> qin{w.qs.middleCols(n * d, d), P, true};
        map.logits(qin, Blk(w.qf.middleCols(n * F, F)));
        map.finish(qin, Blk(w.qf.middleCols(n * F, F)), cq[std::size_t(b * N + n)], Scalar(0));
        map.finish(FeatureInput<Scalar>{w.ks.middleCols(n * d, d), P, false},
                   Blk(w.kf.middleCols(n * F, F)), ck[std::size_t(b * N + n)], key_max);
      }
    }
  }

  /// Scaled projections of the whole batch (the expplus paths, which need all of it).
  std::vector<RowWork> projectBatch(const Inputs& in, Index q0, Index q1,
                                    const std::vector<Scalar>& scales) const {
    std::vector<RowWork> rows(static_cast<std::size_t>(in.B));
    for (Index b = 0; b < in.B; ++b) {
      RowWork& w = rows[std::size_t(b)];
      const Scalar r = std::sqrt(scales[std::size_t(b)]);
      projectRows(in, b, q0, q1 - q0, 0, in.S, r, r, w, m_pool.get());
    }
    return rows;
  }

  /// One part of the bidirectional layer: query rows [q0, q1) through `map`, dropout stream
  /// `part`, and the output projection (kernel, bias).
  template <typename Map>
  void bidirectionalPart(const Map& map, bool short_path, const Inputs& in, Index q0, Index q1,
                         const std::vector<Scalar>& scales, const Mat* P, bool drop,
                         std::uint64_t call, std::uint64_t part, const Tensor<Scalar, 3>& kernel,
                         const Tensor<Scalar, 1>& bias, TensorMap<Scalar, 3>& output) const {
    auto finishRow = [&](RowWork& w, Index b, const ThreadPool* pool) {
      if (drop) dropout(w.heads, call, part, b, q0);
      emit(in, w.heads, b, q0, kernel, bias, output, pool);
    };
    {
      // Refuse before any buffer exists (tasks on the pool must not throw). The quadratic
      // forms hold one [T, S] score matrix per thread.
      const Index F = featureDim(m_key_dim, P), Tq = q1 - q0;
      const bool quadratic = short_path || (m_form == CoreForm::Auto
                                                ? detail::explicitIsCheaper(Tq, in.S, F, m_value_dim)
                                                : m_form == CoreForm::Explicit);
      if (quadratic) {
        checkAllocation(double(Tq) * double(in.S) * double(m_pool ? m_pool->threads() : 1),
                        sizeof(Scalar), [&] {
                          return std::string(short_path ? "the short-sequence path's"
                                                        : "the explicit form's") +
                                 " attention matrices [T, S] = [" + std::to_string(Tq) + ", " +
                                 std::to_string(in.S) + "], one per thread";
                        });
      }
      // The low-rank form streams keys and queries in blocks and holds only the heads
      // [T, N d_v]; the others hold a batch row's (expplus: the batch's) projections and
      // features, for queries and keys.
      const bool whole_rows = quadratic || (feature_map_traits<Map>::pair_statistics && P);
      const double per_row = double(m_heads) * (whole_rows ? double(2 * m_key_dim + 2 * F + m_value_dim)
                                                           : double(m_value_dim));
      const double batch = feature_map_traits<Map>::pair_statistics && P ? double(in.B) : 1.0;
      const double rows = whole_rows ? batch * (double(Tq) + double(in.S)) : double(Tq);
      // The low-rank form's tasks hold a block of rows, values and features each, and its
      // key pass up to kKeyGroups partial sums per head.
      const double blocks = whole_rows ? 0.0
                                       : double(m_pool ? m_pool->threads() : 1) * kStreamRows *
                                                 double(F + m_key_dim + m_value_dim) +
                                             double(m_heads) * double(keyGroups(in.S)) *
                                                 double(F) * double(m_value_dim + 1);
      checkAllocation(rows * per_row + blocks, sizeof(Scalar), [&] {
        return "the working buffers of " + std::to_string(Tq) + " queries and " +
               std::to_string(in.S) + " keys";
      });
    }
    if (in.S == 0) {
      // No keys: every sum over keys is empty, so the heads are zero and the output is the
      // bias (and the per-head column blocks of 0-row matrices are never formed).
      const double flops = callFlops(in, featureDim(m_key_dim, P));
      forBatchRows(in.B, flops, [&](Index b, const ThreadPool* pool) {
        Workspace ws(*this);
        RowWork& w = *ws;
        w.heads.setZero(q1 - q0, m_heads * m_value_dim);
        emit(in, w.heads, b, q0, kernel, bias, output, pool);
      });
      return;
    }
    if constexpr (feature_map_traits<Map>::pair_statistics) {
      if (P && !short_path) {
        std::vector<RowWork> rows = projectBatch(in, q0, q1, scales);
        pairFeatures(map, rows, P);
        for (Index b = 0; b < in.B; ++b) {
          attendRow(false, in, b, P->rows(), rows[std::size_t(b)], m_pool.get());
          finishRow(rows[std::size_t(b)], b, m_pool.get());
        }
        return;
      }
      if (P) {
        // The short path scales only the queries, by s: expplus statistics follow suit.
        std::vector<RowWork> rows(static_cast<std::size_t>(in.B));
        for (Index b = 0; b < in.B; ++b) {
          RowWork& w = rows[std::size_t(b)];
          projectRows(in, b, q0, q1 - q0, 0, in.S, scales[std::size_t(b)], Scalar(1), w,
                      m_pool.get());
        }
        pairFeatures(map, rows, P);
        for (Index b = 0; b < in.B; ++b) {
          attendRow(true, in, b, P->rows(), rows[std::size_t(b)], m_pool.get());
          finishRow(rows[std::size_t(b)], b, m_pool.get());
        }
        return;
      }
    }
    const Index F = featureDim(m_key_dim, P), Tq = q1 - q0, Ndv = m_heads * m_value_dim;
    const bool low_rank = !short_path && (m_form == CoreForm::Auto
                                              ? !detail::explicitIsCheaper(Tq, in.S, F, m_value_dim)
                                              : m_form == CoreForm::LowRank);
    forBatchRows(in.B, callFlops(in, F), [&](Index b, const ThreadPool* pool) {
      Workspace ws(*this);
      RowWork& w = *ws;
      if (low_rank) {
        if (in.heads_out) {
          MapMat target(in.heads_out + (b * in.T + q0) * Ndv, Tq, Ndv);
          lowRankRow(map, in, b, q0, q1, scales[std::size_t(b)], P, target, pool);
          if (drop) {
            w.heads = target;
            dropout(w.heads, call, part, b, q0);
            target = w.heads;
          }
          return;
        }
        w.heads.resize(Tq, Ndv);
        lowRankRow(map, in, b, q0, q1, scales[std::size_t(b)], P, w.heads, pool);
      } else {
        bidirectionalRow(map, short_path, in, b, q0, q1, scales[std::size_t(b)], P, w, pool);
      }
      finishRow(w, b, pool);
    });
  }

  /// The projection of this call: the layer's, or the k-th redraw in training mode.
  const Mat* callProjection(bool training, std::uint64_t call, Mat& redrawn) const {
    if (!m_config.hasProjection()) return nullptr;
    if (training && m_config.redraw) {
      redrawn = redrawProjection<Scalar>(m_config.num_random_features, m_key_dim, m_config.seed,
                                         call);
      return &redrawn;
    }
    return &m_projection;
  }

  void forwardInto(const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
                   const std::optional<ConstTensorMap<Scalar, 3>>& key,
                   const std::optional<ConstTensorMap<Scalar, 2>>& mask, bool training,
                   StreamingState<Scalar>* state, TensorMap<Scalar, 3> output) const {
    buildOnFirstCall(query.dimension(2), value.dimension(2),
                     key ? key->dimension(2) : value.dimension(2));
    const Index O = outputDimOrThrow();
    const Inputs in = checkInputs(query, value, key, mask);
    checkShape<3>("output", output.dimensions(), {in.B, in.T, O});
    run(in, training, state, output);
  }

  /// Everything after the input checks, for forward and attend. Defined after the class, not
  /// inline, so that KATTN_EXTERN_TEMPLATES can keep it out of a translation unit.
  void run(const Inputs& in, bool training, StreamingState<Scalar>* state,
           TensorMap<Scalar, 3> output) const;

  // ---- causal ---------------------------------------------------------------------------

  detail::CausalParams wholePassParams(Index T) const {
    detail::CausalParams p;
    p.chunk = m_masking.chunk;
    p.window = m_masking.window;
    p.gamma = m_masking.gamma();
    const Index lead = m_masking.leadingPad(T);
    const Index chunks = (T + lead + p.chunk - 1) / p.chunk;
    p.drop = p.window < chunks;
    return p;
  }

  /// Rows per block of the whole causal pass: whole chunks, enough rows to keep the products
  /// efficient, few enough that a block's projections and features stay small.
  Index causalBlockRows() const {
    const Index C = m_masking.chunk;
    const Index target = 2048;
    return C >= target ? C : C * (target / C);
  }

  /// Causal kernel of every head of one block (features in w), state per head in `st`.
  void causalHeads(const detail::CausalParams& params, detail::CausalHeadState<Scalar>* st,
                   RowWork& w, Index lead, const ThreadPool* pool) const {
    const Index N = m_heads, dv = m_value_dim, F = w.qf.cols() / N;
    w.heads.resize(w.qf.rows(), N * dv);
    forEachHead(N, pool, [&](Index n) {
      detail::causalProcess<Scalar>(params, st[n], w.qf.middleCols(n * F, F),
                                    w.kf.middleCols(n * F, F), w.vs.middleCols(n * dv, dv), lead,
                                    w.heads.middleCols(n * dv, dv));
    });
  }

  /**
   * Features, mask and causal kernel of every head of rows [r0, r0 + L) of batch row b, one
   * task per head, for the maps that need no shift over the whole row: each task reads its
   * head's rows where they are (the caller's heads for attend, scaled by r here; else the
   * block's projections in w, already scaled) and writes its heads to `heads` [L, N d_v].
   * No copy of a whole block runs on one thread, and a head's data stay in its core's cache.
   */
  void causalHeadsFused(const detail::CausalParams& params, detail::CausalHeadState<Scalar>* st,
                        const Inputs& in, Index b, Index r0, Index L, Index lead, Scalar r,
                        const Mat* P, RowWork& w, Eigen::Ref<Mat> heads,
                        const ThreadPool* pool) const {
    const Index N = m_heads, dv = m_value_dim;
    if (L == 1 && !pool) {
      causalStep(params, st, in, b, r0, r, P, w, heads);
      return;
    }
    const Scalar* mask_row = in.mask ? in.mask + b * in.T + r0 : nullptr;
    // Each task walks its head's rows in pieces of whole chunks, about kStreamRows rows, so
    // that a piece's scaled rows and features stay in the core's cache.
    const Index C = params.chunk;
    const Index piece = C >= kStreamRows ? C : C * (kStreamRows / C);
    auto head = [&](Index n, RowWork& t) {
      for (Index p0 = 0; p0 < L;) {
        const Index len = std::min(L - p0, p0 == 0 ? piece - lead : piece);
        const Index row = b * in.T + r0 + p0;  // first row of the piece in the caller's heads
        const ConstBlock v =
            in.v_heads ? ConstBlock(ConstMapMat(in.v_heads + row * N * dv, len, N * dv)
                                        .middleCols(n * dv, dv))
                       : ConstBlock(w.vs.block(p0, n * dv, len, dv));
        sideFeatures(in.q_heads, w.qs, row, p0, len, n, 1, r, P, true, t.qs, t.qf);
        sideFeatures(in.k_heads, w.ks, row, p0, len, n, 1, r, P, false, t.ks, t.kf);
        maskRows(t.kf, mask_row ? mask_row + p0 : nullptr);
        detail::causalProcess<Scalar>(params, st[n], t.qf, t.kf, v, p0 == 0 ? lead : 0,
                                      heads.block(p0, n * dv, len, dv));
        p0 += len;
      }
    };
    if (pool) {
      forEachHead(N, pool, [&](Index n) {
        Workspace ws(*this);
        head(n, *ws);
      });
    } else {
      // One workspace for all heads: a decode step is a few microseconds, and taking the
      // workspace pool's lock per head was a tenth of it.
      Workspace ws(*this);
      for (Index n = 0; n < N; ++n) head(n, *ws);
    }
  }

  /**
   * causalHeadsFused for a decode step (one row of batch row b) on the calling thread:
   * scaling, features and key mask go over the row of all heads at once, then the one-token
   * kernel (or the exact state's one-token chunk) runs per head (done per head they were a
   * third of a step). Features go in w.qf and w.kf, which the fused pass leaves unused; a
   * scaled copy of the caller's heads in w.qs and w.ks, which hold projections only when the
   * caller gave none.
   */
  void causalStep(const detail::CausalParams& params, detail::CausalHeadState<Scalar>* st,
                  const Inputs& in, Index b, Index r0, Scalar r, const Mat* P, RowWork& w,
                  Eigen::Ref<Mat> heads) const {
    const Index N = m_heads, d = m_key_dim, dv = m_value_dim, F = featureDim(d, P);
    const Index row = b * in.T + r0;
    const ConstBlock v = in.v_heads ? ConstBlock(ConstMapMat(in.v_heads + row * N * dv, 1, N * dv))
                                    : ConstBlock(w.vs.topRows(1));
    sideFeatures(in.q_heads, w.qs, row, 0, 1, 0, N, r, P, true, w.qs, w.qf);
    sideFeatures(in.k_heads, w.ks, row, 0, 1, 0, N, r, P, false, w.ks, w.kf);
    maskRows(w.kf, in.mask ? in.mask + row : nullptr);
    for (Index n = 0; n < N; ++n) {
      const auto q = w.qf.middleCols(n * F, F), k = w.kf.middleCols(n * F, F);
      if (params.drop) {
        detail::causalDropChunk<Scalar>(params, st[n], q, k, v.middleCols(n * dv, dv),
                                        heads.middleCols(n * dv, dv));
      } else {
        detail::causalToken<Scalar>(Scalar(params.gamma), st[n], q, k, v.middleCols(n * dv, dv),
                                    heads.middleCols(n * dv, dv));
      }
    }
  }

  /**
   * Features of `rows` rows of heads [n0, n0 + heads) of one side (queries or keys) into
   * `features` [rows, heads F], for the causal passes that read heads where they are: the
   * caller's heads `given` from row `row` (rows of N d, scaled by r here), else this call's
   * projections `projected` from row `p0` (already scaled). `scaled` takes the scaled copy
   * when one is needed; elementwise maps without a projection scale as they go instead.
   */
  void sideFeatures(const Scalar* given, const Mat& projected, Index row, Index p0, Index rows,
                    Index n0, Index heads, Scalar r, const Mat* P, bool is_query, Mat& scaled,
                    Mat& features) const {
    const Index N = m_heads, d = m_key_dim, F = featureDim(d, P);
    const Scalar s = given ? r : Scalar(1);
    const ConstBlock x = given ? ConstBlock(ConstMapMat(given + row * N * d, rows, N * d)
                                                .middleCols(n0 * d, heads * d))
                               : ConstBlock(projected.block(p0, n0 * d, rows, heads * d));
    if constexpr (std::is_base_of_v<detail::ElementwiseFeatureMap<FeatureMap>, FeatureMap>) {
      if (!P) {
        features.resize(rows, heads * d);
        for (Index t = 0; t < rows; ++t) {
          if (t + detail::kPrefetchRows < rows) {
            detail::prefetchRow(x.row(t + detail::kPrefetchRows).data(), x.cols());
          }
          features.row(t) = FeatureMap::template f<Scalar>(x.row(t).array() * s).matrix();
        }
        return;
      }
    }
    if (s != Scalar(1)) scaled.noalias() = x * s;
    const ConstBlock y = s != Scalar(1) ? ConstBlock(scaled) : x;
    features.resize(rows, heads * F);
    for (Index h = 0; h < heads; ++h) {
      FeatureMap{}(FeatureInput<Scalar>{y.middleCols(h * d, d), P, is_query},
                   Blk(features.middleCols(h * F, F)));
    }
  }

  /// Where the fused pass of rows [r0, r0 + L) writes its heads: straight into the caller's
  /// heads for attend (unless dropout must go over them first), else into w.heads.
  Eigen::Ref<Mat> causalTarget(const Inputs& in, Index b, Index r0, Index L, bool drop,
                               RowWork& w) const {
    const Index Ndv = m_heads * m_value_dim;
    if (in.heads_out && !drop) return MapMat(in.heads_out + (b * in.T + r0) * Ndv, L, Ndv);
    w.heads.resize(L, Ndv);
    return w.heads;
  }

  void causalForward(const Inputs& in, const std::vector<Scalar>& scales, const Mat* P, bool drop,
                     std::uint64_t call, TensorMap<Scalar, 3>& output) const {
    const Index N = m_heads, dv = m_value_dim, F = numFeatures(), T = in.T;
    const detail::CausalParams params = wholePassParams(T);
    const Index lead = m_masking.leadingPad(T);
    if (params.drop) {
      // The window's chunks (rows or terms) and, once it drops, up to W suffix sums, for every
      // head of the batch rows that run at once.
      const double chunks = double((T + lead + params.chunk - 1) / params.chunk);
      const double at_once = double(std::min<Index>(in.B, m_pool ? m_pool->threads() : 1));
      const double numbers = detail::CausalHeadState<Scalar>::windowNumbers(
          double(F), double(dv), 0, 0, 0, chunks, params.chunk, params.window,
          params.compact_ring);
      checkAllocation(numbers * double(N) * at_once, sizeof(Scalar), [&] {
        return "the causal window of " + std::to_string(params.window) + " chunks";
      });
    }
    if constexpr (Traits::pair_statistics) {
      if (P) {
        // expplus sees the whole sequence (its coefficients use future positions, as in the
        // reference): features of the whole batch first, then the causal kernel.
        std::vector<RowWork> rows = projectBatch(in, 0, T, scales);
        pairFeatures(FeatureMap{}, rows, P);
        for (Index b = 0; b < in.B; ++b) {
          RowWork& w = rows[std::size_t(b)];
          maskRows(w.kf, in.mask ? in.mask + b * T : nullptr);
          std::vector<detail::CausalHeadState<Scalar>> st(static_cast<std::size_t>(N));
          for (auto& h : st) h.reset(F, dv);
          causalHeads(params, st.data(), w, lead, m_pool.get());
          if (drop) dropout(w.heads, call, 0, b, 0);
          emit(in, w.heads, b, 0, m_weights.output_kernel, m_weights.output_bias, output,
               m_pool.get());
        }
        return;
      }
    }
    // Blocks bound the memory of a block's projections and heads. attend into caller memory
    // has neither, so it takes the whole row as one block: one pass of the pool, not one per
    // block with every thread waiting at each block's end for the slowest head.
    const bool in_place =
        !Traits::max_shifted && in.q_heads && in.k_heads && in.v_heads && in.heads_out && !drop;
    const Index C = params.chunk;
    const Index block = in_place ? std::max(causalBlockRows(), (T + lead + C - 1) / C * C)
                                 : causalBlockRows();
    forBatchRows(in.B, callFlops(in, F), [&](Index b, const ThreadPool* pool) {
      const Scalar r = std::sqrt(scales[std::size_t(b)]);
      std::vector<detail::CausalHeadState<Scalar>> st(static_cast<std::size_t>(N));
      for (auto& h : st) h.reset(F, dv);
      Workspace ws(*this);
      RowWork& w = *ws;
      // Blocks hold whole chunks; the first holds C - lead real rows of its first chunk.
      const Index first = std::min(T, block - lead);
      auto blockRows = [&](Index r0) { return std::min(T - r0, r0 == 0 ? first : block); };
      // The exp maps shift by the largest logit of the whole row (SPEC 2): with more than one
      // block that needs a first pass over the logits.
      std::optional<Scalar> q_shift, k_shift;
      if constexpr (Traits::max_shifted) {
        if (first < T) {
          Scalar mq = -std::numeric_limits<Scalar>::infinity(), mk = mq;
          for (Index r0 = 0; r0 < T; r0 += blockRows(r0)) {
            const Index L = blockRows(r0);
            projectRows(in, b, r0, L, r0, L, r, r, w, pool, false);
            mq = std::max(mq, maxLogit(FeatureMap{}, w.qs, P, pool));
            mk = std::max(mk, maxLogit(FeatureMap{}, w.ks, P, pool));
          }
          q_shift = mq;
          k_shift = mk;
        }
      }
      for (Index r0 = 0; r0 < T; r0 += blockRows(r0)) {
        const Index L = blockRows(r0);
        if constexpr (!Traits::max_shifted) {
          if (!in.q_heads) projectRows(in, b, r0, L, r0, L, r, r, w, pool);
          Eigen::Ref<Mat> heads = causalTarget(in, b, r0, L, drop, w);
          causalHeadsFused(params, st.data(), in, b, r0, L, r0 == 0 ? lead : 0, r, P, w, heads,
                           pool);
          if (drop) dropout(w.heads, call, 0, b, r0);
          if (drop || !in.heads_out) {
            emit(in, w.heads, b, r0, m_weights.output_kernel, m_weights.output_bias, output,
                 pool);
          }
          continue;
        }
        projectRows(in, b, r0, L, r0, L, r, r, w, pool);
        features(FeatureMap{}, w.qs, P, true, w.qf, q_shift, pool);
        features(FeatureMap{}, w.ks, P, false, w.kf, k_shift, pool);
        maskRows(w.kf, in.mask ? in.mask + b * T + r0 : nullptr);
        causalHeads(params, st.data(), w, r0 == 0 ? lead : 0, pool);
        if (drop) dropout(w.heads, call, 0, b, r0);
        emit(in, w.heads, b, r0, m_weights.output_kernel, m_weights.output_bias, output, pool);
      }
    });
  }

  void checkState(const StreamingState<Scalar>& s, const Inputs& in) const {
    if (m_config.scale_by_length) {
      throw std::invalid_argument("scale_by_length: not supported with a streaming state (no "
                                  "causal definition agrees with the whole-sequence pass)");
    }
    if (s.batch() != in.B || s.heads() != m_heads || s.features() != numFeatures() ||
        s.valueDim() != m_value_dim) {
      throw std::invalid_argument(
          "state: expected a state for [B, N, F, d_v] = [" + std::to_string(in.B) + ", " +
          std::to_string(m_heads) + ", " + std::to_string(numFeatures()) + ", " +
          std::to_string(m_value_dim) + "], got [" + std::to_string(s.batch()) + ", " +
          std::to_string(s.heads()) + ", " + std::to_string(s.features()) + ", " +
          std::to_string(s.valueDim()) + "]");
    }
    if (s.m_chunk != m_masking.chunk || s.m_window != m_masking.window ||
        s.m_gamma != m_masking.gamma()) {
      throw std::invalid_argument("state: made for another layer (chunk, window or decay differ)");
    }
    if (s.m_finished) {
      throw std::invalid_argument("state: the previous call ended inside a chunk (right "
                                  "padding), so the stream is finished; reset() the state");
    }
    if (s.mode() == StreamingMode::Exact && in.T % m_masking.chunk != 0 &&
        m_masking.padding != Padding::Right) {
      throw std::invalid_argument(
          "query: exact streaming needs calls of whole chunks; a call of " + std::to_string(in.T) +
          " tokens is not a multiple of causal_chunk_length " + std::to_string(m_masking.chunk));
    }
  }

  void streamingForward(const Inputs& in, const Mat* P, StreamingState<Scalar>& state,
                        TensorMap<Scalar, 3>& output) const {
    const Index N = m_heads, T = in.T;
    detail::CausalParams params;
    params.gamma = m_masking.gamma();
    if (state.mode() == StreamingMode::Recurrent) {
      params.chunk = T;  // the whole call is one chunk, as in the reference's cache
      params.drop = false;
    } else {
      params.chunk = m_masking.chunk;
      params.window = m_masking.window;
      params.drop = true;
      params.compact_ring = !Traits::max_shifted;
    }
    if (state.mode() == StreamingMode::Exact && in.B > 0) {
      // Every head holds the same chunks: the window's chunks (as rows or terms) and, once
      // the window drops, its suffix sums. A call may also finish the last call's chunk.
      const Index C = m_masking.chunk, W = m_masking.window;
      const auto& h = state.head(0, 0);
      const double calls_chunks = double((T + C - 1) / C + (C > 1 ? 1 : 0));
      const double numbers = h.numbersAfter(calls_chunks, C, W, params.compact_ring);
      checkAllocation(numbers * double(in.B) * double(N), sizeof(Scalar), [&] {
        const double chunks = std::min(double(W), double(h.windowChunks()) + calls_chunks);
        return "the exact streaming window of " + std::to_string(Index(chunks)) + " chunks";
      });
    }
    checkAllocation(
        double(T) * double(N) * double(3 * m_key_dim + 3 * numFeatures() + 2 * m_value_dim),
        sizeof(Scalar), [&] {
          return "one streaming call's projections and features (" + std::to_string(T) +
                 " tokens)";
        });
    const Scalar r = std::sqrt(Scalar(m_scale));
    const double flops = callFlops(in, featureDim(m_key_dim, P));
    forBatchRows(in.B, flops, [&](Index b, const ThreadPool* pool) {
      Workspace ws(*this);
      RowWork& w = *ws;
      if constexpr (!Traits::max_shifted) {
        if (!in.q_heads) projectRows(in, b, 0, T, 0, T, r, r, w, pool);
        Eigen::Ref<Mat> heads = causalTarget(in, b, 0, T, false, w);
        causalHeadsFused(params, &state.head(b, 0), in, b, 0, T, 0, r, P, w, heads, pool);
        if (!in.heads_out) {
          emit(in, w.heads, b, 0, m_weights.output_kernel, m_weights.output_bias, output, pool);
        }
        return;
      }
      projectRows(in, b, 0, T, 0, T, r, r, w, pool);
      std::optional<Scalar> k_shift;
      if constexpr (Traits::max_shifted) {
        // Keep the state relative to the running maximum of key logits, rescaling it when the
        // maximum grows (online-softmax style); the shifts then cancel between calls.
        Scalar& running = state.m_key_shift[std::size_t(b)];
        const Scalar mk = maxLogit(FeatureMap{}, w.ks, P, pool);
        if (mk > running) {
          if (std::isfinite(running)) {
            for (Index n = 0; n < N; ++n) state.head(b, n).rescale(std::exp(running - mk));
          }
          running = mk;
        }
        k_shift = running;
      }
      features(FeatureMap{}, w.qs, P, true, w.qf, std::nullopt, pool);
      features(FeatureMap{}, w.ks, P, false, w.kf, k_shift, pool);
      maskRows(w.kf, in.mask ? in.mask + b * T : nullptr);
      causalHeads(params, &state.head(b, 0), w, 0, pool);
      emit(in, w.heads, b, 0, m_weights.output_kernel, m_weights.output_bias, output, pool);
    });
    state.m_tokens += T;
    if (state.mode() == StreamingMode::Exact && T % m_masking.chunk != 0) state.m_finished = true;
  }

  // A copyable atomic: copies of a layer start from the same training-call count.
  struct CallCounter {
    std::atomic<std::uint64_t> value{0};
    CallCounter() = default;
    CallCounter(const CallCounter& o) : value(o.value.load()) {}
    CallCounter& operator=(const CallCounter& o) {
      value = o.value.load();
      return *this;
    }
  };

  LayerConfig m_config;
  Masking m_masking;
  Index m_heads = 1, m_key_dim = 1, m_value_dim = 1;
  double m_scale = 1.0;
  Mat m_projection;
  // Mutable for Keras's lazy build on a first const forward (buildOnFirstCall), which writes
  // them once under m_build_mutex before publishing m_has_weights.
  mutable Weights<Scalar> m_weights;
  mutable Index m_out_dim = 0;
  struct Flag {
    std::atomic<bool> value{false};
    Flag() = default;
    Flag(const Flag& o) : value(o.value.load()) {}
    Flag& operator=(const Flag& o) {
      value = o.value.load();
      return *this;
    }
  };
  mutable Flag m_has_weights;
  std::shared_ptr<std::mutex> m_build_mutex = std::make_shared<std::mutex>();
  mutable CallCounter m_training_calls;  // numbers training calls: redraw k, dropout stream k
  std::shared_ptr<const ThreadPool> m_pool = defaultThreadPool();
  CoreForm m_form = CoreForm::Auto;
  // Reusable buffers; shared by copies of the layer (they are only scratch space).
  struct WorkspacePool {
    std::mutex mutex;
    std::vector<std::unique_ptr<RowWork>> free;
  };
  std::shared_ptr<WorkspacePool> m_workspace = std::make_shared<WorkspacePool>();
};

template <typename Scalar, typename FeatureMap, typename Masking>
void KernelAttention<Scalar, FeatureMap, Masking>::run(const Inputs& in, bool training,
                                                       StreamingState<Scalar>* state,
                                                       TensorMap<Scalar, 3> output) const {
  if constexpr (Masking::causal) {
    if (state) checkState(*state, in);
  }
  const std::vector<Scalar> scales = batchScales(in);
  const bool random_call = training && (m_config.dropout > 0 || m_config.redraw);
  const std::uint64_t call = random_call ? m_training_calls.value.fetch_add(1) : 0;
  Mat redrawn;
  const Mat* P = callProjection(training, call, redrawn);
  const bool drop = training && m_config.dropout > 0;
  if (in.B == 0 || in.T == 0) return;

  if constexpr (Masking::causal) {
    if (state) {
      streamingForward(in, P, *state, output);
    } else {
      causalForward(in, scales, P, drop, call, output);
    }
  } else {
    const Index K = std::min<Index>(m_config.begin_kernel, in.T);
    if (K > 0) {
      bidirectionalPart(Identity{}, true, in, 0, K, scales, P, drop, call, 1,
                        m_weights.output_softmax_kernel, m_weights.output_softmax_bias, output);
    }
    if (K < in.T) {
      bidirectionalPart(FeatureMap{}, m_config.is_short_seq, in, K, in.T, scales, P, drop, call,
                        0, m_weights.output_kernel, m_weights.output_bias, output);
    }
  }
}

// Compile-time lever for programs with many translation units: every layer type used is
// otherwise compiled in each of them (most of a build's time). Define KATTN_EXTERN_TEMPLATES in
// every translation unit and include <kattn/instances.hpp> in one (or spread its
// KATTN_INSTANCE parts over several): the built-in layers are compiled once. Not the whole
// class (`template class`): a bidirectional layer cannot instantiate the causal members. The
// members named here are the heavy ones (construction draws the projection, weights come from
// the initializers, the forward pass); the rest are small wrappers around them.
#define KATTN_FOR_EACH_BUILTIN_MAP(X, S, K) \
  X(S, Elu, K) X(S, Relu, K) X(S, Square, K) X(S, Exp, K) X(S, ExpMod, K) X(S, ExpPlus, K) X(S, Identity, K)

#define KATTN_LAYER_INSTANCE(PREFIX, S, M, K)                                                  \
  PREFIX template KernelAttention<S, M, K>::KernelAttention(const LayerConfig&);               \
  PREFIX template void KernelAttention<S, M, K>::setProjection(const Matrix<S>&);              \
  PREFIX template void KernelAttention<S, M, K>::setWeights(Weights<S>);                       \
  PREFIX template void KernelAttention<S, M, K>::initializeWeights(Index, Index,               \
                                                                   std::optional<Index>);      \
  PREFIX template Tensor<S, 3> KernelAttention<S, M, K>::forward(                              \
      const ConstTensorMap<S, 3>&, const ConstTensorMap<S, 3>&,                                \
      const std::optional<ConstTensorMap<S, 3>>&, const std::optional<ConstTensorMap<S, 2>>&,  \
      bool) const;                                                                             \
  PREFIX template Tensor<S, 4> KernelAttention<S, M, K>::attend(                               \
      const ConstTensorMap<S, 4>&, const ConstTensorMap<S, 4>&, const ConstTensorMap<S, 4>&,   \
      const std::optional<ConstTensorMap<S, 2>>&, bool) const;                                 \
  PREFIX template Tensor<S, 3> KernelAttention<S, M, K>::newOutput(                            \
      const ConstTensorMap<S, 3>&, const ConstTensorMap<S, 3>&,                                \
      const std::optional<ConstTensorMap<S, 3>>&) const;                                       \
  PREFIX template void KernelAttention<S, M, K>::forwardInto(                                  \
      const ConstTensorMap<S, 3>&, const ConstTensorMap<S, 3>&,                                \
      const std::optional<ConstTensorMap<S, 3>>&, const std::optional<ConstTensorMap<S, 2>>&,  \
      bool, StreamingState<S>*, TensorMap<S, 3>) const;                                        \
  PREFIX template void KernelAttention<S, M, K>::run(                                          \
      const KernelAttention<S, M, K>::Inputs&, bool, StreamingState<S>*, TensorMap<S, 3>) const;

#if defined(KATTN_EXTERN_TEMPLATES) && !defined(KATTN_INSTANTIATING)
#define KATTN_EXTERN_LAYER(S, M, K) KATTN_LAYER_INSTANCE(extern, S, M, K)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, float, Bidirectional)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, float, CausalWindowed)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, double, Bidirectional)
KATTN_FOR_EACH_BUILTIN_MAP(KATTN_EXTERN_LAYER, double, CausalWindowed)
#undef KATTN_EXTERN_LAYER
#endif

/// Short aliases for the common instantiations.
template <typename Scalar, typename FeatureMap>
using CausalKernelAttention = KernelAttention<Scalar, FeatureMap, CausalWindowed>;

}  // namespace kattn
