// favor_accuracy: how far kattn's random-feature attention is from exact softmax attention.
//
// For one head (d = d_v = 64, T = S = 512) it compares, on the same q, k, v,
//   exact   a_t = sum_s softmax_s(q_t . k_s / sqrt(d)) v_s,
//   exp     KernelAttention<double, Exp>::attend      (FAVOR+,  Choromanski et al. 2021),
//   expplus KernelAttention<double, ExpPlus>::attend  (FAVOR++, Likhosherstov et al. 2022),
// with m = 64, 256, 1024 random features and the projection the layer draws from `seed` (the
// reference's create_projection_matrix). With the default scale s = 1/sqrt(d) the layer
// multiplies q and k by sqrt(s) = d^(-1/4) before the feature map, so exp sees x = q / d^(1/4),
// y = k / d^(1/4) and estimates exp(x . y) = exp(q . k / sqrt(d)). The rows of q and k are
// random directions scaled so that |x| = |y| = r exactly, r = 0.5, 1, 2, 4 (|q| = r d^(1/4));
// v is N(0, 1).
//
// expplus multiplies its input by d^(-1/4) once more (as the reference does): with the
// default scale it estimates exp(q . k / d), a flatter softmax. The main table therefore runs
// it with scale = 1, where it estimates the same exp(q . k / sqrt(d)) as exp; the second table
// shows what the default scale gives.
//
// Error: the relative error of the attention output, averaged over the T query rows and over
// kSeeds seeds (each seed draws new q, k, v and a new projection): mean_t |a^_t - a_t| / |a_t|.
// Context columns:
//   - uniform: the error of a_t = mean_s v_s, attention that ignores q and k;
//   - FAVOR+ without eps: the exp estimate with the layer's projection but without the
//     normaliser's eps = 1e-6, i.e. the Monte-Carlo error alone. exp features are shifted by
//     the largest logit of the batch row (as the reference does), which scales q'.z down by
//     exp(-(Mq + Mk)); once that is far below eps the output collapses towards 0;
//   - |a^|/|a|: mean_t |a^_t| / |a_t| of exp (1 when unbiased in size, 0 when collapsed).
//
// Prints two Markdown tables (docs/accuracy.md holds them). Build optimised, e.g.
//   g++ -O2 -DNDEBUG -march=native -std=c++17 -I include -I /usr/include/eigen3
//       examples/favor_accuracy.cpp -lpthread
// Exits non-zero if a result is not finite or if, at r = 0.5, more features do not help.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <optional>
#include <random>
#include <vector>

#include <kattn/kattn.hpp>

namespace {

using kattn::Index;
using Mat = kattn::Matrix<double>;

constexpr Index kKeyDim = 64, kLength = 512;
constexpr int kSeeds = 5;
constexpr double kNorms[] = {0.5, 1.0, 2.0, 4.0};
constexpr Index kFeatures[] = {64, 256, 1024};
constexpr int kNumNorms = 4, kNumFeatures = 3;

/// Rows of length d in random directions with norm exactly `norm`: [L, 1, d] as one head.
kattn::Tensor<double, 4> directions(Index L, Index d, double norm, std::mt19937_64& gen) {
  std::normal_distribution<double> normal(0.0, 1.0);
  kattn::Tensor<double, 4> x(1, L, 1, d);
  for (Index t = 0; t < L; ++t) {
    double sq = 0;
    for (Index j = 0; j < d; ++j) sq += (x(0, t, 0, j) = normal(gen)) * x(0, t, 0, j);
    for (Index j = 0; j < d; ++j) x(0, t, 0, j) *= norm / std::sqrt(sq);
  }
  return x;
}

/// The [L, d] matrix of a one-head, one-batch-row tensor [1, L, 1, d].
Mat rows(const kattn::Tensor<double, 4>& x) {
  return Eigen::Map<const Mat>(x.data(), x.dimension(1), x.dimension(3));
}

/// Exact softmax attention softmax(q k^T / temperature) v, row by row (shifted by the row max).
Mat softmaxAttention(const Mat& q, const Mat& k, const Mat& v, double temperature) {
  Mat scores = (q * k.transpose()) / temperature;
  for (Index t = 0; t < scores.rows(); ++t) {
    scores.row(t) = (scores.row(t).array() - scores.row(t).maxCoeff()).exp().matrix();
    scores.row(t) /= scores.row(t).sum();
  }
  return scores * v;
}

/// FAVOR+ without eps: phi(x) = exp(x P^T - |x|^2 / 2 - c) with a shift c per query row and
/// one for all keys, which cancel exactly in the normalised attention.
Mat favorPlusWithoutEps(const Mat& q, const Mat& k, const Mat& v, const Mat& P) {
  const double s = 1.0 / std::sqrt(std::sqrt(double(q.cols())));
  const Mat x = q * s, y = k * s;
  Mat qf = x * P.transpose(), kf = y * P.transpose();
  for (Index t = 0; t < qf.rows(); ++t) qf.row(t).array() -= x.row(t).squaredNorm() / 2;
  for (Index t = 0; t < kf.rows(); ++t) kf.row(t).array() -= y.row(t).squaredNorm() / 2;
  for (Index t = 0; t < qf.rows(); ++t) qf.row(t).array() -= qf.row(t).maxCoeff();
  kf.array() -= kf.maxCoeff();
  qf = qf.array().exp().matrix();
  kf = kf.array().exp().matrix();
  Mat out = qf * (kf.transpose() * v);
  const kattn::Vector<double> den = qf * kf.colwise().sum().transpose();
  for (Index t = 0; t < out.rows(); ++t) out.row(t) /= den(t);
  return out;
}

/// mean_t |a^_t - a_t| / |a_t|.
double meanRelativeError(const Mat& estimate, const Mat& exact) {
  double sum = 0;
  for (Index t = 0; t < exact.rows(); ++t) {
    sum += (estimate.row(t) - exact.row(t)).norm() / exact.row(t).norm();
  }
  return sum / double(exact.rows());
}

/// mean_t |a^_t| / |a_t|.
double meanNormRatio(const Mat& estimate, const Mat& exact) {
  double sum = 0;
  for (Index t = 0; t < exact.rows(); ++t) sum += estimate.row(t).norm() / exact.row(t).norm();
  return sum / double(exact.rows());
}

/// The attention core of a one-head layer with m random features drawn from `seed`.
template <typename FeatureMap>
Mat kattnAttention(const char* transform, Index m, int seed, std::optional<double> scale,
                   const kattn::Tensor<double, 4>& q, const kattn::Tensor<double, 4>& k,
                   const kattn::Tensor<double, 4>& v) {
  kattn::LayerConfig config;
  config.num_heads = 1;
  config.key_dim = int(kKeyDim);
  config.feature_transform = transform;
  config.num_random_features = int(m);
  config.seed = seed;    // the projection: randomProjection<double>(m, d, seed)
  config.scale = scale;  // absent: 1/sqrt(d)
  kattn::KernelAttention<double, FeatureMap> layer(config);
  layer.setThreads(1);
  return rows(layer.attend(q, k, v));  // heads [1, T, 1, d_v]; attend needs no weights
}

/// Averages over seeds for one r.
struct Errors {
  double exp[kNumFeatures] = {}, expplus[kNumFeatures] = {}, without_eps[kNumFeatures] = {};
  double uniform = 0, norm_ratio = 0, expplus_default = 0, expplus_default_own = 0;
};

int run() {
  const auto start = std::chrono::steady_clock::now();
  const double root4d = std::sqrt(std::sqrt(double(kKeyDim)));
  Errors errors[kNumNorms];
  for (int i = 0; i < kNumNorms; ++i) {
    Errors& e = errors[i];
    for (int seed = 1; seed <= kSeeds; ++seed) {
      std::mt19937_64 gen(std::uint64_t(1000 * i + seed));
      const double qnorm = kNorms[i] * root4d;  // so that the feature maps see |x| = r
      const kattn::Tensor<double, 4> q = directions(kLength, kKeyDim, qnorm, gen);
      const kattn::Tensor<double, 4> k = directions(kLength, kKeyDim, qnorm, gen);
      kattn::Tensor<double, 4> v(1, kLength, 1, kKeyDim);
      std::normal_distribution<double> normal(0.0, 1.0);
      for (Index j = 0; j < v.size(); ++j) v.data()[j] = normal(gen);
      const Mat exact = softmaxAttention(rows(q), rows(k), rows(v), std::sqrt(double(kKeyDim)));
      const Mat uniform = rows(v).colwise().mean().replicate(kLength, 1);
      const double w = 1.0 / kSeeds;
      e.uniform += w * meanRelativeError(uniform, exact);
      for (int f = 0; f < kNumFeatures; ++f) {
        const Index m = kFeatures[f];
        const Mat a_exp = kattnAttention<kattn::Exp>("exp", m, seed, std::nullopt, q, k, v);
        e.exp[f] += w * meanRelativeError(a_exp, exact);
        e.expplus[f] += w * meanRelativeError(
                                kattnAttention<kattn::ExpPlus>("expplus", m, seed, 1.0, q, k, v),
                                exact);
        const Mat P = kattn::randomProjection<double>(m, kKeyDim, seed);
        e.without_eps[f] +=
            w * meanRelativeError(favorPlusWithoutEps(rows(q), rows(k), rows(v), P), exact);
        if (f == kNumFeatures - 1) {
          e.norm_ratio += w * meanNormRatio(a_exp, exact);
          const Mat a_default =
              kattnAttention<kattn::ExpPlus>("expplus", m, seed, std::nullopt, q, k, v);
          e.expplus_default += w * meanRelativeError(a_default, exact);
          e.expplus_default_own += w * meanRelativeError(
              a_default, softmaxAttention(rows(q), rows(k), rows(v), double(kKeyDim)));
        }
      }
    }
  }

  bool ok = true;
  auto cell = [&](double x) {
    ok = ok && std::isfinite(x);
    std::printf(" | %.3f", x);
  };
  auto rowHead = [&](int i) {
    std::printf("| %.1f | %.2f | %.2f", kNorms[i], kNorms[i] * root4d,
                kNorms[i] * kNorms[i] / std::sqrt(double(kKeyDim)));
  };
  std::printf("Mean relative error against softmax(q k^T / sqrt(d)) v (d = %ld, T = S = %ld, "
              "%d seeds):\n\n",
              long(kKeyDim), long(kLength), kSeeds);
  std::printf("| r = \\|x\\| | \\|q\\| | std of q.k/sqrt(d)");
  for (Index m : kFeatures) std::printf(" | exp m=%ld", long(m));
  for (Index m : kFeatures) std::printf(" | expplus m=%ld", long(m));
  std::printf(" | uniform |\n|");
  for (int c = 0; c < 3 + 2 * kNumFeatures + 1; ++c) std::printf(" ---: |");
  std::printf("\n");
  for (int i = 0; i < kNumNorms; ++i) {
    rowHead(i);
    for (double x : errors[i].exp) cell(x);
    for (double x : errors[i].expplus) cell(x);
    cell(errors[i].uniform);
    std::printf(" |\n");
  }
  const long m_last = long(kFeatures[kNumFeatures - 1]);
  std::printf("\nDiagnostics (exp: default scale; expplus: default scale, m = %ld):\n\n", m_last);
  std::printf("| r = \\|x\\|");
  for (Index m : kFeatures) std::printf(" | FAVOR+ without eps m=%ld", long(m));
  std::printf(" | exp \\|a^\\|/\\|a\\| m=%ld | expplus vs softmax(q k^T/sqrt(d)) "
              "| expplus vs softmax(q k^T/d) |\n|",
              m_last);
  for (int c = 0; c < 1 + kNumFeatures + 3; ++c) std::printf(" ---: |");
  std::printf("\n");
  for (int i = 0; i < kNumNorms; ++i) {
    std::printf("| %.1f", kNorms[i]);
    for (double x : errors[i].without_eps) cell(x);
    cell(errors[i].norm_ratio);
    cell(errors[i].expplus_default);
    cell(errors[i].expplus_default_own);
    std::printf(" |\n");
  }
  ok = ok && errors[0].exp[kNumFeatures - 1] < errors[0].exp[0] &&
       errors[0].expplus[kNumFeatures - 1] < errors[0].expplus[0];
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "favor_accuracy: %.1f s\n", seconds);
  if (!ok) std::fprintf(stderr, "favor_accuracy: FAILED (non-finite error, or no gain from m)\n");
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "favor_accuracy: FAILED: %s\n", e.what());
    return 1;
  }
}
