#pragma once
/// \file
/// \private The state of the causal windowed kernel on one head (SPEC 3.3-3.5), shared by the
/// whole-sequence pass and every kind of streaming: the whole pass is a fresh state fed once.
///
/// State after chunk c: S_c = sum_{j<W} gamma^j KV_{c-j} (and z likewise). Two regimes:
/// - fixed window (the window covers every chunk, or the reference's recurrent cache): S_c =
///   gamma S_{c-1} + KV_c;
/// - sliding window (a window shorter than the sequence): chunk terms kept as two stacks (the
///   "two-stack" sliding-window aggregation): the newest chunks in a decayed running sum plus
///   their raw terms, the oldest as decayed suffix sums. Chunks leave the window without any
///   subtraction, so a window of small values is never polluted by the rounding residue of
///   large values that left it (a running sum minus the dropped term loses all digits there,
///   in float32 completely). O(F d_v) per chunk, amortised.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <deque>
#include <vector>

#include "../assert.hpp"
#include "bidirectional.hpp"

namespace kattn {
namespace detail {

/// Parameters of the kernel for one call.
struct CausalParams {
  Index chunk = 1;       ///< C
  Index window = 1;      ///< W (only read when sliding)
  double gamma = 1.0;    ///< decay per chunk, 1 for none
  bool sliding = false;  ///< the window slides: keep a ring and let chunks older than W leave
  /// The ring may keep a chunk's rows instead of its term (when fewer numbers: a token's
  /// term is rank one). Not for states that are rescaled (the exp maps' streaming states):
  /// a rescaled term must stay the matrix that save() writes, for bit-exact restores.
  bool compact_ring = true;
};

/// Numbers a head's sliding window may hold (ring, front and sums), for the memory limit: its
/// state now (zero for a state not yet made) and the chunks still to come.
struct WindowLoad {
  double features = 0;   ///< F
  double value_dim = 0;  ///< d_v
  double held = 0;       ///< numbers the ring holds now (rows and terms)
  double in_window = 0;  ///< chunks in the window now
  double front = 0;      ///< suffix sums held now
  double chunks = 0;     ///< chunks to come
  Index chunk = 1;       ///< C, rows per chunk at most
  Index window = 1;      ///< W
  bool rows = true;      ///< the ring may keep a chunk's rows instead of its term

  /// An upper bound: the sums, the ring as it is plus the new chunks (as rows when allowed and
  /// smaller than a term, as terms otherwise) with the ring's partly used block of rows (its
  /// size in numbers is `ring_block`), and the front, which becomes up to W sums once the
  /// window slides.
  double numbers(double ring_block) const {
    const double term = features * (value_dim + 1);
    const bool as_rows = rows && double(chunk) * (features + value_dim) < features * value_dim;
    const double entry = as_rows ? double(chunk) * (features + value_dim) : term;
    const bool slides = in_window + chunks > double(window);
    return term + held + std::min(chunks, double(window)) * entry + (as_rows ? ring_block : 0.0) +
           (slides ? double(window) : front) * term;
  }
};

/// z <- g z + add over n numbers, compensated by zc (Kahan): y = add - g zc, t = g z + y,
/// zc = (t - g z) - y, each step one rounding: the compensation is lost under -ffast-math
/// (reassociation), which kattn is not built with. z - zc is the sum.
template <typename Scalar>
void compensatedAdd(Scalar g, Scalar* __restrict z, Scalar* __restrict zc,
                    const Scalar* __restrict add, Index n) {
  for (Index f = 0; f < n; ++f) {  // contiguous and independent: vectorised
    const Scalar kept = g * z[f], y = add[f] - g * zc[f], t = kept + y;
    zc[f] = (t - kept) - y;
    z[f] = t;
  }
}

/// Running state of one (batch row, head).
template <typename Scalar>
struct CausalHeadState {
  Matrix<Scalar> kv;                    ///< [F, d_v] decayed sum of the newest chunks (all of
                                        ///< them in a fixed window)
  Vector<Scalar> z;                     ///< [F] the same for key features
  /// [F] what z's additions rounded away, Kahan's compensation (z - zc is the sum). z sums
  /// positive features, many of them the maps' constant epsilon, so a token at a time its
  /// roundings share a sign and the normaliser drifts with the length (1e-5 relative after
  /// 65,536 tokens in float32); compensated, it stays within a rounding of the sum.
  Vector<Scalar> zc;
  Vector<Scalar> z_add;                 ///< [F] scratch of addToZ (not state)
  std::deque<Matrix<Scalar>> ring_kv;   ///< raw terms KV_c of the chunks in kv (sliding only);
                                        ///< empty for a chunk kept as rows
  std::deque<Vector<Scalar>> ring_z;    ///< raw terms z_c; empty likewise
  /// The rows of the chunks kept as rows, whose terms are k'^T v and k'^T 1 (a token's are
  /// rank one: F + d_v numbers instead of F d_v): chunk after chunk, k' [C, F] then v [C, d_v],
  /// row-major, in blocks of at least kRingBlock numbers that never reallocate. Not an
  /// allocation per chunk: malloc grows a secondary arena (which threads use once they met
  /// contention) a page at a time with a system call each; nor one growing buffer, whose
  /// doubling copies and first-touches all of it inside one step.
  /// Emptied blocks stay for the chunks that come after (clearRing, reset), so a state that
  /// goes on, or starts over, writes into memory it already touched.
  std::vector<std::vector<Scalar>> ring_rows;
  std::size_t ring_cur = 0;             ///< the block being filled
  std::vector<std::size_t> ring_block;  ///< per ring entry: the block of its rows
  std::vector<std::size_t> ring_at;     ///< per ring entry: offset of its rows in the block
  std::vector<Index> ring_n;            ///< per ring entry: its rows, 0 for a kept term
  static constexpr std::size_t kRingBlock = std::size_t(1) << 16;
  std::size_t ring_numbers = 0;         ///< numbers the ring's entries hold (rows and terms)
  std::vector<Matrix<Scalar>> front_kv; ///< decayed suffix sums of the older chunks (sliding only)
  std::vector<Vector<Scalar>> front_z;
  std::size_t front_pos = 0;            ///< first front entry still inside the window

  void reset(Index F, Index dv) {
    kv.setZero(F, dv);
    z.setZero(F);
    zc.setZero(F);
    z_add.resize(F);
    clearRing();
    front_kv.clear();
    front_z.clear();
    front_pos = 0;
  }

  /// z <- g z + add, compensated (zc): compensatedAdd.
  template <typename Derived>
  void addToZ(Scalar g, const Eigen::MatrixBase<Derived>& add) {
    KATTN_ASSERT(add.size() == z.size());
    z_add.noalias() = add;  // a row, or column sums of a few rows: evaluated once
    compensatedAdd(g, z.data(), zc.data(), z_add.data(), z.size());
  }

  /// The normaliser's sum, z corrected by its compensation.
  Vector<Scalar> zSum() const { return z - zc; }

  using RowsMap = Eigen::Map<Matrix<Scalar>>;
  using ConstRowsMap = Eigen::Map<const Matrix<Scalar>>;

  /// Key features k' [C, F] and values v [C, d_v] of ring entry i, kept as rows.
  const Scalar* ringRows(std::size_t i) const {
    return ring_rows[ring_block[i]].data() + ring_at[i];
  }
  ConstRowsMap ringK(std::size_t i) const {
    return ConstRowsMap(ringRows(i), ring_n[i], kv.rows());
  }
  ConstRowsMap ringV(std::size_t i) const {
    return ConstRowsMap(ringRows(i) + std::size_t(ring_n[i] * kv.rows()), ring_n[i], kv.cols());
  }

  /// The terms KV_i and z_i of ring entry i: kept, or made from its rows.
  Matrix<Scalar> ringTerm(std::size_t i) const {
    if (ring_n[i] == 0) return ring_kv[i];
    return ringK(i).transpose() * ringV(i);
  }
  Vector<Scalar> ringZ(std::size_t i) const {
    if (ring_n[i] == 0) return ring_z[i];
    return ringK(i).colwise().sum().transpose();
  }

  /// Whether a chunk's rows are fewer numbers than its term KV_c = k'^T v.
  static bool rowsAreSmaller(const ConstBlock<Scalar>& kf, const ConstBlock<Scalar>& v) {
    return kf.rows() * (kf.cols() + v.cols()) < kf.cols() * v.cols();
  }

  /// Adds a chunk to the ring as its terms KV_c and z_c.
  void pushTerm(Matrix<Scalar>&& kv_c, Vector<Scalar>&& z_c) {
    ring_numbers += std::size_t(kv_c.size() + z_c.size());
    ring_kv.push_back(std::move(kv_c));
    ring_z.push_back(std::move(z_c));
    ring_block.push_back(0);
    ring_at.push_back(0);
    ring_n.push_back(0);
  }

  /// Adds a chunk of at least one row to the ring as its rows, k' [C, F] and v [C, d_v].
  void pushRows(const ConstBlock<Scalar>& kf, const ConstBlock<Scalar>& v) {
    const Index n = kf.rows(), F = kf.cols();
    const std::size_t size = std::size_t(n * (F + v.cols()));
    if (ring_rows.empty()) {
      ring_rows.emplace_back().reserve(std::max(kRingBlock, size));
      ring_cur = 0;
    } else if (ring_rows[ring_cur].capacity() - ring_rows[ring_cur].size() < size) {
      if (++ring_cur == ring_rows.size()) ring_rows.emplace_back();
      ring_rows[ring_cur].reserve(std::max(kRingBlock, size));  // the next block is empty
    }
    std::vector<Scalar>& block = ring_rows[ring_cur];
    const std::size_t at = block.size();
    block.resize(at + size);  // within the capacity: the block never moves
    RowsMap(block.data() + at, n, F) = kf;
    RowsMap(block.data() + at + std::size_t(n * F), n, v.cols()) = v;
    ring_kv.emplace_back();
    ring_z.emplace_back();
    ring_block.push_back(ring_cur);
    ring_at.push_back(at);
    ring_n.push_back(n);
    ring_numbers += size;
  }

  /// Empties the ring; its blocks of rows stay for the next chunks.
  void clearRing() {
    ring_kv.clear();
    ring_z.clear();
    for (auto& block : ring_rows) block.clear();
    ring_cur = 0;
    ring_block.clear();
    ring_at.clear();
    ring_n.clear();
    ring_numbers = 0;
  }

  /// Chunks currently inside the window (sliding regime).
  std::size_t windowChunks() const { return front_kv.size() - front_pos + ring_kv.size(); }

  /// What this state's window may hold after `chunks` more chunks of at most C rows go
  /// through a window of W chunks (`rows`: the ring may keep a chunk's rows).
  WindowLoad load(double chunks, Index C, Index W, bool rows) const {
    WindowLoad w;
    w.features = double(kv.rows());
    w.value_dim = double(kv.cols());
    w.held = double(ring_numbers);
    w.in_window = double(windowChunks());
    w.front = double(front_kv.size());
    w.chunks = chunks;
    w.chunk = C;
    w.window = W;
    w.rows = rows;
    return w;
  }

  /// The window sum S (and its z) of the last chunk: kv plus the decayed older suffix.
  void windowSum(Scalar gamma, Matrix<Scalar>& s_kv, Vector<Scalar>& s_z) const {
    s_kv = kv;
    s_z = zSum();
    if (front_pos < front_kv.size()) {
      const Scalar g = std::pow(gamma, Scalar(ring_kv.size()));
      s_kv += g * front_kv[front_pos];
      s_z += g * front_z[front_pos];
    }
  }

  /// Drops the oldest chunk of the window, moving the newest chunks to the front first when
  /// the front is used up.
  void dropOldest(Scalar gamma) {
    if (front_pos == front_kv.size()) {
      const std::size_t n = ring_kv.size();
      front_kv.resize(n);
      front_z.resize(n);
      // front[k] = sum_{j >= k} gamma^(n-1-j) term_j: weights relative to the newest chunk.
      Scalar weight = Scalar(1);
      for (std::size_t k = n; k-- > 0;) {
        // Into the front's own matrices, which keep their memory from one rebuild to the next.
        if (ring_n[k] == 0) {
          front_kv[k] = weight * ring_kv[k];
          front_z[k] = weight * ring_z[k];
        } else {
          front_kv[k].noalias() = weight * (ringK(k).transpose() * ringV(k));
          front_z[k].noalias() = weight * ringK(k).colwise().sum().transpose();
        }
        if (k + 1 < n) {
          front_kv[k] += front_kv[k + 1];
          front_z[k] += front_z[k + 1];
        }
        weight *= gamma;
      }
      front_pos = 0;
      clearRing();
      kv.setZero();
      z.setZero();
      zc.setZero();
    }
    ++front_pos;
  }

  /**
   * The state after `later`'s chunks follow this state's (sliding regime, no call in
   * `later` that started inside this state's last chunk): the window keeps the last W of
   * this state's chunks and `later`'s, with the same weights as one state fed both. `later`
   * must not have slid yet unless its own W chunks fill the window.
   */
  CausalHeadState followedBy(const CausalHeadState& later, Scalar gamma, Index W) const {
    const std::size_t nb = later.windowChunks();
    if (Index(nb) >= W || later.front_pos < later.front_kv.size()) return later;
    const std::size_t na = windowChunks(), keep = std::min(na, std::size_t(W) - nb);
    const std::size_t front_left = front_kv.size() - front_pos;
    CausalHeadState out;
    out.reset(kv.rows(), kv.cols());
    if (na - keep <= front_left) {
      // The oldest chunks leave from the front; the ring's sums stay as they are.
      out.front_kv = front_kv;
      out.front_z = front_z;
      out.front_pos = front_pos + (na - keep);
      for (std::size_t i = 0; i < ring_kv.size(); ++i) out.pushTerm(ringTerm(i), ringZ(i));
      out.kv = kv;
      out.z = zSum();
    } else {
      // The front and the oldest ring chunks leave: the ring's decayed sum is made again
      // from the terms that stay (no subtraction).
      for (std::size_t i = ring_kv.size() - keep; i < ring_kv.size(); ++i) {
        out.kv = gamma * out.kv + ringTerm(i);
        out.z = gamma * out.z + ringZ(i);
        out.pushTerm(ringTerm(i), ringZ(i));
      }
    }
    const Scalar g = std::pow(gamma, Scalar(nb));
    out.kv = g * out.kv + later.kv;
    out.z = g * out.z + later.zSum();
    for (std::size_t i = 0; i < later.ring_kv.size(); ++i) {
      out.pushTerm(later.ringTerm(i), later.ringZ(i));
    }
    return out;
  }

  /// Multiplies every stored sum by `factor` (the exp maps' running-maximum rescale).
  void rescale(Scalar factor) {
    kv *= factor;
    z *= factor;
    zc *= factor;
    for (auto& m : ring_kv) m *= factor;
    for (auto& v : ring_z) v *= factor;
    for (std::size_t i = 0; i < ring_n.size(); ++i) {  // rows (the exp maps' streaming
      if (ring_n[i] > 0) {                              // states, the rescaled ones, keep terms)
        RowsMap(ring_rows[ring_block[i]].data() + ring_at[i], ring_n[i], kv.rows()) *= factor;
      }
    }
    for (auto& m : front_kv) m *= factor;
    for (auto& v : front_z) v *= factor;
  }
};

}  // namespace detail
}  // namespace kattn
