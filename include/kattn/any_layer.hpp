#pragma once
/// \file
/// AnyKernelAttention<Scalar>: a layer whose feature map and masking are chosen at run time
/// from a LayerConfig (for config-driven code and kattn-run). The typed KernelAttention stays
/// the zero-overhead path; this adds one virtual call per forward.

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "layer.hpp"

namespace kattn {

namespace detail {

template <typename Scalar>
class AnyLayerBase {
 public:
  virtual ~AnyLayerBase() = default;
  virtual std::unique_ptr<AnyLayerBase> clone() const = 0;
  virtual void setWeights(Weights<Scalar> w) = 0;
  virtual void initializeWeights(Index query_dim, Index value_dim, std::optional<Index> key_dim) = 0;
  virtual bool hasWeights() const = 0;
  virtual void setProjection(const Matrix<Scalar>& P) = 0;
  virtual const Matrix<Scalar>& projection() const = 0;
  virtual const Weights<Scalar>& weights() const = 0;
  virtual Index outputDim() const = 0;
  virtual Index numFeatures() const = 0;
  virtual void setThreadPool(std::shared_ptr<const ThreadPool> pool) = 0;
  virtual void setCoreForm(CoreForm form) = 0;
  virtual Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& q,
                                    const ConstTensorMap<Scalar, 3>& v,
                                    const std::optional<ConstTensorMap<Scalar, 3>>& k,
                                    const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                                    Training training) const = 0;
  virtual StreamingState<Scalar> makeState(Index batch,
                                           std::optional<StreamingMode> mode) const = 0;
  virtual Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& q,
                                    const ConstTensorMap<Scalar, 3>& v,
                                    const std::optional<ConstTensorMap<Scalar, 3>>& k,
                                    const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                                    StreamingState<Scalar>& state) const = 0;
  virtual void forward(const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
                       const std::optional<ConstTensorMap<Scalar, 3>>& k,
                       const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                       StreamingState<Scalar>& state, TensorMap<Scalar, 3> output) const = 0;
};

template <typename Scalar, typename FeatureMap, typename Masking>
class AnyLayerImpl final : public AnyLayerBase<Scalar> {
  using Layer = KernelAttention<Scalar, FeatureMap, Masking>;
  static constexpr bool kStreams =
      Masking::causal && !feature_map_traits<FeatureMap>::bidirectional_only;

 public:
  explicit AnyLayerImpl(const LayerConfig& c) : m_layer(c) {}
  std::unique_ptr<AnyLayerBase<Scalar>> clone() const override {
    return std::make_unique<AnyLayerImpl>(*this);
  }
  void setWeights(Weights<Scalar> w) override { m_layer.setWeights(std::move(w)); }
  void initializeWeights(Index query_dim, Index value_dim, std::optional<Index> key_dim) override {
    m_layer.initializeWeights(query_dim, value_dim, key_dim);
  }
  bool hasWeights() const override { return m_layer.hasWeights(); }
  void setProjection(const Matrix<Scalar>& P) override { m_layer.setProjection(P); }
  const Matrix<Scalar>& projection() const override { return m_layer.projection(); }
  const Weights<Scalar>& weights() const override { return m_layer.weights(); }
  Index outputDim() const override { return m_layer.outputDim(); }
  Index numFeatures() const override { return m_layer.numFeatures(); }
  void setThreadPool(std::shared_ptr<const ThreadPool> pool) override {
    m_layer.setThreadPool(std::move(pool));
  }
  void setCoreForm(CoreForm form) override { m_layer.setCoreForm(form); }
  Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
                            const std::optional<ConstTensorMap<Scalar, 3>>& k,
                            const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                            Training training) const override {
    return m_layer.forward(q, v, k, mask, training);
  }
  StreamingState<Scalar> makeState(Index batch, std::optional<StreamingMode> mode) const override {
    if constexpr (kStreams) {
      return m_layer.makeState(batch, mode);
    } else {
      (void)batch;
      (void)mode;
      throw std::invalid_argument(noStreamingReason());
    }
  }
  Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
                            const std::optional<ConstTensorMap<Scalar, 3>>& k,
                            const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                            StreamingState<Scalar>& state) const override {
    if constexpr (kStreams) {
      return m_layer.forward(q, v, k, mask, state);
    } else {
      (void)q, (void)v, (void)k, (void)mask, (void)state;
      throw std::invalid_argument(noStreamingReason());
    }
  }
  void forward(const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
               const std::optional<ConstTensorMap<Scalar, 3>>& k,
               const std::optional<ConstTensorMap<Scalar, 2>>& mask, StreamingState<Scalar>& state,
               TensorMap<Scalar, 3> output) const override {
    if constexpr (kStreams) {
      m_layer.forward(q, v, k, mask, state, output);
    } else {
      (void)q, (void)v, (void)k, (void)mask, (void)state, (void)output;
      throw std::invalid_argument(noStreamingReason());
    }
  }

 private:
  static std::string noStreamingReason() {
    if (!Masking::causal) {
      return "cache: a streaming state needs use_causal_windowed = true";
    }
    return std::string("feature_transform: ") + FeatureMap::name +
           " uses whole-sequence statistics and cannot stream";
  }
  Layer m_layer;
};

/// f(Map{}) for the built-in feature map named `name` (a feature_transform value): the one
/// place that maps the names to types, for the layers chosen at run time.
/// \throws std::invalid_argument for an unknown name.
template <typename F>
decltype(auto) visitFeatureMap(const std::string& name, F&& f) {
  if (name == "elu") return f(Elu{});
  if (name == "relu") return f(Relu{});
  if (name == "square") return f(Square{});
  if (name == "exp") return f(Exp{});
  if (name == "expmod") return f(ExpMod{});
  if (name == "expplus") return f(ExpPlus{});
  if (name == "identity") return f(Identity{});
  throw std::invalid_argument("feature_transform: unknown \"" + name + "\"; valid: " +
                              featureTransformList());
}

template <typename Scalar, typename Masking>
std::unique_ptr<AnyLayerBase<Scalar>> makeAnyLayer(const LayerConfig& c) {
  return visitFeatureMap(c.feature_transform, [&](auto map) -> std::unique_ptr<AnyLayerBase<Scalar>> {
    return std::make_unique<AnyLayerImpl<Scalar, decltype(map), Masking>>(c);
  });
}

// KATTN_EXTERN_TEMPLATES (layer.hpp): the run-time layer's constructor, which instantiates
// every built-in layer, is compiled once too (<kattn/instances.hpp>).
#if defined(KATTN_EXTERN_TEMPLATES) && !defined(KATTN_INSTANTIATING)
extern template std::unique_ptr<AnyLayerBase<float>> makeAnyLayer<float, Bidirectional>(
    const LayerConfig&);
extern template std::unique_ptr<AnyLayerBase<float>> makeAnyLayer<float, CausalWindowed>(
    const LayerConfig&);
extern template std::unique_ptr<AnyLayerBase<double>> makeAnyLayer<double, Bidirectional>(
    const LayerConfig&);
extern template std::unique_ptr<AnyLayerBase<double>> makeAnyLayer<double, CausalWindowed>(
    const LayerConfig&);
#endif

}  // namespace detail

/**
 * \brief A kernel attention layer configured entirely at run time: the feature map comes from
 * `config.feature_transform`, the masking from `config.use_causal_windowed`. Same results as
 * the typed KernelAttention with the same config (it wraps one).
 */
template <typename Scalar>
class AnyKernelAttention {
 public:
  /// \throws std::invalid_argument for an invalid config (SPEC 5).
  explicit AnyKernelAttention(const LayerConfig& config)
      : m_config(config),
        m_impl(config.use_causal_windowed ? detail::makeAnyLayer<Scalar, CausalWindowed>(config)
                                          : detail::makeAnyLayer<Scalar, Bidirectional>(config)) {}
  /// A deep copy: the copy has its own weights and projection.
  AnyKernelAttention(const AnyKernelAttention& o) : m_config(o.m_config), m_impl(o.m_impl->clone()) {}
  /// Deep copy, as the copy constructor.
  AnyKernelAttention& operator=(const AnyKernelAttention& o) {
    m_config = o.m_config;
    m_impl = o.m_impl->clone();
    return *this;
  }
  /// Takes over the layer; the moved-from object may only be assigned or destroyed.
  AnyKernelAttention(AnyKernelAttention&&) noexcept = default;
  /// Takes over the layer, as the move constructor.
  AnyKernelAttention& operator=(AnyKernelAttention&&) noexcept = default;

  /// The config the layer was built from.
  const LayerConfig& config() const { return m_config; }
  /// See KernelAttention::setWeights.
  void setWeights(Weights<Scalar> w) { m_impl->setWeights(std::move(w)); }
  /// See KernelAttention::initializeWeights.
  void initializeWeights(Index query_dim, Index value_dim,
                         std::optional<Index> key_dim = std::nullopt) {
    m_impl->initializeWeights(query_dim, value_dim, key_dim);
  }
  /// See KernelAttention::hasWeights.
  bool hasWeights() const { return m_impl->hasWeights(); }
  /// See KernelAttention::setProjection.
  void setProjection(const Matrix<Scalar>& P) { m_impl->setProjection(P); }
  /// See KernelAttention::projection.
  const Matrix<Scalar>& projection() const { return m_impl->projection(); }
  /// See KernelAttention::weights.
  const Weights<Scalar>& weights() const { return m_impl->weights(); }
  /// See KernelAttention::outputDim.
  Index outputDim() const { return m_impl->outputDim(); }
  /// See KernelAttention::numFeatures.
  Index numFeatures() const { return m_impl->numFeatures(); }
  /// See KernelAttention::setThreadPool.
  void setThreadPool(std::shared_ptr<const ThreadPool> pool) {
    m_impl->setThreadPool(std::move(pool));
  }
  /// See KernelAttention::setThreads.
  void setThreads(int threads) { setThreadPool(std::make_shared<ThreadPool>(threads)); }
  /// See KernelAttention::setCoreForm.
  void setCoreForm(CoreForm form) { m_impl->setCoreForm(form); }

  /// See KernelAttention::forward. query [B, T, D_q], value [B, S, D_v] -> [B, T, O].
  Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& query,
                            const ConstTensorMap<Scalar, 3>& value,
                            const std::optional<ConstTensorMap<Scalar, 3>>& key = std::nullopt,
                            const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask =
                                std::nullopt,
                            Training training = false) const {
    return m_impl->forward(query, value, key, attention_mask, training);
  }

  /// See KernelAttention::makeState; throws std::invalid_argument where the layer cannot stream.
  StreamingState<Scalar> makeState(Index batch,
                                   std::optional<StreamingMode> mode = std::nullopt) const {
    return m_impl->makeState(batch, mode);
  }

  /// See KernelAttention::forward with a state.
  Tensor<Scalar, 3> forward(const ConstTensorMap<Scalar, 3>& query,
                            const ConstTensorMap<Scalar, 3>& value,
                            const std::optional<ConstTensorMap<Scalar, 3>>& key,
                            const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask,
                            StreamingState<Scalar>& state) const {
    return m_impl->forward(query, value, key, attention_mask, state);
  }

  /// See KernelAttention::forward with a state into caller memory.
  void forward(const ConstTensorMap<Scalar, 3>& query, const ConstTensorMap<Scalar, 3>& value,
               const std::optional<ConstTensorMap<Scalar, 3>>& key,
               const std::optional<ConstTensorMap<Scalar, 2>>& attention_mask,
               StreamingState<Scalar>& state, TensorMap<Scalar, 3> output) const {
    m_impl->forward(query, value, key, attention_mask, state, output);
  }

 private:
  LayerConfig m_config;
  std::unique_ptr<detail::AnyLayerBase<Scalar>> m_impl;
};

}  // namespace kattn
