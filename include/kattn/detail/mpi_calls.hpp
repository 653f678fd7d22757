#pragma once
/// \file
/// \private The passes of kattn::mpi::SequenceParallel (kattn/mpi.hpp): bidirectional by an
/// all-reduce of key summaries, causal by an exclusive scan of streaming states, both over
/// blocks of rows so that a rank holds one block's projections at a time. Local work runs
/// inside Comm::step, so that an exception on one rank reaches every rank before the next
/// collective call.

#include "../mpi.hpp"

namespace kattn {
namespace mpi {

template <typename Scalar, typename FeatureMap, typename Masking>
auto SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::prepare(const Rows& x)
    -> Prepared {
  Prepared p;
  p.r = rowScales(x.B, x.masked, x.mask, x.Lk);
  m_comm.step([&] { syncTwins(); });
  if constexpr (kPair) {
    if (!m_layer.config().hasProjection()) return p;  // expplus is then the identity
    // SPEC 2: per (b, n) the sums of squares and row sums of both sides over the whole
    // sequences, and the largest key logit over the whole key tensor.
    const Index N = m_layer.numHeads(), d = m_layer.keyDim(), F = m_layer.numFeatures();
    const Index per = 2 * (1 + d);
    p.stats.assign(std::size_t(x.B * N * per), Scalar(0));
    const Weights<Scalar>& w = m_layer.weights();
    const ThreadPool* pool = m_layer.threadPool().get();
    auto add = [&](const ConstTensorMap<Scalar, 4>& h, Index at, bool keys) {
      const Index n = h.dimension(1);
      Mat u;
      for (Index b = 0; b < x.B; ++b) {
        const Eigen::Map<const Mat> rows(h.data() + b * n * N * d, n, N * d);
        for (Index hd = 0; hd < N; ++hd) {
          Scalar* s = p.stats.data() + (b * N + hd) * per + at;
          const auto blk = rows.middleCols(hd * d, d);
          s[0] += blk.squaredNorm();
          Eigen::Map<Vector<Scalar>>(s + 1, d) += blk.colwise().sum().transpose();
          if (!keys) continue;
          u.resize(n, F);
          ExpPlus{}.logits(FeatureInput<Scalar>{blk, &m_layer.projection(), false},
                           FeatureBlock<Scalar>(u));
          if (u.size()) p.key_max = std::max(p.key_max, u.maxCoeff());
        }
      }
    };
    m_comm.step([&] {
      detail::BlockBuffer<Scalar> h;
      for (Index r0 = 0; r0 < x.Lq; r0 += kBlockRows) {
        const Index n = std::min(kBlockRows, x.Lq - r0);
        detail::projectHeads(x.q, x.B, x.Lq, r0, n, w.query_kernel, w.query_bias, p.r, pool, h);
        add(h.view(), 0, false);
      }
      for (Index r0 = 0; r0 < x.Lk; r0 += kBlockRows) {
        const Index n = std::min(kBlockRows, x.Lk - r0);
        detail::projectHeads(x.k, x.B, x.Lk, r0, n, w.key_kernel, w.key_bias, p.r, pool, h);
        add(h.view(), 1 + d, true);
      }
    });
    m_comm.allreduce(p.stats.data(), p.stats.size(), MPI_SUM);
    m_comm.allreduce(&p.key_max, 1, MPI_MAX);
    p.lengths[0] = x.Lq;
    p.lengths[1] = x.Lk;
    m_comm.allreduce(p.lengths, 2, MPI_SUM);
  }
  return p;
}

template <typename Scalar, typename FeatureMap, typename Masking>
void SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::block(
    const Rows& x, const Prepared& p, Index q0, Index nq, Index k0, Index nk,
    CoreInputs& c) const {
  const Weights<Scalar>& w = m_layer.weights();
  const ThreadPool* pool = m_layer.threadPool().get();
  const std::vector<Scalar> ones(std::size_t(x.B), Scalar(1));
  const bool pair = kPair && m_layer.config().hasProjection();
  // expplus: the heads go to scratch, its features to q and k.
  detail::projectHeads(x.q, x.B, x.Lq, q0, nq, w.query_kernel, w.query_bias, p.r, pool,
                       pair ? c.scratch : c.q);
  if (pair) features(p, c.scratch.view(), true, c.q);
  detail::projectHeads(x.k, x.B, x.Lk, k0, nk, w.key_kernel, w.key_bias, p.r, pool,
                       pair ? c.scratch : c.k);
  if (pair) features(p, c.scratch.view(), false, c.k);
  detail::projectHeads(x.v, x.B, x.Lk, k0, nk, w.value_kernel, w.value_bias, ones, pool, c.v);
}

template <typename Scalar, typename FeatureMap, typename Masking>
void SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::features(
    const Prepared& p, const ConstTensorMap<Scalar, 4>& h, bool queries,
    detail::BlockBuffer<Scalar>& out) const {
  // SPEC 2, with the coefficients of the whole sequences' statistics.
  const Index B = h.dimension(0), n = h.dimension(1), N = m_layer.numHeads();
  const Index d = m_layer.keyDim(), F = m_layer.numFeatures(), per = 2 * (1 + d);
  const Mat& P = m_layer.projection();
  Scalar* f = out.reshape({B, n, N, F});
  for (Index b = 0; b < B; ++b) {
    const Eigen::Map<const Mat> rows(h.data() + b * n * N * d, n, N * d);
    Eigen::Map<Mat> o(f + b * n * N * F, n, N * F);
    for (Index hd = 0; hd < N; ++hd) {
      const Scalar* s = p.stats.data() + (b * N + hd) * per;
      typename ExpPlus::template SideStatistics<Scalar> sq, sk;
      sq.sum_squares = s[0];
      sq.sum = Eigen::Map<const Vector<Scalar>>(s + 1, d);
      sq.length = Index(p.lengths[0]);
      sk.sum_squares = s[1 + d];
      sk.sum = Eigen::Map<const Vector<Scalar>>(s + 2 + d, d);
      sk.length = Index(p.lengths[1]);
      const FeatureInput<Scalar> in{rows.middleCols(hd * d, d), &P, queries};
      FeatureBlock<Scalar> blk(o.middleCols(hd * F, F));
      ExpPlus{}.logits(in, blk);
      ExpPlus{}.finish(in, blk,
                       queries ? ExpPlus::coefficients(sq, sk, d) : ExpPlus::coefficients(sk, sq, d),
                       queries ? Scalar(0) : p.key_max);
    }
  }
}

template <typename Scalar, typename FeatureMap, typename Masking>
void SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::shifts(
    const Rows& x, const Prepared& p, std::vector<Scalar>& qshift, std::vector<Scalar>* kshift) {
  // The exp maps' largest logits of each side over the whole sequences (SPEC 2): a pass of
  // projections before the core, as the single-process pass makes.
  qshift.assign(std::size_t(x.B), -std::numeric_limits<Scalar>::infinity());
  if (kshift) kshift->assign(std::size_t(x.B), -std::numeric_limits<Scalar>::infinity());
  if constexpr (feature_map_traits<CoreMap>::max_shifted) {
    m_comm.step([&] {
      auto fold = [](std::vector<Scalar>& into, const std::vector<Scalar>& from) {
        for (std::size_t b = 0; b < into.size(); ++b) into[b] = std::max(into[b], from[b]);
      };
      CoreInputs c;
      for (Index r0 = 0; r0 < x.Lq; r0 += kBlockRows) {
        const Index n = std::min(kBlockRows, x.Lq - r0);
        block(x, p, r0, n, 0, 0, c);
        fold(qshift, queryShift(m_core, c.q.view()));
      }
      for (Index r0 = 0; kshift && r0 < x.Lk; r0 += kBlockRows) {
        const Index n = std::min(kBlockRows, x.Lk - r0);
        block(x, p, 0, 0, r0, n, c);
        fold(*kshift, queryShift(m_core, c.k.view()));
      }
    });
    m_comm.allreduce(qshift.data(), qshift.size(), MPI_MAX);
    if (kshift) m_comm.allreduce(kshift->data(), kshift->size(), MPI_MAX);
  }
}

template <typename Scalar, typename FeatureMap, typename Masking>
Tensor<Scalar, 3> SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::bidirectional(
    const Rows& x) {
  constexpr bool shifted = feature_map_traits<CoreMap>::max_shifted;
  const Index B = x.B, N = m_layer.numHeads(), F = m_layer.numFeatures();
  const Index dv = m_layer.valueDim();
  const Prepared p = prepare(x);
  std::vector<Scalar> qshift;
  shifts(x, p, qshift, nullptr);
  KeySummary<Scalar> summary(B, N, F, dv);
  m_comm.step([&] {
    Tensor<Scalar, 2> m;
    CoreInputs c;
    for (Index r0 = 0; r0 < x.Lk; r0 += kBlockRows) {
      const Index n = std::min(kBlockRows, x.Lk - r0);
      block(x, p, 0, 0, r0, n, c);
      std::optional<ConstTensorMap<Scalar, 2>> mask;
      if (x.mask) {
        m = Tensor<Scalar, 2>(B, n);
        for (Index b = 0; b < B; ++b)
          std::copy(x.mask + b * x.Lk + r0, x.mask + b * x.Lk + r0 + n, m.data() + b * n);
        mask.emplace(m.data(), B, n);
      }
      summary = combine(summary, summarizeKeys(m_keys, c.k.view(), c.v.view(), mask));
    }
  });
  // Every rank's sums relative to the largest key logit of all ranks, then added.
  if constexpr (shifted) {
    std::vector<Scalar> all(std::size_t(B * N));
    for (Index b = 0; b < B; ++b)
      for (Index n = 0; n < N; ++n) all[std::size_t(b * N + n)] = summary.shift(b, n);
    m_comm.allreduce(all.data(), all.size(), MPI_MAX);
    for (Index b = 0; b < B; ++b)
      for (Index n = 0; n < N; ++n) {
        const Scalar own = summary.shift(b, n), top = all[std::size_t(b * N + n)];
        const Scalar w = std::isfinite(own) && std::isfinite(top) ? std::exp(own - top) : 1;
        summary.kv(b, n) *= w;
        summary.z(b, n) *= w;
        summary.shift(b, n) = top;
      }
  }
  const Index per = F * dv + F;
  std::vector<Scalar> sums(std::size_t(B * N * per));
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n) {
      Scalar* s = sums.data() + (b * N + n) * per;
      Eigen::Map<Mat>(s, F, dv) = summary.kv(b, n);
      Eigen::Map<Vector<Scalar>>(s + F * dv, F) = summary.z(b, n);
    }
  m_comm.allreduce(sums.data(), sums.size(), MPI_SUM);
  Tensor<Scalar, 3> y(B, x.Lq, m_layer.outputDim());
  m_comm.step([&] {
    for (Index b = 0; b < B; ++b)
      for (Index n = 0; n < N; ++n) {
        const Scalar* s = sums.data() + (b * N + n) * per;
        summary.kv(b, n) = Eigen::Map<const Mat>(s, F, dv);
        summary.z(b, n) = Eigen::Map<const Vector<Scalar>>(s + F * dv, F);
      }
    CoreInputs c;
    detail::BlockBuffer<Scalar> heads;
    for (Index r0 = 0; r0 < x.Lq; r0 += kBlockRows) {
      const Index n = std::min(kBlockRows, x.Lq - r0);
      block(x, p, r0, n, 0, 0, c);
      heads.reshape({B, n, N, dv});
      readout(m_keys, c.q.view(), summary, heads.map(), qshift);
      detail::projectOutput(heads.view(), m_layer.weights(), m_layer.threadPool().get(), y.data(),
                            x.Lq, r0);
    }
  });
  return y;
}

template <typename Scalar, typename FeatureMap, typename Masking>
void SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::feed(
    const Rows& x, const Prepared& p, Index a, Index b, Index lead, StreamingState<Scalar>& s,
    Scalar* y) const {
  const Index B = x.B, C = m_core.masking().chunk;
  const Index step = std::max(C, kBlockRows / C * C);
  Tensor<Scalar, 2> m;
  CoreInputs c;
  detail::BlockBuffer<Scalar> heads, qp, kp, vp;
  const Index N = m_layer.numHeads(), dv = m_layer.valueDim();
  for (Index r0 = a; r0 < b;) {
    // Left padding's first chunk: `pad` copies of its first row, masked, in front. A copy
    // leaves the exp maps' largest key logit as it is, and a masked key adds nothing.
    const Index pad = r0 == 0 ? lead : 0, n = std::min(b - r0, step - pad);
    block(x, p, r0, n, r0, n, c);
    m.resize(B, pad + n);
    for (Index i = 0; i < B; ++i)
      for (Index t = 0; t < pad + n; ++t)
        m(i, t) = t < pad ? Scalar(0) : (x.mask ? x.mask[i * x.Lk + r0 + t - pad] : Scalar(1));
    heads.reshape({B, pad + n, N, dv});
    if (pad > 0) {
      detail::padRows(c.q.view(), pad, qp);
      detail::padRows(c.k.view(), pad, kp);
      detail::padRows(c.v.view(), pad, vp);
      m_core.attend(qp.view(), kp.view(), vp.view(), m, s, heads.map());
    } else {
      m_core.attend(c.q.view(), c.k.view(), c.v.view(), m, s, heads.map());
    }
    if (y) {
      const ConstTensorMap<Scalar, 4> all = heads.view();
      if (pad > 0) {
        // The real rows' heads, without the padding's.
        const Tensor<Scalar, 4> real =
            all.slice(std::array<Index, 4>{0, pad, 0, 0}, std::array<Index, 4>{B, n, N, dv});
        detail::projectOutput(ConstTensorMap<Scalar, 4>(real.data(), B, n, N, dv),
                              m_layer.weights(), m_layer.threadPool().get(), y, x.Lq, r0);
      } else {
        detail::projectOutput(all, m_layer.weights(), m_layer.threadPool().get(), y, x.Lq, r0);
      }
    }
    r0 += n;
  }
}

template <typename Scalar, typename FeatureMap, typename Masking>
StreamingState<Scalar> SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::ownState(
    const Rows& x, const Prepared& p, Index lead, StreamingState<Scalar> s) {
  constexpr bool shifted = feature_map_traits<CoreMap>::max_shifted;
  const Index B = x.B, L = x.Lq, N = m_layer.numHeads();
  const CausalWindowed& cw = m_core.masking();
  const Index C = cw.chunk, chunks = (lead + L + C - 1) / C;
  if (L == 0) return s;
  if (cw.window < kUnboundedWindow) {
    // A finite window: only the last W chunks stay in the state.
    const Index keep = std::min(chunks, cw.window);
    const Index skip = chunks > keep ? (chunks - keep) * C - lead : 0;
    feed(x, p, skip, L, lead, s, nullptr);
    s.addTokens(skip);
    return s;
  }
  // Nothing leaves the window: the state is the sums over every key, chunk c weighted by
  // gamma^(chunks after it), which the key summary takes as mask weights. No query is read.
  KeySummary<Scalar> sum(B, N, m_layer.numFeatures(), m_layer.valueDim());
  Tensor<Scalar, 2> weight;
  CoreInputs c;
  for (Index r0 = 0; r0 < L; r0 += kBlockRows) {
    const Index n = std::min(kBlockRows, L - r0);
    block(x, p, 0, 0, r0, n, c);
    weight = Tensor<Scalar, 2>(B, n);
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < n; ++t) {
        const Scalar m = x.mask ? x.mask[b * L + r0 + t] : Scalar(1);
        const Index after = chunks - 1 - (r0 + t + lead) / C;
        weight(b, t) = cw.decay ? m * std::pow(Scalar(*cw.decay), Scalar(after)) : m;
      }
    sum = combine(sum, summarizeKeys(m_keys, c.k.view(), c.v.view(),
                                     std::optional<ConstTensorMap<Scalar, 2>>(
                                         ConstTensorMap<Scalar, 2>(weight.data(), B, n))));
  }
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n) {
      Scalar w = 1;
      if constexpr (shifted) {
        const Scalar own = sum.shift(b, n), all = s.keyShift(b);
        w = std::isfinite(own) && std::isfinite(all) ? std::exp(own - all) : 1;
      }
      s.headStates(b)[n].kv = w * sum.kv(b, n);
      s.headStates(b)[n].z = w * sum.z(b, n);
    }
  s.addTokens(lead + L);
  return s;
}

template <typename Scalar, typename FeatureMap, typename Masking>
Tensor<Scalar, 3> SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::causal(
    const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
    const std::optional<ConstTensorMap<Scalar, 3>>& k,
    const std::optional<ConstTensorMap<Scalar, 2>>& mask, const std::vector<std::int64_t>& lengths,
    StreamingState<Scalar>* final_state) {
  constexpr bool shifted = feature_map_traits<CoreMap>::max_shifted;
  const Index B = q.dimension(0);
  Index T = 0;
  for (std::int64_t n : lengths) T += Index(n);
  // The same on every rank: a length that padding none refuses throws everywhere.
  const detail::ChunkPlan plan(lengths, m_layer.masking().chunk, m_layer.masking().leadingPad(T));
  const int me = rank();
  const Index L = plan.rows(me), lead = plan.computed[std::size_t(me)] == 0 ? plan.lead : 0;
  // The rows of the chunks this rank computes: only rows of cut chunks move.
  auto exchange = [&](const std::vector<Scalar>& s, const std::vector<std::size_t>& sc,
                      std::vector<Scalar>& r, const std::vector<std::size_t>& rc) {
    m_comm.alltoallv(s, sc, r, rc);
  };
  std::vector<Scalar> qm, vm, km, mm;
  auto moved = [&](const Scalar* rows, Index width, std::vector<Scalar>& out) -> const Scalar* {
    if (plan.aligned()) return rows;
    out = detail::moveRows(plan, me, B, width, rows, true, exchange);
    return out.data();
  };
  Rows x;
  x.B = B;
  x.Lq = x.Lk = L;
  x.q = moved(q.data(), q.dimension(2), qm);
  x.v = moved(v.data(), v.dimension(2), vm);
  x.k = k ? moved(k->data(), k->dimension(2), km) : x.v;
  x.mask = mask ? moved(mask->data(), 1, mm) : nullptr;
  x.masked = bool(mask);
  const Prepared p = prepare(x);
  std::vector<Scalar> qshift, kshift;
  shifts(x, p, qshift, &kshift);
  StreamingState<Scalar> fresh = m_core.makeState(B, StreamingMode::Exact);
  for (Index b = 0; b < B && shifted; ++b) fresh.raiseKeyShift(b, kshift[std::size_t(b)]);
  // The scan. The last rank's own state is nobody's prefix.
  std::string own;
  m_comm.step([&] {
    own = me + 1 < size() && L > 0 ? ownState(x, p, lead, fresh).toBytes() : fresh.toBytes();
  });
  // The operator must not throw between the scan's messages (a rank that left would leave
  // its peers waiting): it keeps its first error for the agreement after the scan.
  std::exception_ptr scan_error;
  const std::string before = m_comm.exclusiveScan(
      own, fresh.toBytes(), [&](const std::string& a, const std::string& b) {
        try {
          const auto sa = StreamingState<Scalar>::fromBytes(a);
          const auto sb = StreamingState<Scalar>::fromBytes(b);
          if (sb.tokens() == 0) return a;
          if (sa.tokens() == 0) return b;
          return combine(sa, sb).toBytes();
        } catch (...) {
          if (!scan_error) scan_error = std::current_exception();
          return b;
        }
      });
  m_comm.agree(scan_error);
  Tensor<Scalar, 3> yc(B, L, m_layer.outputDim());
  m_comm.step([&] {
    StreamingState<Scalar> state = StreamingState<Scalar>::fromBytes(before);
    for (Index b = 0; b < B && shifted; ++b) state.fixQueryShift(b, qshift[std::size_t(b)]);
    feed(x, p, 0, L, lead, state, yc.data());
    if (final_state && me + 1 == size()) {
      // Through bytes: the fixed query shift is a setting of this pass, not of the stream.
      *final_state = StreamingState<Scalar>::fromBytes(state.toBytes());
    }
  });
  if (plan.aligned()) return yc;
  const std::vector<Scalar> back = detail::moveRows(plan, me, B, yc.dimension(2), yc.data(),
                                                    false, exchange);
  Tensor<Scalar, 3> y(B, q.dimension(1), yc.dimension(2));
  std::copy(back.begin(), back.end(), y.data());
  return y;
}

}  // namespace mpi
}  // namespace kattn
