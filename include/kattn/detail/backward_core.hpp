#pragma once
/// \file
/// \private The bidirectional core's backward (SPEC 3.1, 3.2): from the heads q, k, v a call
/// projected and the gradient of its attention heads, the gradients of q, k and v, by
/// recomputing the features from the inputs. Per (batch row, head) the low-rank form holds
/// KV, z and their gradients [F, d_v] and [F] and one block of rows: it walks the keys
/// (KV, z), the queries (heads, dKV, dz, dq) and the keys again (dk, dv). The explicit form
/// and the short-sequence softmax hold the [T, S] matrix, as their forwards do.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "../feature_maps.hpp"
#include "../masking.hpp"
#include "../parallel.hpp"
#include "../tensor.hpp"
#include "backward_features.hpp"
#include "bidirectional.hpp"
#include "low_rank.hpp"
#include "pass.hpp"
#include "schedule.hpp"

namespace kattn {
namespace detail {

/// One call of the core backward. Heads are row-major [B, L, N, h]; the gradients are added
/// to (the caller zeroes them), except that the causal backward overwrites dk and dv, which
/// it uses as scratch between its two walks (detail/causal_backward.hpp).
template <typename Scalar>
struct CoreGradCall {
  HeadDims dims;
  Index B = 0, T = 0, S = 0;
  const Scalar* q = nullptr;     ///< [B, T, N, d]
  const Scalar* k = nullptr;     ///< [B, S, N, d]
  const Scalar* v = nullptr;     ///< [B, S, N, d_v]
  const Scalar* grad = nullptr;  ///< [B, T, N, d_v], d loss / d heads
  const Scalar* mask = nullptr;  ///< [B, S], or null
  BatchScales<Scalar> scales;
  const Matrix<Scalar>* projection = nullptr;
  CoreForm form = CoreForm::Auto;
  Index begin_kernel = 0;
  bool is_short_seq = false;
  const ThreadPool* pool = nullptr;
  Scalar* dq = nullptr;     ///< [B, T, N, d]
  Scalar* dk = nullptr;     ///< [B, S, N, d]
  Scalar* dv = nullptr;     ///< [B, S, N, d_v]
  Scalar* heads = nullptr;  ///< [B, T, N, d_v] (the forward's heads), or null
  const SavedData<Scalar>* saved = nullptr;  ///< the forward's features (SavedFeatures), or null
};

template <typename Scalar>
using ConstStrided = Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;
template <typename Scalar>
using Strided = Eigen::Map<Matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Rows [r0, r0 + L) of head n of batch row b of a [B, len, N, h] tensor.
template <typename Scalar>
ConstStrided<Scalar> headBlock(const Scalar* base, Index len, Index N, Index h, Index b, Index n,
                               Index r0, Index L) {
  return ConstStrided<Scalar>(base + ((b * len + r0) * N + n) * h, L, h,
                              Eigen::OuterStride<>(N * h));
}
template <typename Scalar>
Strided<Scalar> headBlock(Scalar* base, Index len, Index N, Index h, Index b, Index n, Index r0,
                          Index L) {
  return Strided<Scalar>(base + ((b * len + r0) * N + n) * h, L, h, Eigen::OuterStride<>(N * h));
}

/// dst = factor * src, src rows of one head inside rows of all heads, prefetched
/// kPrefetchRows ahead (prefetchRow says why).
template <typename Scalar>
void gatherRows(const ConstStrided<Scalar>& src, Scalar factor, Matrix<Scalar>& dst) {
  const Index L = src.rows(), h = src.cols();
  dst.resize(L, h);
  for (Index t = 0; t < L; ++t) {
    if (t + kPrefetchRows < L) prefetchRow(src.row(t + kPrefetchRows).data(), h);
    dst.row(t).noalias() = factor * src.row(t);
  }
}

/// dst = factor * src (Add: dst += factor * src), dst rows of one head inside rows of all
/// heads, prefetched as in gatherRows.
template <bool Add, typename Scalar, typename Src>
void scatterRows(const Src& src, Scalar factor, Strided<Scalar> dst) {
  const Index L = src.rows(), h = src.cols();
  for (Index t = 0; t < L; ++t) {
    if (t + kPrefetchRows < L) prefetchRow(dst.row(t + kPrefetchRows).data(), h);
    if constexpr (Add) {
      dst.row(t) += factor * src.row(t);
    } else {
      dst.row(t) = factor * src.row(t);
    }
  }
}

/// One (batch row, head) of one part (query rows [q0, q1)) of the core backward.
template <typename Scalar>
struct HeadJob {
  using Mat = Matrix<Scalar>;
  const CoreGradCall<Scalar>* call = nullptr;
  Index b = 0, n = 0, q0 = 0, q1 = 0;
  Scalar rq = 1, rk = 1;  ///< the factors on q and k before the map
  FeatureSide<Scalar> qside, kside;
  Scalar dshift_q = 0, dshift_k = 0;  ///< what the features send to their stabilisers
  const SavedData<Scalar>* saved = nullptr;  ///< features to read instead of recomputing

  /// Features f of query rows [t0, t0 + x.rows()) (t0 absolute) whose scaled rows are x:
  /// read from what the forward saved, brought from its block's shift to the side's, or
  /// recomputed.
  template <typename Map>
  void queryFeatures(Index t0, const Mat& x, Mat& f) const {
    if (!saved) return recomputeFeatures<Map, Scalar>(qside, x, f);
    const Index r = t0 - saved->q0, i = (b * N() + n) * saved->queryBlocks() + r / kStreamRows;
    readSaved(saved->queryFeatures(b, n, r), x.rows(),
              saved->shifted ? saved->qshift(i) - qside.shift : Scalar(0), f);
  }
  /// Features f of key rows [s0, s0 + x.rows()), as queryFeatures.
  template <typename Map>
  void keyFeatures(Index s0, const Mat& x, Mat& f) const {
    if (!saved) return recomputeFeatures<Map, Scalar>(kside, x, f);
    const Index i = (b * N() + n) * saved->keyBlocks() + s0 / kStreamRows;
    readSaved(saved->keyFeatures(b, n, s0), x.rows(),
              saved->shifted ? saved->kshift(i) - kside.shift : Scalar(0), f);
  }
  /// f = e^log_factor times L saved rows of features.
  void readSaved(const Scalar* rows, Index L, Scalar log_factor, Mat& f) const {
    const Eigen::Map<const Mat> src(rows, L, saved->features);
    if (log_factor == Scalar(0)) {
      f = src;
    } else {
      f = src * std::exp(log_factor);
    }
  }

  const Scalar* maskRow() const { return call->mask ? call->mask + b * call->S : nullptr; }
  Index d() const { return call->dims.key_dim; }
  Index dv() const { return call->dims.value_dim; }
  Index N() const { return call->dims.heads; }

  /// Scaled query rows [t0, t0 + L) (t0 absolute), scaled key rows [s0, s0 + L).
  void queries(Index t0, Index L, Mat& x) const {
    gatherRows(headBlock(call->q, call->T, N(), d(), b, n, t0, L), rq, x);
  }
  void keys(Index s0, Index L, Mat& x) const {
    gatherRows(headBlock(call->k, call->S, N(), d(), b, n, s0, L), rk, x);
  }
  ConstStrided<Scalar> values(Index s0, Index L) const {
    return headBlock(call->v, call->S, N(), dv(), b, n, s0, L);
  }
  ConstStrided<Scalar> grads(Index t0, Index L) const {
    return headBlock(call->grad, call->T, N(), dv(), b, n, t0, L);
  }
  /// Multiplies the rows of key features (or their gradients) [s0, ...) by the mask.
  void applyMask(Mat& f, Index s0) const {
    const Scalar* m = maskRow();
    if (!m) return;
    for (Index s = 0; s < f.rows(); ++s)
      if (m[s0 + s] != Scalar(1)) f.row(s) *= m[s0 + s];
  }
  /// Adds the gradients of scaled rows dx to the heads' gradients.
  void addQueryGrad(Index t0, const Mat& dx) const {
    scatterRows<true>(dx, rq, headBlock(call->dq, call->T, N(), d(), b, n, t0, dx.rows()));
  }
  void addKeyGrad(Index s0, const Mat& dx) const {
    scatterRows<true>(dx, rk, headBlock(call->dk, call->S, N(), d(), b, n, s0, dx.rows()));
  }
};

/// The low-rank form's backward of one job: a = q'KV / (q'z + eps) with KV = k'^T v, z = k'^T 1.
/// dKV = q'^T (g / den), dz = q'^T dden with dden = -g.a / den; dq' = (g / den) KV^T + dden z^T;
/// dk' = v dKV^T + 1 dz^T; dv = k' dKV. O((T + S) F d_v), memory O(F d_v + block).
template <typename Map, typename Scalar>
void lowRankBackward(HeadJob<Scalar>& job) {
  using Mat = Matrix<Scalar>;
  const Index F = featureDim(job.d(), job.call->projection), dv = job.dv(), S = job.call->S;
  const Index L = kStreamRows;
  const Scalar eps = Scalar(kNormaliserEps);
  Mat kv = Mat::Zero(F, dv), dkv = Mat::Zero(F, dv);
  Vector<Scalar> z = Vector<Scalar>::Zero(F), dz = Vector<Scalar>::Zero(F);
  Mat x, f, df, dx, a, gn, masked;
  Vector<Scalar> den, gd;
  if (const SavedData<Scalar>* saved = job.saved) {
    const Index i = job.b * job.N() + job.n;
    const Scalar c = saved->shifted ? std::exp(saved->kv_shift(i) - job.kside.shift) : Scalar(1);
    kv = Eigen::Map<const Mat>(saved->kv.data() + i * F * dv, F, dv) * c;
    z = saved->z.segment(i * F, F) * c;
  } else {
    for (Index s0 = 0; s0 < S; s0 += L) {
      const Index len = std::min(L, S - s0);
      job.keys(s0, len, x);
      recomputeFeatures<Map, Scalar>(job.kside, x, f);
      job.applyMask(f, s0);
      kv.noalias() += f.transpose() * job.values(s0, len);
      z.noalias() += f.colwise().sum().transpose();
    }
  }
  for (Index t0 = job.q0; t0 < job.q1; t0 += L) {
    const Index len = std::min(L, job.q1 - t0);
    job.queries(t0, len, x);
    job.template queryFeatures<Map>(t0, x, f);
    den.noalias() = f * z;
    den.array() += eps;
    gatherRows(job.grads(t0, len), Scalar(1), gn);
    gn.array().colwise() /= den.array();
    df.noalias() = gn * kv.transpose();
    // gd_t = -g_t.a_t / den_t = -q'_t.(gn_t KV^T) / den_t: read off df's first term, so the
    // heads a = q'KV / den are computed only for a caller who wants them (the layer's dWo).
    gd.resize(len);
    for (Index t = 0; t < len; ++t) gd(t) = -f.row(t).dot(df.row(t)) / den(t);
    if (job.call->heads) {
      a.noalias() = f * kv;
      a.array().colwise() /= den.array();
      scatterRows<false>(a, Scalar(1), headBlock(job.call->heads, job.call->T, job.N(), dv,
                                                 job.b, job.n, t0, len));
    }
    dkv.noalias() += f.transpose() * gn;
    dz.noalias() += f.transpose() * gd;
    df.noalias() += gd * z.transpose();
    featureBackward<Map, Scalar>(job.qside, x, f, df, dx, job.dshift_q);
    job.addQueryGrad(t0, dx);
  }
  for (Index s0 = 0; s0 < S; s0 += L) {
    const Index len = std::min(L, S - s0);
    job.keys(s0, len, x);
    job.template keyFeatures<Map>(s0, x, f);
    const Mat* fm = &f;
    if (job.maskRow()) {
      masked = f;
      job.applyMask(masked, s0);
      fm = &masked;
    }
    headBlock(job.call->dv, S, job.N(), dv, job.b, job.n, s0, len).noalias() += *fm * dkv;
    df.noalias() = job.values(s0, len) * dkv.transpose();
    df.rowwise() += dz.transpose();
    job.applyMask(df, s0);
    featureBackward<Map, Scalar>(job.kside, x, f, df, dx, job.dshift_k);
    job.addKeyGrad(s0, dx);
  }
}

/// The backward of the forms through the [T, S] matrix for one job: the explicit kernel form
/// (scores A = q'k'^T, a = A v / (A 1 + eps)) or, with `short_path`, the softmax over kernel
/// scores (masked keys excluded; a row with no key left has zero heads and gradients).
template <typename Map, typename Scalar>
void quadraticBackward(HeadJob<Scalar>& job, bool short_path) {
  using Mat = Matrix<Scalar>;
  const Index S = job.call->S, T = job.q1 - job.q0, dv = job.dv();
  const Scalar* keep = job.maskRow();
  Mat xq, xk, qf, kraw;
  job.queries(job.q0, T, xq);
  job.keys(0, S, xk);
  recomputeFeatures<Map, Scalar>(job.qside, xq, qf);
  recomputeFeatures<Map, Scalar>(job.kside, xk, kraw);
  Mat kf = kraw;
  job.applyMask(kf, 0);
  const Mat v = job.values(0, S);
  const Mat g = job.grads(job.q0, T);
  Mat w = qf * kf.transpose();  // [T, S]: scores, then the weights of the values
  Mat a(T, dv), dw(T, S), dvals;
  if (short_path) {
    std::vector<bool> kept(std::size_t(S), true);
    bool any = false;
    for (Index s = 0; s < S; ++s) {
      kept[std::size_t(s)] = !keep || keep[s] != Scalar(0);
      any = any || kept[std::size_t(s)];
    }
    if (!any) {
      if (job.call->heads) headBlock(job.call->heads, job.call->T, job.N(), dv, job.b, job.n,
                                     job.q0, T).setZero();
      return;
    }
    for (Index t = 0; t < T; ++t) {
      Scalar top = -std::numeric_limits<Scalar>::infinity();
      for (Index s = 0; s < S; ++s)
        if (kept[std::size_t(s)]) top = std::max(top, w(t, s));
      for (Index s = 0; s < S; ++s) w(t, s) = kept[std::size_t(s)] ? std::exp(w(t, s) - top) : 0;
      w.row(t) /= w.row(t).sum();
    }
    a.noalias() = w * v;
    dw.noalias() = g * v.transpose();
    for (Index t = 0; t < T; ++t) {
      const Scalar inner = dw.row(t).dot(w.row(t));
      dw.row(t) = (w.row(t).array() * (dw.row(t).array() - inner)).matrix();
    }
    dvals.noalias() = w.transpose() * g;
  } else {
    Vector<Scalar> den = w.rowwise().sum();
    den.array() += Scalar(kNormaliserEps);
    a.noalias() = w * v;
    Mat gn(T, dv);
    Vector<Scalar> gd(T);
    for (Index t = 0; t < T; ++t) {
      a.row(t) /= den(t);
      gn.row(t) = g.row(t) / den(t);
      gd(t) = -g.row(t).dot(a.row(t)) / den(t);
    }
    dw.noalias() = gn * v.transpose();
    dw.colwise() += gd;
    dvals.noalias() = w.transpose() * gn;
  }
  if (job.call->heads) headBlock(job.call->heads, job.call->T, job.N(), dv, job.b, job.n, job.q0,
                                 T) = a;
  headBlock(job.call->dv, S, job.N(), dv, job.b, job.n, 0, S) += dvals;
  Mat dqf = dw * kf, dkf = dw.transpose() * qf, dx;
  job.applyMask(dkf, 0);
  featureBackward<Map, Scalar>(job.qside, xq, qf, dqf, dx, job.dshift_q);
  job.addQueryGrad(job.q0, dx);
  featureBackward<Map, Scalar>(job.kside, xk, kraw, dkf, dx, job.dshift_k);
  job.addKeyGrad(0, dx);
}

/// Adds the gradient `total` of a side's maximum logit to the rows it was taken from (split
/// evenly between ties, as tf.reduce_max's gradient): (b, row, head, feature) entries of `at`,
/// whose logit is c x.P_j with x = r_b times the head's row.
template <typename Scalar, typename Factor>
void addMaxGradient(const ArgMax<Scalar>& at, Scalar total, const Matrix<Scalar>* P, Scalar c,
                    Scalar* grad, Index len, Index N, Index d, const Factor& r) {
  if (at.at.empty() || total == Scalar(0)) return;
  const Scalar share = total / Scalar(at.at.size());
  for (const auto& e : at.at) {
    Strided<Scalar> row = headBlock(grad, len, N, d, e[0], e[2], e[1], 1);
    addLogitGradient<Scalar>(row.row(0), P, e[3], r(e[0]) * c * share);
  }
}

/// One job's share of the forward's whole-sequence quantities, in blocks of rows: for the exp
/// maps the largest logit of each side of its batch row (qmax, kmax); for expplus the largest
/// key u of the whole batch (key_max) and the job's coefficients, from both sides' statistics
/// (equal to the forward's up to the order of their sums).
template <typename Map, typename Scalar>
void scanSides(HeadJob<Scalar>& j, std::vector<ArgMax<Scalar>>& qmax,
               std::vector<ArgMax<Scalar>>& kmax, ArgMax<Scalar>& key_max) {
  constexpr bool shifted = feature_map_traits<Map>::max_shifted;
  const Matrix<Scalar>* P = j.call->projection;
  const Index d = j.d(), S = j.call->S, L = kStreamRows;
  Matrix<Scalar> x, z;
  ExpPlus::SideStatistics<Scalar> sq, sk;
  sq.sum.setZero(d);
  sk.sum.setZero(d);
  sq.length = j.q1 - j.q0;
  sk.length = S;
  for (Index t0 = j.q0; t0 < j.q1; t0 += L) {
    j.queries(t0, std::min(L, j.q1 - t0), x);
    if (shifted) {
      stabiliserLogits<Map, Scalar>(x, P, z);
      qmax[std::size_t(j.b)].scan(z, j.b, t0, j.n);
    }
    sq.sum_squares += x.squaredNorm();
    sq.sum += x.colwise().sum().transpose();
  }
  for (Index s0 = 0; s0 < S; s0 += L) {
    j.keys(s0, std::min(L, S - s0), x);
    stabiliserLogits<Map, Scalar>(x, P, z);
    (shifted ? kmax[std::size_t(j.b)] : key_max).scan(z, j.b, s0, j.n);
    sk.sum_squares += x.squaredNorm();
    sk.sum += x.colwise().sum().transpose();
  }
  if constexpr (feature_map_traits<Map>::pair_statistics) {
    j.qside.coeff = ExpPlus::coefficients(sq, sk, d);
    j.kside.coeff = ExpPlus::coefficients(sk, sq, d);
  }
}

/// The exp maps' stabilisers from what the forward saved: a side's largest logit is the
/// largest of its blocks' maxima, and only the blocks that reach it are scanned again for
/// where it is taken.
template <typename Map, typename Scalar>
void savedSides(std::vector<HeadJob<Scalar>>& jobs, const SavedData<Scalar>& saved,
                std::vector<ArgMax<Scalar>>& qmax, std::vector<ArgMax<Scalar>>& kmax) {
  const Index N = saved.heads, L = saved.block_rows, qb = saved.queryBlocks();
  const Index kb = saved.keyBlocks();
  std::vector<Scalar> Mq(std::size_t(saved.B), -std::numeric_limits<Scalar>::infinity());
  std::vector<Scalar> Mk(Mq);
  for (Index b = 0; b < saved.B; ++b) {
    Mq[std::size_t(b)] = saved.qshift.segment(b * N * qb, N * qb).maxCoeff();
    Mk[std::size_t(b)] = saved.kmax.segment(b * N * kb, N * kb).maxCoeff();
  }
  const Matrix<Scalar>* P = jobs.front().call->projection;
  Matrix<Scalar> x, z;
  for (HeadJob<Scalar>& j : jobs) {
    const std::size_t b = std::size_t(j.b);
    const Index h = j.b * N + j.n;
    for (Index i = 0; i < qb; ++i) {
      if (saved.qshift(h * qb + i) != Mq[b]) continue;
      const Index t0 = j.q0 + i * L;
      j.queries(t0, std::min(L, j.q1 - t0), x);
      stabiliserLogits<Map, Scalar>(x, P, z);
      qmax[b].scan(z, j.b, t0, j.n);
    }
    for (Index i = 0; i < kb; ++i) {
      if (saved.kmax(h * kb + i) != Mk[b]) continue;
      const Index s0 = i * L;
      j.keys(s0, std::min(L, saved.S - s0), x);
      stabiliserLogits<Map, Scalar>(x, P, z);
      kmax[b].scan(z, j.b, s0, j.n);
    }
    j.qside.shift = Mq[b];
    j.kside.shift = Mk[b];
  }
}

/**
 * Runs `kernel` on one HeadJob per (batch row, head) of query rows [q0, q1) through `Map`
 * (factors of the short-sequence softmax when `short_path`), on the pool when `flops` is
 * worth it: first the stabilisers the forward took over whole rows (and expplus's
 * coefficients), then the jobs, then the stabilisers' gradients, added in a fixed order
 * after the parallel part.
 */
template <typename Map, typename Scalar, typename Kernel>
void runHeadJobs(const CoreGradCall<Scalar>& call, bool short_path, Index q0, Index q1,
                 const SavedData<Scalar>* saved, double flops, const Kernel& kernel) {
  using Traits = feature_map_traits<Map>;
  const Index B = call.B, N = call.dims.heads, d = call.dims.key_dim, S = call.S;
  const Matrix<Scalar>* P = call.projection;
  auto rq = [&](Index b) {
    const Scalar s = call.scales[std::size_t(b)];
    return short_path ? s : std::sqrt(s);
  };
  auto rk = [&](Index b) {
    return short_path ? Scalar(1) : std::sqrt(call.scales[std::size_t(b)]);
  };
  std::vector<HeadJob<Scalar>> jobs(std::size_t(B * N));
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n) {
      HeadJob<Scalar>& j = jobs[std::size_t(b * N + n)];
      j.call = &call;
      j.b = b;
      j.n = n;
      j.q0 = q0;
      j.q1 = q1;
      j.rq = rq(b);
      j.rk = rk(b);
      j.qside = FeatureSide<Scalar>{P, true};
      j.kside = FeatureSide<Scalar>{P, false};
      j.saved = saved;
    }
  // The stabilisers of the forward, and where they were taken.
  std::vector<ArgMax<Scalar>> qmax(static_cast<std::size_t>(B)), kmax(qmax);
  ArgMax<Scalar> key_max;
  if constexpr (Traits::max_shifted || Traits::pair_statistics) {
    if (Traits::max_shifted && saved) {
      savedSides<Map>(jobs, *saved, qmax, kmax);
    } else if (Traits::max_shifted || P) {
      for (HeadJob<Scalar>& j : jobs) scanSides<Map>(j, qmax, kmax, key_max);
      for (HeadJob<Scalar>& j : jobs) {
        j.qside.shift = qmax[std::size_t(j.b)].value;
        j.kside.shift = kmax[std::size_t(j.b)].value;
        j.kside.key_max = key_max.value;
      }
    }
  }
  forEach(B * N, poolFor(call.pool, flops), [&](Index i) { kernel(jobs[std::size_t(i)]); });
  if constexpr (Traits::max_shifted) {
    for (Index b = 0; b < B; ++b) {
      Scalar dq_shift = 0, dk_shift = 0;
      for (Index n = 0; n < N; ++n) {
        dq_shift += jobs[std::size_t(b * N + n)].dshift_q;
        dk_shift += jobs[std::size_t(b * N + n)].dshift_k;
      }
      addMaxGradient(qmax[std::size_t(b)], dq_shift, P, Scalar(1), call.dq, call.T, N, d, rq);
      addMaxGradient(kmax[std::size_t(b)], dk_shift, P, Scalar(1), call.dk, S, N, d, rk);
    }
  } else if constexpr (Traits::pair_statistics) {
    Scalar total = 0;
    for (const HeadJob<Scalar>& j : jobs) total += j.dshift_k;
    const Scalar c = Scalar(1) / std::sqrt(std::sqrt(Scalar(d)));
    if (P) addMaxGradient(key_max, total, P, c, call.dk, S, N, d, rk);
  }
}

/// One part of the core backward: query rows [q0, q1) through `Map` (the short-sequence
/// softmax when `short_path`), against all keys.
template <typename Map, typename Scalar>
void backwardPart(const CoreGradCall<Scalar>& call, bool short_path, Index q0, Index q1) {
  const Index Tq = q1 - q0, S = call.S, d = call.dims.key_dim, dv = call.dims.value_dim;
  const Index F = featureDim(d, call.projection);
  const bool quadratic =
      short_path || (call.form == CoreForm::Auto ? explicitIsCheaper(Tq, S, F, dv)
                                                 : call.form == CoreForm::Explicit);
  const double flops = 6.0 * double(call.B * call.dims.heads) * double(Tq + S) * double(F) *
                       double(d + dv) *
                       (quadratic ? double(std::max<Index>(1, std::min(Tq, S))) : 1.0);
  // The forward saves the low-rank form's features only (not expplus's with a projection,
  // whose forward takes another path); under a non-finite shift they are recomputed.
  const SavedData<Scalar>* s = call.saved;
  const bool pair = feature_map_traits<Map>::pair_statistics && call.projection;
  const SavedData<Scalar>* saved =
      s && s->holds && !quadratic && !pair && s->q0 == q0 && s->finiteShifts() ? s : nullptr;
  runHeadJobs<Map>(call, short_path, q0, q1, saved, flops, [&](HeadJob<Scalar>& j) {
    if (quadratic) {
      quadraticBackward<Map>(j, short_path);
    } else {
      lowRankBackward<Map>(j);
    }
  });
}

/// The whole core backward: begin_kernel's softmax part (identity features, short path) for
/// query rows [0, K), the configured map for the rest.
template <typename Map, typename Scalar>
void coreBackward(const CoreGradCall<Scalar>& call) {
  if (call.B == 0 || call.T == 0) return;
  if (call.S == 0) {
    // No keys: the heads are zero whatever q, k and v are.
    if (call.heads) {
      std::fill_n(call.heads, call.B * call.T * call.dims.heads * call.dims.value_dim, Scalar(0));
    }
    return;
  }
  const Index K = std::min<Index>(call.begin_kernel, call.T);
  if (K > 0) backwardPart<Identity>(call, true, 0, K);
  if (K < call.T) backwardPart<Map>(call, call.is_short_seq, K, call.T);
}

}  // namespace detail
}  // namespace kattn
