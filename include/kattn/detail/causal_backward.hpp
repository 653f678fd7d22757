#pragma once
/// \file
/// \private The causal windowed core's backward (SPEC 3.3), in memory bounded in T.
///
/// Per (batch row, head), with chunk terms KV_c = k'_c^T v_c and z_c = k'_c^T 1, window sums
/// S_c = sum_{j<W} w_j KV_{c-j} (w_j = gamma^j, or 1) and a_t = q'_t S_c / (q'_t zS_c + eps)
/// for the rows t of chunk c:
/// - dS_c = q'_c^T (g / den) and dzS_c = -q'_c^T (g.a / den) come from chunk c's queries;
/// - dKV_c = sum_{j<W} w_j dS_{c+j} is the same window sum over the chunks taken last to
///   first, so the key side walks the chunks backwards with the forward's window state;
/// - dq'_t = (g_t / den_t) S_c^T + dden_t zS_c^T needs S_c, which exists only walking forwards.
/// So two walks: forwards (S_c, heads, dq, and per row den_t and g_t.a_t), then backwards
/// (dS_c, dKV_c, dk, dv). The two numbers per row pass from the first walk to the second in
/// the row's own entries of dk and dv, which the second walk overwrites right after reading
/// them: no [T] buffer, no [T, F, d_v] one. Each walk holds a block of rows and one window
/// state: the chunk terms of a window of W chunks (two-stack, as the forward's) when the
/// window slides, one running sum when it covers the sequence.

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../masking.hpp"
#include "backward_core.hpp"
#include "causal_state.hpp"
#include "causal_tokens.hpp"

namespace kattn {
namespace detail {

/// The window sums of a stream of chunk terms X (a matrix and a vector) in which the newest
/// term weighs 1 and the one j terms older w_j: sum_{j<W} w_j X_{newest - j}.
template <typename Scalar>
class ChunkWindow {
 public:
  ChunkWindow(Index F, Index dv, Scalar gamma, Index window, bool sliding)
      : m_gamma(gamma), m_window(window), m_sliding(sliding) {
    m_state.reset(F, dv);
  }

  /// Takes in the newest term; sum() and zSum() are then the window's sums.
  void push(const Matrix<Scalar>& term, const Vector<Scalar>& z_term) {
    if (m_sliding && Index(m_state.windowChunks()) >= m_window) m_state.dropOldest(m_gamma);
    m_state.kv = m_gamma * m_state.kv + term;
    m_state.z = m_gamma * m_state.z + z_term;
    if (m_sliding) {
      m_state.pushTerm(Matrix<Scalar>(term), Vector<Scalar>(z_term));
      m_state.windowSum(m_gamma, m_sum, m_z_sum);
    }
  }
  /// The window's matrix sum after the last push.
  const Matrix<Scalar>& sum() const { return m_sliding ? m_sum : m_state.kv; }
  /// The window's vector sum after the last push.
  const Vector<Scalar>& zSum() const { return m_sliding ? m_z_sum : m_state.z; }

 private:
  CausalHeadState<Scalar> m_state;  // the forward's two-stack window, fed only terms
  Matrix<Scalar> m_sum;
  Vector<Scalar> m_z_sum;
  Scalar m_gamma;
  Index m_window;
  bool m_sliding;
};

/// The chunking of a whole causal pass over T real rows.
struct CausalChunking {
  Index T = 0, chunk = 1, lead = 0, window = 1;
  double gamma = 1.0;

  Index chunks() const { return (T + lead + chunk - 1) / chunk; }
  /// The first real row of chunk c (T for c = chunks()): padding rows are no rows here,
  /// their features being zero.
  Index rowOf(Index c) const { return std::min(T, std::max<Index>(0, c * chunk - lead)); }
  bool sliding() const { return window < chunks(); }
};

/// Entry 0 of row t of the job's head in a [B, T, N, h] gradient: where the forward walk
/// leaves one number of the row for the backward walk.
template <typename Scalar>
Scalar& rowSlot(const HeadJob<Scalar>& job, Scalar* base, Index h, Index t) {
  return base[((job.b * job.call->T + t) * job.N() + job.n) * h];
}

/// Rows [r0, r0 + L) of a causal job, both sides: the scaled rows xq and xk, the query
/// features qf, the key features before the mask (kraw, for their backward) and after it (kf).
template <typename Scalar>
struct CausalRows {
  Matrix<Scalar> xq, qf, xk, kraw, kf;

  template <typename Map>
  void load(const HeadJob<Scalar>& job, Index r0, Index L) {
    job.queries(r0, L, xq);
    recomputeFeatures<Map, Scalar>(job.qside, xq, qf);
    job.keys(r0, L, xk);
    recomputeFeatures<Map, Scalar>(job.kside, xk, kraw);
    kf = kraw;
    job.applyMask(kf, r0);
  }
};

/// The causal backward of one job (all T rows of its batch row and head). Writes (not adds)
/// the job's entries of dk and dv; adds to dq.
template <typename Map, typename Scalar>
void causalBackward(HeadJob<Scalar>& job, const CausalChunking& ch) {
  using Mat = Matrix<Scalar>;
  using Vec = Vector<Scalar>;
  const CoreGradCall<Scalar>& call = *job.call;
  const Index F = featureDim(job.d(), call.projection), dv = job.dv(), d = job.d();
  const Index chunks = ch.chunks(), per_block = std::max<Index>(1, kStreamRows / ch.chunk);
  const Index blocks = (chunks + per_block - 1) / per_block;
  const Scalar eps = Scalar(kNormaliserEps), gamma = Scalar(ch.gamma);
  CausalRows<Scalar> rows;
  const Mat &xq = rows.xq, &qf = rows.qf, &xk = rows.xk, &kraw = rows.kraw, &kf = rows.kf;
  Mat df, dx, a, gn, vals, term;
  Vec den, gd, z_term;

  // Forwards: the window sums S_c, the heads, dq; den_t and g_t.a_t into the row's slots.
  ChunkWindow<Scalar> win(F, dv, gamma, ch.window, ch.sliding());
  for (Index blk = 0; blk < blocks; ++blk) {
    const Index c0 = blk * per_block, c1 = std::min(chunks, c0 + per_block);
    const Index r0 = ch.rowOf(c0), L = ch.rowOf(c1) - r0;
    rows.template load<Map>(job, r0, L);
    const auto v = job.values(r0, L);
    const auto g = job.grads(r0, L);
    df.resize(L, F);
    for (Index c = c0; c < c1; ++c) {
      const Index i0 = ch.rowOf(c) - r0, n = ch.rowOf(c + 1) - ch.rowOf(c);
      term.noalias() = kf.middleRows(i0, n).transpose() * v.middleRows(i0, n);
      z_term.noalias() = kf.middleRows(i0, n).colwise().sum().transpose();
      win.push(term, z_term);
      const Mat& S = win.sum();
      const Vec& zS = win.zSum();
      den.noalias() = qf.middleRows(i0, n) * zS;
      den.array() += eps;
      a.noalias() = qf.middleRows(i0, n) * S;
      gn.resize(n, dv);
      gd.resize(n);
      for (Index t = 0; t < n; ++t) {
        a.row(t) /= den(t);
        gn.row(t) = g.row(i0 + t) / den(t);
        const Scalar ga = g.row(i0 + t).dot(a.row(t));
        gd(t) = -ga / den(t);
        rowSlot(job, call.dk, d, r0 + i0 + t) = den(t);
        rowSlot(job, call.dv, dv, r0 + i0 + t) = ga;
      }
      if (call.heads) headBlock(call.heads, call.T, job.N(), dv, job.b, job.n, r0 + i0, n) = a;
      df.middleRows(i0, n).noalias() = gn * S.transpose();
      df.middleRows(i0, n).noalias() += gd * zS.transpose();
    }
    featureBackward<Map, Scalar>(job.qside, xq, qf, df, dx, job.dshift_q);
    job.addQueryGrad(r0, dx);
  }

  // Backwards: dS_c from chunk c's queries, dKV_c as a window sum over the later chunks,
  // then the keys and values of chunk c.
  ChunkWindow<Scalar> back(F, dv, gamma, ch.window, ch.sliding());
  for (Index blk = blocks; blk-- > 0;) {
    const Index c0 = blk * per_block, c1 = std::min(chunks, c0 + per_block);
    const Index r0 = ch.rowOf(c0), L = ch.rowOf(c1) - r0;
    rows.template load<Map>(job, r0, L);
    const auto v = job.values(r0, L);
    const auto g = job.grads(r0, L);
    gn.resize(L, dv);
    gd.resize(L);
    for (Index t = 0; t < L; ++t) {
      const Scalar dn = rowSlot(job, call.dk, d, r0 + t);
      gn.row(t) = g.row(t) / dn;
      gd(t) = -rowSlot(job, call.dv, dv, r0 + t) / dn;
    }
    df.resize(L, F);
    vals.resize(L, dv);
    for (Index c = c1; c-- > c0;) {
      const Index i0 = ch.rowOf(c) - r0, n = ch.rowOf(c + 1) - ch.rowOf(c);
      term.noalias() = qf.middleRows(i0, n).transpose() * gn.middleRows(i0, n);
      z_term.noalias() = qf.middleRows(i0, n).transpose() * gd.segment(i0, n);
      back.push(term, z_term);
      const Mat& dkv = back.sum();
      vals.middleRows(i0, n).noalias() = kf.middleRows(i0, n) * dkv;
      df.middleRows(i0, n).noalias() = v.middleRows(i0, n) * dkv.transpose();
      df.middleRows(i0, n).rowwise() += back.zSum().transpose();
    }
    job.applyMask(df, r0);
    featureBackward<Map, Scalar>(job.kside, xk, kraw, df, dx, job.dshift_k);
    headBlock(call.dk, call.T, job.N(), d, job.b, job.n, r0, L) = job.rk * dx;
    headBlock(call.dv, call.T, job.N(), dv, job.b, job.n, r0, L) = vals;
  }
}

/**
 * causalBackward for chunks of one token and a window over the whole sequence (prefix-sum
 * attention, W3's core): three unnormalised scans on the token kernels (linearScan) instead
 * of causalBackward's window sums and one-row products per token. With S_t = sum_{s<=t}
 * gamma^(t-s) k'_s^T v_s, z_t likewise, den_t = q'_t z_t + eps and gn_t = g_t / den_t:
 * - dq'_t = S_t gn_t^T + gd_t z_t, the first term a forward scan (query gn, key v, value k');
 * - gd_t = -gn_t.a_t = -q'_t.(S_t gn_t^T) / den_t, read off that term, so the heads a_t are
 *   not recomputed unless the caller wants them (one more scan);
 * - dk'_t = sum_{s>=t} gamma^(s-t) ([v_t, 1].[gn_s, gd_s]) q'_s and
 *   dv_t = sum_{s>=t} gamma^(s-t) (k'_t.q'_s) gn_s, two scans last to first.
 * den_t and gd_t pass from the first walk to the second in the rows' slots, as in
 * causalBackward. z_t is summed with compensation, as the forward's is.
 */
template <typename Map, typename Scalar>
void tokenBackward(HeadJob<Scalar>& job, const CausalChunking& ch) {
  using Mat = Matrix<Scalar>;
  const CoreGradCall<Scalar>& call = *job.call;
  const Index F = featureDim(job.d(), call.projection), dv = job.dv(), d = job.d(), T = ch.T;
  const Index L = kStreamRows;
  const Scalar eps = Scalar(kNormaliserEps), gamma = Scalar(ch.gamma);
  CausalRows<Scalar> rows;
  const Mat &xq = rows.xq, &qf = rows.qf, &xk = rows.xk, &kraw = rows.kraw, &kf = rows.kf;
  Mat v, g, df, dx, zs, wk, a, ag, av;
  Vector<Scalar> den, z = Vector<Scalar>::Zero(F), zc = Vector<Scalar>::Zero(F);  // z_t, its error
  Mat s_dq = Mat::Zero(dv, F);                        // sum of v^T k': the dq scan's state
  Mat s_a = call.heads ? Mat::Zero(F, dv) : Mat();  // sum of k'^T v: the heads' scan's

  for (Index r0 = 0; r0 < T; r0 += L) {
    const Index n = std::min(L, T - r0);
    rows.template load<Map>(job, r0, n);
    gatherRows(job.values(r0, n), Scalar(1), v);
    gatherRows(job.grads(r0, n), Scalar(1), g);
    zs.resize(n, F);
    den.resize(n);
    for (Index t = 0; t < n; ++t) {  // z_t = gamma z_{t-1} + k'_t, compensated
      compensatedAdd(gamma, z.data(), zc.data(), kf.row(t).data(), F);
      zs.row(t) = (z - zc).transpose();
      den(t) = qf.row(t).dot(zs.row(t)) + eps;
    }
    ag.noalias() = g;
    ag.array().colwise() /= den.array();
    df.resize(n, F);
    linearScan<false>(gamma, s_dq, ag, v, kf, wk, df);
    for (Index t = 0; t < n; ++t) {
      const Scalar gd = -qf.row(t).dot(df.row(t)) / den(t);
      df.row(t) += gd * zs.row(t);
      rowSlot(job, call.dk, d, r0 + t) = den(t);
      rowSlot(job, call.dv, dv, r0 + t) = gd;
    }
    if (call.heads) {
      a.resize(n, dv);
      linearScan<false>(gamma, s_a, qf, kf, v, wk, a);
      a.array().colwise() /= den.array();
      scatterRows<false>(a, Scalar(1),
                         headBlock(call.heads, call.T, job.N(), dv, job.b, job.n, r0, n));
    }
    featureBackward<Map, Scalar>(job.qside, xq, qf, df, dx, job.dshift_q);
    job.addQueryGrad(r0, dx);
  }

  Mat r_k = Mat::Zero(dv + 1, F);  // suffix sum of [gn, gd]^T q': the dk scan's state
  Mat r_v = Mat::Zero(F, dv);      // suffix sum of q'^T gn: the dv scan's
  const Index blocks = (T + L - 1) / L;
  for (Index blk = blocks; blk-- > 0;) {
    const Index r0 = blk * L, n = std::min(L, T - r0);
    rows.template load<Map>(job, r0, n);
    gatherRows(job.values(r0, n), Scalar(1), v);
    gatherRows(job.grads(r0, n), Scalar(1), g);
    ag.resize(n, dv + 1);  // [gn, gd]
    av.resize(n, dv + 1);  // [v, 1]
    for (Index t = 0; t < n; ++t) {
      ag.row(t).head(dv) = g.row(t) / rowSlot(job, call.dk, d, r0 + t);
      ag(t, dv) = rowSlot(job, call.dv, dv, r0 + t);
    }
    av.leftCols(dv) = v;
    av.col(dv).setOnes();
    df.resize(n, F);
    linearScan<true>(gamma, r_k, av, ag, qf, wk, df);
    a.resize(n, dv);
    const auto gn = ag.leftCols(dv);
    linearScan<true>(gamma, r_v, kf, qf, gn, wk, a);
    job.applyMask(df, r0);
    featureBackward<Map, Scalar>(job.kside, xk, kraw, df, dx, job.dshift_k);
    scatterRows<false>(dx, job.rk, headBlock(call.dk, call.T, job.N(), d, job.b, job.n, r0, n));
    scatterRows<false>(a, Scalar(1), headBlock(call.dv, call.T, job.N(), dv, job.b, job.n, r0, n));
  }
}

/// The whole causal core backward (S = T), for `masking`'s chunks, window, decay and padding.
/// The caller zeroes dq; dk and dv are overwritten.
template <typename Map, typename Scalar>
void causalCoreBackward(const CoreGradCall<Scalar>& call, const CausalWindowed& masking) {
  if (call.B == 0 || call.T == 0) return;
  CausalChunking ch;
  ch.T = call.T;
  ch.chunk = masking.chunk;
  ch.lead = masking.leadingPad(call.T);
  ch.window = masking.window;
  ch.gamma = masking.gamma();
  const Index d = call.dims.key_dim, dv = call.dims.value_dim;
  const Index F = featureDim(d, call.projection);
  const double flops = 12.0 * double(call.B * call.dims.heads) * double(call.T) * double(F) *
                       double(d + dv);
  const SavedData<Scalar>* none = nullptr;  // a causal forward saves no features
  runHeadJobs<Map>(call, false, 0, call.T, none, flops,
                   [&](HeadJob<Scalar>& j) {
                     if (ch.chunk == 1 && !ch.sliding()) {
                       tokenBackward<Map>(j, ch);
                     } else {
                       causalBackward<Map>(j, ch);
                     }
                   });
}

}  // namespace detail
}  // namespace kattn
