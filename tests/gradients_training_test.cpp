// Gradients in training mode (gradients.hpp with a TrainingCall): dropout and the projection's
// redraw. The analytic gradients against central finite differences in float64 of the
// training-mode forward replayed at a fixed call number (setTrainingCalls before each
// evaluation), for relu and exp, one bidirectional and one causal layer, with dropout, with
// redraw and with both; the core-level attendBackward likewise; that another call number gives
// other gradients; that backward leaves the counter alone; float against double; the error
// paths. Errors are the project's measure: the largest absolute error over the largest
// absolute reference entry, per tensor. Few layer types, because each instantiation of the
// backward costs compile time.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
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

constexpr Index kB = 2, kT = 5, kN = 2, kd = 3, kdv = 2, kDq = 4, kDv = 3, kDk = 4, kO = 3;
constexpr int kM = 4;
constexpr double kFdTol = 1e-6;
constexpr std::uint64_t kCall = 5;  // the replayed call; not 0, the counter's first number

// A `bool training` where a call number belongs does not compile (true is no call 1).
static_assert(!std::is_convertible_v<bool, std::optional<kattn::TrainingCall>>);
static_assert(!std::is_convertible_v<std::uint64_t, std::optional<kattn::TrainingCall>>);

/// The inputs of one backward, and the upstream gradient.
struct Problem {
  Tensor<double, 3> query, value, key, grad;
  Tensor<double, 2> mask;
};

Problem makeProblem(std::mt19937_64& gen) {
  Problem p;
  p.query = randomTensor<3>(gen, 1.0, {kB, kT, kDq});
  p.value = randomTensor<3>(gen, 1.0, {kB, kT, kDv});
  p.key = randomTensor<3>(gen, 1.0, {kB, kT, kDk});
  p.grad = randomTensor<3>(gen, 1.0, {kB, kT, kO});
  p.mask = Tensor<double, 2>(kB, kT);
  for (Index b = 0; b < kB; ++b)
    for (Index j = 0; j < kT; ++j) p.mask(b, j) = (j + b) % 3 == 1 ? 0.0 : 1.0;
  return p;
}

/// One configuration of the checks: the randomness and the masking's options.
struct Variant {
  double dropout = 0;
  bool redraw = false;
  bool causal = false;
  int begin_kernel = 0;
  bool short_seq = false;
};

std::string label(const Variant& v) {
  char rate[32];
  std::snprintf(rate, sizeof rate, " dropout=%g", v.dropout);
  return std::string(v.causal ? "causal" : "bidirectional") + (v.dropout > 0 ? rate : "") +
         (v.redraw ? " redraw" : "") +
         (v.begin_kernel ? " begin_kernel=" + std::to_string(v.begin_kernel) : "") +
         (v.short_seq ? " short" : "");
}

kattn::LayerConfig config(const char* map, const Variant& v) {
  kattn::LayerConfig c;
  c.feature_transform = map;
  c.num_heads = int(kN);
  c.key_dim = int(kd);
  c.value_dim = int(kdv);
  c.output_shape = int(kO);
  c.num_random_features = kM;
  c.seed = 7;
  c.dropout = v.dropout;
  c.redraw = v.redraw;
  c.begin_kernel = v.begin_kernel;
  c.is_short_seq = v.short_seq;
  if (v.causal) {
    // Chunks of 2 over 5 rows with left padding: the dropout's rows are the real positions.
    c.use_causal_windowed = true;
    c.causal_chunk_length = 2;
    c.causal_window_length = 2;
    c.causal_window_decay = 0.7;
    c.causal_padding = std::string("left");
  }
  return c;
}

kattn::Weights<double> makeWeights(std::mt19937_64& gen, const kattn::LayerConfig& c) {
  kattn::Weights<double> w;
  w.query_kernel = randomTensor<3>(gen, 0.5, {kDq, kN, kd});
  w.key_kernel = randomTensor<3>(gen, 0.5, {kDk, kN, kd});
  w.value_kernel = randomTensor<3>(gen, 0.5, {kDv, kN, kdv});
  w.output_kernel = randomTensor<3>(gen, 0.5, {kN, kdv, kO});
  w.query_bias = randomTensor<2>(gen, 0.3, {kN, kd});
  w.key_bias = randomTensor<2>(gen, 0.3, {kN, kd});
  w.value_bias = randomTensor<2>(gen, 0.3, {kN, kdv});
  w.output_bias = randomTensor<1>(gen, 0.3, {kO});
  if (c.begin_kernel > 0) {
    w.output_softmax_kernel = randomTensor<3>(gen, 0.5, {kN, kdv, kO});
    w.output_softmax_bias = randomTensor<1>(gen, 0.3, {kO});
  }
  return w;
}

/// The projection the training call `call` uses: the redraw, or the layer's.
template <typename Layer>
kattn::Matrix<double> projectionOfCall(const Layer& layer, std::uint64_t call) {
  const kattn::LayerConfig& c = layer.config();
  return c.redraw ? kattn::redrawProjection<double>(c.num_random_features, c.key_dim, c.seed, call)
                  : layer.projection();
}

/// The smallest |logit| x.P_j of rows x [rows, d] (relu's kink is at 0; a positive factor on
/// x keeps a logit's distance from 0 in proportion).
double smallestLogit(const kattn::Matrix<double>& P, const Eigen::MatrixXd& x) {
  return (x * P.transpose()).cwiseAbs().minCoeff();
}

/// The projected heads x W + b of every (batch row, row, head), as rows [B T N, d].
Eigen::MatrixXd headsOf(const Tensor<double, 3>& x, const Tensor<double, 3>& kernel,
                        const Tensor<double, 2>& bias) {
  const Index rows = x.dimension(0) * x.dimension(1), D = x.dimension(2);
  const Index N = kernel.dimension(1), d = kernel.dimension(2);
  using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMat h = Eigen::Map<const RowMat>(x.data(), rows, D) *
             Eigen::Map<const RowMat>(kernel.data(), D, N * d);
  h.rowwise() += Eigen::Map<const Eigen::RowVectorXd>(bias.data(), N * d);
  return Eigen::Map<const RowMat>(h.data(), rows * N, d);
}

/// The check of one tensor: relative error at most kFdTol, on a gradient that is not zero.
/// Returns the error.
double expectMatches(const std::string& what, const double* analytic,
                     const std::vector<double>& fd) {
  double scale = 0, err = 0;
  for (std::size_t i = 0; i < fd.size(); ++i) {
    scale = std::max(scale, std::abs(fd[i]));
    err = std::max(err, std::abs(analytic[i] - fd[i]));
  }
  EXPECT_GT(scale, 1e-8) << what << ": a gradient that is zero everywhere checks nothing";
  EXPECT_LE(err / scale, kFdTol) << what;
  return err / scale;
}

/// sum(grad * y) for y the training-mode forward replayed as call `call`.
template <typename Layer>
double trainingLoss(Layer& layer, const Problem& p, std::uint64_t call) {
  layer.setTrainingCalls(call);
  const Tensor<double, 3> y = layer.forward(p.query, p.value, p.key, p.mask, true);
  double l = 0;
  for (Index i = 0; i < y.size(); ++i) l += y.data()[i] * p.grad.data()[i];
  return l;
}

template <typename Layer>
kattn::Gradients<double> trainingBackward(const Layer& layer, const Problem& p,
                                          std::optional<kattn::TrainingCall> call) {
  return kattn::backward(layer, p.query, p.value, CMap<double, 3>(p.key.data(), p.key.dimensions()),
                         CMap<double, 2>(p.mask.data(), p.mask.dimensions()), p.grad, call);
}

/// Finite differences of the training forward at call kCall against backward given kCall,
/// over every input and weight; returns the largest error.
template <typename Map, typename Masking>
double checkTrainingGradients(const Variant& v, std::uint64_t seed) {
  using Layer = kattn::KernelAttention<double, Map, Masking>;
  Layer layer(config(Map::name, v));
  std::mt19937_64 gen(seed);
  Problem p;
  kattn::Weights<double> w;
  const kattn::Matrix<double> P = projectionOfCall(layer, kCall);
  // Draw until every relu logit of the replayed call is clear of the kink by far more than
  // the step.
  for (int attempt = 0;; ++attempt) {
    if (attempt == 50) {
      ADD_FAILURE() << "no problem clear of the relu kink";
      return 1;
    }
    p = makeProblem(gen);
    w = makeWeights(gen, layer.config());
    if (smallestLogit(P, headsOf(p.query, w.query_kernel, w.query_bias)) > 1e-3 &&
        smallestLogit(P, headsOf(p.key, w.key_kernel, w.key_bias)) > 1e-3) {
      break;
    }
  }
  layer.setWeights(w);
  const kattn::Gradients<double> g = trainingBackward(layer, p, kattn::TrainingCall{kCall});
  auto loss = [&] { return trainingLoss(layer, p, kCall); };
  double worst = 0;
  worst = std::max(worst, expectMatches("query", g.query.data(),
                                        centralDifferences(p.query.data(), p.query.size(), loss)));
  worst = std::max(worst, expectMatches("value", g.value.data(),
                                        centralDifferences(p.value.data(), p.value.size(), loss)));
  worst = std::max(worst, expectMatches("key", g.key.data(),
                                        centralDifferences(p.key.data(), p.key.size(), loss)));
  for (const kattn::NamedTensor<double>& t : g.named()) {
    kattn::Weights<double> perturbed = w;
    double* x = weightData(perturbed, t.name);
    const std::vector<double> fd = centralDifferences(x, t.values.size(), [&] {
      layer.setWeights(perturbed);
      return loss();
    });
    layer.setWeights(w);
    worst = std::max(worst, expectMatches(t.name, t.values.data(), fd));
  }
  return worst;
}

/// The variants of the finite-difference checks: dropout, redraw, both; for bidirectional
/// layers also begin_kernel's softmax part (its own dropout stream) and the short path.
std::vector<Variant> variants(bool causal) {
  std::vector<Variant> out = {{0.3, false, causal}, {0.0, true, causal}, {0.3, true, causal}};
  if (!causal) {
    out.push_back({0.3, true, false, 2, false});
    out.push_back({0.3, false, false, 0, true});
  }
  return out;
}

template <typename Map, typename Masking>
void checkEveryVariant(std::uint64_t seed) {
  for (const Variant& v : variants(Masking::causal)) {
    SCOPED_TRACE(std::string(Map::name) + " " + label(v));
    const double err = checkTrainingGradients<Map, Masking>(v, ++seed);
    std::printf("%s %s: largest relative error against finite differences %.3g\n", Map::name,
                label(v).c_str(), err);
  }
}

// ---- finite differences ----------------------------------------------------------------------

TEST(TrainingGradients, BidirectionalMatchesFiniteDifferences) {
  checkEveryVariant<kattn::Relu, kattn::Bidirectional>(100);
  checkEveryVariant<kattn::Exp, kattn::Bidirectional>(200);
}

TEST(TrainingGradients, CausalMatchesFiniteDifferences) {
  checkEveryVariant<kattn::Relu, kattn::CausalWindowed>(300);
  checkEveryVariant<kattn::Exp, kattn::CausalWindowed>(400);
}

/// attendBackward against finite differences of attend(training) replayed at kCall.
template <typename Masking>
void checkAttendBackward(const Variant& v, std::uint64_t seed) {
  using Layer = kattn::KernelAttention<double, kattn::Relu, Masking>;
  Layer layer(config("relu", v));
  std::mt19937_64 gen(seed);
  const kattn::Matrix<double> P = projectionOfCall(layer, kCall);
  Tensor<double, 4> q, k;
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 50) << "no heads clear of the relu kink";
    q = randomTensor<4>(gen, 0.6, {kB, kT, kN, kd}, 0.8);
    k = randomTensor<4>(gen, 0.6, {kB, kT, kN, kd}, 0.8);
    auto rows = [](const Tensor<double, 4>& x) {
      return Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic,
                                            Eigen::RowMajor>>(x.data(), x.size() / kd, kd)
          .eval();
    };
    if (smallestLogit(P, rows(q)) > 1e-3 && smallestLogit(P, rows(k)) > 1e-3) break;
  }
  Tensor<double, 4> val = randomTensor<4>(gen, 1.0, {kB, kT, kN, kdv});
  const Tensor<double, 4> g = randomTensor<4>(gen, 1.0, {kB, kT, kN, kdv});
  const Tensor<double, 2> mask = makeProblem(gen).mask;
  auto loss = [&] {
    layer.setTrainingCalls(kCall);
    const Tensor<double, 4> a = layer.attend(q, k, val, mask, true);
    double l = 0;
    for (Index i = 0; i < a.size(); ++i) l += a.data()[i] * g.data()[i];
    return l;
  };
  const kattn::HeadGradients<double> hg =
      kattn::attendBackward(layer, q, k, val, mask, g, kattn::TrainingCall{kCall});
  double worst = 0;
  worst = std::max(worst, expectMatches("q", hg.q.data(),
                                        centralDifferences(q.data(), q.size(), loss)));
  worst = std::max(worst, expectMatches("k", hg.k.data(),
                                        centralDifferences(k.data(), k.size(), loss)));
  worst = std::max(worst, expectMatches("v", hg.v.data(),
                                        centralDifferences(val.data(), val.size(), loss)));
  std::printf("attendBackward, relu %s: largest relative error against finite differences %.3g\n",
              label(v).c_str(), worst);
}

TEST(TrainingGradients, AttendBackwardMatchesFiniteDifferences) {
  {
    const Variant v{0.3, true, false, 2, false};
    SCOPED_TRACE(label(v));
    checkAttendBackward<kattn::Bidirectional>(v, 500);
  }
  {
    const Variant v{0.3, true, true};
    SCOPED_TRACE(label(v));
    checkAttendBackward<kattn::CausalWindowed>(v, 600);
  }
}

// ---- the call number -------------------------------------------------------------------------

/// max over every input and weight gradient of the error of `a` against `b`.
double gradientError(const kattn::Gradients<double>& a, const kattn::Gradients<double>& b) {
  double err = std::max({relError(a.query.data(), b.query.data(), a.query.size()),
                         relError(a.value.data(), b.value.data(), a.value.size()),
                         relError(a.key.data(), b.key.data(), a.key.size())});
  const auto na = a.named(), nb = b.named();
  EXPECT_EQ(na.size(), nb.size());
  for (std::size_t i = 0; i < std::min(na.size(), nb.size()); ++i) {
    err = std::max(err, relError(na[i].values.data(), nb[i].values.data(), na[i].values.size()));
  }
  return err;
}

template <typename Masking>
void checkCallNumberMatters() {
  constexpr bool causal = Masking::causal;
  for (const Variant& v : {Variant{0.3, false, causal}, Variant{0.0, true, causal}}) {
    SCOPED_TRACE(label(v));
    kattn::KernelAttention<double, kattn::Relu, Masking> layer(config("relu", v));
    std::mt19937_64 gen(700);
    const Problem p = makeProblem(gen);
    layer.setWeights(makeWeights(gen, layer.config()));
    layer.setTrainingCalls(40);
    const auto at_k = trainingBackward(layer, p, kattn::TrainingCall{kCall});
    const auto again = trainingBackward(layer, p, kattn::TrainingCall{kCall});
    const auto next = trainingBackward(layer, p, kattn::TrainingCall{kCall + 1});
    const auto inference = trainingBackward(layer, p, std::nullopt);
    EXPECT_EQ(layer.trainingCalls(), 40u) << "backward advanced the counter";
    EXPECT_EQ(gradientError(again, at_k), 0.0) << "the same call, other gradients";
    EXPECT_GT(gradientError(next, at_k), 0.05) << "call k + 1 has the gradients of call k";
    EXPECT_GT(gradientError(inference, at_k), 0.05) << "the training call has no effect";
  }
}

TEST(TrainingGradients, AnotherCallHasOtherGradients) {
  checkCallNumberMatters<kattn::Bidirectional>();
  checkCallNumberMatters<kattn::CausalWindowed>();
}

TEST(TrainingGradients, CounterNumbersRandomTrainingCallsAndIsReplayable) {
  const Variant v{0.3, true, false};
  kattn::KernelAttention<double, kattn::Relu> layer(config("relu", v));
  std::mt19937_64 gen(800);
  const Problem p = makeProblem(gen);
  layer.setWeights(makeWeights(gen, layer.config()));
  EXPECT_EQ(layer.trainingCalls(), 0u);
  (void)layer.forward(p.query, p.value, p.key, p.mask, false);
  EXPECT_EQ(layer.trainingCalls(), 0u) << "an inference call took a number";
  layer.setTrainingCalls(kCall);
  const Tensor<double, 3> y = layer.forward(p.query, p.value, p.key, p.mask, true);
  EXPECT_EQ(layer.trainingCalls(), kCall + 1);
  const Tensor<double, 3> y_next = layer.forward(p.query, p.value, p.key, p.mask, true);
  layer.setTrainingCalls(kCall);
  const Tensor<double, 3> replay = layer.forward(p.query, p.value, p.key, p.mask, true);
  EXPECT_EQ(relError(replay.data(), y.data(), y.size()), 0.0) << "replay differs";
  EXPECT_GT(relError(y_next.data(), y.data(), y.size()), 0.05) << "two calls alike";
  // A copy's counter starts where the original's stood.
  const kattn::KernelAttention<double, kattn::Relu> copy = layer;
  EXPECT_EQ(copy.trainingCalls(), layer.trainingCalls());
  // Without dropout and redraw a training call draws nothing and takes no number, and any
  // call number gives the inference gradients.
  kattn::KernelAttention<double, kattn::Relu> plain(config("relu", Variant{}));
  plain.setWeights(layer.weights());
  (void)plain.forward(p.query, p.value, p.key, p.mask, true);
  EXPECT_EQ(plain.trainingCalls(), 0u);
  const auto inference = trainingBackward(plain, p, std::nullopt);
  for (std::uint64_t call : {std::uint64_t(0), std::uint64_t(3),
                             std::numeric_limits<std::uint64_t>::max()}) {
    EXPECT_EQ(gradientError(trainingBackward(plain, p, kattn::TrainingCall{call}), inference), 0.0)
        << call;
  }
}

TEST(TrainingGradients, AForwardGivenItsNumberDrawsThatCallAndLeavesTheCounter) {
  for (const Variant& v : {Variant{0.3, true, false}, Variant{0.3, false, false}}) {
    SCOPED_TRACE(label(v));
    const kattn::LayerConfig c = config("relu", v);
    kattn::KernelAttention<double, kattn::Relu> layer(c);
    std::mt19937_64 gen(850);
    const Problem p = makeProblem(gen);
    layer.setWeights(makeWeights(gen, c));
    layer.setTrainingCalls(kCall);
    const Tensor<double, 3> counted = layer.forward(p.query, p.value, p.key, p.mask, true);
    layer.setTrainingCalls(40);
    const Tensor<double, 3> given =
        layer.forward(p.query, p.value, p.key, p.mask, kattn::TrainingCall{kCall});
    EXPECT_EQ(relError(given.data(), counted.data(), counted.size()), 0.0);
    EXPECT_EQ(layer.trainingCalls(), 40u) << "a numbered forward moved the counter";
    // takeTrainingCall hands out the counter's numbers one by one.
    EXPECT_EQ(layer.takeTrainingCall(), 40u);
    EXPECT_EQ(layer.takeTrainingCall(), 41u);
    EXPECT_EQ(layer.trainingCalls(), 42u);
    // attend, into caller memory, likewise.
    const Tensor<double, 4> q = randomTensor<4>(gen, 1.0, {kB, kT, kN, kd});
    const Tensor<double, 4> k = randomTensor<4>(gen, 1.0, {kB, kT, kN, kd});
    const Tensor<double, 4> val = randomTensor<4>(gen, 1.0, {kB, kT, kN, kdv});
    layer.setTrainingCalls(kCall);
    const Tensor<double, 4> heads = layer.attend(q, k, val, std::nullopt, true);
    Tensor<double, 4> into(heads.dimensions());
    layer.attend(q, k, val, std::nullopt, kattn::TrainingCall{kCall},
                 kattn::TensorMap<double, 4>(into));
    EXPECT_EQ(relError(into.data(), heads.data(), heads.size()), 0.0);
  }
}

TEST(TrainingGradients, ThreadsThatTakeTheirNumbersKnowTheirCalls) {
  // Four threads share one layer, each taking its numbers and running its forwards with them:
  // each forward is the call of its number (so that number's backward is its backward), which
  // a thread that read trainingCalls() before an unnumbered forward could not be sure of.
  const Variant v{0.3, true, false};
  const kattn::LayerConfig c = config("relu", v);
  kattn::KernelAttention<double, kattn::Relu> layer(c);
  std::mt19937_64 gen(860);
  const Problem p = makeProblem(gen);
  layer.setWeights(makeWeights(gen, c));
  constexpr int kThreads = 4, kSteps = 3;
  std::vector<std::vector<std::pair<std::uint64_t, Tensor<double, 3>>>> ran(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      for (int step = 0; step < kSteps; ++step) {
        const std::uint64_t n = layer.takeTrainingCall();
        ran[std::size_t(i)].emplace_back(
            n, layer.forward(p.query, p.value, p.key, p.mask, kattn::TrainingCall{n}));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  std::vector<std::uint64_t> numbers;
  for (const auto& list : ran)
    for (const auto& [n, y] : list) {
      numbers.push_back(n);
      layer.setTrainingCalls(n);
      const Tensor<double, 3> replay = layer.forward(p.query, p.value, p.key, p.mask, true);
      EXPECT_EQ(relError(y.data(), replay.data(), y.size()), 0.0) << "call " << n;
    }
  std::sort(numbers.begin(), numbers.end());
  for (std::size_t i = 0; i < numbers.size(); ++i) EXPECT_EQ(numbers[i], i) << "numbers taken";
}

// ---- float against double, errors ------------------------------------------------------------

TEST(TrainingGradients, FloatIsWithin1e4OfDouble) {
  const Variant v{0.3, true, false, 2, false};
  const kattn::LayerConfig c = config("relu", v);
  kattn::KernelAttention<double, kattn::Relu> d64(c);
  kattn::KernelAttention<float, kattn::Relu> f32(c);
  std::mt19937_64 gen(900);
  const Problem p = makeProblem(gen);
  const kattn::Weights<double> w = makeWeights(gen, c);
  d64.setWeights(w);
  f32.setWeights(kattn::castWeights<float>(w));
  const auto want = trainingBackward(d64, p, kattn::TrainingCall{kCall});
  const Tensor<float, 3> q = p.query.cast<float>(), val = p.value.cast<float>(),
                         k = p.key.cast<float>(), g = p.grad.cast<float>();
  const Tensor<float, 2> mask = p.mask.cast<float>();
  const kattn::Gradients<float> got =
      kattn::backward(f32, q, val, CMap<float, 3>(k.data(), k.dimensions()),
                      CMap<float, 2>(mask.data(), mask.dimensions()), g,
                      kattn::TrainingCall{kCall});
  double worst = std::max({relError(got.query.data(), want.query.data(), want.query.size()),
                           relError(got.value.data(), want.value.data(), want.value.size()),
                           relError(got.key.data(), want.key.data(), want.key.size())});
  const auto ng = got.named();
  const auto nw = want.named();
  ASSERT_EQ(ng.size(), nw.size());
  for (std::size_t i = 0; i < ng.size(); ++i) {
    worst = std::max(worst, relError(ng[i].values.data(), nw[i].values.data(),
                                     nw[i].values.size()));
  }
  EXPECT_LE(worst, 1e-4);
  std::printf("largest relative error of float against double: %.3g\n", worst);
}

/// Runs f, expecting std::invalid_argument whose message starts with `name`.
template <typename F>
void expectInvalid(const std::string& name, const F& f) {
  try {
    f();
    ADD_FAILURE() << "no exception for " << name;
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind(name, 0), 0u) << e.what();
  }
}

TEST(TrainingGradients, ACallNumberRedrawCannotTakeIsAnError) {
  // redrawProjection folds k + 1 into the seed as an int32: k <= 2147483646.
  const std::uint64_t last = std::uint64_t(std::numeric_limits<std::int32_t>::max()) - 1;
  kattn::KernelAttention<double, kattn::Relu> layer(config("relu", Variant{0.0, true, false}));
  std::mt19937_64 gen(1000);
  const Problem p = makeProblem(gen);
  layer.setWeights(makeWeights(gen, layer.config()));
  EXPECT_NO_THROW(trainingBackward(layer, p, kattn::TrainingCall{last}));
  expectInvalid("training_call",
                [&] { trainingBackward(layer, p, kattn::TrainingCall{last + 1}); });
  const Tensor<double, 4> q(kB, kT, kN, kd), k(kB, kT, kN, kd), v(kB, kT, kN, kdv);
  Tensor<double, 4> g(kB, kT, kN, kdv);
  g.setZero();
  expectInvalid("training_call", [&] {
    kattn::attendBackward(layer, q, k, v, std::nullopt, g, kattn::TrainingCall{last + 1});
  });
  // A forward given the number refuses it likewise; the counter's own are redraw's error.
  expectInvalid("training_call", [&] {
    (void)layer.forward(p.query, p.value, p.key, p.mask, kattn::TrainingCall{last + 1});
  });
  // Dropout alone takes any number.
  kattn::KernelAttention<double, kattn::Relu> dropout(config("relu", Variant{0.3, false, false}));
  dropout.setWeights(layer.weights());
  EXPECT_NO_THROW(trainingBackward(dropout, p, kattn::TrainingCall{last + 1}));
}

}  // namespace
