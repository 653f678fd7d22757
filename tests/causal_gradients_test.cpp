// Gradients of causal windowed layers in inference mode (gradients.hpp,
// detail/causal_backward.hpp): attendBackward and backward against central finite differences
// in float64 for every map over chunks, windows (finite and unbounded), decay, padding and
// key masks; against finite differences of an explicit O(T^2) masked formula written here from
// SPEC 3.3 and of the streaming forward fed token by token (the recurrence); float against
// double; thread count; the error paths. Errors are the project's measure: the largest
// absolute error over the largest absolute reference entry, per tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <kattn/gradients.hpp>
#include <kattn/kattn.hpp>

#include "gradient_support.hpp"

namespace {

using kattn::Index;
using kattn_test::randomTensor;
using kattn_test::centralDifferences;
using kattn_test::relError;
using kattn_test::weightData;
template <typename S, int R>
using Tensor = kattn::Tensor<S, R>;
template <typename S, int R>
using CMap = kattn::ConstTensorMap<S, R>;

constexpr Index kB = 2, kN = 2, kd = 3, kdv = 2, kDq = 4, kDv = 3, kDk = 4, kO = 3;
constexpr double kFdTol = 1e-6;
constexpr int kNoWindow = kattn::kUnboundedWindow;

using kattn_test::forEachMap;
using kattn_test::FrozenExpPlus;
using kattn_test::LossMap;
using kattn_test::Tag;
using kattn_test::toFloat;

template <typename Map>
using Causal = kattn::KernelAttention<double, Map, kattn::CausalWindowed>;

/// Below this largest |entry| a finite-difference gradient is rounding noise.
constexpr double kFlat = 1e-8;

/// Relative error of `analytic` against the finite differences `fd`, over the largest of
/// |fd| and `floor`; a flat fd wants a flat analytic gradient. Returns the error (0 when flat)
/// for the report of the largest one.
double expectMatches(const std::string& what, const double* analytic,
                     const std::vector<double>& fd, double tol = kFdTol, double floor = 0) {
  double scale = floor, got = 0;
  for (std::size_t i = 0; i < fd.size(); ++i) {
    scale = std::max(scale, std::abs(fd[i]));
    got = std::max(got, std::abs(analytic[i]));
  }
  if (scale < kFlat) {
    EXPECT_LT(got, kFlat) << what << ": flat, by finite differences";
    return 0;
  }
  double err = 0;
  for (std::size_t i = 0; i < fd.size(); ++i) err = std::max(err, std::abs(analytic[i] - fd[i]));
  EXPECT_LE(err / scale, tol) << what;
  return err / scale;
}

/// A causal configuration: chunks C, window W, decay (0 for none), padding.
struct Causality {
  int chunk = 1;
  int window = kNoWindow;
  double decay = 0;
  const char* padding = "none";
};

std::string label(const char* map, int m, const Causality& k, bool masked) {
  return std::string(map) + " m=" + std::to_string(m) + " C=" + std::to_string(k.chunk) +
         " W=" + (k.window == kNoWindow ? std::string("inf") : std::to_string(k.window)) +
         " decay=" + std::to_string(k.decay) + " padding=" + k.padding +
         (masked ? " masked" : "");
}

kattn::LayerConfig causalConfig(const char* map, int m, const Causality& k) {
  kattn::LayerConfig c;
  c.feature_transform = map;
  c.num_heads = int(kN);
  c.key_dim = int(kd);
  c.value_dim = int(kdv);
  c.output_shape = int(kO);
  c.num_random_features = m;
  c.seed = 7;
  c.use_causal_windowed = true;
  c.causal_chunk_length = k.chunk;
  c.causal_window_length = k.window;
  if (k.decay > 0) c.causal_window_decay = k.decay;
  c.causal_padding = std::string(k.padding);
  return c;
}

/// A key mask [B, T] of zeros, ones and a fractional weight; every row sums to at least 1.
Tensor<double, 2> makeMask(Index B, Index T) {
  Tensor<double, 2> m(B, T);
  for (Index b = 0; b < B; ++b)
    for (Index j = 0; j < T; ++j) m(b, j) = (j + b) % 3 == 1 ? 0.0 : (j == 0 ? 0.5 : 1.0);
  return m;
}

/// The smallest |logit| x.P_j (x_j without P) of heads x [B, L, N, d] (relu's kink is at 0).
double smallestHeadLogit(const kattn::LayerConfig& c, const Eigen::MatrixXd& P,
                         const Tensor<double, 4>& x) {
  double smallest = std::numeric_limits<double>::infinity();
  const Index d = x.dimension(3);
  for (Index r = 0; r < x.size() / d; ++r) {
    const Eigen::Map<const Eigen::VectorXd> h(x.data() + r * d, d);
    const Eigen::VectorXd z = c.hasProjection() ? Eigen::VectorXd(P * h) : h;
    smallest = std::min(smallest, z.cwiseAbs().minCoeff());
  }
  return smallest;
}

/// Heads q, k, v, an upstream gradient and an optional mask for attend() of T positions.
struct Heads {
  Tensor<double, 4> q, k, v, g;
  std::optional<Tensor<double, 2>> mask;
};

Tensor<double, 4> naiveAttend(const std::string& map, const kattn::LayerConfig& c,
                              const Eigen::MatrixXd& P, const Heads& h,
                              double* smallest = nullptr);

/// Heads with an offset shared by q and k, drawn until every logit is clear of relu's kink by
/// far more than the step and, for the identity map (features of any sign), every normaliser
/// that sees a key is clear of 0: near 0 the gradients are as large as finite differences are
/// inaccurate.
Heads makeHeads(std::mt19937_64& gen, const kattn::LayerConfig& c, const Eigen::MatrixXd& P,
                Index T, bool masked, bool clear = true) {
  Heads h;
  if (masked) h.mask = makeMask(kB, T);
  for (int attempt = 0;; ++attempt) {
    EXPECT_LT(attempt, 100) << "no heads clear of the relu kink and of a vanishing normaliser";
    h.q = randomTensor<4>(gen, 0.6, {kB, T, kN, kd}, 0.8);
    h.k = randomTensor<4>(gen, 0.6, {kB, T, kN, kd}, 0.8);
    h.v = randomTensor<4>(gen, 1.0, {kB, T, kN, kdv});
    h.g = randomTensor<4>(gen, 1.0, {kB, T, kN, kdv});
    if (!clear) break;
    double smallest = std::numeric_limits<double>::infinity();
    if (c.feature_transform == "identity") (void)naiveAttend("identity", c, P, h, &smallest);
    if (attempt >= 100 || (smallestHeadLogit(c, P, h.q) > 1e-3 &&
                           smallestHeadLogit(c, P, h.k) > 1e-3 && smallest > 0.1)) {
      break;
    }
  }
  return h;
}

/// sum(g * heads) for heads from `attend`.
double dotWith(const Tensor<double, 4>& a, const Tensor<double, 4>& g) {
  double l = 0;
  for (Index i = 0; i < a.size(); ++i) l += a.data()[i] * g.data()[i];
  return l;
}

template <typename Layer>
kattn::HeadGradients<double> attendBackwardOf(const Layer& layer, const Heads& h) {
  std::optional<CMap<double, 2>> m;
  if (h.mask) m.emplace(h.mask->data(), h.mask->dimensions());
  return kattn::attendBackward(layer, h.q, h.k, h.v, m, h.g);
}

/// The largest error seen by the finite-difference checks, printed at the end.
double g_largest = 0;

/// attendBackward of a causal layer against central differences of `loss` over q, k and v.
template <typename Map>
void checkHeads(const kattn::LayerConfig& c, Heads& h, const std::function<double()>& loss,
                double tol = kFdTol) {
  Causal<Map> layer(c);
  FrozenExpPlus::table() = {};
  (void)loss();  // records expplus's coefficients at this point
  FrozenExpPlus::table().replay = true;
  const kattn::HeadGradients<double> hg = attendBackwardOf(layer, h);
  // With C = 1 and W = 1 a row sees only itself, a_t = w v_t / (w + eps): q and k reach the
  // loss through eps alone, gradients some 1e-6 of v's, below what finite differences resolve
  // to 1e-6 of themselves. Their errors are then measured against the call's largest gradient.
  const bool eps_only = c.causal_chunk_length == 1 && c.causal_window_length == 1;
  const std::vector<double> fd_v = centralDifferences(h.v.data(), h.v.size(), loss);
  double floor = 0;
  if (eps_only) {
    for (double x : fd_v) floor = std::max(floor, std::abs(x));
  }
  for (auto [name, x, an] : {std::make_tuple("q", &h.q, &hg.q), std::make_tuple("k", &h.k, &hg.k)}) {
    const std::vector<double> fd = centralDifferences(x->data(), x->size(), loss);
    g_largest = std::max(g_largest, expectMatches(name, an->data(), fd, tol, floor));
  }
  g_largest = std::max(g_largest, expectMatches("v", hg.v.data(), fd_v, tol));
  FrozenExpPlus::table() = {};
}

/// Every combination of C in {1, 2, 3}, W in {1, 2, none}, decay none or 0.7 and the three
/// paddings, each with a T that needs the padding (several chunks, so that W = 2 slides).
template <typename Fn>
void forEachCausality(const Fn& fn) {
  for (int chunk : {1, 2, 3})
    for (int window : {1, 2, kNoWindow})
      for (double decay : {0.0, 0.7})
        for (const char* padding : {"none", "left", "right"}) {
          const Index T = std::string(padding) == "none" ? 12 : 7;
          fn(Causality{chunk, window, decay, padding}, T);
        }
}

// ---- attendBackward against finite differences of attend ---------------------------------

TEST(CausalGradients, AttendBackwardMatchesFiniteDifferencesForEveryMap) {
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    int i = 0;
    forEachCausality([&](const Causality& k, Index T) {
      // Projection and mask alternate so that each appears with every C, W and padding.
      const int m = (i % 2) ? 4 : 0;
      const bool masked = (i / 2) % 2 == 1 || i % 5 == 0;
      ++i;
      if (std::string(Map::name) == "expplus" && m == 0) return;  // expplus without P: identity
      SCOPED_TRACE(label(Map::name, m, k, masked));
      const kattn::LayerConfig c = causalConfig(Map::name, m, k);
      Causal<typename LossMap<Map>::type> frozen(c);
      std::mt19937_64 gen(100 + std::uint64_t(i));
      Heads h = makeHeads(gen, c, frozen.projection(), T, masked);
      checkHeads<Map>(c, h, [&] { return dotWith(frozen.attend(h.q, h.k, h.v, h.mask), h.g); });
    });
  });
  std::printf("largest relative error against finite differences of attend: %.3g\n", g_largest);
}

TEST(CausalGradients, AttendBackwardOverSeveralBlocksMatchesFiniteDifferences) {
  // T past the backward's blocks of whole chunks (about 256 rows), so that the window state
  // crosses blocks in both walks: central differences at sampled entries of q, k and v.
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    for (const Causality& k : {Causality{1, kNoWindow, 0.7, "none"}, Causality{3, 2, 0.0, "left"},
                               Causality{5, 70, 0.9, "right"}}) {
      // Too many logits to keep all clear of relu's kink: the sampled entries' few are, with
      // odds of about 1e-5 each. Identity without P, whose shared offset keeps it positive.
      const int m = std::string(Map::name) == "identity" ? 0 : 4;
      SCOPED_TRACE(label(Map::name, m, k, true));
      const kattn::LayerConfig c = causalConfig(Map::name, m, k);
      Causal<Map> layer(c);
      Causal<typename LossMap<Map>::type> frozen(c);
      std::mt19937_64 gen(900);
      Heads h = makeHeads(gen, c, layer.projection(), 601, true, false);
      auto loss = [&] { return dotWith(frozen.attend(h.q, h.k, h.v, h.mask), h.g); };
      FrozenExpPlus::table() = {};
      (void)loss();
      FrozenExpPlus::table().replay = true;
      const kattn::HeadGradients<double> hg = attendBackwardOf(layer, h);
      std::uniform_int_distribution<Index> pick(0, 1 << 30);
      for (auto [name, x, an] : {std::make_tuple("q", &h.q, &hg.q),
                                 std::make_tuple("k", &h.k, &hg.k),
                                 std::make_tuple("v", &h.v, &hg.v)}) {
        std::vector<double> fd, got;
        for (int i = 0; i < 12; ++i) {
          // Early, middle and late rows alike.
          const Index at = (i < 4 ? 0 : i < 8 ? x->size() / 2 : x->size() - x->size() / 8) +
                           pick(gen) % (x->size() / 8);
          fd.push_back(centralDifferences(x->data() + at, 1, loss)[0]);
          got.push_back(an->data()[at]);
        }
        g_largest = std::max(g_largest, expectMatches(name, got.data(), fd));
      }
      FrozenExpPlus::table() = {};
    }
  });
}

// ---- an explicit O(T^2) reference, SPEC 3.3 written out ----------------------------------

/// phi(x sqrt(s)) of one head's row for elu, relu or identity (phi = f(x P^T) / sqrt(m) with P).
Eigen::VectorXd naiveFeatures(const std::string& map, const Eigen::VectorXd& x,
                              const Eigen::MatrixXd& P, double scale) {
  const Eigen::VectorXd xs = x * std::sqrt(scale);
  Eigen::VectorXd z = P.size() ? Eigen::VectorXd(P * xs) : xs;
  for (Index j = 0; j < z.size(); ++j) {
    if (map == "relu") z(j) = std::max(z(j), 0.0) + 1e-3;
    if (map == "elu") z(j) = z(j) > 0 ? z(j) + 1 : std::exp(z(j));
  }
  return P.size() ? Eigen::VectorXd(z / std::sqrt(double(P.rows()))) : z;
}

/// Heads by the explicit formula: query t in chunk c_t sees key s with weight
/// w = gamma^(c_t - c_s) when 0 <= c_t - c_s < W, chunks counted on the padded positions.
/// `smallest`, when given, receives the smallest |normaliser| without its eps.
Tensor<double, 4> naiveAttend(const std::string& map, const kattn::LayerConfig& c,
                              const Eigen::MatrixXd& P, const Heads& h, double* smallest) {
  const Index T = h.q.dimension(1), C = c.causal_chunk_length;
  const Index rem = T % C;
  const std::string pad = c.causal_padding.value_or("none");
  const Index lead = pad == "left" && rem ? C - rem : 0;
  const double gamma = c.causal_window_decay.value_or(1.0), s = c.resolvedScale();
  Tensor<double, 4> out(kB, T, kN, kdv);
  for (Index b = 0; b < kB; ++b)
    for (Index n = 0; n < kN; ++n) {
      auto row = [&](const Tensor<double, 4>& x, Index t, Index w) {
        Eigen::VectorXd r(w);
        for (Index j = 0; j < w; ++j) r(j) = x(b, t, n, j);
        return r;
      };
      for (Index t = 0; t < T; ++t) {
        const Eigen::VectorXd qf = naiveFeatures(map, row(h.q, t, kd), P, s);
        Eigen::VectorXd num = Eigen::VectorXd::Zero(kdv);
        double den = 1e-6;
        bool sees = false;  // a key of nonzero mask (else a = 0, however small den is)
        for (Index u = 0; u < T; ++u) {
          const Index dc = (t + lead) / C - (u + lead) / C;
          if (dc < 0 || dc >= c.causal_window_length) continue;
          double w = std::pow(gamma, double(dc)) *
                     qf.dot(naiveFeatures(map, row(h.k, u, kd), P, s));
          if (h.mask) w *= (*h.mask)(b, u);
          sees = sees || !h.mask || (*h.mask)(b, u) != 0;
          num += w * row(h.v, u, kdv);
          den += w;
        }
        for (Index j = 0; j < kdv; ++j) out(b, t, n, j) = num(j) / den;
        if (smallest && sees) *smallest = std::min(*smallest, std::abs(den - 1e-6));
      }
    }
  return out;
}

TEST(CausalGradients, AttendBackwardMatchesTheExplicitMaskedFormula) {
  // The formula's own finite differences: independent of kattn's forward, so the backward's
  // chunks, window weights and padding are checked against SPEC 3.3 itself.
  int i = 0;
  auto run = [&](auto tag) {
    using Map = typename decltype(tag)::type;
    forEachCausality([&](const Causality& k, Index T) {
      const int m = (i % 3 == 1) ? 4 : 0;
      const bool masked = i % 2 == 0;
      ++i;
      SCOPED_TRACE(label(Map::name, m, k, masked));
      const kattn::LayerConfig c = causalConfig(Map::name, m, k);
      const Eigen::MatrixXd P = Causal<Map>(c).projection();
      std::mt19937_64 gen(300 + std::uint64_t(i));
      Heads h = makeHeads(gen, c, P, T, masked);
      checkHeads<Map>(c, h, [&] { return dotWith(naiveAttend(Map::name, c, P, h), h.g); });
    });
  };
  run(Tag<kattn::Relu>{});
  run(Tag<kattn::Elu>{});
}

// ---- the token-by-token recurrence ------------------------------------------------------

/// Rows [t, t + 1) of x [B, T, ...] as a tensor of length 1.
template <int R>
Tensor<double, R> tokenOf(const Tensor<double, R>& x, Index t) {
  std::array<Index, R> offsets{}, extents = x.dimensions();
  offsets[1] = t;
  extents[1] = 1;
  return x.slice(offsets, extents);
}

TEST(CausalGradients, WholePassGradientsEqualThoseOfTheTokenByTokenRecurrence) {
  // C = 1: the whole pass's gradients against finite differences of a streaming state fed one
  // token per call, exact mode (window of 2 and none, with and without decay) and recurrent
  // mode (the reference's decayed cache, W covering the sequence).
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    if constexpr (!kattn::feature_map_traits<Map>::max_shifted &&
                  !kattn::feature_map_traits<Map>::pair_statistics) {
      int i = 0;
      for (int window : {2, kNoWindow})
        for (double decay : {0.0, 0.7})
          for (bool recurrent : {false, true}) {
            if (recurrent && (decay == 0.0 || window != kNoWindow)) continue;
            const int m = i % 2 ? 4 : 0;
            ++i;
            const Causality k{1, window, decay, "none"};
            SCOPED_TRACE(label(Map::name, m, k, true) + (recurrent ? " recurrent" : " exact"));
            const kattn::LayerConfig c = causalConfig(Map::name, m, k);
            Causal<Map> layer(c);
            std::mt19937_64 gen(500 + std::uint64_t(i));
            Heads h = makeHeads(gen, c, layer.projection(), 9, true);
            const auto mode =
                recurrent ? kattn::StreamingMode::Recurrent : kattn::StreamingMode::Exact;
            auto loss = [&] {
              auto state = layer.makeState(kB, mode);
              double l = 0;
              for (Index t = 0; t < h.q.dimension(1); ++t) {
                const Tensor<double, 4> a =
                    layer.attend(tokenOf(h.q, t), tokenOf(h.k, t), tokenOf(h.v, t),
                                 tokenOf(*h.mask, t), state);
                l += dotWith(a, tokenOf(h.g, t));
              }
              return l;
            };
            checkHeads<Map>(c, h, loss);
          }
    }
  });
}

// ---- the whole layer ------------------------------------------------------------------------

/// The inputs of one layer backward and its upstream gradient.
struct Problem {
  Tensor<double, 3> query, value, grad;
  std::optional<Tensor<double, 3>> key;
  std::optional<Tensor<double, 2>> mask;
};

kattn::Weights<double> makeWeights(std::mt19937_64& gen, const kattn::LayerConfig& c,
                                   bool separate_key, bool identity) {
  const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim(), O = *c.output_shape;
  kattn::Weights<double> w;
  w.query_kernel = randomTensor<3>(gen, 0.5, {kDq, N, d});
  w.key_kernel = randomTensor<3>(gen, 0.5, {separate_key ? kDk : kDv, N, d});
  w.value_kernel = randomTensor<3>(gen, 0.5, {kDv, N, dv});
  w.output_kernel = randomTensor<3>(gen, 0.5, {N, dv, O});
  w.query_bias = randomTensor<2>(gen, 0.3, {N, d}, identity ? 2.0 : 0.0);
  w.key_bias = identity ? w.query_bias : randomTensor<2>(gen, 0.3, {N, d});
  w.value_bias = randomTensor<2>(gen, 0.3, {N, dv});
  w.output_bias = randomTensor<1>(gen, 0.3, {O});
  return w;
}

template <typename Layer>
Tensor<double, 3> forwardOf(const Layer& layer, const Problem& p) {
  return layer.forward(p.query, p.value, p.key, p.mask);
}

template <typename Layer, typename Scalar>
kattn::Gradients<Scalar> backwardOf(const Layer& layer, const Tensor<Scalar, 3>& query,
                                    const Tensor<Scalar, 3>& value,
                                    const std::optional<Tensor<Scalar, 3>>& key,
                                    const std::optional<Tensor<Scalar, 2>>& mask,
                                    const Tensor<Scalar, 3>& grad) {
  std::optional<CMap<Scalar, 3>> k;
  std::optional<CMap<Scalar, 2>> m;
  if (key) k.emplace(key->data(), key->dimensions());
  if (mask) m.emplace(mask->data(), mask->dimensions());
  return kattn::backward(layer, query, value, k, m, grad);
}

/// Heads x W + b [B, T, N, h] of an input x [B, T, D].
Tensor<double, 4> project(const Tensor<double, 3>& x, const Tensor<double, 3>& kernel,
                          const Tensor<double, 2>& bias) {
  const Index B = x.dimension(0), T = x.dimension(1), D = x.dimension(2);
  const Index N = kernel.dimension(1), h = kernel.dimension(2);
  Tensor<double, 4> out(B, T, N, h);
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < T; ++t)
      for (Index n = 0; n < N; ++n)
        for (Index j = 0; j < h; ++j) {
          double v = bias(n, j);
          for (Index i = 0; i < D; ++i) v += x(b, t, i) * kernel(i, n, j);
          out(b, t, n, j) = v;
        }
  return out;
}

/// One case of the whole layer's finite-difference check.
struct LayerCase {
  int m = 0;
  Causality causality;
  Index T = 7;
  bool masked = false, separate_key = true, scale_by_length = false;
};

template <typename Map>
void checkLayer(const LayerCase& lc, std::uint64_t seed) {
  kattn::LayerConfig c = causalConfig(Map::name, lc.m, lc.causality);
  c.scale_by_length = lc.scale_by_length;
  const bool identity = std::string(Map::name) == "identity";
  Causal<Map> layer(c);
  Causal<typename LossMap<Map>::type> frozen(c);
  std::mt19937_64 gen(seed);
  Problem p;
  kattn::Weights<double> w;
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 50) << "no problem clear of the relu kink";
    p.query = randomTensor<3>(gen, 1.0, {kB, lc.T, kDq});
    p.value = randomTensor<3>(gen, 1.0, {kB, lc.T, kDv});
    p.key.reset();
    if (lc.separate_key) p.key = randomTensor<3>(gen, 1.0, {kB, lc.T, kDk});
    p.grad = randomTensor<3>(gen, 1.0, {kB, lc.T, kO});
    p.mask.reset();
    if (lc.masked) p.mask = makeMask(kB, lc.T);
    w = makeWeights(gen, c, lc.separate_key, identity);
    const Tensor<double, 4> qh = project(p.query, w.query_kernel, w.query_bias);
    const Tensor<double, 4> kh = project(p.key ? *p.key : p.value, w.key_kernel, w.key_bias);
    if (smallestHeadLogit(c, layer.projection(), qh) > 3e-3 &&
        smallestHeadLogit(c, layer.projection(), kh) > 3e-3) {
      break;
    }
  }
  layer.setWeights(w);
  frozen.setWeights(w);
  auto loss = [&] {
    const Tensor<double, 3> y = forwardOf(frozen, p);
    double l = 0;
    for (Index i = 0; i < y.size(); ++i) l += y.data()[i] * p.grad.data()[i];
    return l;
  };
  FrozenExpPlus::table() = {};
  (void)loss();
  FrozenExpPlus::table().replay = true;
  const kattn::Gradients<double> g = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
  auto check = [&](const std::string& what, double* x, const double* analytic, Index n) {
    const std::vector<double> fd = centralDifferences(x, n, loss);
    g_largest = std::max(g_largest, expectMatches(what, analytic, fd));
  };
  check("query", p.query.data(), g.query.data(), p.query.size());
  check("value", p.value.data(), g.value.data(), p.value.size());
  if (p.key) check("key", p.key->data(), g.key.data(), p.key->size());
  EXPECT_EQ(g.key.size(), p.key ? p.key->size() : 0);
  for (const kattn::NamedTensor<double>& t : g.named()) {
    kattn::Weights<double> perturbed = w;
    double* x = weightData(perturbed, t.name);
    const std::vector<double> fd = centralDifferences(x, t.values.size(), [&] {
      frozen.setWeights(perturbed);
      return loss();
    });
    frozen.setWeights(w);
    g_largest = std::max(g_largest, expectMatches(t.name, t.values.data(), fd));
  }
  FrozenExpPlus::table() = {};
}

TEST(CausalGradients, LayerBackwardMatchesFiniteDifferencesForEveryMap) {
  const std::vector<LayerCase> cases = {
      {0, {2, 2, 0.7, "left"}, 7, true, true, false},
      {4, {3, 1, 0.0, "right"}, 7, false, false, false},
      {4, {1, kNoWindow, 0.0, "none"}, 6, true, true, false},
      {0, {2, kNoWindow, 0.7, "right"}, 7, true, false, true},
      {4, {3, 2, 0.0, "none"}, 9, true, true, true},
  };
  forEachMap([&](auto tag) {
    using Map = typename decltype(tag)::type;
    std::uint64_t seed = 700;
    for (LayerCase lc : cases) {
      if (std::string(Map::name) == "expplus") lc.m = 4;
      SCOPED_TRACE(label(Map::name, lc.m, lc.causality, lc.masked) +
                   (lc.separate_key ? " key" : " no-key") +
                   (lc.scale_by_length ? " scale_by_length" : ""));
      checkLayer<Map>(lc, ++seed);
    }
  });
  std::printf("largest relative error against finite differences: %.3g\n", g_largest);
}

// ---- float against double, threads --------------------------------------------------------

TEST(CausalGradients, FloatIsWithin1e4OfDouble) {
  double largest = 0;
  forEachMap([&](auto tag) {
    using Map = typename decltype(tag)::type;
    for (const Causality& k : {Causality{3, 2, 0.7, "left"}, Causality{1, kNoWindow, 0.0, "none"},
                               Causality{4, kNoWindow, 0.9, "right"}}) {
      const int m = 4;
      SCOPED_TRACE(label(Map::name, m, k, true));
      const kattn::LayerConfig c = causalConfig(Map::name, m, k);
      Causal<Map> d64(c);
      kattn::KernelAttention<float, Map, kattn::CausalWindowed> f32(c);
      f32.setProjection(d64.projection().template cast<float>());
      std::mt19937_64 gen(1300);
      const Index T = 41;
      Problem p;
      p.query = randomTensor<3>(gen, 1.0, {kB, T, kDq});
      p.value = randomTensor<3>(gen, 1.0, {kB, T, kDv});
      p.key = randomTensor<3>(gen, 1.0, {kB, T, kDk});
      p.grad = randomTensor<3>(gen, 1.0, {kB, T, kO});
      p.mask = makeMask(kB, T);
      const kattn::Weights<double> w =
          makeWeights(gen, c, true, std::string(Map::name) == "identity");
      d64.setWeights(w);
      f32.setWeights(kattn::castWeights<float>(w));
      const auto want = backwardOf(d64, p.query, p.value, p.key, p.mask, p.grad);
      const std::optional<Tensor<float, 3>> key = toFloat(*p.key);
      const std::optional<Tensor<float, 2>> mask = toFloat(*p.mask);
      const auto got =
          backwardOf(f32, toFloat(p.query), toFloat(p.value), key, mask, toFloat(p.grad));
      auto expectClose = [&](const std::string& what, const float* x, const double* ref, Index n) {
        const double e = relError(x, ref, n);
        largest = std::max(largest, e);
        EXPECT_LE(e, 1e-4) << what;
      };
      expectClose("query", got.query.data(), want.query.data(), want.query.size());
      expectClose("value", got.value.data(), want.value.data(), want.value.size());
      expectClose("key", got.key.data(), want.key.data(), want.key.size());
      const auto ng = got.named();
      const auto nw = want.named();
      ASSERT_EQ(ng.size(), nw.size());
      for (std::size_t i = 0; i < ng.size(); ++i) {
        expectClose(nw[i].name, ng[i].values.data(), nw[i].values.data(), nw[i].values.size());
      }
    }
  });
  std::printf("largest relative error of float against double: %.3g\n", largest);
}

bool sameBits(const double* x, const double* y, Index n) {
  return std::memcmp(x, y, std::size_t(n) * sizeof(double)) == 0;
}

TEST(CausalGradients, ResultsDoNotDependOnTheThreadCount) {
  // Large enough for the pool to take the head tasks; a sliding window and an unbounded one.
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    for (const Causality& k : {Causality{4, 3, 0.8, "left"}, Causality{1, kNoWindow, 0.0, "none"}}) {
      SCOPED_TRACE(label(Map::name, 32, k, true));
      const kattn::LayerConfig c = causalConfig(Map::name, 32, k);
      Causal<Map> layer(c);
      std::mt19937_64 gen(21);
      const Index T = 301;
      Problem p;
      p.query = randomTensor<3>(gen, 1.0, {3, T, kDq});
      p.value = randomTensor<3>(gen, 1.0, {3, T, kDv});
      p.grad = randomTensor<3>(gen, 1.0, {3, T, kO});
      p.mask = makeMask(3, T);
      layer.setWeights(makeWeights(gen, c, false, std::string(Map::name) == "identity"));
      layer.setThreads(1);
      const auto one = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
      layer.setThreads(2);
      const auto two = backwardOf(layer, p.query, p.value, p.key, p.mask, p.grad);
      EXPECT_TRUE(sameBits(one.query.data(), two.query.data(), one.query.size()));
      EXPECT_TRUE(sameBits(one.value.data(), two.value.data(), one.value.size()));
      const auto n1 = one.named(), n2 = two.named();
      for (std::size_t i = 0; i < n1.size(); ++i) {
        EXPECT_TRUE(sameBits(n1[i].values.data(), n2[i].values.data(), n1[i].values.size()))
            << n1[i].name;
      }
    }
  });
}

// ---- memory ----------------------------------------------------------------------------------

TEST(CausalGradients, AttendBackwardIntoCallerMemoryWritesTheReturnedGradients) {
  // Buffers full of NaN, so that an entry left unwritten shows; the token scans (C = 1, a
  // window over the sequence) and the chunk walk.
  for (const Causality& k : {Causality{1, kNoWindow, 0.7, "none"}, Causality{2, 2, 0.0, "left"}}) {
    SCOPED_TRACE(label("relu", 4, k, true));
    const kattn::LayerConfig c = causalConfig("relu", 4, k);
    Causal<kattn::Relu> layer(c);
    std::mt19937_64 gen(31);
    const Heads h = makeHeads(gen, c, layer.projection(), 9, true);
    const kattn::HeadGradients<double> want = attendBackwardOf(layer, h);
    Tensor<double, 4> dq(h.q.dimensions()), dk(h.k.dimensions()), dv(h.v.dimensions());
    for (Tensor<double, 4>* t : {&dq, &dk, &dv}) t->setConstant(std::nan(""));
    const CMap<double, 2> m(h.mask->data(), h.mask->dimensions());
    kattn::attendBackward(layer, h.q, h.k, h.v, m, h.g, kattn::TensorMap<double, 4>(dq),
                          kattn::TensorMap<double, 4>(dk), kattn::TensorMap<double, 4>(dv));
    EXPECT_TRUE(sameBits(dq.data(), want.q.data(), dq.size()));
    EXPECT_TRUE(sameBits(dk.data(), want.k.data(), dk.size()));
    EXPECT_TRUE(sameBits(dv.data(), want.v.data(), dv.size()));
  }
}

// ---- the error paths ---------------------------------------------------------------------

template <typename F>
void expectInvalid(const std::string& name, const F& f) {
  try {
    f();
    ADD_FAILURE() << "no exception for " << name;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(name, 0), 0u) << e.what();
  }
}

TEST(CausalGradients, ErrorsNameTheArgument) {
  const kattn::LayerConfig c = causalConfig("elu", 4, Causality{3, 2, 0.0, "none"});
  Causal<kattn::Elu> layer(c);
  std::mt19937_64 gen(11);
  const Tensor<double, 4> q = randomTensor<4>(gen, 1.0, {kB, 6, kN, kd});
  const Tensor<double, 4> k = randomTensor<4>(gen, 1.0, {kB, 6, kN, kd});
  const Tensor<double, 4> v = randomTensor<4>(gen, 1.0, {kB, 6, kN, kdv});
  const Tensor<double, 4> g = randomTensor<4>(gen, 1.0, {kB, 6, kN, kdv});
  EXPECT_NO_THROW(kattn::attendBackward(layer, q, k, v, std::nullopt, g));
  // Keys of another length than the queries.
  const Tensor<double, 4> k9 = randomTensor<4>(gen, 1.0, {kB, 9, kN, kd});
  const Tensor<double, 4> v9 = randomTensor<4>(gen, 1.0, {kB, 9, kN, kdv});
  expectInvalid("k", [&] { kattn::attendBackward(layer, q, k9, v9, std::nullopt, g); });
  // A length that breaks the chunks without padding, as attend() says.
  const Tensor<double, 4> q7 = randomTensor<4>(gen, 1.0, {kB, 7, kN, kd});
  const Tensor<double, 4> k7 = randomTensor<4>(gen, 1.0, {kB, 7, kN, kd});
  const Tensor<double, 4> v7 = randomTensor<4>(gen, 1.0, {kB, 7, kN, kdv});
  const Tensor<double, 4> g7 = randomTensor<4>(gen, 1.0, {kB, 7, kN, kdv});
  EXPECT_THROW(layer.attend(q7, k7, v7), std::invalid_argument);
  expectInvalid("query", [&] { kattn::attendBackward(layer, q7, k7, v7, std::nullopt, g7); });
  Tensor<double, 4> nan_grad = g;
  nan_grad(1, 2, 0, 1) = std::nan("");
  expectInvalid("grad_heads", [&] { kattn::attendBackward(layer, q, k, v, std::nullopt, nan_grad); });
  // Into caller memory: shapes, and memory shared with an input or another gradient.
  using Map4 = kattn::TensorMap<double, 4>;
  Tensor<double, 4> dq(q.dimensions()), dk(k.dimensions()), dv(v.dimensions()), dq7(q7.dimensions());
  auto into = [&](Map4 gq, Map4 gk, Map4 gv, const Tensor<double, 4>& kin) {
    kattn::attendBackward(layer, q, kin, v, std::nullopt, g, gq, gk, gv);
  };
  EXPECT_NO_THROW(into(Map4(dq), Map4(dk), Map4(dv), k));
  expectInvalid("grad_q", [&] { into(Map4(dq7), Map4(dk), Map4(dv), k); });
  expectInvalid("grad_v", [&] { into(Map4(dq), Map4(dk), Map4(dk.data(), v.dimensions()), k); });
  Tensor<double, 4> k_owned = k;
  expectInvalid("grad_k", [&] { into(Map4(dq), Map4(k_owned), Map4(dv), k_owned); });
  try {
    into(Map4(dq), Map4(dk), Map4(dq.data() + 1, v.dimensions()), k);
    ADD_FAILURE() << "no exception for grad_v over grad_q";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("overlaps grad_q"), std::string::npos) << e.what();
  }
  // The whole layer.
  Causal<kattn::Elu> with_weights(c);
  with_weights.setWeights(makeWeights(gen, c, true, false));
  const Tensor<double, 3> x = randomTensor<3>(gen, 1.0, {kB, 6, kDq});
  const Tensor<double, 3> xv = randomTensor<3>(gen, 1.0, {kB, 9, kDv});
  const Tensor<double, 3> dy = randomTensor<3>(gen, 1.0, {kB, 6, kO});
  const std::optional<Tensor<double, 3>> xk = randomTensor<3>(gen, 1.0, {kB, 9, kDk});
  expectInvalid("value", [&] { backwardOf(with_weights, x, xv, xk, {}, dy); });
  EXPECT_THROW(backwardOf(layer, x, x, {}, {}, dy), std::logic_error);  // no weights
}

}  // namespace
