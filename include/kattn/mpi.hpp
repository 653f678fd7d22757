#pragma once
/// \file
/// Sequence-parallel kernel attention over MPI: a sequence split across the ranks of a
/// communicator, each rank passing its slice, with the single-process forward's outputs
/// (docs/distributed.md). Optional: needs MPI (CMake target kattn::mpi); no other kattn header
/// includes it.

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "core.hpp"
#include "detail/input_views.hpp"
#include "detail/mpi_comm.hpp"
#include "detail/mpi_pass.hpp"
#include "mpi_error.hpp"
#include "layer.hpp"
#include "streaming.hpp"

namespace kattn {
/// Running a layer across the ranks of an MPI communicator (kattn/mpi.hpp).
namespace mpi {

template <typename Layer>
class SequenceParallel;

/**
 * \brief A layer run over sequences split along their length across the ranks of an MPI
 * communicator. Rank r passes rows [t_r, t_r + T_r) of the sequences (its slice, any length,
 * zero included, in rank order) and gets back its rows of the output, equal to the
 * single-process forward on the whole sequences up to rounding.
 *
 * - Bidirectional: every rank summarises its keys (KV = sum phi(k) v^T and z = sum phi(k) per
 *   batch row and head), one all-reduce adds the summaries, and each rank reads out its
 *   queries. For the exp maps the largest logits and for expplus its statistics are all-reduced
 *   first; scale_by_length uses the global mask sums.
 * - Causal: the rows of a chunk cut by a slice boundary move to the rank where the chunk
 *   starts; each rank's state over its chunks enters an exclusive scan under `combine`
 *   (ceil(log2 P) + 1 rounds of one state each), and each rank runs its chunks from the state
 *   of everything before them. The bytes moved do not depend on T.
 *
 * Every call is collective: all ranks of the communicator call forward together, with layers
 * of the same configuration, weights and projection (checked each call by a fingerprint; a
 * mismatch throws on every rank). An exception on one rank (a bad input) is thrown on every
 * rank, with that rank's message; none is left waiting. Inference only. Not for layers with
 * is_short_seq or begin_kernel (their softmax needs every key on every rank).
 *
 * The object holds a duplicate of the communicator: destroy it before MPI_Finalize. One call
 * at a time per object.
 */
template <typename Scalar, typename FeatureMap, typename Masking>
class SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>> {
  using Traits = feature_map_traits<FeatureMap>;
  /// expplus's features need statistics of the whole sequence: they are made here and fed to
  /// twins with the identity map.
  static constexpr bool kPair = Traits::pair_statistics;
  using CoreMap = std::conditional_t<kPair, Identity, FeatureMap>;

 public:
  /// The layer type.
  using Layer = KernelAttention<Scalar, FeatureMap, Masking>;

  /**
   * \brief Runs `layer` (kept by reference: it must outlive this object) on the ranks of
   * `comm`. Collective: every rank of `comm` constructs one.
   * \throws std::invalid_argument for MPI_COMM_NULL; std::logic_error before MPI_Init;
   *         Error when MPI fails.
   */
  SequenceParallel(const Layer& layer, MPI_Comm comm)
      : m_layer(layer),
        m_comm(comm),
        m_keys(twinConfig(layer, false)),
        m_core(twinConfig(layer, Masking::causal)) {}

  /// This rank and the number of ranks.
  int rank() const { return m_comm.rank(); }
  /// P.
  int size() const { return m_comm.size(); }

  /**
   * \brief One forward pass over sequences split across the ranks; collective.
   * \param query this rank's slice [B, T_r, D_q] (any Eigen tensor, map or expression)
   * \param value [B, S_r, D_v]: its slice of the values (causal layers: S_r = T_r)
   * \param key [B, S_r, D_k] or std::nullopt (the value input is then the key input)
   * \param attention_mask [B, S_r] or std::nullopt
   * \param final_state causal layers, exact mode: on the last rank, set to the streaming state
   *        after the whole sequences, to go on decoding with the layer (ignored elsewhere)
   * \return this rank's rows of the output [B, T_r, O]
   * \throws std::invalid_argument on every rank when any rank's input is bad, the ranks'
   *         layers or batch sizes differ, or the layer's path does not split; Error on an MPI
   *         failure or another exception on some rank.
   */
  template <typename Query, typename Value, typename Key = std::nullopt_t,
            typename Mask = std::nullopt_t>
  Tensor<Scalar, 3> forward(const Query& query, const Value& value, const Key& key = std::nullopt,
                            const Mask& attention_mask = std::nullopt,
                            StreamingState<Scalar>* final_state = nullptr) {
    const double t0 = MPI_Wtime();
    m_comm.stats() = CallStats{};
    using Buffers = kattn::detail::InputBuffers<Scalar>;
    kattn::detail::InputViews<Scalar> in(m_inputs);
    std::optional<ConstTensorMap<Scalar, 3>> q, v, k;
    std::optional<ConstTensorMap<Scalar, 2>> mask;
    std::int64_t meta[kMeta] = {};
    m_comm.step([&] {
      q.emplace(in.template tensor<3>(query, Buffers::kQuery, "query"));
      v.emplace(in.template tensor<3>(value, Buffers::kValue, "value"));
      auto kv = in.template optionalTensor<3>(key, Buffers::kKey, "key");
      if (kv) k.emplace(*kv);
      auto mv = in.template optionalTensor<2>(attention_mask, Buffers::kMask, "attention_mask");
      if (mv) mask.emplace(*mv);
      checkLocal(*q, *v, k, mask, final_state);
      const std::int64_t local[kMeta] = {std::int64_t(detail::fingerprint(m_layer)),
                                         q->dimension(0), k ? 1 : 0, mask ? 1 : 0,
                                         q->dimension(1), v->dimension(1)};
      std::copy(local, local + kMeta, meta);
    });
    const std::vector<std::int64_t> all = agreeOnMeta(meta);
    Tensor<Scalar, 3> y;
    if constexpr (Masking::causal) {
      std::vector<std::int64_t> lengths;
      for (int r = 0; r < size(); ++r) lengths.push_back(all[std::size_t(r * kMeta + 4)]);
      y = causal(*q, *v, k, mask, lengths, final_state);
    } else {
      y = bidirectional(Rows{q->data(), k ? k->data() : v->data(), v->data(),
                             mask ? mask->data() : nullptr, q->dimension(0), q->dimension(1),
                             v->dimension(1), bool(mask)});
    }
    m_comm.stats().seconds = MPI_Wtime() - t0;
    m_last = m_comm.stats();
    return y;
  }

  /// What the last call cost on this rank: time, time in MPI, bytes handed to MPI.
  const CallStats& lastCall() const { return m_last; }

 private:
  using Mat = Matrix<Scalar>;
  using KeysTwin = KernelAttention<Scalar, CoreMap, Bidirectional>;
  using CoreTwin = std::conditional_t<Masking::causal,
                                      KernelAttention<Scalar, CoreMap, CausalWindowed>, KeysTwin>;
  static constexpr int kMeta = 6;  // fingerprint, B, key given, mask given, T_r, S_r

  /// The twins' configuration: the layer's core on heads already scaled (scale 1), with the
  /// identity map on expplus's features.
  static LayerConfig twinConfig(const Layer& layer, bool causal) {
    LayerConfig c = layer.config();
    c.scale = 1.0;
    c.scale_by_length = false;
    c.is_short_seq = false;
    c.begin_kernel = 0;
    c.dropout = 0.0;
    c.redraw = false;
    c.use_causal_windowed = causal;
    if (kPair) {
      c.value_dim = int(layer.valueDim());
      c.key_dim = int(layer.numFeatures());
      c.num_random_features = 0;
      c.feature_transform = CoreMap::name;
    }
    return c;
  }

  /// The checks of one rank's inputs, before any collective.
  void checkLocal(const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
                  const std::optional<ConstTensorMap<Scalar, 3>>& k,
                  const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                  const StreamingState<Scalar>* final_state) const {
    const LayerConfig& c = m_layer.config();
    if (!m_layer.hasWeights()) {
      throw std::logic_error("kattn::mpi: the layer has no weights (call setWeights first)");
    }
    if (c.is_short_seq || c.begin_kernel > 0) {
      throw std::invalid_argument(
          std::string(c.is_short_seq ? "is_short_seq" : "begin_kernel") +
          ": not across ranks (the softmax over kernel scores needs every key on every rank)");
    }
    if (final_state && (!Masking::causal || kPair)) {
      throw std::invalid_argument(std::string("final_state: ") +
                                  (kPair ? "expplus cannot stream"
                                         : "a bidirectional layer has no streaming state"));
    }
    kattn::detail::inputsCall<Scalar>(q, v, k, mask, Masking::causal, m_layer.queryInputDim(),
                                      m_layer.valueInputDim(), m_layer.keyInputDim());
  }

  /// Every rank's (fingerprint, B, key, mask, T_r, S_r); the same error on every rank when
  /// the ranks disagree on anything but the lengths.
  std::vector<std::int64_t> agreeOnMeta(const std::int64_t* meta) {
    const std::vector<std::int64_t> all = m_comm.allgatherArray(meta, kMeta);
    std::string bad;
    const char* what[] = {"layer (configuration, weights or projection)", "batch size B",
                          "key input (given or not)", "attention_mask (given or not)"};
    for (int field = 0; field < 4 && bad.empty(); ++field) {
      for (int r = 1; r < size(); ++r) {
        if (all[std::size_t(r * kMeta + field)] != all[std::size_t(field)]) {
          bad += (bad.empty() ? "" : ", ") + std::to_string(r);
        }
      }
      if (!bad.empty()) {
        throw std::invalid_argument("kattn::mpi: the ranks differ in their " +
                                    std::string(what[field]) + ": rank(s) " + bad +
                                    " differ from rank 0");
      }
    }
    return all;
  }

  /// Per batch row, sqrt of the scale (SPEC 1.2): with scale_by_length from the mask sums of
  /// the whole sequences.
  std::vector<Scalar> rowScales(Index B, bool masked, const Scalar* mask, Index S) {
    const LayerConfig& c = m_layer.config();
    std::vector<Scalar> r(std::size_t(B), std::sqrt(Scalar(c.resolvedScale())));
    if (!c.scale_by_length) return r;
    if (!masked) {
      throw std::invalid_argument("attention_mask: scale_by_length needs a mask (none given)");
    }
    std::vector<Scalar> total(std::size_t(B), Scalar(0));
    for (Index b = 0; b < B; ++b)
      for (Index j = 0; j < S; ++j) total[std::size_t(b)] += mask[b * S + j];
    m_comm.allreduce(total.data(), total.size(), MPI_SUM);
    for (Index b = 0; b < B; ++b) {
      const Scalar t = total[std::size_t(b)];
      if (!(t >= Scalar(1))) {
        throw std::invalid_argument("attention_mask: scale_by_length needs every row to sum to "
                                    "at least 1; row " + std::to_string(b) + " sums to " +
                                    std::to_string(double(t)));
      }
      r[std::size_t(b)] = std::sqrt(Scalar(c.resolvedScale()) * std::log(t) / std::log(Scalar(512)));
    }
    return r;
  }

  /// The twins see the layer's projection and pool as they are at this call.
  void syncTwins() {
    if constexpr (!kPair) {
      if (m_layer.config().hasProjection()) {
        m_keys.setProjection(m_layer.projection());
        m_core.setProjection(m_layer.projection());
      }
    }
    m_keys.setThreadPool(m_layer.threadPool());
    m_core.setThreadPool(m_layer.threadPool());
  }

  /// This rank's rows, row-major and contiguous: queries [B, Lq, D_q], keys [B, Lk, D_k] and
  /// values [B, Lk, D_v], the key mask [B, Lk] (null: none, or no rows). `masked`: a mask
  /// was given (on every rank, as agreed; an empty slice's data may be null).
  struct Rows {
    const Scalar *q = nullptr, *k = nullptr, *v = nullptr, *mask = nullptr;
    Index B = 0, Lq = 0, Lk = 0;
    bool masked = false;
  };
  /// What every block needs from the whole sequences: the row scales (sqrt), and expplus's
  /// statistics per (b, n) (queries' sum of squares and row sum, then the keys'), its largest
  /// key logit and the lengths.
  struct Prepared {
    std::vector<Scalar> r, stats;
    Scalar key_max = -std::numeric_limits<Scalar>::infinity();
    std::int64_t lengths[2] = {0, 0};
  };
  /// What the twins' core takes: the heads, scaled, or for expplus its features (made from
  /// the heads in `scratch`). Kept from block to block.
  struct CoreInputs {
    detail::BlockBuffer<Scalar> q, k, v, scratch;
  };
  /// Rows per block: a pass holds a block's projections, not the slice's.
  static constexpr Index kBlockRows = 1024;

  Prepared prepare(const Rows& x);
  void block(const Rows& x, const Prepared& p, Index q0, Index nq, Index k0, Index nk,
             CoreInputs& c) const;
  void features(const Prepared& p, const ConstTensorMap<Scalar, 4>& h, bool queries,
                detail::BlockBuffer<Scalar>& out) const;
  void shifts(const Rows& x, const Prepared& p, std::vector<Scalar>& qshift,
              std::vector<Scalar>* kshift);
  Tensor<Scalar, 3> bidirectional(const Rows& x);
  Tensor<Scalar, 3> causal(const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
                           const std::optional<ConstTensorMap<Scalar, 3>>& k,
                           const std::optional<ConstTensorMap<Scalar, 2>>& mask,
                           const std::vector<std::int64_t>& lengths,
                           StreamingState<Scalar>* final_state);
  StreamingState<Scalar> ownState(const Rows& x, const Prepared& p, Index lead,
                                  StreamingState<Scalar> s);
  void feed(const Rows& x, const Prepared& p, Index a, Index b, Index lead,
            StreamingState<Scalar>& s, Scalar* y) const;

  const Layer& m_layer;
  detail::Comm m_comm;
  KeysTwin m_keys;
  CoreTwin m_core;
  kattn::detail::InputBufferPool<Scalar> m_inputs;
  CallStats m_last;
};

/// `SequenceParallel sp(layer, comm)` deduces the layer type.
template <typename Layer>
SequenceParallel(const Layer&, MPI_Comm) -> SequenceParallel<Layer>;

}  // namespace mpi
}  // namespace kattn

#include "detail/mpi_calls.hpp"
