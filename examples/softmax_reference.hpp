#pragma once
/// \file
/// Exact softmax attention, the baseline the examples and benchmarks compare kattn with.
///
/// This is the function kernel attention approximates (Vaswani et al. 2017):
/// `a_t = sum_s softmax_s(s q_t . k_s) v_s`, computed exactly (up to float rounding) and as
/// fast as we know how to on a CPU with Eigen, so that a speed-up measured against it is a
/// speed-up over a serious implementation, not over a strawman:
/// - flash-attention style (Dao et al. 2022): queries in blocks, keys in blocks, an online
///   softmax (running row maximum m, running normaliser l, rescaled accumulator), so the
///   T x S score matrix never exists; memory beyond q, k, v and the output is
///   O(query_rows * key_rows + query_rows * d_v) per thread;
/// - both products of a block (`q k^T` and `p v`) go through Eigen's blocked GEMM, the
///   exponentials through Eigen's vectorised `exp`;
/// - the causal variant skips key blocks wholly in the future and masks only the diagonal
///   block, so it does about half the work of the bidirectional one;
/// - query blocks are independent: they are spread over a kattn::ThreadPool (the same pool
///   type kattn's layer runs on, so both sides use the same threads).
///
/// `multiHeadSoftmaxAttention` wraps it in the same dense projections as a kattn layer
/// (kattn::Weights: Wq, Wk, Wv, Wo with biases), i.e. Keras `MultiHeadAttention` without
/// dropout, so a comparison covers whole layers: same inputs, same weights, same output shape.
///
/// `naiveSoftmaxAttention` materialises the T x S matrix; it exists only to check the blocked
/// version on small inputs.

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>

namespace kattn_examples {

using kattn::Index;

/// Read-only rows of one head, possibly strided (one head inside a `[L, N*d]` matrix).
template <typename Scalar>
using ConstRows = Eigen::Ref<const kattn::Matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Writable rows of one head, possibly strided.
template <typename Scalar>
using Rows = Eigen::Ref<kattn::Matrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Block sizes of the blocked softmax. The defaults were the fastest (or within 3% of it) of
/// {32, 64, 128, 256} x {128, 256, 512, 1024} for d = d_v = 64, float, T = S = 4096, with and
/// without -march=native, on the 2-core machine the demo was written on. The results do not
/// depend on them beyond rounding.
struct SoftmaxBlocking {
  Index query_rows = 64;   ///< queries per block (one task of the pool in softmaxAttention)
  Index key_rows = 256;    ///< keys per inner step
  Index slab_rows = 256;   ///< multiHeadSoftmaxAttention: most query rows per task
};

/// Scratch of one query block, reused across key blocks and heads.
template <typename Scalar>
struct SoftmaxScratch {
  std::vector<Scalar> scores;             // [query_rows, key_rows], row-major
  kattn::Vector<Scalar> row_max, row_sum, rescale, new_max;
  kattn::Matrix<Scalar> acc;              // [query_rows, d_v]
};

/**
 * \brief Exact softmax attention of one block of queries against all keys, online softmax.
 *
 * \param q [L, d] queries, already multiplied by the scale
 * \param k [S, d] keys
 * \param v [S, d_v] values
 * \param causal when true, query row r (absolute position q0 + r) sees keys s <= q0 + r only
 * \param q0 absolute position of the first query (used only when causal)
 * \param key_rows keys per inner step
 * \param out [L, d_v]
 * \pre causal implies q0 + L <= S.
 */
template <typename Scalar>
void softmaxAttentionBlock(const ConstRows<Scalar>& q, const ConstRows<Scalar>& k,
                           const ConstRows<Scalar>& v, bool causal, Index q0, Index key_rows,
                           SoftmaxScratch<Scalar>& ws, Rows<Scalar> out) {
  using Mat = kattn::Matrix<Scalar>;
  const Index L = q.rows(), dv = v.cols();
  const Index S = causal ? std::min<Index>(k.rows(), q0 + L) : k.rows();
  const Scalar neg_inf = -std::numeric_limits<Scalar>::infinity();
  ws.scores.resize(std::size_t(L * key_rows));
  ws.row_max.setConstant(L, neg_inf);
  ws.row_sum.setZero(L);
  ws.acc.setZero(L, dv);
  if (S == 0) {
    out.setZero();
    return;
  }
  for (Index k0 = 0; k0 < S; k0 += key_rows) {
    const Index len = std::min(key_rows, S - k0);
    Eigen::Map<Mat> p(ws.scores.data(), L, len);
    p.noalias() = q * k.middleRows(k0, len).transpose();
    // Keys after a query's own position, only in the block that crosses the diagonal. Set to
    // -inf so that they do not raise the maximum, and to exactly 0 after exp (Eigen's exp
    // returns ~1e-38, not 0, for -inf).
    const bool crosses = causal && k0 + len - 1 > q0;
    auto maskFuture = [&](Scalar value) {
      for (Index r = 0; r < L; ++r) {
        const Index first = q0 + r + 1 - k0;  // first future key, block-local
        if (first < len) p.row(r).tail(len - std::max<Index>(first, 0)).setConstant(value);
      }
    };
    if (crosses) maskFuture(neg_inf);
    // Every row sees key 0 in the first block, so the running maximum is finite from then on.
    ws.new_max = p.rowwise().maxCoeff().cwiseMax(ws.row_max);
    ws.rescale = (ws.row_max - ws.new_max).array().exp().matrix();
    p.array().colwise() -= ws.new_max.array();
    p.array() = p.array().exp();
    if (crosses) maskFuture(Scalar(0));
    ws.row_sum = ws.row_sum.cwiseProduct(ws.rescale) + p.rowwise().sum();
    if (k0 > 0) ws.acc = (ws.acc.array().colwise() * ws.rescale.array()).matrix();
    ws.acc.noalias() += p * v.middleRows(k0, len);
    ws.row_max.swap(ws.new_max);
  }
  out = (ws.acc.array().colwise() / ws.row_sum.array()).matrix();
}

/**
 * \brief Exact softmax attention of one head: `out = softmax(scale q k^T [causal]) v`.
 *
 * \param q [T, d], \param k [S, d], \param v [S, d_v], \param out [T, d_v]
 * \param causal query t sees keys s <= t (needs S == T)
 * \param pool query blocks are spread over it (null: the calling thread)
 * \throws std::invalid_argument on mismatched shapes.
 * \note O(T S (d + d_v)) multiply-adds (half with causal) and T S exponentials; extra memory
 *       O(query_rows (key_rows + d + d_v)) per thread.
 */
template <typename Scalar>
void softmaxAttention(const ConstRows<Scalar>& q, const ConstRows<Scalar>& k,
                      const ConstRows<Scalar>& v, Scalar scale, bool causal, Rows<Scalar> out,
                      const kattn::ThreadPool* pool = nullptr, SoftmaxBlocking blocking = {}) {
  const Index T = q.rows(), d = q.cols(), S = k.rows(), dv = v.cols();
  if (k.cols() != d || v.rows() != S || out.rows() != T || out.cols() != dv) {
    throw std::invalid_argument("softmaxAttention: shapes q [T, d], k [S, d], v [S, d_v], "
                                "out [T, d_v] do not fit");
  }
  if (causal && S != T) {
    throw std::invalid_argument("softmaxAttention: causal attention needs S == T");
  }
  const Index Bq = blocking.query_rows, blocks = (T + Bq - 1) / Bq;
  auto task = [&](Index i) {
    const Index q0 = i * Bq, L = std::min(Bq, T - q0);
    SoftmaxScratch<Scalar> ws;
    const kattn::Matrix<Scalar> qs = q.middleRows(q0, L) * scale;
    softmaxAttentionBlock<Scalar>(qs, k, v, causal, q0, blocking.key_rows, ws,
                                  out.middleRows(q0, L));
  };
  if (pool) {
    pool->parallelFor(blocks, task);
  } else {
    for (Index i = 0; i < blocks; ++i) task(i);
  }
}

/**
 * \brief The T x S reference of softmaxAttention, for checking it on small inputs only.
 * Same parameters; memory O(T S).
 */
template <typename Scalar>
void naiveSoftmaxAttention(const ConstRows<Scalar>& q, const ConstRows<Scalar>& k,
                           const ConstRows<Scalar>& v, Scalar scale, bool causal,
                           Rows<Scalar> out) {
  kattn::Matrix<Scalar> p = (q * k.transpose()) * scale;
  for (Index t = 0; t < p.rows(); ++t) {
    const Index visible = causal ? std::min<Index>(t + 1, p.cols()) : p.cols();
    const Scalar mx = p.row(t).head(visible).maxCoeff();
    p.row(t).head(visible) = (p.row(t).head(visible).array() - mx).exp().matrix();
    p.row(t).tail(p.cols() - visible).setZero();
    p.row(t) /= p.row(t).sum();
  }
  out.noalias() = p * v;
}

/**
 * \brief A whole multi-head softmax attention layer with the weights of a kattn layer: the
 * same dense projections (`q = x_q Wq + bq`, `k = x_k Wk + bk`, `v = x_v Wv + bv`), exact
 * softmax attention per head with scale `scale` (default 1/sqrt(d)), and the output projection
 * `y = a Wo + bo`. Keras `MultiHeadAttention` in inference mode.
 *
 * \param w kattn::Weights: query_kernel [D_q, N, d], key_kernel [D_k, N, d],
 *        value_kernel [D_v, N, d_v], output_kernel [N, d_v, O] and their biases (empty: none);
 *        the `output_softmax_*` pair is not used
 * \param query [B, T, D_q]
 * \param value [B, S, D_v]
 * \param key [B, S, D_k]; absent: the value input is the key input
 * \param causal query t sees keys s <= t (needs S == T)
 * \param pool the projections and query blocks are spread over it (null: the calling thread)
 * \return [B, T, O]
 * \throws std::invalid_argument on mismatched shapes.
 * \note Per batch row, keeps the projected keys and values [S, N d] and [S, N d_v] (what any
 *       exact attention must keep or recompute); queries are projected, attended and
 *       projected out one slab of rows at a time, so nothing else grows with T.
 */
template <typename Scalar>
kattn::Tensor<Scalar, 3> multiHeadSoftmaxAttention(
    const kattn::Weights<Scalar>& w, const kattn::ConstTensorMap<Scalar, 3>& query,
    const kattn::ConstTensorMap<Scalar, 3>& value,
    const std::optional<kattn::ConstTensorMap<Scalar, 3>>& key = std::nullopt,
    bool causal = false, const kattn::ThreadPool* pool = nullptr,
    std::optional<double> scale = std::nullopt, SoftmaxBlocking blocking = {}) {
  using Mat = kattn::Matrix<Scalar>;
  using ConstMap = Eigen::Map<const Mat>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  const kattn::ConstTensorMap<Scalar, 3>& xk = key ? *key : value;
  const Index B = query.dimension(0), T = query.dimension(1), S = value.dimension(1);
  const Index Dq = w.query_kernel.dimension(0), N = w.query_kernel.dimension(1),
              d = w.query_kernel.dimension(2);
  const Index Dk = w.key_kernel.dimension(0), Dv = w.value_kernel.dimension(0),
              dv = w.value_kernel.dimension(2), O = w.output_kernel.dimension(2);
  if (query.dimension(2) != Dq || value.dimension(0) != B || value.dimension(2) != Dv ||
      xk.dimension(0) != B || xk.dimension(1) != S || xk.dimension(2) != Dk ||
      w.key_kernel.dimension(1) != N || w.key_kernel.dimension(2) != d ||
      w.value_kernel.dimension(1) != N || w.output_kernel.dimension(0) != N ||
      w.output_kernel.dimension(1) != dv) {
    throw std::invalid_argument("multiHeadSoftmaxAttention: inputs and weights do not fit");
  }
  if (causal && S != T) {
    throw std::invalid_argument("multiHeadSoftmaxAttention: causal attention needs S == T");
  }
  const Scalar s = Scalar(scale ? *scale : 1.0 / std::sqrt(double(d)));
  const ConstMap Wq(w.query_kernel.data(), Dq, N * d), Wk(w.key_kernel.data(), Dk, N * d),
      Wv(w.value_kernel.data(), Dv, N * dv), Wo(w.output_kernel.data(), N * dv, O);
  auto forEach = [&](Index n, const auto& f) {
    if (pool) {
      pool->parallelFor(n, f);
    } else {
      for (Index i = 0; i < n; ++i) f(i);
    }
  };
  // out = x[b, rows] W + bias, in slices of rows spread over the pool.
  auto dense = [&](const kattn::ConstTensorMap<Scalar, 3>& x, Index b, const ConstMap& W,
                   const auto& bias, Mat& out) {
    const Index L = x.dimension(1), D = x.dimension(2), slice = 256;
    out.resize(L, W.cols());
    forEach((L + slice - 1) / slice, [&](Index i) {
      const Index r0 = i * slice, len = std::min(slice, L - r0);
      auto o = out.middleRows(r0, len);
      o.noalias() = ConstMap(x.data() + (b * L + r0) * D, len, D) * W;
      if (bias.size()) o.rowwise() += Eigen::Map<const RowVec>(bias.data(), W.cols());
    });
  };

  kattn::Tensor<Scalar, 3> y(B, T, O);
  Mat ks, vs;
  // A task projects a slab of query rows, attends it in blocks of query_rows, and projects
  // it out: slabs of slab_rows amortise the packing of Wq and Wo in the GEMMs, and are cut
  // smaller when there would be too few of them to keep the threads busy.
  const Index Bq = blocking.query_rows;
  const Index threads = pool ? pool->threads() : 1;
  const Index wanted = std::max<Index>(Bq, (T + 4 * threads - 1) / (4 * threads));
  const Index slab = std::min(blocking.slab_rows, (wanted + Bq - 1) / Bq * Bq);
  const Index slabs = (T + slab - 1) / slab;
  for (Index b = 0; b < B; ++b) {
    dense(xk, b, Wk, w.key_bias, ks);
    dense(value, b, Wv, w.value_bias, vs);
    forEach(slabs, [&](Index i) {
      const Index r0 = i * slab, R = std::min(slab, T - r0);
      Mat qs(R, N * d), heads(R, N * dv);
      qs.noalias() = ConstMap(query.data() + (b * T + r0) * Dq, R, Dq) * Wq;
      if (w.query_bias.size()) qs.rowwise() += Eigen::Map<const RowVec>(w.query_bias.data(), N * d);
      qs *= s;
      SoftmaxScratch<Scalar> ws;
      for (Index q0 = 0; q0 < R; q0 += Bq) {
        const Index L = std::min(Bq, R - q0);
        for (Index n = 0; n < N; ++n) {
          softmaxAttentionBlock<Scalar>(qs.block(q0, n * d, L, d), ks.middleCols(n * d, d),
                                        vs.middleCols(n * dv, dv), causal, r0 + q0,
                                        blocking.key_rows, ws, heads.block(q0, n * dv, L, dv));
        }
      }
      Eigen::Map<Mat> yb(y.data() + (b * T + r0) * O, R, O);
      yb.noalias() = heads * Wo;
      if (w.output_bias.size()) yb.rowwise() += Eigen::Map<const RowVec>(w.output_bias.data(), O);
    });
  }
  return y;
}

}  // namespace kattn_examples
