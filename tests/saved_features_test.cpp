// attend() and forward() keeping their features (SavedFeatures), attendBackward() and
// backward() reading them: the same heads and outputs as without them, the same gradients as
// recomputing, for every map, across blocks of rows with different shifts, with masks,
// begin_kernel and training draws, on any number of threads; nothing kept where the forward
// has no low-rank form; and the errors of a mismatched backward.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>

#include <gtest/gtest.h>

#include <kattn/gradients.hpp>
#include <kattn/kattn.hpp>

#include "gradient_support.hpp"

namespace {

using kattn::Index;
using kattn::Tensor;
using kattn_test::forEachMap;
using kattn_test::randomTensor;
using kattn_test::relError;

constexpr Index kN = 2, kd = 4, kdv = 3;

kattn::LayerConfig config(const char* map, int m) {
  kattn::LayerConfig c;
  c.feature_transform = map;
  c.num_heads = int(kN);
  c.key_dim = int(kd);
  c.value_dim = int(kdv);
  c.output_shape = 5;
  c.num_random_features = m;
  c.seed = 11;
  return c;
}

/// Heads q, k, v, a mask with zeros and a half, and an upstream gradient, for B rows of T
/// queries and S keys. q and k share an offset, so that the identity map's normaliser stays
/// positive; their spread puts the blocks' largest logits apart.
template <typename Scalar>
struct Heads {
  Tensor<Scalar, 4> q, k, v, g;
  Tensor<Scalar, 2> mask;
};

Heads<double> makeHeads(std::uint64_t seed, Index B, Index T, Index S) {
  std::mt19937_64 gen(seed);
  Heads<double> h;
  h.q = randomTensor<4>(gen, 0.6, {B, T, kN, kd}, 0.8);
  h.k = randomTensor<4>(gen, 0.6, {B, S, kN, kd}, 0.8);
  h.v = randomTensor<4>(gen, 1.0, {B, S, kN, kdv});
  h.g = randomTensor<4>(gen, 1.0, {B, T, kN, kdv});
  h.mask = Tensor<double, 2>(B, S);
  for (Index b = 0; b < B; ++b)
    for (Index s = 0; s < S; ++s) h.mask(b, s) = (s + b) % 7 == 3 ? 0.0 : (s % 11 == 5 ? 0.5 : 1.0);
  return h;
}

Heads<float> toFloat(const Heads<double>& h) {
  return {h.q.cast<float>(), h.k.cast<float>(), h.v.cast<float>(), h.g.cast<float>(),
          h.mask.cast<float>()};
}

/// attend() into memory, keeping its features in `saved` (when given).
template <typename Layer, typename Scalar>
Tensor<Scalar, 4> attendInto(const Layer& layer, const Heads<Scalar>& h, kattn::Training training,
                             kattn::SavedFeatures<kattn::detail::NoDeduce<Scalar>>* saved) {
  Tensor<Scalar, 4> heads(h.q.dimension(0), h.q.dimension(1), kN, kdv);
  layer.attend(h.q, h.k, h.v, h.mask, training, kattn::TensorMap<Scalar, 4>(heads), saved);
  return heads;
}

template <typename Layer, typename Scalar>
kattn::HeadGradients<Scalar> backwardOf(const Layer& layer, const Heads<Scalar>& h,
                                        std::optional<kattn::TrainingCall> call,
                                        const kattn::SavedFeatures<kattn::detail::NoDeduce<Scalar>>* saved) {
  return kattn::attendBackward(layer, h.q, h.k, h.v, h.mask, h.g, call, saved);
}

template <typename Scalar>
double gradError(const kattn::HeadGradients<Scalar>& got, const kattn::HeadGradients<Scalar>& want) {
  return std::max({relError(got.q.data(), want.q.data(), want.q.size()),
                   relError(got.k.data(), want.k.data(), want.k.size()),
                   relError(got.v.data(), want.v.data(), want.v.size())});
}

template <typename Scalar, int R>
bool sameBits(const Tensor<Scalar, R>& a, const Tensor<Scalar, R>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), std::size_t(a.size()) * sizeof(Scalar)) == 0;
}

bool savesFeatures(const std::string& map, int m) { return !(map == "expplus" && m > 0); }

TEST(SavedFeatures, BackwardFromSavedFeaturesEqualsRecomputing) {
  // T and S over several blocks of 256 rows, the last ones partial; a first call of the same
  // sizes with other inputs, so that the second reuses (and must overwrite) the buffers.
  forEachMap([](auto tag) {
    using Map = typename decltype(tag)::type;
    for (int m : {0, 16}) {
      SCOPED_TRACE(std::string(Map::name) + " m=" + std::to_string(m));
      kattn::KernelAttention<double, Map> layer(config(Map::name, m));
      layer.setCoreForm(kattn::CoreForm::LowRank);
      const Heads<double> other = makeHeads(40 + std::uint64_t(m), 2, 300, 530);
      const Heads<double> h = makeHeads(50 + std::uint64_t(m), 2, 300, 530);
      kattn::SavedFeatures<double> saved;
      (void)attendInto(layer, other, false, &saved);
      const Tensor<double, 4> heads = attendInto(layer, h, false, &saved);
      EXPECT_TRUE(sameBits(heads, attendInto(layer, h, false, nullptr)));
      EXPECT_EQ(saved.holdsFeatures(), savesFeatures(Map::name, m));
      const auto want = backwardOf(layer, h, std::nullopt, nullptr);
      EXPECT_LE(gradError(backwardOf(layer, h, std::nullopt, &saved), want), 1e-12);

      kattn::KernelAttention<float, Map> f32(config(Map::name, m));
      f32.setCoreForm(kattn::CoreForm::LowRank);
      if (m > 0) f32.setProjection(layer.projection().template cast<float>());
      // float32 from saved features within the 1e-4 of float64, as recomputing is.
      const Heads<float> hf = toFloat(h);
      kattn::SavedFeatures<float> saved32;
      (void)attendInto(f32, hf, false, &saved32);
      const kattn::HeadGradients<float> got = backwardOf(f32, hf, std::nullopt, &saved32);
      EXPECT_LE(relError(got.q.data(), want.q.data(), want.q.size()), 1e-4);
      EXPECT_LE(relError(got.k.data(), want.k.data(), want.k.size()), 1e-4);
      EXPECT_LE(relError(got.v.data(), want.v.data(), want.v.size()), 1e-4);
    }
  });
}

TEST(SavedFeatures, BeginKernelScaleByLengthAndTrainingDraws) {
  kattn::LayerConfig c = config("exp", 16);
  c.begin_kernel = 40;
  c.scale_by_length = true;
  c.dropout = 0.3;
  c.redraw = true;
  kattn::KernelAttention<double, kattn::Exp> layer(c);
  layer.setCoreForm(kattn::CoreForm::LowRank);
  const Heads<double> h = makeHeads(70, 2, 300, 300);
  kattn::SavedFeatures<double> saved;
  const kattn::TrainingCall call{5};
  const Tensor<double, 4> heads = attendInto(layer, h, call, &saved);
  EXPECT_TRUE(sameBits(heads, attendInto(layer, h, call, nullptr)));
  ASSERT_TRUE(saved.holdsFeatures());
  EXPECT_LE(gradError(backwardOf(layer, h, call, &saved), backwardOf(layer, h, call, nullptr)),
            1e-12);
}

/// The largest relative error over the input and weight gradients of two layer backwards.
double layerGradError(const kattn::Gradients<double>& got, const kattn::Gradients<double>& want) {
  double err = std::max({relError(got.query.data(), want.query.data(), want.query.size()),
                         relError(got.value.data(), want.value.data(), want.value.size()),
                         relError(got.key.data(), want.key.data(), want.key.size())});
  const auto g = got.named(), w = want.named();
  EXPECT_EQ(g.size(), w.size());
  for (std::size_t i = 0; i < std::min(g.size(), w.size()); ++i) {
    err = std::max(err, relError(g[i].values.data(), w[i].values.data(), w[i].values.size()));
  }
  return err;
}

TEST(SavedFeatures, LayerBackwardFromSavedFeaturesEqualsRecomputing) {
  // The whole layer: forward into memory keeping the core's features, backward reading them;
  // with a separate key input, a mask, begin_kernel, and a training call with dropout and
  // redraw.
  constexpr Index B = 2, T = 300, S = 280, Dq = 6, Dv = 5, Dk = 7;
  std::mt19937_64 gen(130);
  const Tensor<double, 3> query = randomTensor<3>(gen, 1.0, {B, T, Dq});
  const Tensor<double, 3> value = randomTensor<3>(gen, 1.0, {B, S, Dv});
  const Tensor<double, 3> key = randomTensor<3>(gen, 1.0, {B, S, Dk});
  const Tensor<double, 3> grad = randomTensor<3>(gen, 1.0, {B, T, 5});
  const Heads<double> masks = makeHeads(131, B, 1, S);
  auto check = [&](auto layer, kattn::Training training, std::optional<kattn::TrainingCall> call) {
    layer.setCoreForm(kattn::CoreForm::LowRank);
    layer.initializeWeights(Dq, Dv, Dk);
    kattn::SavedFeatures<double> saved;
    Tensor<double, 3> out(B, T, 5), plain(B, T, 5);
    layer.forward(query, value, key, masks.mask, training, kattn::TensorMap<double, 3>(out),
                  &saved);
    layer.forward(query, value, key, masks.mask, training, kattn::TensorMap<double, 3>(plain));
    EXPECT_TRUE(sameBits(out, plain));
    EXPECT_TRUE(saved.holdsFeatures());
    const auto got = kattn::backward(layer, query, value, key, masks.mask, grad, call, &saved);
    const auto want = kattn::backward(layer, query, value, key, masks.mask, grad, call);
    EXPECT_LE(layerGradError(got, want), 1e-12);
    // And it reads them (TheBackwardReadsThem below says why not whole rows).
    auto& qf = kattn::detail::savedData(saved).qf;
    for (Index i = 0; i < qf.size(); i += 3) qf(i) *= 2.0;
    EXPECT_GT(layerGradError(
                  kattn::backward(layer, query, value, key, masks.mask, grad, call, &saved), want),
              1e-3);
  };
  {
    SCOPED_TRACE("relu");
    check(kattn::KernelAttention<double, kattn::Relu>(config("relu", 16)), false, std::nullopt);
  }
  {
    SCOPED_TRACE("exp, begin_kernel, dropout, redraw");
    kattn::LayerConfig c = config("exp", 16);
    c.begin_kernel = 40;
    c.dropout = 0.3;
    c.redraw = true;
    check(kattn::KernelAttention<double, kattn::Exp>(c), kattn::TrainingCall{2},
          kattn::TrainingCall{2});
  }
}

TEST(SavedFeatures, ThreadsSaveAndReadTheSameNumbers) {
  // Shapes whose forward and backward run on the pool (the ones above run serially): the
  // forward's tasks write their blocks of the features concurrently, and the gradients from
  // them are the same, bit for bit, on 1 and 2 threads.
  kattn::LayerConfig c = config("exp", 64);
  c.num_heads = 4;
  c.key_dim = 16;
  c.value_dim = 16;
  const Index B = 2, T = 600, S = 700, N = 4, d = 16, dv = 16;
  std::mt19937_64 gen(120);
  Heads<double> h;
  h.q = randomTensor<4>(gen, 0.3, {B, T, N, d});
  h.k = randomTensor<4>(gen, 0.3, {B, S, N, d});
  h.v = randomTensor<4>(gen, 1.0, {B, S, N, dv});
  h.g = randomTensor<4>(gen, 1.0, {B, T, N, dv});
  h.mask = Tensor<double, 2>(B, S);
  h.mask.setConstant(1.0);
  auto run = [&](int threads) {
    kattn::KernelAttention<double, kattn::Exp> layer(c);
    layer.setCoreForm(kattn::CoreForm::LowRank);
    layer.setThreads(threads);
    kattn::SavedFeatures<double> saved;
    Tensor<double, 4> heads(B, T, N, dv);
    layer.attend(h.q, h.k, h.v, h.mask, false, kattn::TensorMap<double, 4>(heads), &saved);
    EXPECT_TRUE(saved.holdsFeatures());
    const auto got = kattn::attendBackward(layer, h.q, h.k, h.v, h.mask, h.g, std::nullopt, &saved);
    const auto want = kattn::attendBackward(layer, h.q, h.k, h.v, h.mask, h.g);
    EXPECT_LE(gradError(got, want), 1e-12);
    return got;
  };
  const kattn::HeadGradients<double> one = run(1), two = run(2);
  EXPECT_TRUE(sameBits(one.q, two.q));
  EXPECT_TRUE(sameBits(one.k, two.k));
  EXPECT_TRUE(sameBits(one.v, two.v));
}

TEST(SavedFeatures, TheBackwardReadsThem) {
  // Changing the saved query features changes the gradients: the backward reads them rather
  // than recomputing (which the equality above alone would not show).
  for (const char* map : {"relu", "exp"}) {
    SCOPED_TRACE(map);
    const Heads<double> h = makeHeads(80, 1, 260, 270);
    auto run = [&](auto layer) {
      layer.setCoreForm(kattn::CoreForm::LowRank);
      kattn::SavedFeatures<double> saved;
      (void)attendInto(layer, h, false, &saved);
      // Not a scaling of whole rows: attention is invariant to those.
      auto& qf = kattn::detail::savedData(saved).qf;
      for (Index i = 0; i < qf.size(); i += 3) qf(i) *= 2.0;
      return gradError(backwardOf(layer, h, std::nullopt, &saved),
                       backwardOf(layer, h, std::nullopt, nullptr));
    };
    const double err = std::string(map) == "relu"
                           ? run(kattn::KernelAttention<double, kattn::Relu>(config(map, 16)))
                           : run(kattn::KernelAttention<double, kattn::Exp>(config(map, 16)));
    EXPECT_GT(err, 1e-3);
  }
}

TEST(SavedFeatures, HoldNoneWhereTheForwardHasNoLowRankForm) {
  const Heads<double> h = makeHeads(90, 2, 30, 40);
  auto check = [&](const auto& layer, const char* what) {
    SCOPED_TRACE(what);
    kattn::SavedFeatures<double> saved;
    (void)attendInto(layer, h, false, &saved);
    EXPECT_FALSE(saved.holdsFeatures());
    EXPECT_LE(gradError(backwardOf(layer, h, std::nullopt, &saved),
                        backwardOf(layer, h, std::nullopt, nullptr)),
              0.0);
  };
  kattn::KernelAttention<double, kattn::Exp> expl(config("exp", 16));
  expl.setCoreForm(kattn::CoreForm::Explicit);
  check(expl, "explicit form");
  kattn::LayerConfig short_seq = config("exp", 16);
  short_seq.is_short_seq = true;
  check(kattn::KernelAttention<double, kattn::Exp>(short_seq), "short path");
  kattn::KernelAttention<double, kattn::ExpPlus> plus(config("expplus", 16));
  plus.setCoreForm(kattn::CoreForm::LowRank);
  check(plus, "expplus with a projection");
  const Heads<double> causal_heads = makeHeads(91, 1, 12, 12);
  kattn::LayerConfig causal_config = config("relu", 0);
  causal_config.use_causal_windowed = true;
  causal_config.causal_chunk_length = 2;
  causal_config.causal_window_length = 2;
  kattn::CausalKernelAttention<double, kattn::Relu> causal(causal_config);
  kattn::SavedFeatures<double> saved;
  Tensor<double, 4> heads(1, 12, kN, kdv);
  causal.attend(causal_heads.q, causal_heads.k, causal_heads.v, std::nullopt, false,
                kattn::TensorMap<double, 4>(heads), &saved);
  EXPECT_FALSE(saved.holdsFeatures());
}

TEST(SavedFeatures, ErrorsNameTheArgument) {
  kattn::LayerConfig c = config("exp", 16);
  c.dropout = 0.2;
  kattn::KernelAttention<double, kattn::Exp> layer(c);
  layer.setCoreForm(kattn::CoreForm::LowRank);
  const Heads<double> h = makeHeads(100, 1, 20, 24);
  auto message = [&](const auto& fn) {
    try {
      fn();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  kattn::SavedFeatures<double> saved;
  (void)attendInto(layer, h, kattn::TrainingCall{3}, &saved);
  ASSERT_TRUE(saved.holdsFeatures());
  EXPECT_EQ(message([&] { backwardOf(layer, h, kattn::TrainingCall{4}, &saved); })
                .rfind("training_call: the saved features are of training call 3", 0),
            0u);
  EXPECT_EQ(message([&] { backwardOf(layer, h, std::nullopt, &saved); }).rfind("training_call:", 0),
            0u);
  EXPECT_NO_THROW(backwardOf(layer, h, kattn::TrainingCall{3}, &saved));

  const Heads<double> shorter = makeHeads(101, 1, 19, 24);
  EXPECT_EQ(message([&] { backwardOf(layer, shorter, kattn::TrainingCall{3}, &saved); })
                .rfind("saved: features of a call with [B, T, S, N, F] = [1, 20, 24, 2, 16]", 0),
            0u);

  // Features beyond the memory limit are refused before anything is computed: 2 (600 + 600)
  // 16 doubles are 300 KiB, the working buffers far less.
  const Heads<double> longer = makeHeads(102, 1, 600, 600);
  const std::size_t limit = kattn::memoryLimit();
  kattn::setMemoryLimit(200000);
  kattn::SavedFeatures<double> big;
  try {
    (void)attendInto(layer, longer, false, &big);
    ADD_FAILURE() << "no MemoryLimitError";
  } catch (const kattn::MemoryLimitError& e) {
    EXPECT_NE(std::string(e.what()).find("the saved features"), std::string::npos) << e.what();
  }
  kattn::setMemoryLimit(limit);
  EXPECT_FALSE(big.holdsFeatures());
}

}  // namespace
