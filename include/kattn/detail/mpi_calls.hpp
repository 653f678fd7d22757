#pragma once
/// \file
/// \private The passes of kattn::mpi::SequenceParallel (kattn/mpi.hpp): bidirectional by an
/// all-reduce of key summaries, causal by an exclusive scan of streaming states. Local work
/// runs inside Comm::step, so that an exception on one rank reaches every rank before the
/// next collective call.

#include "../mpi.hpp"

namespace kattn {
namespace mpi {

template <typename Scalar, typename FeatureMap, typename Masking>
auto SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::coreInputs(
    const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
    const std::optional<ConstTensorMap<Scalar, 3>>& k,
    const std::optional<ConstTensorMap<Scalar, 2>>& mask) -> CoreInputs {
  const Index B = q.dimension(0);
  const std::vector<Scalar> r = rowScales(B, mask);
  const ThreadPool* pool = m_layer.threadPool().get();
  const Weights<Scalar>& w = m_layer.weights();
  CoreInputs x;
  m_comm.step([&] {
    syncTwins();
    x.q = detail::projectHeads(q, w.query_kernel, w.query_bias, r, pool);
    x.k = detail::projectHeads(k ? *k : v, w.key_kernel, w.key_bias, r, pool);
    x.v = detail::projectHeads(v, w.value_kernel, w.value_bias,
                               std::vector<Scalar>(std::size_t(B), Scalar(1)), pool);
  });
  if constexpr (kPair) {
    if (!m_layer.config().hasProjection()) return x;  // expplus is then the identity
    // SPEC 2: per (b, n) the sums of squares and row sums of both sides over the whole
    // sequences, and the largest key logit over the whole key tensor.
    using Map = ExpPlus;
    const Index N = m_layer.numHeads(), d = m_layer.keyDim(), F = m_layer.numFeatures();
    const Mat& P = m_layer.projection();
    const Index per = 2 * (1 + d);
    std::vector<Scalar> stats(std::size_t(B * N * per), Scalar(0));
    Scalar key_max = -std::numeric_limits<Scalar>::infinity();
    auto rows = [&](const Tensor<Scalar, 4>& t, Index b) {
      return Eigen::Map<const Mat>(t.data() + b * t.dimension(1) * N * d, t.dimension(1), N * d);
    };
    m_comm.step([&] {
      Mat u;
      for (Index b = 0; b < B; ++b) {
        for (Index n = 0; n < N; ++n) {
          Scalar* s = stats.data() + (b * N + n) * per;
          const auto qb = rows(x.q, b).middleCols(n * d, d);
          const auto kb = rows(x.k, b).middleCols(n * d, d);
          s[0] = qb.squaredNorm();
          Eigen::Map<Vector<Scalar>>(s + 1, d) = qb.colwise().sum().transpose();
          s[1 + d] = kb.squaredNorm();
          Eigen::Map<Vector<Scalar>>(s + 2 + d, d) = kb.colwise().sum().transpose();
          u.resize(kb.rows(), F);
          Map{}.logits(FeatureInput<Scalar>{kb, &P, false}, FeatureBlock<Scalar>(u));
          if (u.size()) key_max = std::max(key_max, u.maxCoeff());
        }
      }
    });
    m_comm.allreduce(stats.data(), stats.size(), MPI_SUM);
    m_comm.allreduce(&key_max, 1, MPI_MAX);
    std::int64_t lengths[2] = {q.dimension(1), v.dimension(1)};
    m_comm.allreduce(lengths, 2, MPI_SUM);
    CoreInputs f;
    m_comm.step([&] {
      f.q = Tensor<Scalar, 4>(B, q.dimension(1), N, F);
      f.k = Tensor<Scalar, 4>(B, v.dimension(1), N, F);
      f.v = std::move(x.v);
      for (Index b = 0; b < B; ++b) {
        Eigen::Map<Mat> qf(f.q.data() + b * f.q.dimension(1) * N * F, f.q.dimension(1), N * F);
        Eigen::Map<Mat> kf(f.k.data() + b * f.k.dimension(1) * N * F, f.k.dimension(1), N * F);
        for (Index n = 0; n < N; ++n) {
          const Scalar* s = stats.data() + (b * N + n) * per;
          typename Map::template SideStatistics<Scalar> sq, sk;
          sq.sum_squares = s[0];
          sq.sum = Eigen::Map<const Vector<Scalar>>(s + 1, d);
          sq.length = Index(lengths[0]);
          sk.sum_squares = s[1 + d];
          sk.sum = Eigen::Map<const Vector<Scalar>>(s + 2 + d, d);
          sk.length = Index(lengths[1]);
          const FeatureInput<Scalar> qin{rows(x.q, b).middleCols(n * d, d), &P, true};
          const FeatureInput<Scalar> kin{rows(x.k, b).middleCols(n * d, d), &P, false};
          FeatureBlock<Scalar> qo(qf.middleCols(n * F, F)), ko(kf.middleCols(n * F, F));
          Map{}.logits(qin, qo);
          Map{}.finish(qin, qo, Map::coefficients(sq, sk, d), Scalar(0));
          Map{}.logits(kin, ko);
          Map{}.finish(kin, ko, Map::coefficients(sk, sq, d), key_max);
        }
      }
    });
    return f;
  } else {
    return x;
  }
}

template <typename Scalar, typename FeatureMap, typename Masking>
Tensor<Scalar, 3> SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::bidirectional(
    const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
    const std::optional<ConstTensorMap<Scalar, 3>>& k,
    const std::optional<ConstTensorMap<Scalar, 2>>& mask) {
  constexpr bool shifted = feature_map_traits<CoreMap>::max_shifted;
  const CoreInputs x = coreInputs(q, v, k, mask);
  const Index B = q.dimension(0), T = q.dimension(1), N = m_layer.numHeads();
  const Index F = m_layer.numFeatures(), dv = m_layer.valueDim();
  KeySummary<Scalar> summary;
  std::vector<Scalar> qshift;
  m_comm.step([&] {
    std::optional<ConstTensorMap<Scalar, 2>> m;
    if (mask) m.emplace(mask->data(), B, mask->dimension(1));
    summary = summarizeKeys(m_keys, kattn::constView<Scalar, 4>(x.k), kattn::constView<Scalar, 4>(x.v), m);
    qshift = queryShift(m_keys, kattn::constView<Scalar, 4>(x.q));
  });
  // Every rank's sums relative to the largest key logit of all ranks, then added.
  const Index per = F * dv + F;
  std::vector<Scalar> sums(std::size_t(B * N * per));
  if constexpr (shifted) {
    std::vector<Scalar> shifts(std::size_t(B * N));
    for (Index b = 0; b < B; ++b)
      for (Index n = 0; n < N; ++n) shifts[std::size_t(b * N + n)] = summary.shift(b, n);
    m_comm.allreduce(shifts.data(), shifts.size(), MPI_MAX);
    m_comm.allreduce(qshift.data(), qshift.size(), MPI_MAX);
    for (Index b = 0; b < B; ++b)
      for (Index n = 0; n < N; ++n) {
        const Scalar own = summary.shift(b, n), all = shifts[std::size_t(b * N + n)];
        const Scalar w = std::isfinite(own) && std::isfinite(all) ? std::exp(own - all) : 1;
        summary.kv(b, n) *= w;
        summary.z(b, n) *= w;
        summary.shift(b, n) = all;
      }
  }
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n) {
      Scalar* s = sums.data() + (b * N + n) * per;
      Eigen::Map<Mat>(s, F, dv) = summary.kv(b, n);
      Eigen::Map<Vector<Scalar>>(s + F * dv, F) = summary.z(b, n);
    }
  m_comm.allreduce(sums.data(), sums.size(), MPI_SUM);
  Tensor<Scalar, 3> y;
  m_comm.step([&] {
    for (Index b = 0; b < B; ++b)
      for (Index n = 0; n < N; ++n) {
        const Scalar* s = sums.data() + (b * N + n) * per;
        summary.kv(b, n) = Eigen::Map<const Mat>(s, F, dv);
        summary.z(b, n) = Eigen::Map<const Vector<Scalar>>(s + F * dv, F);
      }
    Tensor<Scalar, 4> heads(B, T, N, dv);
    readout(m_keys, kattn::constView<Scalar, 4>(x.q), summary, TensorMap<Scalar, 4>(heads), qshift);
    y = detail::projectOutput(heads, m_layer.weights(), m_layer.threadPool().get());
  });
  return y;
}

template <typename Scalar, typename FeatureMap, typename Masking>
StreamingState<Scalar> SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::ownState(
    const CoreInputs& x, const Scalar* mask, Index lead, const std::vector<Scalar>& qshift,
    const std::vector<Scalar>& kshift) {
  constexpr bool shifted = feature_map_traits<CoreMap>::max_shifted;
  const Index B = x.q.dimension(0), L = x.q.dimension(1), N = m_layer.numHeads();
  const CausalWindowed& cw = m_core.masking();
  const Index C = cw.chunk;
  StreamingState<Scalar> s = m_core.makeState(B, StreamingMode::Exact);
  for (Index b = 0; b < B && shifted; ++b) {
    s.fixQueryShift(b, qshift[std::size_t(b)]);
    s.raiseKeyShift(b, kshift[std::size_t(b)]);
  }
  if (L == 0) return s;
  const Index chunks = (lead + L + C - 1) / C;
  if (cw.window >= kUnboundedWindow) {
    // Nothing leaves the window: the state is the sums over every key, chunk c weighted by
    // gamma^(chunks after it), which the key summary computes as mask weights.
    std::vector<Scalar> weight(std::size_t(B * L));
    for (Index b = 0; b < B; ++b)
      for (Index t = 0; t < L; ++t) {
        const Scalar m = mask ? mask[b * L + t] : Scalar(1);
        const Index after = chunks - 1 - (t + lead) / C;
        weight[std::size_t(b * L + t)] =
            cw.decay ? m * std::pow(Scalar(*cw.decay), Scalar(after)) : m;
      }
    const KeySummary<Scalar> sum = summarizeKeys(
        m_keys, kattn::constView<Scalar, 4>(x.k), kattn::constView<Scalar, 4>(x.v),
        std::optional<ConstTensorMap<Scalar, 2>>(ConstTensorMap<Scalar, 2>(weight.data(), B, L)));
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
  // A finite window: only the last W chunks stay in the state.
  const Index keep = std::min(chunks, cw.window);
  const Index skip = chunks > keep ? (chunks - keep) * C - lead : 0;
  const Index pad = skip == 0 ? lead : 0, n = L - skip;
  // Left padding's first chunk: `pad` copies of its first row, masked, in front. A copy
  // leaves the exp maps' largest key logit as it is, and a masked key adds nothing.
  Tensor<Scalar, 4> q(B, pad + n, N, x.q.dimension(3)), k(B, pad + n, N, x.k.dimension(3)),
      v(B, pad + n, N, x.v.dimension(3));
  Tensor<Scalar, 2> m(B, pad + n);
  auto copyRows = [&](const Tensor<Scalar, 4>& from, Tensor<Scalar, 4>& to) {
    const Index w = from.dimension(2) * from.dimension(3);
    for (Index b = 0; b < B; ++b) {
      const Scalar* src = from.data() + (b * L + skip) * w;
      Scalar* dst = to.data() + b * (pad + n) * w;
      for (Index p = 0; p < pad; ++p) std::copy(src, src + w, dst + p * w);
      std::copy(src, src + n * w, dst + pad * w);
    }
  };
  copyRows(x.q, q);
  copyRows(x.k, k);
  copyRows(x.v, v);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < pad + n; ++t)
      m(b, t) = t < pad ? Scalar(0) : (mask ? mask[b * L + skip + t - pad] : Scalar(1));
  m_core.attend(q, k, v, m, s);
  s.addTokens(skip);
  return s;
}

template <typename Scalar, typename FeatureMap, typename Masking>
Tensor<Scalar, 3> SequenceParallel<KernelAttention<Scalar, FeatureMap, Masking>>::causal(
    const ConstTensorMap<Scalar, 3>& q, const ConstTensorMap<Scalar, 3>& v,
    const std::optional<ConstTensorMap<Scalar, 3>>& k,
    const std::optional<ConstTensorMap<Scalar, 2>>& mask, const std::vector<std::int64_t>& lengths,
    StreamingState<Scalar>* final_state) {
  constexpr bool shifted = feature_map_traits<CoreMap>::max_shifted;
  const Index B = q.dimension(0), N = m_layer.numHeads();
  Index T = 0;
  for (std::int64_t n : lengths) T += Index(n);
  // The same on every rank: a length that padding none refuses throws everywhere.
  const detail::ChunkPlan plan(lengths, m_layer.masking().chunk, m_layer.masking().leadingPad(T));
  const int me = rank();
  const Index L = plan.rows(me), row0 = plan.computed[std::size_t(me)];
  const Index lead = row0 == 0 ? plan.lead : 0;
  // The rows of the chunks this rank computes.
  auto exchange = [&](const std::vector<Scalar>& s, const std::vector<std::size_t>& sc,
                      std::vector<Scalar>& r, const std::vector<std::size_t>& rc) {
    m_comm.alltoallv(s, sc, r, rc);
  };
  std::vector<Scalar> qm, vm, km, mm;
  auto moved = [&](const Scalar* rows, Index width, std::vector<Scalar>& out) {
    out = detail::moveRows(plan, me, B, width, rows, true, exchange);
    return ConstTensorMap<Scalar, 3>(out.data(), B, L, width);
  };
  std::optional<ConstTensorMap<Scalar, 3>> qc, vc, kc;
  std::optional<ConstTensorMap<Scalar, 2>> mc;
  if (plan.aligned()) {
    qc.emplace(q);
    vc.emplace(v);
    if (k) kc.emplace(*k);
    if (mask) mc.emplace(*mask);
  } else {
    qc.emplace(moved(q.data(), q.dimension(2), qm));
    vc.emplace(moved(v.data(), v.dimension(2), vm));
    if (k) kc.emplace(moved(k->data(), k->dimension(2), km));
    if (mask) mc.emplace(moved(mask->data(), 1, mm).data(), B, L);
  }
  const CoreInputs x = coreInputs(*qc, *vc, kc, mc);
  std::vector<Scalar> qshift(static_cast<std::size_t>(B)), kshift(qshift);
  if constexpr (shifted) {
    m_comm.step([&] {
      qshift = queryShift(m_core, kattn::constView<Scalar, 4>(x.q));
      kshift = queryShift(m_core, kattn::constView<Scalar, 4>(x.k));
    });
    m_comm.allreduce(qshift.data(), qshift.size(), MPI_MAX);
    m_comm.allreduce(kshift.data(), kshift.size(), MPI_MAX);
  }
  const Scalar* mdata = mc ? mc->data() : nullptr;
  // The scan: the last rank's own state is nobody's prefix.
  std::string own;
  m_comm.step([&] {
    if (me + 1 < size() && L > 0) own = ownState(x, mdata, lead, qshift, kshift).toBytes();
  });
  StreamingState<Scalar> empty = m_core.makeState(B, StreamingMode::Exact);
  for (Index b = 0; b < B && shifted; ++b) empty.raiseKeyShift(b, kshift[std::size_t(b)]);
  const std::string fresh = empty.toBytes();
  // The operator must not throw between the scan's messages (a rank that left would leave
  // its peers waiting): it keeps its first error for the agreement after the scan.
  std::exception_ptr scan_error;
  const std::string before = m_comm.exclusiveScan(
      own.empty() ? fresh : own, fresh, [&](const std::string& a, const std::string& b) {
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
  Tensor<Scalar, 3> yc;
  StreamingState<Scalar> state;
  m_comm.step([&] {
    state = StreamingState<Scalar>::fromBytes(before);
    for (Index b = 0; b < B && shifted; ++b) state.fixQueryShift(b, qshift[std::size_t(b)]);
    Tensor<Scalar, 4> heads;
    if (L > 0 && lead > 0) {
      // As in ownState: masked copies of the first row make left padding's first chunk whole.
      const Index Nq = x.q.dimension(3), Nk = x.k.dimension(3), Nv = x.v.dimension(3);
      Tensor<Scalar, 4> qp(B, lead + L, N, Nq), kp(B, lead + L, N, Nk), vp(B, lead + L, N, Nv);
      Tensor<Scalar, 2> mp(B, lead + L);
      auto pad = [&](const Tensor<Scalar, 4>& from, Tensor<Scalar, 4>& to) {
        const Index w = from.dimension(2) * from.dimension(3);
        for (Index b = 0; b < B; ++b) {
          const Scalar* src = from.data() + b * L * w;
          Scalar* dst = to.data() + b * (lead + L) * w;
          for (Index p = 0; p < lead; ++p) std::copy(src, src + w, dst + p * w);
          std::copy(src, src + L * w, dst + lead * w);
        }
      };
      pad(x.q, qp);
      pad(x.k, kp);
      pad(x.v, vp);
      for (Index b = 0; b < B; ++b)
        for (Index t = 0; t < lead + L; ++t)
          mp(b, t) = t < lead ? Scalar(0) : (mdata ? mdata[b * L + t - lead] : Scalar(1));
      const Tensor<Scalar, 4> all = m_core.attend(qp, kp, vp, mp, state);
      const Index dv = m_layer.valueDim();
      heads = Tensor<Scalar, 4>(B, L, N, dv);
      for (Index b = 0; b < B; ++b)
        std::copy(all.data() + (b * (lead + L) + lead) * N * dv,
                  all.data() + (b * (lead + L) + lead + L) * N * dv, heads.data() + b * L * N * dv);
    } else if (L > 0) {
      std::optional<ConstTensorMap<Scalar, 2>> m;
      if (mdata) m.emplace(mdata, B, L);
      heads = m_core.attend(x.q, x.k, x.v, m, state);
    } else {
      heads = Tensor<Scalar, 4>(B, 0, N, m_layer.valueDim());
    }
    yc = detail::projectOutput(heads, m_layer.weights(), m_layer.threadPool().get());
    if (final_state && me + 1 == size()) {
      // Through bytes: the fixed query shift is a setting of this pass, not of the stream.
      *final_state = StreamingState<Scalar>::fromBytes(state.toBytes());
    }
  });
  if (plan.aligned()) return yc;
  const Index O = yc.dimension(2);
  std::vector<Scalar> back =
      detail::moveRows(plan, me, B, O, yc.data(), false, exchange);
  Tensor<Scalar, 3> y(B, q.dimension(1), O);
  std::copy(back.begin(), back.end(), y.data());
  return y;
}

}  // namespace mpi
}  // namespace kattn
