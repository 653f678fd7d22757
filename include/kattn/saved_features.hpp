#pragma once
/// \file
/// What attend() and forward() can keep for attendBackward() and backward(): the features of
/// the bidirectional low-rank form, so that the backward reads them instead of recomputing
/// them (docs/training.md, "Storing the features").

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "limits.hpp"
#include "tensor.hpp"

namespace kattn {

template <typename Scalar>
class SavedFeatures;

namespace detail {

/// \private The contents of a SavedFeatures: per (batch row, head), the features of query
/// rows [q0, T) and of all S keys (before the key mask), each block of kStreamRows rows
/// relative to the stabiliser its forward used (exp maps), and the key sums KV, z.
template <typename Scalar>
struct SavedData {
  bool holds = false;  ///< whether the last call saved anything
  Index B = 0, T = 0, S = 0, heads = 0, features = 0, value_dim = 0;
  Index q0 = 0;                         ///< begin_kernel's softmax rows are not saved
  Index block_rows = 0;                 ///< rows per block of the shifts below
  std::optional<std::uint64_t> call;    ///< the training call whose draws the forward used
  bool shifted = false;                 ///< whether the exp maps' shifts below are set
  Vector<Scalar> qf, kf;                ///< [B, N, T - q0, F], [B, N, S, F]
  Vector<Scalar> qshift;                ///< [B, N, query blocks]: each block's shift, its max
  Vector<Scalar> kshift, kmax;          ///< [B, N, key blocks]: shift used, the block's max
  Vector<Scalar> kv, z;                 ///< [B, N, F, d_v], [B, N, F]
  Vector<Scalar> kv_shift;              ///< [B, N]: the shift of the key sums

  Index queryRows() const { return T - q0; }
  Index queryBlocks() const { return (queryRows() + block_rows - 1) / block_rows; }
  Index keyBlocks() const { return (S + block_rows - 1) / block_rows; }

  /// Sizes the buffers for a call (reusing them when the sizes are those of the last call),
  /// within the memory limit. `holds` waits until the call has filled them.
  void allocate(Index B_, Index T_, Index S_, Index N, Index F, Index dv, Index q0_, Index L,
                bool shifted_) {
    B = B_;
    T = T_;
    S = S_;
    heads = N;
    features = F;
    value_dim = dv;
    q0 = q0_;
    block_rows = L;
    shifted = shifted_;
    const double rows = double(B) * double(N) * (double(queryRows()) + double(S));
    checkAllocation(rows * double(F), sizeof(Scalar), [&] {
      return "the saved features [B, N, T + S, F] = [" + std::to_string(B) + ", " +
             std::to_string(N) + ", " + std::to_string(queryRows() + S) + ", " +
             std::to_string(F) + "]";
    });
    qf.resize(B * N * queryRows() * F);
    kf.resize(B * N * S * F);
    qshift.resize(shifted ? B * N * queryBlocks() : 0);
    kshift.resize(shifted ? B * N * keyBlocks() : 0);
    kmax.resize(kshift.size());
    kv.resize(B * N * F * dv);
    z.resize(B * N * F);
    kv_shift.resize(shifted ? B * N : 0);
  }

  /// Whether every saved shift is finite: features saved under a non-finite shift (a NaN or
  /// Inf logit) cannot be brought to another, so the backward recomputes them.
  bool finiteShifts() const {
    return qshift.allFinite() && kshift.allFinite() && kmax.allFinite() && kv_shift.allFinite();
  }

  Scalar* queryFeatures(Index b, Index n, Index r) {
    return qf.data() + ((b * heads + n) * queryRows() + r) * features;
  }
  const Scalar* queryFeatures(Index b, Index n, Index r) const {
    return qf.data() + ((b * heads + n) * queryRows() + r) * features;
  }
  Scalar* keyFeatures(Index b, Index n, Index s) {
    return kf.data() + ((b * heads + n) * S + s) * features;
  }
  const Scalar* keyFeatures(Index b, Index n, Index s) const {
    return kf.data() + ((b * heads + n) * S + s) * features;
  }
};

/// \private The SavedData inside a SavedFeatures, for the cores.
template <typename Scalar>
SavedData<Scalar>& savedData(SavedFeatures<Scalar>& s) {
  return s.m_data;
}
template <typename Scalar>
const SavedData<Scalar>& savedData(const SavedFeatures<Scalar>& s) {
  return s.m_data;
}

}  // namespace detail

/**
 * \brief The features a bidirectional attend() or forward() computed, kept for
 * attendBackward() or backward() so that it does not recompute them: about (T + S) N F numbers per batch row (128 MB a side for
 * T = 16384, 8 heads, m = 256 in float), against half the backward's work for the exp maps
 * (docs/training.md, "Storing the features").
 *
 * Pass one to attend() or forward() into caller memory, then to the backward of that call;
 * it is overwritten by each call, its buffers reused
 * when the sizes repeat. It holds features only when the call took the low-rank form (not the
 * explicit T x S form, the short-sequence softmax, expplus with a projection, or a causal
 * layer); when it holds none, the backward recomputes, with the same result. Like an
 * output buffer, one object serves one call at a time.
 */
template <typename Scalar>
class SavedFeatures {
 public:
  /// Whether the last attend() given this object saved its features.
  bool holdsFeatures() const { return m_data.holds; }

  /// The bytes its buffers hold.
  std::size_t bytes() const {
    const auto& d = m_data;
    const Index n = d.qf.size() + d.kf.size() + d.qshift.size() + d.kshift.size() +
                    d.kmax.size() + d.kv.size() + d.z.size() + d.kv_shift.size();
    return std::size_t(n) * sizeof(Scalar);
  }

  /// Frees the buffers.
  void clear() { m_data = detail::SavedData<Scalar>(); }

 private:
  friend detail::SavedData<Scalar>& detail::savedData<Scalar>(SavedFeatures<Scalar>&);
  friend const detail::SavedData<Scalar>& detail::savedData<Scalar>(const SavedFeatures<Scalar>&);
  detail::SavedData<Scalar> m_data;
};

}  // namespace kattn
