#pragma once
// Test support: a slow, float64 reference of the kernel attention layer, written from
// ../shared/SPEC.md line by line with plain loops. It uses nothing of kattn but its public
// data types (LayerConfig for the options, Weights and Tensor as containers): no feature map,
// kernel or helper of the library is called, so a bug there cannot cancel out here.
//
// Covered: dense projections with biases, the scale (and scale_by_length), the feature maps
// elu, relu, square, identity, exp, expmod (exp types shifted by the per-batch-row maximum
// over all positions, heads and features of the tensor being mapped), a user-supplied
// elementwise map, the key padding mask, the short-sequence softmax (masked keys excluded),
// the bidirectional kernel attention through the explicit T x S matrix, the causal windowed
// attention through an explicit T x T weight matrix (chunks, window, decay, left and right
// padding), begin_kernel. Not expplus (the golden cases cover it) and not dropout.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include <kattn/any_layer.hpp>
#include <kattn/config.hpp>
#include <kattn/layer.hpp>
#include <kattn/tensor.hpp>

namespace kattn_ref {

using Index = long;
using Tensor1 = kattn::Tensor<double, 1>;
using Tensor2 = kattn::Tensor<double, 2>;
using Tensor3 = kattn::Tensor<double, 3>;

/// The eps of every normaliser (SPEC names).
inline constexpr double kEps = 1e-6;

/// An elementwise f for a user-defined map phi(x) = f(x P^T) / sqrt(m) (f(x) without P).
using ElementwiseF = std::function<double(double)>;

/// Per-head data [B, L, N, H] in one flat vector.
struct Heads {
  Index B = 0, L = 0, N = 0, H = 0;
  std::vector<double> v;
  Heads() = default;
  Heads(Index b, Index l, Index n, Index h)
      : B(b), L(l), N(n), H(h), v(std::size_t(b * l * n * h), 0.0) {}
  double& at(Index b, Index l, Index n, Index i) { return v[std::size_t(((b * L + l) * N + n) * H + i)]; }
  double at(Index b, Index l, Index n, Index i) const {
    return v[std::size_t(((b * L + l) * N + n) * H + i)];
  }
};

/// x[b, r0 + l, :] . W[:, n, :] + bias[n, :], for l < L (SPEC 1.1).
inline Heads dense(const Tensor3& x, Index r0, Index L, const Tensor3& W, const Tensor2& bias) {
  const Index B = x.dimension(0), D = x.dimension(2), N = W.dimension(1), H = W.dimension(2);
  if (W.dimension(0) != D) throw std::logic_error("reference: kernel rows do not match the input");
  Heads out(B, L, N, H);
  for (Index b = 0; b < B; ++b)
    for (Index l = 0; l < L; ++l)
      for (Index n = 0; n < N; ++n)
        for (Index i = 0; i < H; ++i) {
          double acc = bias.size() ? bias(n, i) : 0.0;
          for (Index j = 0; j < D; ++j) acc += x(b, r0 + l, j) * W(j, n, i);
          out.at(b, l, n, i) = acc;
        }
  return out;
}

/// Multiplies every entry of batch row b by factor[b].
inline void scaleRows(Heads& x, const std::vector<double>& factor) {
  for (Index b = 0; b < x.B; ++b)
    for (Index l = 0; l < x.L; ++l)
      for (Index n = 0; n < x.N; ++n)
        for (Index i = 0; i < x.H; ++i) x.at(b, l, n, i) *= factor[std::size_t(b)];
}

/**
 * SPEC 2: phi(x) for x [B, L, N, d] (already scaled) with the named map, P [m, d] or empty
 * (no projection). For exp and expmod the shift is the largest logit of each batch row over
 * all its positions, heads and features. `custom` replaces the map by phi = f(z)/sqrt(m).
 */
inline Heads featureMap(const std::string& name, const Heads& x, const Eigen::MatrixXd& P,
                        const ElementwiseF* custom = nullptr) {
  const bool proj = P.size() > 0;
  const Index d = x.H, F = proj ? P.rows() : d;
  if (proj && P.cols() != d) throw std::logic_error("reference: projection is not [m, d]");
  const double norm = proj ? 1.0 / std::sqrt(double(F)) : 1.0;
  Heads z(x.B, x.L, x.N, F);
  for (Index b = 0; b < x.B; ++b)
    for (Index l = 0; l < x.L; ++l)
      for (Index n = 0; n < x.N; ++n)
        for (Index i = 0; i < F; ++i) {
          double acc = 0;
          if (proj) {
            for (Index j = 0; j < d; ++j) acc += x.at(b, l, n, j) * P(i, j);
          } else {
            acc = x.at(b, l, n, i);
          }
          z.at(b, l, n, i) = acc;
        }
  Heads phi(x.B, x.L, x.N, F);
  const bool exp_type = !custom && (name == "exp" || name == "expmod");
  for (Index b = 0; b < x.B; ++b) {
    double M = -std::numeric_limits<double>::infinity();
    if (exp_type) {
      for (Index l = 0; l < x.L; ++l)
        for (Index n = 0; n < x.N; ++n)
          for (Index i = 0; i < F; ++i) M = std::max(M, z.at(b, l, n, i));
    }
    for (Index l = 0; l < x.L; ++l)
      for (Index n = 0; n < x.N; ++n) {
        double h = 1.0;
        if (!custom && name == "exp") {
          double sq = 0;
          for (Index j = 0; j < d; ++j) sq += x.at(b, l, n, j) * x.at(b, l, n, j);
          h = std::exp(-sq / 2.0);
        } else if (!custom && name == "expmod") {
          h = std::exp(-std::sqrt(double(d)) / 2.0);
        }
        for (Index i = 0; i < F; ++i) {
          const double zi = z.at(b, l, n, i);
          double f;
          if (custom) {
            f = (*custom)(zi);
          } else if (name == "elu") {
            f = zi > 0 ? zi + 1.0 : std::exp(zi);  // elu(z) + 1
          } else if (name == "relu") {
            f = std::max(zi, 0.0) + 1e-3;
          } else if (name == "square") {
            f = zi * zi;
          } else if (name == "identity") {
            f = zi;
          } else if (exp_type) {
            f = std::exp(zi - M);
          } else {
            throw std::logic_error("reference: no feature map \"" + name + "\"");
          }
          phi.at(b, l, n, i) = h * f * norm;
        }
      }
  }
  return phi;
}

/// q'_t . k'_s of head n of batch row b.
inline double dot(const Heads& q, Index t, const Heads& k, Index s, Index b, Index n) {
  const double* x = &q.v[std::size_t(((b * q.L + t) * q.N + n) * q.H)];
  const double* y = &k.v[std::size_t(((b * k.L + s) * k.N + n) * k.H)];
  double acc = 0;
  for (Index i = 0; i < q.H; ++i) acc += x[i] * y[i];
  return acc;
}

/// Padding rows put before the first real position (SPEC 3.3): C - T % C with left padding.
inline Index causalLead(const kattn::LayerConfig& cfg, Index T) {
  const Index C = cfg.causal_chunk_length, rem = T % C;
  if (rem == 0) return 0;
  if (cfg.causal_padding && *cfg.causal_padding == "left") return C - rem;
  if (cfg.causal_padding && *cfg.causal_padding == "right") return 0;
  throw std::logic_error("reference: T is not a multiple of C and there is no padding");
}

/**
 * The explicit T x T causal weights of SPEC 3.3 as a function: position p (real positions,
 * after `lead` padding rows) is in chunk (p + lead) / C; key s counts for query t with weight
 * gamma^(c_t - c_s) (1 without decay) when 0 <= c_t - c_s < W, else 0.
 */
class CausalWeights {
 public:
  CausalWeights(const kattn::LayerConfig& cfg, Index T)
      : m_C(cfg.causal_chunk_length), m_W(cfg.causal_window_length),
        m_lead(causalLead(cfg, T)) {
    const Index chunks = (T + m_lead) / m_C + 1;
    m_pow.assign(std::size_t(std::min<Index>(m_W, chunks)), 1.0);
    for (std::size_t j = 0; j < m_pow.size(); ++j) {
      m_pow[j] = cfg.causal_window_decay ? std::pow(*cfg.causal_window_decay, double(j)) : 1.0;
    }
  }
  double operator()(Index t, Index s) const {
    const Index dc = (t + m_lead) / m_C - (s + m_lead) / m_C;
    if (dc < 0 || dc >= m_W) return 0.0;
    return m_pow[std::size_t(dc)];
  }
  /// Keys outside [first(t), last(t)) have weight 0 (a superset of the window: it only saves
  /// time on long sequences, the weights decide).
  Index first(Index t) const { return std::max<Index>(0, t - m_C * (std::min<Index>(m_W, Index(m_pow.size())) + 2)); }
  Index last(Index t, Index S) const { return std::min<Index>(S, t + m_C + 1); }

 private:
  Index m_C, m_W, m_lead;
  std::vector<double> m_pow;
};

/**
 * The attention core (SPEC 3) for queries q' [B, T, N, F], keys k' [B, S, N, F], values v
 * [B, S, N, d_v]: short softmax, bidirectional explicit form, or causal with the explicit
 * T x T weights. Key features are multiplied by the mask; in the short path keys whose mask
 * is 0 are excluded. `a_eps0`, when given, receives the kernel paths' heads with eps = 0.
 */
inline Heads attention(const kattn::LayerConfig& cfg, bool short_path, bool causal,
                       const Heads& qf, Heads kf, const Heads& v, const Tensor2* mask,
                       double eps = kEps, Heads* a_eps0 = nullptr) {
  const Index B = qf.B, T = qf.L, S = kf.L, N = qf.N, dv = v.H;
  if (mask) {
    for (Index b = 0; b < B; ++b)
      for (Index s = 0; s < S; ++s)
        for (Index n = 0; n < N; ++n)
          for (Index i = 0; i < kf.H; ++i) kf.at(b, s, n, i) *= (*mask)(b, s);
  }
  Heads a(B, T, N, dv);
  if (a_eps0) *a_eps0 = Heads(B, T, N, dv);
  std::optional<CausalWeights> weight;
  if (causal) weight.emplace(cfg, T);
  std::vector<double> w(static_cast<std::size_t>(S)), num(static_cast<std::size_t>(dv));
  for (Index b = 0; b < B; ++b)
    for (Index n = 0; n < N; ++n)
      for (Index t = 0; t < T; ++t) {
        if (short_path) {
          double mx = -std::numeric_limits<double>::infinity();
          for (Index s = 0; s < S; ++s) {
            const bool kept = !mask || (*mask)(b, s) != 0.0;
            w[std::size_t(s)] = kept ? dot(qf, t, kf, s, b, n)
                                     : -std::numeric_limits<double>::infinity();
            mx = std::max(mx, w[std::size_t(s)]);
          }
          if (mx == -std::numeric_limits<double>::infinity()) continue;  // no key: zeros
          double Z = 0;
          for (Index s = 0; s < S; ++s) Z += (w[std::size_t(s)] = std::exp(w[std::size_t(s)] - mx));
          for (Index s = 0; s < S; ++s)
            for (Index h = 0; h < dv; ++h) a.at(b, t, n, h) += w[std::size_t(s)] / Z * v.at(b, s, n, h);
          continue;
        }
        // a_t = sum_s w_ts (q'_t . k'_s) v_s / (sum_s w_ts (q'_t . k'_s) + eps)
        const Index s0 = weight ? weight->first(t) : 0, s1 = weight ? weight->last(t, S) : S;
        double den = 0;
        std::fill(num.begin(), num.end(), 0.0);
        for (Index s = s0; s < s1; ++s) {
          const double c = weight ? (*weight)(t, s) : 1.0;
          if (c == 0.0) continue;
          const double score = c * dot(qf, t, kf, s, b, n);
          den += score;
          const double* vs = &v.v[std::size_t(((b * S + s) * N + n) * dv)];
          for (Index h = 0; h < dv; ++h) num[std::size_t(h)] += score * vs[h];
        }
        if (den + eps != 0.0) {  // else eps = 0 and no key: zeros, the limit eps -> 0
          for (Index h = 0; h < dv; ++h) a.at(b, t, n, h) = num[std::size_t(h)] / (den + eps);
        }
        if (a_eps0 && den != 0.0) {
          for (Index h = 0; h < dv; ++h) a_eps0->at(b, t, n, h) = num[std::size_t(h)] / den;
        }
      }
  return a;
}

/// y[b, r0 + t, :] = sum_{n,h} a[b,t,n,h] Wo[n,h,:] + bo (SPEC 1.5).
inline void outputDense(const Heads& a, const Tensor3& Wo, const Tensor1& bo, Tensor3& y, Index r0) {
  const Index O = Wo.dimension(2);
  for (Index b = 0; b < a.B; ++b)
    for (Index t = 0; t < a.L; ++t)
      for (Index o = 0; o < O; ++o) {
        double acc = bo.size() ? bo(o) : 0.0;
        for (Index n = 0; n < a.N; ++n)
          for (Index h = 0; h < a.H; ++h) acc += a.at(b, t, n, h) * Wo(n, h, o);
        y(b, r0 + t, o) = acc;
      }
}

/// The weights in float64 (from a layer's Weights of any scalar type).
template <typename Scalar>
kattn::Weights<double> toDouble(const kattn::Weights<Scalar>& w) {
  kattn::Weights<double> o;
  o.query_kernel = w.query_kernel.template cast<double>();
  o.query_bias = w.query_bias.template cast<double>();
  o.key_kernel = w.key_kernel.template cast<double>();
  o.key_bias = w.key_bias.template cast<double>();
  o.value_kernel = w.value_kernel.template cast<double>();
  o.value_bias = w.value_bias.template cast<double>();
  o.output_kernel = w.output_kernel.template cast<double>();
  o.output_bias = w.output_bias.template cast<double>();
  o.output_softmax_kernel = w.output_softmax_kernel.template cast<double>();
  o.output_softmax_bias = w.output_softmax_bias.template cast<double>();
  return o;
}

/**
 * The layer's forward (inference) in float64.
 * \param P projection [m, d], or an empty matrix when cfg.num_random_features <= 0
 * \param key the key input, or null (the value input is the key input)
 * \param mask [B, S] or null
 * \param custom a user-defined elementwise map replacing cfg.feature_transform, or null
 * \param eps the normalisers' stabiliser (SPEC: 1e-6; tests vary it to measure its weight)
 * \param kernel_heads receives the heads a [B, T - K, N, d_v] of the kernel part, or null
 * \param kernel_heads_eps0 receives the same heads computed with eps = 0, or null
 * \return [B, T, O]
 */
inline Tensor3 forward(const kattn::LayerConfig& cfg, const kattn::Weights<double>& w,
                       const Eigen::MatrixXd& P, const Tensor3& query, const Tensor3& value,
                       const Tensor3* key, const Tensor2* mask,
                       const ElementwiseF* custom = nullptr, double eps = kEps,
                       Heads* kernel_heads = nullptr, Heads* kernel_heads_eps0 = nullptr) {
  const Index B = query.dimension(0), T = query.dimension(1), S = value.dimension(1);
  const Index O = w.output_kernel.dimension(2);
  const Tensor3& xk = key ? *key : value;
  const bool causal = cfg.use_causal_windowed;
  if (causal && S != T) throw std::logic_error("reference: causal needs S = T");

  // Scale (SPEC 1.2).
  const double s = cfg.scale ? *cfg.scale : 1.0 / std::sqrt(double(cfg.key_dim));
  std::vector<double> sb(std::size_t(B), s);
  if (cfg.scale_by_length) {
    if (!mask) throw std::logic_error("reference: scale_by_length needs a mask");
    for (Index b = 0; b < B; ++b) {
      double total = 0;
      for (Index j = 0; j < S; ++j) total += (*mask)(b, j);
      sb[std::size_t(b)] = s * std::log(total) / std::log(512.0);
    }
  }
  std::vector<double> root(sb.size()), ones(sb.size(), 1.0);
  for (std::size_t b = 0; b < sb.size(); ++b) root[b] = std::sqrt(sb[b]);

  const Heads v = dense(value, 0, S, w.value_kernel, w.value_bias);
  Tensor3 y(B, T, O);
  y.setZero();

  // One part: query rows [q0, q1) with `map` (identity for the softmax part).
  auto part = [&](Index q0, Index q1, const std::string& map, bool short_path,
                  const ElementwiseF* f, const Tensor3& Wo, const Tensor1& bo) {
    Heads q = dense(query, q0, q1 - q0, w.query_kernel, w.query_bias);
    Heads k = dense(xk, 0, S, w.key_kernel, w.key_bias);
    if (short_path) {
      scaleRows(q, sb);  // only the queries, by s
    } else {
      scaleRows(q, root);  // both, by sqrt(s)
      scaleRows(k, root);
    }
    const Heads qf = featureMap(map, q, P, f);
    const Heads kf = featureMap(map, k, P, f);
    const bool kernel_part = &Wo == &w.output_kernel;
    const Heads a = attention(cfg, short_path, causal, qf, kf, v, mask, eps,
                              kernel_part ? kernel_heads_eps0 : nullptr);
    if (kernel_heads && kernel_part) *kernel_heads = a;
    outputDense(a, Wo, bo, y, q0);
  };

  const Index K = std::min<Index>(cfg.begin_kernel, T);
  if (K > 0) {
    part(0, K, "identity", true, nullptr, w.output_softmax_kernel, w.output_softmax_bias);
  }
  if (K < T) {
    part(K, T, cfg.feature_transform, cfg.is_short_seq, custom, w.output_kernel, w.output_bias);
  }
  return y;
}

/// max |got - want| / max |want| (absolute when want is all zero); infinity on NaN.
template <typename A, typename B>
double relativeError(const A& got, const B& want) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double err = 0, ref = 0;
  for (Index i = 0; i < Index(want.size()); ++i) {
    const double g = double(got.data()[i]), r = double(want.data()[i]);
    if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
    err = std::max(err, std::abs(g - r));
    ref = std::max(ref, std::abs(r));
  }
  return ref > 0 ? err / ref : err;
}

/// The declared tolerance: 1e-10 relative in float64, 1e-5 in float32 (STYLE.md).
template <typename Scalar>
constexpr double tolerance() {
  return std::is_same_v<Scalar, double> ? 1e-10 : 1e-5;
}

/// Whether two tensors hold the same bits (same shape, same values, NaNs compared as bits).
template <typename A, typename B>
bool bitIdentical(const A& x, const B& y) {
  if (x.dimensions() != y.dimensions()) return false;
  return std::equal(x.data(), x.data() + x.size(), y.data(), [](auto a, auto b) {
    return std::memcmp(&a, &b, sizeof(a)) == 0;
  });
}

}  // namespace kattn_ref

// ---- fixtures shared by the layer tests (random problems, casts, calls) -------------------
// These drive kattn through its public API only.
namespace kattn_test {

using kattn::Index;
using kattn_ref::Tensor1;
using kattn_ref::Tensor2;
using kattn_ref::Tensor3;

/// Seeded random numbers for test data.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : m_gen(seed) {}
  double normal() { return std::normal_distribution<double>()(m_gen); }
  double uniform(double a, double b) { return std::uniform_real_distribution<double>(a, b)(m_gen); }
  Index intIn(Index a, Index b) { return std::uniform_int_distribution<Index>(a, b)(m_gen); }
  bool coin(double p = 0.5) { return uniform(0, 1) < p; }

 private:
  std::mt19937_64 m_gen;
};

/// [a, b, c] of independent normals times `scale`.
inline Tensor3 randomTensor(Rng& r, Index a, Index b, Index c, double scale) {
  Tensor3 t(a, b, c);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = scale * r.normal();
  return t;
}

/// A 0/1 mask [B, S] with zeros at rate p_zero; each row keeps at least `min_kept` ones
/// (when S allows).
inline Tensor2 randomMask(Rng& r, Index B, Index S, double p_zero, Index min_kept = 0) {
  Tensor2 m(B, S);
  for (Index b = 0; b < B; ++b) {
    Index kept = 0;
    for (Index s = 0; s < S; ++s) kept += Index(m(b, s) = r.coin(p_zero) ? 0.0 : 1.0);
    for (Index s = 0; s < S && kept < min_kept; ++s) {
      if (m(b, s) == 0.0) {
        m(b, s) = 1.0;
        ++kept;
      }
    }
  }
  return m;
}

/**
 * Random weights for `cfg` and input dims Dq, Dk, Dv: kernels with variance 1/fan-in, biases
 * N(0, 0.3^2) when use_bias. qk_offset > 0 adds the same offset vector (entries +-qk_offset)
 * to the query and key biases of each head: queries and keys then share a dominant
 * direction, which keeps the identity map's normaliser q'.z away from zero.
 */
inline kattn::Weights<double> randomWeights(Rng& r, const kattn::LayerConfig& cfg, Index Dq,
                                            Index Dk, Index Dv, double qk_offset = 0.0) {
  const Index N = cfg.num_heads, d = cfg.key_dim, dv = cfg.resolvedValueDim();
  const Index O = cfg.output_shape ? Index(*cfg.output_shape) : Dq;
  auto kernel = [&](Index a, Index b, Index c, Index fan_in) {
    return randomTensor(r, a, b, c, 1.0 / std::sqrt(double(fan_in)));
  };
  auto bias2 = [&](Index a, Index b) {
    Tensor2 t(a, b);
    for (Index i = 0; i < t.size(); ++i) t.data()[i] = 0.3 * r.normal();
    return t;
  };
  auto bias1 = [&](Index a) {
    Tensor1 t(a);
    for (Index i = 0; i < t.size(); ++i) t.data()[i] = 0.3 * r.normal();
    return t;
  };
  kattn::Weights<double> w;
  w.query_kernel = kernel(Dq, N, d, Dq);
  w.key_kernel = kernel(Dk, N, d, Dk);
  w.value_kernel = kernel(Dv, N, dv, Dv);
  w.output_kernel = kernel(N, dv, O, N * dv);
  if (cfg.use_bias) {
    w.query_bias = bias2(N, d);
    w.key_bias = bias2(N, d);
    w.value_bias = bias2(N, dv);
    w.output_bias = bias1(O);
    if (qk_offset > 0) {
      for (Index n = 0; n < N; ++n)
        for (Index i = 0; i < d; ++i) {
          const double o = r.coin() ? qk_offset : -qk_offset;
          w.query_bias(n, i) += o;
          w.key_bias(n, i) += o;
        }
    }
  }
  if (cfg.begin_kernel > 0) {
    w.output_softmax_kernel = kernel(N, dv, O, N * dv);
    if (cfg.use_bias) w.output_softmax_bias = bias1(O);
  }
  return w;
}

template <typename Scalar, int Rank>
kattn::Tensor<Scalar, Rank> cast(const kattn::Tensor<double, Rank>& t) {
  return t.template cast<Scalar>();
}

/// t rounded to Scalar and back: what a Scalar layer sees, for the float64 reference.
template <typename Scalar, int Rank>
kattn::Tensor<double, Rank> rounded(const kattn::Tensor<double, Rank>& t) {
  const kattn::Tensor<Scalar, Rank> s = t.template cast<Scalar>();
  return s.template cast<double>();
}

template <typename Scalar>
kattn::Weights<Scalar> castWeights(const kattn::Weights<double>& w) {
  kattn::Weights<Scalar> o;
  o.query_kernel = cast<Scalar>(w.query_kernel);
  o.query_bias = cast<Scalar>(w.query_bias);
  o.key_kernel = cast<Scalar>(w.key_kernel);
  o.key_bias = cast<Scalar>(w.key_bias);
  o.value_kernel = cast<Scalar>(w.value_kernel);
  o.value_bias = cast<Scalar>(w.value_bias);
  o.output_kernel = cast<Scalar>(w.output_kernel);
  o.output_bias = cast<Scalar>(w.output_bias);
  o.output_softmax_kernel = cast<Scalar>(w.output_softmax_kernel);
  o.output_softmax_bias = cast<Scalar>(w.output_softmax_bias);
  return o;
}

/// A layer's projection as the reference takes it (empty without one).
template <typename Scalar>
Eigen::MatrixXd projectionOf(const kattn::Matrix<Scalar>& P) {
  return P.template cast<double>();
}

/// One problem: a config, its weights, an optional explicit projection, inputs.
struct Problem {
  kattn::LayerConfig cfg;
  kattn::Weights<double> weights;
  std::optional<Eigen::MatrixXd> projection;  // given with setProjection; else the seed's
  Tensor3 query, value;
  std::optional<Tensor3> key;
  std::optional<Tensor2> mask;

  Index B() const { return query.dimension(0); }
  Index T() const { return query.dimension(1); }
  Index S() const { return value.dimension(1); }

  std::string describe() const {
    std::ostringstream os;
    const auto& c = cfg;
    os << c.feature_transform << " B=" << B() << " T=" << T() << " S=" << S()
       << " Dq=" << query.dimension(2) << " Dv=" << value.dimension(2)
       << " Dk=" << (key ? key->dimension(2) : value.dimension(2)) << " N=" << c.num_heads
       << " d=" << c.key_dim << " dv=" << c.resolvedValueDim()
       << " O=" << weights.output_kernel.dimension(2) << " m=" << c.num_random_features
       << (projection ? "(set)" : "(seed)") << " bias=" << c.use_bias
       << " key=" << bool(key) << " mask=" << bool(mask)
       << " scale=" << (c.scale ? std::to_string(*c.scale) : "default")
       << " by_length=" << c.scale_by_length << " short=" << c.is_short_seq
       << " begin_kernel=" << c.begin_kernel;
    if (c.use_causal_windowed) {
      os << " causal C=" << c.causal_chunk_length << " W=" << c.causal_window_length
         << " decay=" << (c.causal_window_decay ? std::to_string(*c.causal_window_decay) : "none")
         << " padding=" << (c.causal_padding ? *c.causal_padding : "none");
    }
    return os.str();
  }
};

/// The scalar type of a typed or run-time layer.
template <typename Layer>
struct ScalarOf {
  using type = typename Layer::scalar_type;
};
template <typename Scalar>
struct ScalarOf<kattn::AnyKernelAttention<Scalar>> {
  using type = Scalar;
};
template <typename Layer>
using ScalarOfT = typename ScalarOf<Layer>::type;

/// Builds the layer of `p` in Scalar (weights, projection when given).
template <typename Layer>
Layer makeLayer(const Problem& p) {
  using Scalar = ScalarOfT<Layer>;
  Layer layer(p.cfg);
  layer.setWeights(castWeights<Scalar>(p.weights));
  if (p.projection) layer.setProjection(p.projection->template cast<Scalar>());
  return layer;
}

/// forward of `layer` on the inputs of `p` rounded to Scalar.
template <typename Layer>
kattn::Tensor<ScalarOfT<Layer>, 3> runLayer(const Layer& layer, const Problem& p,
                                            bool training = false) {
  using Scalar = ScalarOfT<Layer>;
  const kattn::Tensor<Scalar, 3> q = cast<Scalar>(p.query), v = cast<Scalar>(p.value);
  std::optional<kattn::Tensor<Scalar, 3>> k;
  std::optional<kattn::Tensor<Scalar, 2>> m;
  std::optional<kattn::ConstTensorMap<Scalar, 3>> kv;
  std::optional<kattn::ConstTensorMap<Scalar, 2>> mv;
  if (p.key) kv.emplace(k.emplace(cast<Scalar>(*p.key)));
  if (p.mask) mv.emplace(m.emplace(cast<Scalar>(*p.mask)));
  return layer.forward(q, v, kv, mv, training);
}

/// The float64 reference of `p` as a Scalar layer with projection P sees it.
template <typename Scalar>
Tensor3 runReference(const Problem& p, const Eigen::MatrixXd& P,
                     const kattn_ref::ElementwiseF* custom = nullptr,
                     double eps = kattn_ref::kEps, kattn_ref::Heads* heads = nullptr,
                     kattn_ref::Heads* heads_eps0 = nullptr) {
  const Tensor3 q = rounded<Scalar>(p.query), v = rounded<Scalar>(p.value);
  std::optional<Tensor3> k;
  std::optional<Tensor2> m;
  if (p.key) k = rounded<Scalar>(*p.key);
  if (p.mask) m = rounded<Scalar>(*p.mask);
  return kattn_ref::forward(p.cfg, kattn_ref::toDouble(castWeights<Scalar>(p.weights)), P, q, v,
                            k ? &*k : nullptr, m ? &*m : nullptr, custom, eps, heads,
                            heads_eps0);
}

/// Relative error of the layer against the reference on `p`.
template <typename Layer>
double errorAgainstReference(const Problem& p, const kattn_ref::ElementwiseF* custom = nullptr) {
  using Scalar = ScalarOfT<Layer>;
  const Layer layer = makeLayer<Layer>(p);
  const auto got = runLayer(layer, p);
  const Tensor3 want = runReference<Scalar>(p, projectionOf(layer.projection()), custom);
  return kattn_ref::relativeError(got, want);
}

/// The per-head projections of `p` a caller of attend() hands over: the reference's dense
/// layers on the inputs and weights as a Scalar layer sees them, rounded to Scalar.
template <typename Scalar>
struct ProjectedHeads {
  kattn::Tensor<Scalar, 4> q, k, v;  ///< [B, T, N, d], [B, S, N, d], [B, S, N, d_v]

  explicit ProjectedHeads(const Problem& p) {
    const kattn::Weights<double> w = kattn_ref::toDouble(castWeights<Scalar>(p.weights));
    auto project = [&](const Tensor3& x, const Tensor3& kernel, const Tensor2& bias) {
      const kattn_ref::Heads h = kattn_ref::dense(rounded<Scalar>(x), 0, x.dimension(1), kernel, bias);
      kattn::Tensor<Scalar, 4> t(h.B, h.L, h.N, h.H);
      for (Index i = 0; i < t.size(); ++i) t.data()[i] = Scalar(h.v[std::size_t(i)]);
      return t;
    };
    q = project(p.query, w.query_kernel, w.query_bias);
    k = project(p.key ? *p.key : p.value, w.key_kernel, w.key_bias);
    v = project(p.value, w.value_kernel, w.value_bias);
  }
};

/// The reference heads' values, flat, in the layout of attend()'s [B, T, N, d_v].
inline Eigen::Map<const Eigen::VectorXd> flat(const kattn_ref::Heads& h) {
  return Eigen::Map<const Eigen::VectorXd>(h.v.data(), Index(h.v.size()));
}

/// The projection a layer built from `p` uses, in float64 (the given one, else the seed's).
inline Eigen::MatrixXd problemProjection(const Problem& p) {
  if (!p.cfg.hasProjection()) return Eigen::MatrixXd();
  if (p.projection) return *p.projection;
  return kattn::randomProjection<double>(p.cfg.num_random_features, p.cfg.key_dim, p.cfg.seed);
}

/**
 * The conditioning of `p` at relative precision `rel`: the largest relative change of the
 * float64 reference output over `trials` random perturbations of every input, weight and
 * projection entry by a relative `rel`. A float32 layer cannot be expected to land closer to
 * the reference than this with rel = float32's rounding unit, whatever its algorithm; the
 * float32 tests therefore use problems whose sensitivity is well below their tolerance
 * (SPEC 3.5 speaks of "well-conditioned inputs" the same way).
 */
inline double sensitivity(const Problem& p, double rel = 1.2e-7, int trials = 3,
                          const kattn_ref::ElementwiseF* custom = nullptr) {
  const Eigen::MatrixXd P = problemProjection(p);
  const Tensor3 base = runReference<double>(p, P, custom);
  double worst = 0;
  Rng r(12345);
  auto jiggle = [&](auto& t) {
    for (Index i = 0; i < Index(t.size()); ++i) t.data()[i] *= 1.0 + rel * (r.coin() ? 1 : -1);
  };
  for (int k = 0; k < trials; ++k) {
    Problem q = p;
    jiggle(q.query);
    jiggle(q.value);
    if (q.key) jiggle(*q.key);
    auto& w = q.weights;
    for (auto* t : {&w.query_kernel, &w.key_kernel, &w.value_kernel, &w.output_kernel,
                    &w.output_softmax_kernel})
      jiggle(*t);
    for (auto* t : {&w.query_bias, &w.key_bias, &w.value_bias}) jiggle(*t);
    for (auto* t : {&w.output_bias, &w.output_softmax_bias}) jiggle(*t);
    Eigen::MatrixXd Pj = P;
    jiggle(Pj);
    worst = std::max(worst, kattn_ref::relativeError(runReference<double>(q, Pj, custom), base));
  }
  return worst;
}

/// Whether a Scalar layer can be held to the declared tolerance on `p`: always in float64;
/// in float32 when the problem's sensitivity to float32 rounding is below a tenth of it.
template <typename Scalar>
bool wellConditioned(const Problem& p, const kattn_ref::ElementwiseF* custom = nullptr) {
  if (std::is_same_v<Scalar, double>) return true;
  return sensitivity(p, 1.2e-7, 3, custom) <= 0.1 * kattn_ref::tolerance<Scalar>();
}

/// The float64 reference output of `p` and the weight of eps in it (see epsCheck).
struct EpsCheck {
  Tensor3 y;           ///< the reference output, eps = 1e-6
  double bound = 0;    ///< relative, like relativeError
};

/**
 * How much the eps of the normalisers weighs in `p` (begin_kernel = 0): a bound, relative to
 * max |y|, on how far the output moves when eps is replaced by any value in [0, 1e-6] at any
 * position: max over (b, t, o) of sum_{n,h} |a_eps - a_0| |Wo[n, h, o]|. Computations that
 * differ only in how they shift the exp features (a streamed and a whole pass, SPEC 3.5)
 * compute a_t = c N_t / (c D_t + eps) with c >= 1, i.e. an effective eps in (0, 1e-6], and
 * a_t is monotone in eps, so they agree within this bound (plus rounding). SPEC 3.5's
 * "well-conditioned inputs" are those where it is small. The reference sees the inputs as a
 * Scalar layer does, with projection P (default: the problem's).
 */
template <typename Scalar = double>
EpsCheck epsCheck(const Problem& p, const std::optional<Eigen::MatrixXd>& projection = std::nullopt) {
  if (p.cfg.begin_kernel > 0) throw std::logic_error("epsCheck: begin_kernel = 0 only");
  const Eigen::MatrixXd P = projection ? *projection : problemProjection(p);
  kattn_ref::Heads a1, a0;
  EpsCheck out;
  out.y = runReference<Scalar>(p, P, nullptr, kattn_ref::kEps, &a1, &a0);
  const Tensor3& Wo = p.weights.output_kernel;
  double worst = 0, ref = 0;
  for (Index i = 0; i < out.y.size(); ++i) ref = std::max(ref, std::abs(out.y.data()[i]));
  for (Index b = 0; b < a1.B; ++b)
    for (Index t = 0; t < a1.L; ++t)
      for (Index o = 0; o < Wo.dimension(2); ++o) {
        double acc = 0;
        for (Index n = 0; n < a1.N; ++n)
          for (Index h = 0; h < a1.H; ++h)
            acc += std::abs(a1.at(b, t, n, h) - a0.at(b, t, n, h)) * std::abs(Wo(n, h, o));
        worst = std::max(worst, acc);
      }
  out.bound = ref > 0 ? worst / ref : worst;
  return out;
}

/// "float64" / "float32", for test names.
template <typename Scalar>
std::string scalarName() {
  return std::is_same_v<Scalar, double> ? "f64" : "f32";
}

/// A message's check: `what` was thrown with `needle` in its message.
template <typename Exception, typename Fn>
::testing::AssertionResult throwsWith(Fn&& fn, const std::string& needle) {
  try {
    fn();
  } catch (const Exception& e) {
    const std::string msg = e.what();
    if (msg.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "message \"" << msg << "\" lacks \"" << needle << "\"";
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw another type: " << e.what();
  } catch (...) {
    return ::testing::AssertionFailure() << "threw a non-std exception";
  }
  return ::testing::AssertionFailure() << "did not throw (expected \"" << needle << "\")";
}

/// A (Scalar, FeatureMap) pair for typed tests, named like "relu_f32".
template <typename S, typename M>
struct Combo {
  using Scalar = S;
  using Map = M;
};

struct ComboNames {
  template <typename C>
  static std::string GetName(int) {
    return std::string(C::Map::name) + "_" + scalarName<typename C::Scalar>();
  }
};

/// Every built-in map that streams (all but expplus), in float and double.
using Combos = ::testing::Types<
    Combo<double, kattn::Elu>, Combo<float, kattn::Elu>, Combo<double, kattn::Relu>,
    Combo<float, kattn::Relu>, Combo<double, kattn::Square>, Combo<float, kattn::Square>,
    Combo<double, kattn::Identity>, Combo<float, kattn::Identity>, Combo<double, kattn::Exp>,
    Combo<float, kattn::Exp>, Combo<double, kattn::ExpMod>, Combo<float, kattn::ExpMod>>;

}  // namespace kattn_test
