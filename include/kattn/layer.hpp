#pragma once
/// \file
/// KernelAttention<Scalar, FeatureMap, Masking>: the reference layer (dense projections,
/// scaling, feature maps, attention core, dropout, output projection, begin_kernel).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
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
#include "masking.hpp"
#include "projection.hpp"
#include "streaming.hpp"
#include "tensor.hpp"

namespace kattn {

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
  bool hasWeights() const { return m_has_weights; }

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
    m_weights = std::move(w);
    m_out_dim = O;
    m_has_weights = true;
  }

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
    Tensor<Scalar, 3> out(query.dimension(0), query.dimension(1), outputDimOrThrow());
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
    static_assert(Masking::causal,
                  "A streaming state needs a causal layer: use kattn::CausalWindowed masking.");
    static_assert(!Traits::bidirectional_only,
                  "This feature map uses whole-sequence statistics (expplus) and cannot stream.");
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
    static_assert(Masking::causal,
                  "A streaming state needs a causal layer: use kattn::CausalWindowed masking.");
    static_assert(!Traits::bidirectional_only,
                  "This feature map uses whole-sequence statistics (expplus) and cannot stream.");
    Tensor<Scalar, 3> out(query.dimension(0), query.dimension(1), outputDimOrThrow());
    forwardInto(query, value, key, attention_mask, false, &state, TensorMap<Scalar, 3>(out));
    return out;
  }

 private:
  // Per batch row inputs, gathered once per forward.
  struct Inputs {
    ConstTensorMap<Scalar, 3> query, value, key;
    const Scalar* mask;  // [B, S] or null
    Index B, T, S;
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

  Index outputDimOrThrow() const {
    if (!m_has_weights) {
      throw std::logic_error("KernelAttention::forward: no weights set (call setWeights first)");
    }
    return m_out_dim;
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

  /// x[b, r0:r0+L, :] W + bias as [L, cols]; W is a [D, N, h] kernel read as [D, N h].
  static Mat dense(const ConstTensorMap<Scalar, 3>& x, Index b, Index r0, Index L,
                   const Tensor<Scalar, 3>& kernel, const Tensor<Scalar, 2>& bias) {
    const Index D = x.dimension(2), cols = kernel.dimension(1) * kernel.dimension(2);
    const ConstMapMat xb(x.data() + (b * x.dimension(1) + r0) * D, L, D);
    const ConstMapMat W(kernel.data(), D, cols);
    Mat out(L, cols);
    out.noalias() = xb * W;
    if (bias.size()) out.rowwise() += Eigen::Map<const RowVec>(bias.data(), cols);
    return out;
  }

  /// y = a Wo + bo for heads a [L, N d_v], written to output rows [r0, r0 + L) of batch row b.
  void outputDense(const Mat& a, const Tensor<Scalar, 3>& kernel, const Tensor<Scalar, 1>& bias,
                   TensorMap<Scalar, 3>& output, Index b, Index r0) const {
    const Index O = m_out_dim, L = a.rows();
    MapMat y(output.data() + (b * output.dimension(1) + r0) * O, L, O);
    y.noalias() = a * ConstMapMat(kernel.data(), a.cols(), O);
    if (bias.size()) y.rowwise() += Eigen::Map<const RowVec>(bias.data(), O);
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

  /// Features of one side for every head: x [L, N d] scaled -> out [L, N F]. For exp maps the
  /// shift is the maximum logit over the block (all heads), or `shift` when given.
  template <typename Map>
  void features(const Map& map, const Mat& x, const Mat* P, bool is_query, Mat& out,
                std::optional<Scalar> shift = std::nullopt) const {
    const Index d = m_key_dim, F = featureDim(d, P);
    out.resize(x.rows(), m_heads * F);
    using MT = feature_map_traits<Map>;
    if constexpr (MT::max_shifted) {
      for (Index n = 0; n < m_heads; ++n)
        map.logits(FeatureInput<Scalar>{x.middleCols(n * d, d), P, is_query},
                   Blk(out.middleCols(n * F, F)));
      const Scalar M = shift ? *shift : (out.size() ? out.maxCoeff() : Scalar(0));
      for (Index n = 0; n < m_heads; ++n)
        map.finish(FeatureInput<Scalar>{x.middleCols(n * d, d), P, is_query},
                   Blk(out.middleCols(n * F, F)), M);
    } else {
      for (Index n = 0; n < m_heads; ++n)
        map(FeatureInput<Scalar>{x.middleCols(n * d, d), P, is_query}, Blk(out.middleCols(n * F, F)));
    }
  }

  /// The largest logit of one side of a batch row, over all heads (exp maps' reference shift).
  template <typename Map>
  Scalar maxLogit(const Map& map, const Mat& x, const Mat* P) const {
    Mat z;
    const Index d = m_key_dim, F = featureDim(d, P);
    z.resize(x.rows(), F);
    Scalar M = -std::numeric_limits<Scalar>::infinity();
    for (Index n = 0; n < m_heads; ++n) {
      map.logits(FeatureInput<Scalar>{x.middleCols(n * d, d), P, false}, Blk(z));
      if (z.size()) M = std::max(M, z.maxCoeff());
    }
    return M;
  }

  static void maskRows(Mat& kf, const Scalar* mask_row) {
    if (!mask_row) return;
    for (Index s = 0; s < kf.rows(); ++s)
      if (mask_row[s] != Scalar(1)) kf.row(s) *= mask_row[s];
  }

  /**
   * Bidirectional attention heads for query rows [q0, q1) of every batch row, with map `map`,
   * the short-sequence softmax or the kernel form. The softmax part of begin_kernel is this
   * with Identity and short = true.
   */
  template <typename Map>
  std::vector<Mat> bidirectionalHeads(const Map& map, bool short_path, const Inputs& in,
                                      Index q0, Index q1, const std::vector<Scalar>& scales,
                                      const Mat* P) const {
    using MT = feature_map_traits<Map>;
    const Index B = in.B, N = m_heads, d = m_key_dim, dv = m_value_dim, F = featureDim(d, P);
    const Index Tq = q1 - q0;
    const std::size_t nb = static_cast<std::size_t>(B);
    std::vector<Mat> qs(nb), ks(nb), vs(nb);
    for (Index b = 0; b < B; ++b) {
      const Scalar sb = scales[std::size_t(b)];
      qs[b] = dense(in.query, b, q0, Tq, m_weights.query_kernel, m_weights.query_bias);
      ks[b] = dense(in.key, b, 0, in.S, m_weights.key_kernel, m_weights.key_bias);
      vs[b] = dense(in.value, b, 0, in.S, m_weights.value_kernel, m_weights.value_bias);
      if (short_path) {
        qs[b] *= sb;
      } else {
        qs[b] *= std::sqrt(sb);
        ks[b] *= std::sqrt(sb);
      }
    }
    std::vector<Mat> qf(nb), kf(nb);
    if constexpr (MT::pair_statistics) {
      if (P) {
        pairFeatures(map, qs, ks, P, qf, kf);
      } else {
        for (Index b = 0; b < B; ++b) {
          features(map, qs[b], P, true, qf[b]);
          features(map, ks[b], P, false, kf[b]);
        }
      }
    } else {
      for (Index b = 0; b < B; ++b) {
        features(map, qs[b], P, true, qf[b]);
        features(map, ks[b], P, false, kf[b]);
      }
    }
    std::vector<Mat> heads(nb);
    const bool use_explicit = detail::explicitIsCheaper(Tq, in.S, F, dv);
    for (Index b = 0; b < B; ++b) {
      const Scalar* mask_row = in.mask ? in.mask + b * in.S : nullptr;
      maskRows(kf[b], mask_row);
      heads[b].resize(Tq, N * dv);
      for (Index n = 0; n < N; ++n) {
        const auto q = qf[b].middleCols(n * F, F);
        const auto k = kf[b].middleCols(n * F, F);
        const auto v = vs[b].middleCols(n * dv, dv);
        auto a = heads[b].middleCols(n * dv, dv);
        if (short_path) {
          detail::shortSoftmaxAttention<Scalar>(q, k, v, mask_row, a);
        } else if (use_explicit) {
          detail::explicitAttention<Scalar>(q, k, v, a);
        } else {
          detail::lowRankAttention<Scalar>(q, k, v, a);
        }
      }
    }
    return heads;
  }

  /// expplus features: coefficients per (b, n) from both sides, queries stabilised per row,
  /// keys by the largest u over the whole key tensor (all batch rows, as the reference).
  template <typename Map>
  void pairFeatures(const Map& map, const std::vector<Mat>& qs, const std::vector<Mat>& ks,
                    const Mat* P, std::vector<Mat>& qf, std::vector<Mat>& kf) const {
    const Index B = Index(qs.size()), N = m_heads, d = m_key_dim, F = P->rows();
    using Coeff = typename Map::template Coefficients<Scalar>;
    std::vector<Coeff> cq(std::size_t(B * N)), ck(std::size_t(B * N));
    Scalar key_max = -std::numeric_limits<Scalar>::infinity();
    for (Index b = 0; b < B; ++b) {
      qf[b].resize(qs[b].rows(), N * F);
      kf[b].resize(ks[b].rows(), N * F);
      for (Index n = 0; n < N; ++n) {
        const auto sq = Map::template statistics<Scalar>(qs[b].middleCols(n * d, d));
        const auto sk = Map::template statistics<Scalar>(ks[b].middleCols(n * d, d));
        cq[std::size_t(b * N + n)] = Map::coefficients(sq, sk, d);
        ck[std::size_t(b * N + n)] = Map::coefficients(sk, sq, d);
        map.logits(FeatureInput<Scalar>{ks[b].middleCols(n * d, d), P, false},
                   Blk(kf[b].middleCols(n * F, F)));
      }
      if (kf[b].size()) key_max = std::max(key_max, kf[b].maxCoeff());
    }
    for (Index b = 0; b < B; ++b)
      for (Index n = 0; n < N; ++n) {
        const FeatureInput<Scalar> qin{qs[b].middleCols(n * d, d), P, true};
        map.logits(qin, Blk(qf[b].middleCols(n * F, F)));
        map.finish(qin, Blk(qf[b].middleCols(n * F, F)), cq[std::size_t(b * N + n)], Scalar(0));
        map.finish(FeatureInput<Scalar>{ks[b].middleCols(n * d, d), P, false},
                   Blk(kf[b].middleCols(n * F, F)), ck[std::size_t(b * N + n)], key_max);
      }
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
    const Index O = outputDimOrThrow();
    const Inputs in = checkInputs(query, value, key, mask);
    checkShape<3>("output", output.dimensions(), {in.B, in.T, O});
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
        std::vector<Mat> a = bidirectionalHeads(Identity{}, true, in, 0, K, scales, P);
        for (Index b = 0; b < in.B; ++b) {
          if (drop) dropout(a[b], call, 1, b, 0);
          outputDense(a[b], m_weights.output_softmax_kernel, m_weights.output_softmax_bias,
                      output, b, 0);
        }
      }
      if (K < in.T) {
        std::vector<Mat> a =
            bidirectionalHeads(FeatureMap{}, m_config.is_short_seq, in, K, in.T, scales, P);
        for (Index b = 0; b < in.B; ++b) {
          if (drop) dropout(a[b], call, 0, b, K);
          outputDense(a[b], m_weights.output_kernel, m_weights.output_bias, output, b, K);
        }
      }
    }
  }

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

  void causalForward(const Inputs& in, const std::vector<Scalar>& scales, const Mat* P, bool drop,
                     std::uint64_t call, TensorMap<Scalar, 3>& output) const {
    const Index N = m_heads, dv = m_value_dim, F = numFeatures(), T = in.T;
    const detail::CausalParams params = wholePassParams(T);
    const Index lead = m_masking.leadingPad(T);
    if constexpr (Traits::pair_statistics) {
      // expplus sees the whole sequence (its coefficients use future positions, as in the
      // reference): features of the whole batch first, then the causal kernel.
      const std::size_t nb = static_cast<std::size_t>(in.B);
      std::vector<Mat> qs(nb), ks(nb), vs(nb), qf(nb), kf(nb);
      for (Index b = 0; b < in.B; ++b) {
        const Scalar r = std::sqrt(scales[std::size_t(b)]);
        qs[b] = dense(in.query, b, 0, T, m_weights.query_kernel, m_weights.query_bias) * r;
        ks[b] = dense(in.key, b, 0, T, m_weights.key_kernel, m_weights.key_bias) * r;
        vs[b] = dense(in.value, b, 0, T, m_weights.value_kernel, m_weights.value_bias);
      }
      if (P) {
        pairFeatures(FeatureMap{}, qs, ks, P, qf, kf);
      } else {
        for (Index b = 0; b < in.B; ++b) {
          features(FeatureMap{}, qs[b], P, true, qf[b]);
          features(FeatureMap{}, ks[b], P, false, kf[b]);
        }
      }
      for (Index b = 0; b < in.B; ++b) {
        maskRows(kf[b], in.mask ? in.mask + b * T : nullptr);
        Mat a(T, N * dv);
        for (Index n = 0; n < N; ++n) {
          detail::CausalHeadState<Scalar> st;
          st.reset(F, dv);
          detail::causalProcess<Scalar>(params, st, qf[b].middleCols(n * F, F),
                                        kf[b].middleCols(n * F, F), vs[b].middleCols(n * dv, dv),
                                        lead, a.middleCols(n * dv, dv));
        }
        if (drop) dropout(a, call, 0, b, 0);
        outputDense(a, m_weights.output_kernel, m_weights.output_bias, output, b, 0);
      }
    } else {
      const Index block = causalBlockRows();
      std::vector<detail::CausalHeadState<Scalar>> st(static_cast<std::size_t>(N));
      Mat qs, ks, vs, qf, kf, a;
      for (Index b = 0; b < in.B; ++b) {
        const Scalar r = std::sqrt(scales[std::size_t(b)]);
        for (auto& h : st) h.reset(F, dv);
        // The exp maps shift by the largest logit of the whole row (SPEC 2): with more than
        // one block that needs a first pass over the logits.
        std::optional<Scalar> q_shift, k_shift;
        const Index first = std::min(T, block - lead);
        if constexpr (Traits::max_shifted) {
          if (first < T) {
            Scalar mq = -std::numeric_limits<Scalar>::infinity(), mk = mq;
            for (Index r0 = 0; r0 < T;) {
              const Index L = std::min(T - r0, r0 == 0 ? first : block);
              qs = dense(in.query, b, r0, L, m_weights.query_kernel, m_weights.query_bias) * r;
              ks = dense(in.key, b, r0, L, m_weights.key_kernel, m_weights.key_bias) * r;
              mq = std::max(mq, maxLogit(FeatureMap{}, qs, P));
              mk = std::max(mk, maxLogit(FeatureMap{}, ks, P));
              r0 += L;
            }
            q_shift = mq;
            k_shift = mk;
          }
        }
        for (Index r0 = 0; r0 < T;) {
          const Index L = std::min(T - r0, r0 == 0 ? first : block);
          qs = dense(in.query, b, r0, L, m_weights.query_kernel, m_weights.query_bias) * r;
          ks = dense(in.key, b, r0, L, m_weights.key_kernel, m_weights.key_bias) * r;
          vs = dense(in.value, b, r0, L, m_weights.value_kernel, m_weights.value_bias);
          features(FeatureMap{}, qs, P, true, qf, q_shift);
          features(FeatureMap{}, ks, P, false, kf, k_shift);
          maskRows(kf, in.mask ? in.mask + b * T + r0 : nullptr);
          a.resize(L, N * dv);
          for (Index n = 0; n < N; ++n) {
            detail::causalProcess<Scalar>(params, st[std::size_t(n)], qf.middleCols(n * F, F),
                                          kf.middleCols(n * F, F), vs.middleCols(n * dv, dv),
                                          r0 == 0 ? lead : 0, a.middleCols(n * dv, dv));
          }
          if (drop) dropout(a, call, 0, b, r0);
          outputDense(a, m_weights.output_kernel, m_weights.output_bias, output, b, r0);
          r0 += L;
        }
      }
    }
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
    const Index N = m_heads, dv = m_value_dim, F = numFeatures(), T = in.T;
    detail::CausalParams params;
    if (state.mode() == StreamingMode::Recurrent) {
      params.chunk = T;  // the whole call is one chunk, as in the reference's cache
      params.gamma = m_masking.gamma();
      params.drop = false;
    } else {
      params.chunk = m_masking.chunk;
      params.window = m_masking.window;
      params.gamma = m_masking.gamma();
      params.drop = true;
    }
    const Scalar r = std::sqrt(Scalar(m_scale));
    Mat qs, ks, vs, qf, kf, a(T, N * dv);
    for (Index b = 0; b < in.B; ++b) {
      qs = dense(in.query, b, 0, T, m_weights.query_kernel, m_weights.query_bias) * r;
      ks = dense(in.key, b, 0, T, m_weights.key_kernel, m_weights.key_bias) * r;
      vs = dense(in.value, b, 0, T, m_weights.value_kernel, m_weights.value_bias);
      std::optional<Scalar> k_shift;
      if constexpr (Traits::max_shifted) {
        // Keep the state relative to the running maximum of key logits, rescaling it when the
        // maximum grows (online-softmax style); the shifts then cancel between calls.
        Scalar& running = state.m_key_shift[std::size_t(b)];
        const Scalar mk = maxLogit(FeatureMap{}, ks, P);
        if (mk > running) {
          if (std::isfinite(running)) {
            for (Index n = 0; n < N; ++n) state.head(b, n).rescale(std::exp(running - mk));
          }
          running = mk;
        }
        k_shift = running;
      }
      features(FeatureMap{}, qs, P, true, qf);
      features(FeatureMap{}, ks, P, false, kf, k_shift);
      maskRows(kf, in.mask ? in.mask + b * T : nullptr);
      for (Index n = 0; n < N; ++n) {
        detail::causalProcess<Scalar>(params, state.head(b, n), qf.middleCols(n * F, F),
                                      kf.middleCols(n * F, F), vs.middleCols(n * dv, dv), 0,
                                      a.middleCols(n * dv, dv));
      }
      outputDense(a, m_weights.output_kernel, m_weights.output_bias, output, b, 0);
    }
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
  Index m_heads = 1, m_key_dim = 1, m_value_dim = 1, m_out_dim = 0;
  double m_scale = 1.0;
  Mat m_projection;
  Weights<Scalar> m_weights;
  bool m_has_weights = false;
  mutable CallCounter m_training_calls;  // numbers training calls: redraw k, dropout stream k
};

/// Short aliases for the common instantiations.
template <typename Scalar, typename FeatureMap>
using CausalKernelAttention = KernelAttention<Scalar, FeatureMap, CausalWindowed>;

}  // namespace kattn
