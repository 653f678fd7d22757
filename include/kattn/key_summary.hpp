#pragma once
/// \file
/// KeySummary<Scalar>: the key side of bidirectional attention (SPEC 3.2) for a batch of
/// sequences, and `combine`, which adds the summaries of disjoint key sets.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "limits.hpp"
#include "tensor.hpp"

namespace kattn {

/**
 * \brief Per (batch row b, head n): KV = sum_s phi(k_s)^T v_s [F, d_v] and z = sum_s phi(k_s)
 * [F] over a set of keys, with the exp maps' key shift.
 *
 * For exp and expmod the features of the sums are exp(logit - shift(b, n)) h(k) / sqrt(m):
 * they are kept relative to `shift`, the largest key logit of the keys summed (-inf for none;
 * 0 and unused for the other maps). Readout divides by q'z + eps e^(Mk - shift(b, n)), where Mk
 * is the largest shift of the batch row over its heads, the reference's key shift: the eps term
 * is the only part that the shift does not cancel, so it is kept apart from the sums.
 *
 * Made by `summarizeKeys` (core.hpp); summaries of disjoint key sets of the same sequences
 * `combine` into the summary of their union.
 */
template <typename Scalar>
class KeySummary {
 public:
  KeySummary() = default;
  /// An empty summary (no keys): zero sums, shift -inf.
  KeySummary(Index batch, Index heads, Index features, Index value_dim)
      : m_batch(batch), m_heads(heads), m_features(features), m_value_dim(value_dim) {
    if (batch < 0 || heads < 1 || features < 1 || value_dim < 1) {
      throw std::invalid_argument("KeySummary: invalid sizes (batch " + std::to_string(batch) +
                                  ", heads " + std::to_string(heads) + ", features " +
                                  std::to_string(features) + ", value_dim " +
                                  std::to_string(value_dim) + ")");
    }
    checkAllocation(double(batch) * double(heads) * double(features) * double(value_dim + 1),
                    sizeof(Scalar), [&] { return std::string("a KeySummary"); });
    const std::size_t n = std::size_t(batch * heads);
    m_kv.assign(n, Matrix<Scalar>::Zero(features, value_dim));
    m_z.assign(n, Vector<Scalar>::Zero(features));
    m_shift.assign(n, -std::numeric_limits<Scalar>::infinity());
  }

  /// B.
  Index batch() const { return m_batch; }
  /// N.
  Index heads() const { return m_heads; }
  /// F.
  Index features() const { return m_features; }
  /// d_v.
  Index valueDim() const { return m_value_dim; }

  /// KV of (b, n), [F, d_v].
  Matrix<Scalar>& kv(Index b, Index n) { return m_kv[at(b, n)]; }
  /// KV of (b, n), read only.
  const Matrix<Scalar>& kv(Index b, Index n) const { return m_kv[at(b, n)]; }
  /// z of (b, n), [F].
  Vector<Scalar>& z(Index b, Index n) { return m_z[at(b, n)]; }
  /// z of (b, n), read only.
  const Vector<Scalar>& z(Index b, Index n) const { return m_z[at(b, n)]; }
  /// The key shift of (b, n) (exp maps), -inf for no keys.
  Scalar& shift(Index b, Index n) { return m_shift[at(b, n)]; }
  /// The key shift of (b, n), read only.
  Scalar shift(Index b, Index n) const { return m_shift[at(b, n)]; }

  /// Whether `other` summarises keys of sequences of the same shape.
  bool sameShape(const KeySummary& other) const {
    return m_batch == other.m_batch && m_heads == other.m_heads &&
           m_features == other.m_features && m_value_dim == other.m_value_dim;
  }

 private:
  std::size_t at(Index b, Index n) const { return std::size_t(b * m_heads + n); }

  Index m_batch = 0, m_heads = 1, m_features = 1, m_value_dim = 1;
  std::vector<Matrix<Scalar>> m_kv;
  std::vector<Vector<Scalar>> m_z;
  std::vector<Scalar> m_shift;
};

/**
 * \brief The summary of the union of two disjoint key sets: per (b, n) the sums added, each
 * first brought to the larger of the two shifts (multiplied by e^(shift - max), exact up to
 * rounding). Associative and commutative up to rounding; an empty summary is its identity.
 * A non-finite shift (NaN or Inf logits) leaves the sums unscaled, so NaN and Inf reach the
 * outputs as in one pass.
 * \throws std::invalid_argument when the summaries' shapes differ.
 */
template <typename Scalar>
KeySummary<Scalar> combine(const KeySummary<Scalar>& a, const KeySummary<Scalar>& b) {
  if (!a.sameShape(b)) {
    throw std::invalid_argument(
        "combine: the key summaries have different shapes ([B, N, F, d_v] = [" +
        std::to_string(a.batch()) + ", " + std::to_string(a.heads()) + ", " +
        std::to_string(a.features()) + ", " + std::to_string(a.valueDim()) + "] and [" +
        std::to_string(b.batch()) + ", " + std::to_string(b.heads()) + ", " +
        std::to_string(b.features()) + ", " + std::to_string(b.valueDim()) + "])");
  }
  KeySummary<Scalar> out = a;
  for (Index i = 0; i < a.batch(); ++i)
    for (Index n = 0; n < a.heads(); ++n) {
      const Scalar sa = a.shift(i, n), sb = b.shift(i, n);
      const Scalar m = std::max(sa, sb);
      auto weight = [&](Scalar s) {
        return std::isfinite(m) && std::isfinite(s) ? std::exp(s - m) : Scalar(1);
      };
      const Scalar wa = weight(sa), wb = weight(sb);
      out.kv(i, n) = wa * a.kv(i, n) + wb * b.kv(i, n);
      out.z(i, n) = wa * a.z(i, n) + wb * b.z(i, n);
      out.shift(i, n) = std::isnan(sa) || std::isnan(sb) ? sa + sb : m;
    }
  return out;
}

}  // namespace kattn
