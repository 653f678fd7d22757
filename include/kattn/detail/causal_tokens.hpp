#pragma once
/// \file
/// \private The token-level causal kernels: every row a chunk of its own and nothing leaving
/// the window (a decode step, or prefix-sum attention), register-blocked over the state's
/// columns with Eigen's packet functions.

#include <type_traits>

#include "../assert.hpp"
#include "causal_state.hpp"

namespace kattn {
namespace detail {

/// Scalars in one SIMD register (Eigen's packet): the register-blocked token kernels below
/// size their panels by it, so that a panel's sums and values fit the 16 vector registers of
/// SSE and AVX2 (panels sized for AVX-512's 32 registers spill on AVX2).
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
 * the stack, zeroed them with `rep stos` on every call and reloaded them in the loop.
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
  KATTN_ASSERT(c0 >= 0 && c0 + kTokenPanel<Scalar> <= stride);
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
  auto storeOut = [&](Index j, const Packet& e, const Packet& o, const Packet& vp) {
    pstoreu(out + c0 + j * N, pdiv(pmadd(g, padd(e, o), pmul(s, vp)), d));
  };
  storeOut(0, e0, o0, v0);
  storeOut(1, e1, o1, v1);
  storeOut(2, e2, o2, v2);
  storeOut(3, e3, o3, v3);
}

/// causalTokenPanel on the last columns [c0, d_v) when they are fewer than kTokenPanel.
template <bool Decays, typename Scalar>
void causalTokenTail(Scalar gamma, Matrix<Scalar>& kv, const Scalar* q, const Scalar* k,
                     const Scalar* v, Index c0, Scalar self, Scalar den, Scalar* out) {
  using Panel =
      Eigen::Matrix<Scalar, 1, Eigen::Dynamic, Eigen::RowMajor, 1, kTokenPanel<Scalar>>;
  const Index F = kv.rows(), stride = kv.cols(), width = stride - c0;
  KATTN_ASSERT(width > 0 && width <= kTokenPanel<Scalar>);
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
  KATTN_ASSERT(qf.rows() == 1 && kf.rows() == 1 && v.rows() == 1 && out.rows() == 1);
  KATTN_ASSERT(qf.cols() == st.kv.rows() && kf.cols() == st.kv.rows() && st.z.size() == st.kv.rows());
  KATTN_ASSERT(v.cols() == st.kv.cols() && out.cols() == st.kv.cols());
  // The raw-pointer panels read each row as contiguous.
  KATTN_ASSERT(v.innerStride() == 1 && out.innerStride() == 1);
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
  st.addToZ(gamma, kf.row(0).transpose());
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
 * its store waits for three multiply-adds in a row, not four.
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
  KATTN_ASSERT(c0 >= 0 && c0 + kPacket<Scalar> <= stride);
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
  auto storeOut = [&](int l, const Packet& a, const Packet& own) {
    pstoreu(out[l] + c0, pdiv(pmadd(splat(b.g_out[l]), a, own), splat(b.den[l])));
  };
  storeOut(0, a0, pmul(splat(s[0][0]), v0));
  storeOut(1, a1, pmadd(splat(s[1][1]), v1, pmul(splat(s[1][0]), v0)));
  storeOut(2, a2, pmadd(splat(s[2][2]), v2, pmadd(splat(s[2][1]), v1, pmul(splat(s[2][0]), v0))));
  storeOut(3, a3,
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
  KATTN_ASSERT(width > 0 && width <= kPacket<Scalar>);
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
 * Rows [0, L) of a pass where every row is a chunk of its own and nothing leaves the window (token-level
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
  KATTN_ASSERT(kf.rows() == L && v.rows() == L && out.rows() == L);
  KATTN_ASSERT(kf.cols() == F && st.kv.rows() == F && st.kv.cols() == dv && out.cols() == dv);
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
      st.addToZ(gpow[B], wk.colwise().sum().transpose());
    } else {
      panels(std::false_type{});
      st.addToZ(Scalar(1), kf.middleRows(t, B).colwise().sum().transpose());
    }
  }
  for (; t < L; ++t) {
    causalToken<Scalar>(gamma, st, qf.row(t), kf.row(t), v.row(t), out.row(t));
  }
}

/**
 * Unnormalised token-level linear attention over the rows of a block, walked first to last
 * (Reverse = false) or last to first: out_t = q_t S_t with S_t = gamma S_prev + k_t^T v_t,
 * S_prev the state after the row walked before t, so that row t sees itself and the rows walked
 * before it, the one j steps earlier weighted gamma^j. `state` [K, V] carries S from the block
 * walked before and is left at the sum after the last row. The causal backward's products are
 * scans of this kind, so they run on causalTokens' register kernel with normalisers of 1.
 * q, k [L, K], v [L, V], out [L, V], each with contiguous rows; `wk` is scratch.
 */
template <bool Reverse, typename Scalar, typename Q, typename K, typename V, typename Out>
void linearScan(Scalar gamma, Matrix<Scalar>& state, const Q& q, const K& k, const V& v,
                Matrix<Scalar>& wk, Out& out) {
  constexpr int B = kTokenBlock;
  const Index L = q.rows(), F = q.cols(), dv = v.cols();
  KATTN_ASSERT(k.rows() == L && v.rows() == L && out.rows() == L);
  KATTN_ASSERT(k.cols() == F && state.rows() == F && state.cols() == dv && out.cols() == dv);
  KATTN_ASSERT(q.innerStride() == 1 && k.innerStride() == 1 && v.innerStride() == 1 &&
               out.innerStride() == 1);
  auto at = [L](Index i) { return Reverse ? L - 1 - i : i; };
  const bool decays = gamma != Scalar(1);
  Scalar gpow[B + 1];
  gpow[0] = Scalar(1);
  for (int i = 1; i <= B; ++i) gpow[i] = gpow[i - 1] * gamma;
  if (decays) wk.resize(B, F);
  TokenBlock<Scalar> b;
  b.g_state = gpow[B];
  Scalar* rows_out[B];
  Index i = 0;
  for (; i + B <= L; i += B) {
    for (int l = 0; l < B; ++l) {
      const Index r = at(i + l);
      b.q[l] = q.row(r).data();
      b.v[l] = v.row(r).data();
      rows_out[l] = out.row(r).data();
      if (decays) {
        wk.row(l) = gpow[B - 1 - l] * k.row(r);
        b.k[l] = wk.row(l).data();
      } else {
        b.k[l] = k.row(r).data();
      }
      for (int j = 0; j <= l; ++j) b.s[l][j] = gpow[l - j] * q.row(r).dot(k.row(at(i + j)));
      b.g_out[l] = gpow[l + 1];
      b.den[l] = Scalar(1);
    }
    auto panels = [&](auto decays_tag) {
      constexpr bool D = decltype(decays_tag)::value;
      constexpr int W = kPacket<Scalar>;
      Index c0 = 0;
      for (; c0 + W <= dv; c0 += W) causalTokenBlockPanel<D, Scalar>(b, state, c0, rows_out);
      if (c0 < dv) causalTokenBlockTail<D, Scalar>(b, state, c0, rows_out);
    };
    if (decays) {
      panels(std::true_type{});
    } else {
      panels(std::false_type{});
    }
  }
  for (; i < L; ++i) {  // at most B - 1 rows: Eigen's products
    const Index r = at(i);
    if (decays) state *= gamma;
    state.noalias() += k.row(r).transpose() * v.row(r);
    out.row(r).noalias() = q.row(r) * state;
  }
}

}  // namespace detail
}  // namespace kattn
