#pragma once
/// \file
/// \private The causal windowed kernel (SPEC 3.3, 3.4, 3.5) on one head, written as a state
/// machine so that the whole-sequence pass and every kind of streaming run the same code:
/// the whole pass is a fresh state fed once.
///
/// State after chunk c: S_c = sum_{j<W} gamma^j KV_{c-j} (and z likewise). Two regimes:
/// - no drop (the window covers every chunk, or the reference's recurrent cache): S_c =
///   gamma S_{c-1} + KV_c, computed over groups of chunks with one masked intra-group product
///   and one state product per group, so that the work runs through GEMM;
/// - drop (a window shorter than the sequence): a sliding window over chunk terms kept as
///   two stacks (the "two-stack" sliding-window aggregation): the newest chunks in a decayed
///   running sum plus their raw terms, the oldest as decayed suffix sums. Chunks leave the
///   window without any subtraction, so a window of small values is never polluted by the
///   rounding residue of large values that left it (a running sum minus the dropped term
///   loses all digits there, in float32 completely). O(F d_v) per chunk, amortised.

#include <algorithm>
#include <cmath>
#include <deque>
#include <type_traits>
#include <vector>

#include "bidirectional.hpp"

namespace kattn {
namespace detail {

/// Parameters of the kernel for one call.
struct CausalParams {
  Index chunk = 1;       ///< C
  Index window = 1;      ///< W (only read when drop is set)
  double gamma = 1.0;    ///< decay per chunk, 1 for none
  bool drop = false;     ///< keep a ring and drop chunks older than W
  /// The ring may keep a chunk's rows instead of its term (when fewer numbers: a token's
  /// term is rank one). Not for states that are rescaled (the exp maps' streaming states):
  /// a rescaled term must stay the matrix that save() writes, for bit-exact restores.
  bool compact_ring = true;
};

/// Running state of one (batch row, head).
template <typename Scalar>
struct CausalHeadState {
  Matrix<Scalar> kv;                    ///< [F, d_v] decayed sum of the newest chunks (all of
                                        ///< them without drop)
  Vector<Scalar> z;                     ///< [F] the same for key features
  std::deque<Matrix<Scalar>> ring_kv;   ///< raw terms KV_c of the chunks in kv (drop only);
                                        ///< empty for a chunk kept as rows
  std::deque<Vector<Scalar>> ring_z;    ///< raw terms z_c; empty likewise
  /// The rows of the chunks kept as rows, whose terms are k'^T v and k'^T 1 (a token's are
  /// rank one: F + d_v numbers instead of F d_v): chunk after chunk, k' [C, F] then v [C, d_v],
  /// row-major, in blocks of at least kRingBlock numbers that never reallocate. Not an
  /// allocation per chunk: malloc grows a secondary arena (which threads use once they met
  /// contention) a page at a time with a system call each (kattn_bench W5 on two threads:
  /// 34 microseconds a token that way, 23 in blocks); nor one growing buffer, whose doubling
  /// copies and first-touches all of it inside one step (30 microseconds a token on average).
  /// Emptied blocks stay for the chunks that come after (clearRing, reset), so a state that
  /// goes on, or starts over, writes into memory it already touched.
  std::vector<std::vector<Scalar>> ring_rows;
  std::size_t ring_cur = 0;             ///< the block being filled
  std::vector<std::size_t> ring_block;  ///< per ring entry: the block of its rows
  std::vector<std::size_t> ring_at;     ///< per ring entry: offset of its rows in the block
  std::vector<Index> ring_n;            ///< per ring entry: its rows, 0 for a kept term
  static constexpr std::size_t kRingBlock = std::size_t(1) << 16;
  std::size_t ring_numbers = 0;         ///< numbers the ring's entries hold (rows and terms)
  std::vector<Matrix<Scalar>> front_kv; ///< decayed suffix sums of the older chunks (drop only)
  std::vector<Vector<Scalar>> front_z;
  std::size_t front_pos = 0;            ///< first front entry still inside the window

  void reset(Index F, Index dv) {
    kv.setZero(F, dv);
    z.setZero(F);
    clearRing();
    front_kv.clear();
    front_z.clear();
    front_pos = 0;
  }

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

  /// Chunks currently inside the window (drop regime).
  std::size_t windowChunks() const { return front_kv.size() - front_pos + ring_kv.size(); }

  /**
   * Numbers this state may hold (drop regime) after `chunks` more chunks of at most C rows
   * went through a window of W chunks: the ring as it is plus the new chunks (as rows when
   * `rows` allows and they are smaller than a term, as terms otherwise), with the ring's
   * partly used block of rows; and the front, which becomes up to W sums once the window
   * drops. An upper bound, for the memory limit.
   */
  double numbersAfter(double chunks, Index C, Index W, bool rows) const {
    return windowNumbers(double(kv.rows()), double(kv.cols()), double(ring_numbers),
                         double(windowChunks()), double(front_kv.size()), chunks, C, W, rows);
  }

  /// numbersAfter for a state of F features and d_v values whose ring holds `held` numbers
  /// in `in_window` chunks, with `front` suffix sums: also for a state not yet made.
  static double windowNumbers(double F, double dv, double held, double in_window, double front,
                              double chunks, Index C, Index W, bool rows) {
    const double term = F * (dv + 1);
    const bool as_rows = rows && double(C) * (F + dv) < F * dv;
    const double entry = as_rows ? double(C) * (F + dv) : term;
    const bool drops = in_window + chunks > double(W);
    return term + held + std::min(chunks, double(W)) * entry +
           (as_rows ? double(kRingBlock) : 0.0) + (drops ? double(W) : front) * term;
  }

  /// The window sum S (and its z) of the last chunk: kv plus the decayed older suffix.
  void windowSum(Scalar gamma, Matrix<Scalar>& s_kv, Vector<Scalar>& s_z) const {
    s_kv = kv;
    s_z = z;
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
        front_kv[k] = weight * ringTerm(k);
        front_z[k] = weight * ringZ(k);
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
    }
    ++front_pos;
  }

  /// Multiplies every stored sum by `factor` (the exp maps' running-maximum rescale).
  void rescale(Scalar factor) {
    kv *= factor;
    z *= factor;
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

/// Whether every entry of m is finite, in one vectorised sum: 0 * x is 0 exactly when x is
/// finite (Eigen's allFinite tests element by element, which showed up in profiles).
template <typename Derived>
bool allFiniteFast(const Eigen::MatrixBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  return (m.array() * Scalar(0)).sum() == Scalar(0);
}

/// Rows per group in the no-drop regime with chunks longer than one row: whole chunks, about
/// 16 rows. A group costs 2 F d_v per row in state products and L (F + d_v) in its masked
/// intra-group products, so small groups waste less, as long as the products stay large
/// enough to run fast (kattn_bench W3 on one thread, medians of 3, when chunk 1 still took
/// this path: groups of 64, 32 and 16 rows took 56, 47 and 44 ms at T = 16384; the row by row
/// kernel that chunk 1 takes now, 35 ms).
inline Index groupRows(Index chunk) {
  const Index target = 16;
  return chunk >= target ? chunk : chunk * ((target + chunk - 1) / chunk);
}

/// Scalars in one SIMD register (Eigen's packet): the register-blocked token kernels below
/// size their panels by it, so that a panel's sums and values fit the 16 vector registers of
/// SSE and AVX2 (panels sized for AVX-512's 32 spilled on AVX2: on a 2-core Zen 3, sizing
/// them by the registers took the one-token decode step, kattn_bench W5/recurrent, from 6.6
/// to 5.1-5.5 microseconds and W3/16384 on one thread from 118 to 99 ms, min of 3 alternating
/// runs).
template <typename Scalar>
inline constexpr int kPacket = Eigen::internal::packet_traits<Scalar>::size;

/// Columns of the state that causalToken carries through one pass over its rows: four
/// registers' worth, so that the panel's two readout sums and its values (12 registers) stay
/// in registers.
template <typename Scalar>
inline constexpr int kTokenPanel = 4 * kPacket<Scalar>;

/**
 * causalToken on the state's columns [c0, c0 + kTokenPanel). Rows go in pairs with a readout
 * sum each: the two sums' additions do not wait for each other (one sum made the loop wait on
 * the addition's latency). Decays is a template argument so that the loop holds no test of
 * gamma. Written with Eigen's packet functions and one named variable per register: written
 * with fixed-size Eigen row vectors (or arrays of packets), GCC 12 kept the sums and values on
 * the stack, zeroed them with `rep stos` on every call and reloaded them in the loop
 * (kattn_bench W5/recurrent, medians of 3 alternating runs on a 2-core Zen 3: 5.72 -> 4.67
 * microseconds a token on one thread, 6.00 -> 4.83 on two).
 */
template <bool Decays, typename Scalar>
void causalTokenPanel(Scalar gamma, Matrix<Scalar>& kv, const Scalar* q, const Scalar* k,
                      const Scalar* v, Index c0, Scalar self, Scalar den, Scalar* out) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  constexpr Index N = kPacket<Scalar>;
  static_assert(kTokenPanel<Scalar> == 4 * N, "the kernel below holds four packets a row");
  const Packet v0 = ploadu<Packet>(v + c0), v1 = ploadu<Packet>(v + c0 + N),
               v2 = ploadu<Packet>(v + c0 + 2 * N), v3 = ploadu<Packet>(v + c0 + 3 * N);
  const Packet zero = pset1<Packet>(Scalar(0)), g = pset1<Packet>(gamma);
  Packet e0 = zero, e1 = zero, e2 = zero, e3 = zero;  // readout of the even rows
  Packet o0 = zero, o1 = zero, o2 = zero, o3 = zero;  // and of the odd rows
  // r <- gamma r + k v for the old row a.
  auto update = [&](Scalar* r, const Packet& kf, const Packet& a, const Packet& vp) {
    if constexpr (Decays) {
      pstoreu(r, pmadd(kf, vp, pmul(g, a)));
    } else {
      pstoreu(r, pmadd(kf, vp, a));
    }
  };
  const Index F = kv.rows(), stride = kv.cols();
  Scalar* row = kv.data() + c0;
  Index f = 0;
  for (; f + 2 <= F; f += 2, row += 2 * stride) {
    Scalar* next = row + stride;
    const Packet a0 = ploadu<Packet>(row), a1 = ploadu<Packet>(row + N),
                 a2 = ploadu<Packet>(row + 2 * N), a3 = ploadu<Packet>(row + 3 * N);
    const Packet b0 = ploadu<Packet>(next), b1 = ploadu<Packet>(next + N),
                 b2 = ploadu<Packet>(next + 2 * N), b3 = ploadu<Packet>(next + 3 * N);
    const Packet qa = pset1<Packet>(q[f]), qb = pset1<Packet>(q[f + 1]);
    e0 = pmadd(qa, a0, e0);
    e1 = pmadd(qa, a1, e1);
    e2 = pmadd(qa, a2, e2);
    e3 = pmadd(qa, a3, e3);
    o0 = pmadd(qb, b0, o0);
    o1 = pmadd(qb, b1, o1);
    o2 = pmadd(qb, b2, o2);
    o3 = pmadd(qb, b3, o3);
    const Packet ka = pset1<Packet>(k[f]), kb = pset1<Packet>(k[f + 1]);
    update(row, ka, a0, v0);
    update(row + N, ka, a1, v1);
    update(row + 2 * N, ka, a2, v2);
    update(row + 3 * N, ka, a3, v3);
    update(next, kb, b0, v0);
    update(next + N, kb, b1, v1);
    update(next + 2 * N, kb, b2, v2);
    update(next + 3 * N, kb, b3, v3);
  }
  if (f < F) {
    const Packet a0 = ploadu<Packet>(row), a1 = ploadu<Packet>(row + N),
                 a2 = ploadu<Packet>(row + 2 * N), a3 = ploadu<Packet>(row + 3 * N);
    const Packet qa = pset1<Packet>(q[f]), ka = pset1<Packet>(k[f]);
    e0 = pmadd(qa, a0, e0);
    e1 = pmadd(qa, a1, e1);
    e2 = pmadd(qa, a2, e2);
    e3 = pmadd(qa, a3, e3);
    update(row, ka, a0, v0);
    update(row + N, ka, a1, v1);
    update(row + 2 * N, ka, a2, v2);
    update(row + 3 * N, ka, a3, v3);
  }
  // a = (gamma q'S + (q'.k') v) / den, a division as in causalTokenBlockPanel.
  const Packet s = pset1<Packet>(self), d = pset1<Packet>(den);
  auto emit = [&](Index j, const Packet& e, const Packet& o, const Packet& vp) {
    pstoreu(out + c0 + j * N, pdiv(pmadd(g, padd(e, o), pmul(s, vp)), d));
  };
  emit(0, e0, o0, v0);
  emit(1, e1, o1, v1);
  emit(2, e2, o2, v2);
  emit(3, e3, o3, v3);
}

/// causalTokenPanel on the last columns [c0, d_v) when they are fewer than kTokenPanel.
template <bool Decays, typename Scalar>
void causalTokenTail(Scalar gamma, Matrix<Scalar>& kv, const Scalar* q, const Scalar* k,
                     const Scalar* v, Index c0, Scalar self, Scalar den, Scalar* out) {
  using Panel =
      Eigen::Matrix<Scalar, 1, Eigen::Dynamic, Eigen::RowMajor, 1, kTokenPanel<Scalar>>;
  const Index F = kv.rows(), stride = kv.cols(), width = stride - c0;
  const Panel vp = Eigen::Map<const Panel>(v + c0, width);
  Panel sum = Panel::Zero(width);
  Scalar* row = kv.data() + c0;
  for (Index f = 0; f < F; ++f, row += stride) {
    Eigen::Map<Panel> r(row, width);
    sum += q[f] * r;
    r = (Decays ? gamma : Scalar(1)) * r + k[f] * vp;
  }
  Eigen::Map<Panel>(out + c0, width) = (gamma * sum + self * vp) / den;
}

/**
 * One token that is a chunk of its own (a one-token call: a decode step): with
 * S <- gamma S + k'^T v, a = q'S / (q'z + eps) = (gamma q'KV + (q'.k') v) / (gamma q'z +
 * q'.k' + eps). One pass over the state's rows reads each for the readout before updating it,
 * a panel of columns at a time with its readout in registers: the state is read once, and no
 * partial sum goes through memory.
 */
template <typename Scalar>
void causalToken(Scalar gamma, CausalHeadState<Scalar>& st, const ConstBlock<Scalar>& qf,
                 const ConstBlock<Scalar>& kf, const ConstBlock<Scalar>& v, Block<Scalar> out) {
  constexpr int W = kTokenPanel<Scalar>;
  const Scalar self = qf.row(0).dot(kf.row(0));
  const Scalar den = gamma * qf.row(0).dot(st.z) + self + Scalar(kNormaliserEps);
  const Index dv = st.kv.cols();
  // Raw pointers: Eigen's packet stores may alias anything, so through the blocks the loops
  // reloaded their data pointers after every store.
  const Scalar *q = qf.data(), *k = kf.data(), *vr = v.data();
  Scalar* o = out.data();
  auto panels = [&](auto decays) {
    constexpr bool D = decltype(decays)::value;
    Index c0 = 0;
    for (; c0 + W <= dv; c0 += W) {
      causalTokenPanel<D, Scalar>(gamma, st.kv, q, k, vr, c0, self, den, o);
    }
    if (c0 < dv) causalTokenTail<D, Scalar>(gamma, st.kv, q, k, vr, c0, self, den, o);
  };
  if (gamma == Scalar(1)) {
    panels(std::false_type{});
  } else {
    panels(std::true_type{});
  }
  st.z = gamma * st.z + kf.row(0).transpose();
}

/// Tokens that causalTokens takes through one pass over the state: the block's four readout
/// sums, its four values and a state row (9 packets) stay in registers for one packet of the
/// state's columns.
inline constexpr int kTokenBlock = 4;

/// What causalTokenBlockPanel needs of a block of kTokenBlock tokens, l = 0 .. 3: rows of
/// q' and of k' weighted by gamma^(3 - l); intra-block weights s(l, j) = gamma^(l - j) q'_l.k'_j
/// (j <= l); readout factors gamma^(l + 1), normalisers den_l; gamma^4.
template <typename Scalar>
struct TokenBlock {
  const Scalar* q[kTokenBlock];
  const Scalar* k[kTokenBlock];
  const Scalar* v[kTokenBlock];
  Scalar s[kTokenBlock][kTokenBlock];
  Scalar g_out[kTokenBlock];
  Scalar den[kTokenBlock];
  Scalar g_state;
};

/**
 * causalTokens' pass for one block over one packet of the state's columns, [c0, c0 +
 * kPacket): one load and one store of each state row for four tokens, where causalToken
 * stores it four times (with its four loads and stores per row the one-token kernel is bound
 * by the stores as much as by its multiply-adds). Eigen's packet functions, one variable per
 * register, as causalTokenPanel; the new row sums its four key terms in two halves, so that
 * its store waits for three multiply-adds in a row, not four (kattn_bench W3 at T = 4096 and
 * 16384 on one and two threads, medians of 5 alternating runs against fixed-size Eigen row
 * vectors on a 2-core Zen 3: 0.84-1.00 of the old time, W3/16384 on two threads 62.5 -> 52.2
 * ms).
 */
template <bool Decays, typename Scalar>
void causalTokenBlockPanel(const TokenBlock<Scalar>& b, Matrix<Scalar>& kv, Index c0,
                           Scalar* const out[kTokenBlock]) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<Scalar>::type;
  auto splat = [](Scalar x) { return pset1<Packet>(x); };
  const Packet v0 = ploadu<Packet>(b.v[0] + c0), v1 = ploadu<Packet>(b.v[1] + c0),
               v2 = ploadu<Packet>(b.v[2] + c0), v3 = ploadu<Packet>(b.v[3] + c0);
  const Packet zero = splat(Scalar(0)), g_state = splat(b.g_state);
  Packet a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  const Scalar *q0 = b.q[0], *q1 = b.q[1], *q2 = b.q[2], *q3 = b.q[3];
  const Scalar *k0 = b.k[0], *k1 = b.k[1], *k2 = b.k[2], *k3 = b.k[3];
  const Index F = kv.rows(), stride = kv.cols();
  Scalar* row = kv.data() + c0;
  for (Index f = 0; f < F; ++f, row += stride) {
    const Packet old = ploadu<Packet>(row);
    a0 = pmadd(splat(q0[f]), old, a0);
    a1 = pmadd(splat(q1[f]), old, a1);
    a2 = pmadd(splat(q2[f]), old, a2);
    a3 = pmadd(splat(q3[f]), old, a3);
    const Packet kept = Decays ? pmul(g_state, old) : old;
    const Packet first = pmadd(splat(k1[f]), v1, pmadd(splat(k0[f]), v0, kept));
    const Packet second = pmadd(splat(k3[f]), v3, pmul(splat(k2[f]), v2));
    pstoreu(row, padd(first, second));
  }
  // Token l sees the tokens before it in the block through s(l, j) only: a later token's
  // value never meets a zero weight here (0 * Inf), as in the one-token kernel.
  const auto& s = b.s;
  // A division, not a product with 1 / den: den may be tiny where the map's features can
  // be negative (identity), and 1 / den would overflow where the quotient does not.
  auto emit = [&](int l, const Packet& a, const Packet& own) {
    pstoreu(out[l] + c0, pdiv(pmadd(splat(b.g_out[l]), a, own), splat(b.den[l])));
  };
  emit(0, a0, pmul(splat(s[0][0]), v0));
  emit(1, a1, pmadd(splat(s[1][1]), v1, pmul(splat(s[1][0]), v0)));
  emit(2, a2, pmadd(splat(s[2][2]), v2, pmadd(splat(s[2][1]), v1, pmul(splat(s[2][0]), v0))));
  emit(3, a3,
       pmadd(splat(s[3][3]), v3,
             pmadd(splat(s[3][2]), v2, pmadd(splat(s[3][1]), v1, pmul(splat(s[3][0]), v0)))));
}

/// causalTokenBlockPanel on the last columns [c0, d_v) when they are fewer than a packet.
template <bool Decays, typename Scalar>
void causalTokenBlockTail(const TokenBlock<Scalar>& b, Matrix<Scalar>& kv, Index c0,
                          Scalar* const out[kTokenBlock]) {
  using Panel = Eigen::Matrix<Scalar, 1, Eigen::Dynamic, Eigen::RowMajor, 1, kPacket<Scalar>>;
  using ConstMap = Eigen::Map<const Panel>;
  const Index F = kv.rows(), stride = kv.cols(), width = stride - c0;
  const Panel v0 = ConstMap(b.v[0] + c0, width), v1 = ConstMap(b.v[1] + c0, width),
              v2 = ConstMap(b.v[2] + c0, width), v3 = ConstMap(b.v[3] + c0, width);
  Panel a0 = Panel::Zero(width), a1 = Panel::Zero(width), a2 = Panel::Zero(width),
        a3 = Panel::Zero(width);
  Scalar* row = kv.data() + c0;
  for (Index f = 0; f < F; ++f, row += stride) {
    Eigen::Map<Panel> r(row, width);
    const Panel old = r;
    a0 += b.q[0][f] * old;
    a1 += b.q[1][f] * old;
    a2 += b.q[2][f] * old;
    a3 += b.q[3][f] * old;
    r = (Decays ? b.g_state : Scalar(1)) * old + b.k[0][f] * v0 + b.k[1][f] * v1 +
        b.k[2][f] * v2 + b.k[3][f] * v3;
  }
  const auto& s = b.s;
  Eigen::Map<Panel>(out[0] + c0, width) = (b.g_out[0] * a0 + s[0][0] * v0) / b.den[0];
  Eigen::Map<Panel>(out[1] + c0, width) =
      (b.g_out[1] * a1 + s[1][0] * v0 + s[1][1] * v1) / b.den[1];
  Eigen::Map<Panel>(out[2] + c0, width) =
      (b.g_out[2] * a2 + s[2][0] * v0 + s[2][1] * v1 + s[2][2] * v2) / b.den[2];
  Eigen::Map<Panel>(out[3] + c0, width) =
      (b.g_out[3] * a3 + s[3][0] * v0 + s[3][1] * v1 + s[3][2] * v2 + s[3][3] * v3) /
      b.den[3];
}

/**
 * Rows [0, L) of a pass where every row is a chunk of its own and nothing drops (token-level
 * attention): causalToken's recurrence, kTokenBlock tokens per pass over the state. With S
 * the state before the block, token l reads
 *   a_l = (gamma^(l+1) q'_l S + sum_{j<=l} gamma^(l-j) (q'_l.k'_j) v_j) / den_l,
 *   den_l = gamma^(l+1) q'_l z + sum_{j<=l} gamma^(l-j) q'_l.k'_j + eps,
 * and the state becomes gamma^4 S + sum_l gamma^(3-l) k'_l^T v_l. The rows left over go
 * through causalToken. `wk` is scratch for the weighted key rows.
 */
template <typename Scalar>
void causalTokens(Scalar gamma, CausalHeadState<Scalar>& st, const ConstBlock<Scalar>& qf,
                  const ConstBlock<Scalar>& kf, const ConstBlock<Scalar>& v, Matrix<Scalar>& wk,
                  Block<Scalar> out) {
  constexpr int B = kTokenBlock;
  const Index L = qf.rows(), F = qf.cols(), dv = v.cols();
  const bool decays = gamma != Scalar(1);
  Scalar gpow[B + 1];
  gpow[0] = Scalar(1);
  for (int i = 1; i <= B; ++i) gpow[i] = gpow[i - 1] * gamma;
  if (decays && L >= B) wk.resize(B, F);  // not for a decode step: it takes causalToken alone
  TokenBlock<Scalar> b;
  b.g_state = gpow[B];
  Scalar* rows_out[B];
  Index t = 0;
  for (; t + B <= L; t += B) {
    for (Index a = t + kPrefetchRows; a < std::min(L, t + kPrefetchRows + B); ++a) {
      prefetchRow(v.row(a).data(), dv);
      prefetchRow(out.row(a).data(), dv);
    }
    for (int l = 0; l < B; ++l) {
      b.q[l] = qf.row(t + l).data();
      b.v[l] = v.row(t + l).data();
      rows_out[l] = out.row(t + l).data();
      if (decays) {
        wk.row(l) = gpow[B - 1 - l] * kf.row(t + l);
        b.k[l] = wk.row(l).data();
      } else {
        b.k[l] = kf.row(t + l).data();
      }
    }
    for (int l = 0; l < B; ++l) {
      Scalar den = gpow[l + 1] * qf.row(t + l).dot(st.z) + Scalar(kNormaliserEps);
      for (int j = 0; j <= l; ++j) {
        b.s[l][j] = gpow[l - j] * qf.row(t + l).dot(kf.row(t + j));
        den += b.s[l][j];
      }
      b.g_out[l] = gpow[l + 1];
      b.den[l] = den;
    }
    auto panels = [&](auto decays_tag) {
      constexpr bool D = decltype(decays_tag)::value;
      constexpr int W = kPacket<Scalar>;
      Index c0 = 0;
      for (; c0 + W <= dv; c0 += W) causalTokenBlockPanel<D, Scalar>(b, st.kv, c0, rows_out);
      if (c0 < dv) causalTokenBlockTail<D, Scalar>(b, st.kv, c0, rows_out);
    };
    if (decays) {
      panels(std::true_type{});
      st.z = gpow[B] * st.z + wk.colwise().sum().transpose();
    } else {
      panels(std::false_type{});
      st.z += kf.middleRows(t, B).colwise().sum().transpose();
    }
  }
  for (; t < L; ++t) {
    causalToken<Scalar>(gamma, st, qf.row(t), kf.row(t), v.row(t), out.row(t));
  }
}

/// Buffers of causalGroup, reused across the groups of one causalProcess call (a group is
/// small, so allocating them per group would cost as much as its products).
template <typename Scalar>
struct CausalScratch {
  Matrix<Scalar> scores, wk, finite_v, base;
  Vector<Scalar> den, gpow;
  std::vector<Index> chunk_end;  // per row: one past the last row of its chunk
};

/// Readout and state update for a group of whole chunks, rows [0, L); `chunk_of[r]` is the
/// group-local chunk of row r (non-decreasing, from 0). No drop.
template <typename Scalar>
void causalGroup(const CausalParams& p, CausalHeadState<Scalar>& st, const ConstBlock<Scalar>& qf,
                 const ConstBlock<Scalar>& kf, const ConstBlock<Scalar>& v,
                 const std::vector<Index>& chunk_of, CausalScratch<Scalar>& sc,
                 Block<Scalar> out) {
  const Index L = qf.rows();
  const Index n_chunks = L ? chunk_of[L - 1] + 1 : 0;
  const Scalar gamma = Scalar(p.gamma);
  const bool decays = p.gamma != 1.0;
  const Scalar eps = Scalar(kNormaliserEps);

  if (n_chunks == 1 && L * (qf.cols() + v.cols()) > 2 * qf.cols() * v.cols()) {
    // A single chunk whose rows all see each other (C above the group size, or a recurrent
    // call of many tokens): the low-rank form, S <- gamma S + k'^T v, a = q'S / (q'z + eps),
    // is cheaper than the L x L scores and needs no L x L memory.
    if (decays) {
      st.kv *= gamma;
      st.z *= gamma;
    }
    st.kv.noalias() += kf.transpose() * v;
    st.z += kf.colwise().sum().transpose();
    Vector<Scalar>& den = sc.den;
    den.noalias() = qf * st.z;
    den.array() += eps;
    out.noalias() = qf * st.kv;
    divideRows<Scalar>(out, den);
    return;
  }

  // gamma^dc for every chunk distance in the group, so the L x L loop does no pow.
  Vector<Scalar>& gpow = sc.gpow;
  gpow.resize(n_chunks + 1);
  gpow(0) = Scalar(1);
  for (Index c = 1; c <= n_chunks; ++c) gpow(c) = gpow(c - 1) * gamma;
  std::vector<Index>& chunk_end = sc.chunk_end;
  chunk_end.resize(std::size_t(L));
  for (Index t = L; t-- > 0;) {
    chunk_end[std::size_t(t)] =
        t + 1 == L || chunk_of[t + 1] != chunk_of[t] ? t + 1 : chunk_end[std::size_t(t + 1)];
  }

  Matrix<Scalar>& scores = sc.scores;
  scores.noalias() = qf * kf.transpose();  // [L, L]
  for (Index t = 0; t < L; ++t) {
    const Index e = chunk_end[std::size_t(t)];
    scores.row(t).tail(L - e).setZero();  // keys of later chunks
    if (decays) {
      for (Index s = 0; s < e; ++s) scores(t, s) *= gpow(chunk_of[t] - chunk_of[s]);
    }
  }
  Vector<Scalar>& den = sc.den;
  den.noalias() = qf * st.z;
  out.noalias() = qf * st.kv;
  if (decays) {
    for (Index t = 0; t < L; ++t) {
      const Scalar g = gpow(chunk_of[t] + 1);
      den(t) *= g;
      out.row(t) *= g;
    }
  }
  // The first row of v with a non-finite entry (rare).
  Index bad = L;
  if (!allFiniteFast(v)) {
    bad = 0;
    while (bad < L && v.row(bad).allFinite()) ++bad;
  }
  if (bad == L) {
    out.noalias() += scores * v;
  } else {
    // 0 * Inf = NaN would carry a future non-finite value to earlier rows through the zeroed
    // scores. Rows before its chunk take the product with those values zeroed (bit for bit
    // what they get without them); the later rows sum over their own past only.
    sc.base = out;
    sc.finite_v = v;
    for (Index s = bad; s < L; ++s)
      if (!v.row(s).allFinite()) sc.finite_v.row(s).setZero();
    out.noalias() += scores * sc.finite_v;
    for (Index t = 0; t < L; ++t) {
      if (chunk_of[t] < chunk_of[bad]) continue;
      const Index e = chunk_end[std::size_t(t)];
      out.row(t).noalias() = sc.base.row(t) + scores.row(t).head(e) * v.topRows(e);
    }
  }
  den += scores.rowwise().sum();
  den.array() += eps;
  divideRows<Scalar>(out, den);

  if (decays) {
    st.kv *= gpow(n_chunks);
    st.z *= gpow(n_chunks);
    sc.wk = kf;
    for (Index s = 0; s < L; ++s) sc.wk.row(s) *= gpow(n_chunks - 1 - chunk_of[s]);
    st.kv.noalias() += sc.wk.transpose() * v;
    st.z += sc.wk.colwise().sum().transpose();
  } else {
    st.kv.noalias() += kf.transpose() * v;
    st.z += kf.colwise().sum().transpose();
  }
}

/// One chunk in the drop regime: drop the chunk W back, add this chunk, read out.
template <typename Scalar>
void causalDropChunk(const CausalParams& p, CausalHeadState<Scalar>& st,
                     const ConstBlock<Scalar>& qf, const ConstBlock<Scalar>& kf,
                     const ConstBlock<Scalar>& v, Block<Scalar> out) {
  const Scalar gamma = Scalar(p.gamma);
  if (Index(st.windowChunks()) >= p.window) st.dropOldest(gamma);
  const bool front_empty = st.front_pos == st.front_kv.size();
  if (p.compact_ring && front_empty && kf.rows() == 1) {
    // A one-token chunk with nothing older in the window: the state is kv alone, so this is
    // the one-token kernel of the no-drop pass, and the ring keeps the token's rows.
    causalToken<Scalar>(gamma, st, qf, kf, v, out);
    st.pushRows(kf, v);
    return;
  }
  if (p.compact_ring && st.rowsAreSmaller(kf, v)) {
    // The ring keeps the rows, so the terms are never made: they go into kv and z directly.
    if (gamma != Scalar(1)) {
      st.kv *= gamma;
      st.z *= gamma;
    }
    st.kv.noalias() += kf.transpose() * v;
    st.z += kf.colwise().sum().transpose();
    st.pushRows(kf, v);
  } else {
    Matrix<Scalar> kv_c = kf.transpose() * v;
    Vector<Scalar> z_c = kf.colwise().sum().transpose();
    st.kv = gamma * st.kv + kv_c;
    st.z = gamma * st.z + z_c;
    st.pushTerm(std::move(kv_c), std::move(z_c));
  }
  // The window's sum is kv plus the decayed older suffix (windowSum), read out here without
  // forming it: two products instead of a copy of the state per chunk.
  Vector<Scalar> den = (qf * st.z).array() + Scalar(kNormaliserEps);
  out.noalias() = qf * st.kv;
  if (!front_empty) {
    const Scalar g = std::pow(gamma, Scalar(st.ring_kv.size()));
    den.noalias() += g * (qf * st.front_z[st.front_pos]);
    out.noalias() += g * (qf * st.front_kv[st.front_pos]);
  }
  divideRows<Scalar>(out, den);
}

/**
 * Feeds rows [0, L) to the state; the first chunk of the call has C - lead rows (lead > 0 for
 * left padding: those rows are zero and add nothing); a last chunk may be short (right
 * padding). out [L, d_v] receives the attention of every row.
 */
template <typename Scalar>
void causalProcess(const CausalParams& p, CausalHeadState<Scalar>& st,
                   const ConstBlock<Scalar>& qf, const ConstBlock<Scalar>& kf,
                   const ConstBlock<Scalar>& v, Index lead, Block<Scalar> out) {
  const Index L = qf.rows();
  const Index C = p.chunk;
  if (!p.drop && (L == 1 || C == 1)) {
    // Every row a chunk of its own (a decode step, or token-level attention): the recurrence,
    // a few tokens per pass over the state. Each token sums over its own past only, which
    // also keeps a non-finite value from reaching earlier rows (the group path's care).
    Matrix<Scalar> wk;
    causalTokens<Scalar>(Scalar(p.gamma), st, qf, kf, v, wk, out);
    return;
  }
  Index r = 0;
  std::vector<Index> chunk_of;
  CausalScratch<Scalar> scratch;
  while (r < L) {
    if (p.drop) {
      const Index len = std::min(L - r, (r == 0 ? C - lead : C));
      causalDropChunk<Scalar>(p, st, qf.middleRows(r, len), kf.middleRows(r, len),
                              v.middleRows(r, len), out.middleRows(r, len));
      r += len;
      continue;
    }
    // A group of whole chunks of about groupRows(C) rows.
    const Index target = groupRows(C);
    chunk_of.clear();
    Index len = 0, c = 0;
    while (r + len < L && len < target) {
      const Index clen = std::min(L - r - len, (r + len == 0 ? C - lead : C));
      chunk_of.insert(chunk_of.end(), clen, c++);
      len += clen;
    }
    causalGroup<Scalar>(p, st, qf.middleRows(r, len), kf.middleRows(r, len), v.middleRows(r, len),
                        chunk_of, scratch, out.middleRows(r, len));
    r += len;
  }
}

}  // namespace detail
}  // namespace kattn
