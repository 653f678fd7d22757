#pragma once
/// \file
/// \private The chunked causal kernels (SPEC 3.3): groups of whole chunks through GEMM with a
/// masked intra-group product in the fixed-window regime, one chunk at a time in the sliding
/// one, and causalProcess, which feeds a block of rows to a head's state by the right kernel.

#include <algorithm>
#include <cmath>
#include <vector>

#include "../assert.hpp"
#include "causal_state.hpp"
#include "causal_tokens.hpp"

namespace kattn {
namespace detail {

/// Whether every entry of m is finite, in one vectorised sum: 0 * x is 0 exactly when x is
/// finite (Eigen's allFinite tests element by element, which showed up in profiles).
template <typename Derived>
bool allFiniteFast(const Eigen::MatrixBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  return (m.array() * Scalar(0)).sum() == Scalar(0);
}
/// Rows per group in the fixed-window regime with chunks longer than one row: whole chunks,
/// about 16 rows. A group costs 2 F d_v per row in state products and L (F + d_v) in its masked
/// intra-group products, so small groups waste less, as long as the products stay large enough
/// to run fast (benchmarks/README.md has the group sizes measured).
inline Index groupRows(Index chunk) {
  const Index target = 16;
  return chunk >= target ? chunk : chunk * ((target + chunk - 1) / chunk);
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
/// group-local chunk of row r (non-decreasing, from 0). Fixed-window regime.
template <typename Scalar>
void causalGroup(const CausalParams& p, CausalHeadState<Scalar>& st, const ConstBlock<Scalar>& qf,
                 const ConstBlock<Scalar>& kf, const ConstBlock<Scalar>& v,
                 const std::vector<Index>& chunk_of, CausalScratch<Scalar>& sc,
                 Block<Scalar> out) {
  const Index L = qf.rows();
  KATTN_ASSERT(Index(chunk_of.size()) >= L && kf.rows() == L && v.rows() == L && out.rows() == L);
  const Index n_chunks = L ? chunk_of[L - 1] + 1 : 0;
  const Scalar gamma = Scalar(p.gamma);
  const bool decays = p.gamma != 1.0;
  const Scalar eps = Scalar(kNormaliserEps);

  if (n_chunks == 1 && L * (qf.cols() + v.cols()) > 2 * qf.cols() * v.cols()) {
    // A single chunk whose rows all see each other (C above the group size, or a recurrent
    // call of many tokens): the low-rank form, S <- gamma S + k'^T v, a = q'S / (q'z + eps),
    // is cheaper than the L x L scores and needs no L x L memory.
    if (decays) st.kv *= gamma;
    st.kv.noalias() += kf.transpose() * v;
    st.addToZ(gamma, kf.colwise().sum().transpose());
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
    sc.wk = kf;
    for (Index s = 0; s < L; ++s) sc.wk.row(s) *= gpow(n_chunks - 1 - chunk_of[s]);
    st.kv.noalias() += sc.wk.transpose() * v;
    st.addToZ(gpow(n_chunks), sc.wk.colwise().sum().transpose());
  } else {
    st.kv.noalias() += kf.transpose() * v;
    st.addToZ(Scalar(1), kf.colwise().sum().transpose());
  }
}

/// One chunk in the sliding-window regime: the chunk W back leaves, this chunk enters, read out.
template <typename Scalar>
void causalSlidingChunk(const CausalParams& p, CausalHeadState<Scalar>& st,
                     const ConstBlock<Scalar>& qf, const ConstBlock<Scalar>& kf,
                     const ConstBlock<Scalar>& v, Block<Scalar> out) {
  const Scalar gamma = Scalar(p.gamma);
  if (Index(st.windowChunks()) >= p.window) st.dropOldest(gamma);
  const bool front_empty = st.front_pos == st.front_kv.size();
  if (p.compact_ring && front_empty && kf.rows() == 1) {
    // A one-token chunk with nothing older in the window: the state is kv alone, so this is
    // the one-token kernel of the fixed-window pass, and the ring keeps the token's rows.
    causalToken<Scalar>(gamma, st, qf, kf, v, out);
    st.pushRows(kf, v);
    return;
  }
  if (p.compact_ring && st.rowsAreSmaller(kf, v)) {
    // The ring keeps the rows, so the terms are never made: they go into kv and z directly.
    if (gamma != Scalar(1)) st.kv *= gamma;
    st.kv.noalias() += kf.transpose() * v;
    st.addToZ(gamma, kf.colwise().sum().transpose());
    st.pushRows(kf, v);
  } else {
    Matrix<Scalar> kv_c = kf.transpose() * v;
    Vector<Scalar> z_c = kf.colwise().sum().transpose();
    st.kv = gamma * st.kv + kv_c;
    st.addToZ(gamma, z_c);
    st.pushTerm(std::move(kv_c), std::move(z_c));
  }
  // The window's sum is kv plus the decayed older suffix (windowSum), read out here without
  // forming it: two products instead of a copy of the state per chunk.
  out.noalias() = qf * st.kv;
  const Scalar g = front_empty ? Scalar(0) : std::pow(gamma, Scalar(st.ring_kv.size()));
  if (qf.rows() == 1) {
    // A decode step's one row. Eigen's matrix-vector product copies a scaled row into a
    // temporary, and the normaliser would be a vector: neither allocates here.
    Scalar den = qf.row(0).dot(st.z) + Scalar(kNormaliserEps);
    if (!front_empty) {
      out.noalias() += g * qf.lazyProduct(st.front_kv[st.front_pos]);
      den += g * qf.row(0).dot(st.front_z[st.front_pos]);
    }
    out /= den;
    return;
  }
  if (!front_empty) out.noalias() += g * (qf * st.front_kv[st.front_pos]);
  Vector<Scalar> den = (qf * st.z).array() + Scalar(kNormaliserEps);
  if (!front_empty) den.noalias() += g * (qf * st.front_z[st.front_pos]);
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
  KATTN_ASSERT(C >= 1 && lead >= 0 && lead < C);
  KATTN_ASSERT(kf.rows() == L && v.rows() == L && out.rows() == L);
  KATTN_ASSERT(qf.cols() == st.kv.rows() && kf.cols() == st.kv.rows());
  KATTN_ASSERT(v.cols() == st.kv.cols() && out.cols() == st.kv.cols());
  if (!p.sliding && (L == 1 || C == 1)) {
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
    if (p.sliding) {
      const Index len = std::min(L - r, (r == 0 ? C - lead : C));
      causalSlidingChunk<Scalar>(p, st, qf.middleRows(r, len), kf.middleRows(r, len),
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
