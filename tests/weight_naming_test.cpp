// io/weight_naming.hpp and the naming overloads of io/weights.hpp: a layer's weights written
// as PyTorch nn.Linear tensors (by this test's own loops, not by addWeights) load to exactly
// the Keras weights and give the same forward; JSON name maps with a prefix; the messages of
// every error path.
#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>

#include <kattn/io/weights.hpp>
#include <kattn/kattn.hpp>

#include "test_support.hpp"

namespace {

using kattn::Index;
using kattn::Tensor;
using kattn::io::SafeTensors;
using kattn::io::SafeTensorsWriter;
using kattn::io::WeightLayout;
using kattn::io::WeightNaming;

// Every size distinct, so that a transpose or a swapped axis cannot go unnoticed.
constexpr Index kN = 2, kD = 3, kDv = 4, kDq = 5, kDk = 7, kDvIn = 6, kO = 8;

kattn::LayerConfig smallConfig() {
  kattn::LayerConfig c;
  c.num_heads = int(kN);
  c.key_dim = int(kD);
  c.value_dim = int(kDv);
  c.output_shape = int(kO);
  c.feature_transform = "elu";
  c.num_random_features = 0;
  c.begin_kernel = 1;  // so that the attention_output_softmax pair is read too
  return c;
}

template <int R, typename... Dims>
Tensor<double, R> randomTensor(std::mt19937_64& gen, Dims... dims) {
  Tensor<double, R> t(dims...);
  std::normal_distribution<double> normal;
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  return t;
}

kattn::Weights<double> randomWeights(std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  kattn::Weights<double> w;
  w.query_kernel = randomTensor<3>(gen, kDq, kN, kD);
  w.query_bias = randomTensor<2>(gen, kN, kD);
  w.key_kernel = randomTensor<3>(gen, kDk, kN, kD);
  w.key_bias = randomTensor<2>(gen, kN, kD);
  w.value_kernel = randomTensor<3>(gen, kDvIn, kN, kDv);
  w.value_bias = randomTensor<2>(gen, kN, kDv);
  w.output_kernel = randomTensor<3>(gen, kN, kDv, kO);
  w.output_bias = randomTensor<1>(gen, kO);
  w.output_softmax_kernel = randomTensor<3>(gen, kN, kDv, kO);
  w.output_softmax_bias = randomTensor<1>(gen, kO);
  return w;
}

// nn.Linear(in, N*h).weight [N*h, in] of a Keras kernel [in, N, h]: row n*h + j is head n's
// feature j (q.view(B, T, N, h) splits it so).
Tensor<double, 2> torchInputWeight(const Tensor<double, 3>& k) {
  const Index in = k.dimension(0), N = k.dimension(1), h = k.dimension(2);
  Tensor<double, 2> w(N * h, in);
  for (Index i = 0; i < in; ++i)
    for (Index n = 0; n < N; ++n)
      for (Index j = 0; j < h; ++j) w(n * h + j, i) = k(i, n, j);
  return w;
}

// nn.Linear(N*dv, O).weight [O, N*dv] of a Keras kernel [N, dv, O].
Tensor<double, 2> torchOutputWeight(const Tensor<double, 3>& k) {
  const Index N = k.dimension(0), dv = k.dimension(1), O = k.dimension(2);
  Tensor<double, 2> w(O, N * dv);
  for (Index n = 0; n < N; ++n)
    for (Index j = 0; j < dv; ++j)
      for (Index o = 0; o < O; ++o) w(o, n * dv + j) = k(n, j, o);
  return w;
}

Tensor<double, 1> flat(const Tensor<double, 2>& b) {
  Tensor<double, 1> out(b.size());
  for (Index n = 0; n < b.dimension(0); ++n)
    for (Index j = 0; j < b.dimension(1); ++j) out(n * b.dimension(1) + j) = b(n, j);
  return out;
}

/// `w` as a PyTorch block's state_dict would hold it, module names `q`, `k`, `v`, `out`,
/// `out_softmax` after `prefix` (`q.weight`, `q.bias`, ...).
void addTorchTensors(SafeTensorsWriter& out, const kattn::Weights<double>& w,
                     const std::string& prefix, const std::string& q, const std::string& k,
                     const std::string& v, const std::string& o, const std::string& o_softmax) {
  out.add(prefix + q + ".weight", torchInputWeight(w.query_kernel));
  out.add(prefix + q + ".bias", flat(w.query_bias));
  out.add(prefix + k + ".weight", torchInputWeight(w.key_kernel));
  out.add(prefix + k + ".bias", flat(w.key_bias));
  out.add(prefix + v + ".weight", torchInputWeight(w.value_kernel));
  out.add(prefix + v + ".bias", flat(w.value_bias));
  out.add(prefix + o + ".weight", torchOutputWeight(w.output_kernel));
  out.add(prefix + o + ".bias", w.output_bias);
  out.add(prefix + o_softmax + ".weight", torchOutputWeight(w.output_softmax_kernel));
  out.add(prefix + o_softmax + ".bias", w.output_softmax_bias);
}

SafeTensors torchFile(const kattn::Weights<double>& w) {
  SafeTensorsWriter out;
  addTorchTensors(out, w, "", "to_q", "to_k", "to_v", "to_out", "to_out_softmax");
  return SafeTensors::parse(out.bytes(), "torch.safetensors");
}

template <typename T>
bool sameTensor(const T& a, const T& b) {
  if (a.dimensions() != b.dimensions()) return false;
  for (Index i = 0; i < a.size(); ++i) {
    if (a.data()[i] != b.data()[i]) return false;
  }
  return true;
}

void expectSameWeights(const kattn::Weights<double>& a, const kattn::Weights<double>& b) {
  EXPECT_TRUE(sameTensor(a.query_kernel, b.query_kernel));
  EXPECT_TRUE(sameTensor(a.query_bias, b.query_bias));
  EXPECT_TRUE(sameTensor(a.key_kernel, b.key_kernel));
  EXPECT_TRUE(sameTensor(a.key_bias, b.key_bias));
  EXPECT_TRUE(sameTensor(a.value_kernel, b.value_kernel));
  EXPECT_TRUE(sameTensor(a.value_bias, b.value_bias));
  EXPECT_TRUE(sameTensor(a.output_kernel, b.output_kernel));
  EXPECT_TRUE(sameTensor(a.output_bias, b.output_bias));
  EXPECT_TRUE(sameTensor(a.output_softmax_kernel, b.output_softmax_kernel));
  EXPECT_TRUE(sameTensor(a.output_softmax_bias, b.output_softmax_bias));
}

template <typename F>
void expectError(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(WeightNaming, BuiltInMaps) {
  const WeightNaming keras = WeightNaming::keras();
  const WeightNaming torch = WeightNaming::torch();
  for (const char* variable : kattn::io::kWeightVariables) {
    EXPECT_EQ(keras.fileName(variable), variable);
    EXPECT_EQ(keras.entry(variable).layout, WeightLayout::Keras);
    EXPECT_EQ(torch.entry(variable).layout, WeightLayout::TorchLinear);
  }
  EXPECT_EQ(torch.fileName("query/kernel"), "to_q.weight");
  EXPECT_EQ(torch.fileName("value/bias"), "to_v.bias");
  EXPECT_EQ(torch.fileName("attention_output/kernel"), "to_out.weight");
  EXPECT_EQ(torch.fileName("attention_output_softmax/bias"), "to_out_softmax.bias");
  expectError([&] { (void)torch.entry("query/kernel:0"); },
              {"\"query/kernel:0\" is not a Keras variable", "attention_output/bias"});
}

TEST(WeightNaming, TorchFileLoadsToTheKerasWeightsExactly) {
  const kattn::LayerConfig config = smallConfig();
  const kattn::Weights<double> w = randomWeights(11);
  SafeTensorsWriter keras_writer;
  kattn::io::addWeights(keras_writer, w);
  const auto keras_file = SafeTensors::parse(keras_writer.bytes(), "keras.safetensors");
  const auto torch_file = torchFile(w);

  const auto from_keras = kattn::io::loadWeights<double>(keras_file, config);
  const auto from_torch = kattn::io::loadWeights<double>(torch_file, config, WeightNaming::torch());
  expectSameWeights(from_keras, w);
  expectSameWeights(from_torch, w);

  // The same layer either way: the forward outputs agree bit for bit.
  std::mt19937_64 gen(3);
  const Tensor<double, 3> query = randomTensor<3>(gen, Index(2), Index(5), kDq);
  const Tensor<double, 3> value = randomTensor<3>(gen, Index(2), Index(4), kDvIn);
  const Tensor<double, 3> key = randomTensor<3>(gen, Index(2), Index(4), kDk);
  kattn::AnyKernelAttention<double> a(config), b(config);
  a.setWeights(from_keras);
  b.setWeights(from_torch);
  const Tensor<double, 3> out_a = a.forward(query, value, kattn::ConstTensorMap<double, 3>(key));
  const Tensor<double, 3> out_b = b.forward(query, value, kattn::ConstTensorMap<double, 3>(key));
  EXPECT_EQ(out_a.dimension(2), kO);
  EXPECT_TRUE(sameTensor(out_a, out_b));

  // float reads the same file (F64 rounded to float) as it reads the Keras one.
  const auto f_keras = kattn::io::loadWeights<float>(keras_file, config);
  const auto f_torch = kattn::io::loadWeights<float>(torch_file, config, WeightNaming::torch());
  EXPECT_TRUE(sameTensor(f_keras.output_kernel, f_torch.output_kernel));
  EXPECT_TRUE(sameTensor(f_keras.value_kernel, f_torch.value_kernel));
}

TEST(WeightNaming, AddWeightsWritesTheTorchLayout) {
  const kattn::Weights<double> w = randomWeights(12);
  SafeTensorsWriter by_library;
  kattn::io::addWeights(by_library, w, WeightNaming::torch());
  SafeTensorsWriter by_hand;
  addTorchTensors(by_hand, w, "", "to_q", "to_k", "to_v", "to_out", "to_out_softmax");
  EXPECT_EQ(by_library.bytes(), by_hand.bytes());
}

TEST(WeightNaming, WithoutBiasesOrSoftmaxPartOnlyTheKernelsAreRead) {
  kattn::LayerConfig config = smallConfig();
  config.use_bias = false;
  config.begin_kernel = 0;
  kattn::Weights<double> w = randomWeights(13);
  SafeTensorsWriter out;
  out.add("to_q.weight", torchInputWeight(w.query_kernel));
  out.add("to_k.weight", torchInputWeight(w.key_kernel));
  out.add("to_v.weight", torchInputWeight(w.value_kernel));
  out.add("to_out.weight", torchOutputWeight(w.output_kernel));
  const auto file = SafeTensors::parse(out.bytes(), "torch.safetensors");
  const auto got = kattn::io::loadWeights<double>(file, config, WeightNaming::torch());
  EXPECT_TRUE(sameTensor(got.query_kernel, w.query_kernel));
  EXPECT_TRUE(sameTensor(got.output_kernel, w.output_kernel));
  EXPECT_EQ(got.query_bias.size(), 0);
  EXPECT_EQ(got.output_softmax_kernel.size(), 0);
}

constexpr const char* kHuggingFaceMap = R"({
  "prefix": "encoder.layers.1.self_attn.",
  "query/kernel": {"name": "q_proj.weight", "layout": "torch_linear"},
  "query/bias": {"name": "q_proj.bias", "layout": "torch_linear"},
  "key/kernel": {"name": "k_proj.weight", "layout": "torch_linear"},
  "key/bias": {"name": "k_proj.bias", "layout": "torch_linear"},
  "value/kernel": {"name": "v_proj.weight", "layout": "torch_linear"},
  "value/bias": {"name": "v_proj.bias", "layout": "torch_linear"},
  "attention_output/kernel": {"name": "out_proj.weight", "layout": "torch_linear"},
  "attention_output/bias": {"name": "out_proj.bias", "layout": "torch_linear"},
  "attention_output_softmax/kernel": {"name": "softmax_out/kernel"},
  "attention_output_softmax/bias": {"name": "softmax_out/bias", "layout": "keras"}
})";

TEST(WeightNaming, JsonMapWithAPrefixPicksOneLayerOfACheckpoint) {
  const WeightNaming naming = WeightNaming::fromJsonText(kHuggingFaceMap);
  EXPECT_EQ(naming.prefix(), "encoder.layers.1.self_attn.");
  EXPECT_EQ(naming.fileName("key/bias"), "encoder.layers.1.self_attn.k_proj.bias");
  EXPECT_EQ(naming.entry("attention_output_softmax/kernel").layout, WeightLayout::Keras);

  const kattn::LayerConfig config = smallConfig();
  const kattn::Weights<double> layer0 = randomWeights(20), layer1 = randomWeights(21);
  SafeTensorsWriter out;
  for (const auto& [prefix, w] : {std::pair{std::string("encoder.layers.0.self_attn."), &layer0},
                                  std::pair{std::string("encoder.layers.1.self_attn."), &layer1}}) {
    out.add(prefix + "q_proj.weight", torchInputWeight(w->query_kernel));
    out.add(prefix + "q_proj.bias", flat(w->query_bias));
    out.add(prefix + "k_proj.weight", torchInputWeight(w->key_kernel));
    out.add(prefix + "k_proj.bias", flat(w->key_bias));
    out.add(prefix + "v_proj.weight", torchInputWeight(w->value_kernel));
    out.add(prefix + "v_proj.bias", flat(w->value_bias));
    out.add(prefix + "out_proj.weight", torchOutputWeight(w->output_kernel));
    out.add(prefix + "out_proj.bias", w->output_bias);
    out.add(prefix + "softmax_out/kernel", w->output_softmax_kernel);
    out.add(prefix + "softmax_out/bias", w->output_softmax_bias);
  }
  const auto file = SafeTensors::parse(out.bytes(), "model.safetensors");
  expectSameWeights(kattn::io::loadWeights<double>(file, config, naming), layer1);

  // addWeights under the same map writes what the loader reads.
  SafeTensorsWriter again;
  kattn::io::addWeights(again, layer1, naming);
  const auto round_trip = SafeTensors::parse(again.bytes());
  expectSameWeights(kattn::io::loadWeights<double>(round_trip, config, naming), layer1);
  EXPECT_TRUE(round_trip.contains("encoder.layers.1.self_attn.out_proj.weight"));
}

TEST(WeightNaming, JsonMapKeepsTheKerasEntriesItDoesNotList) {
  const WeightNaming naming = WeightNaming::fromJsonText(
      R"({"query/kernel": {"name": "wq", "layout": "torch_linear"}})");
  EXPECT_EQ(naming.prefix(), "");
  EXPECT_EQ(naming.fileName("query/kernel"), "wq");
  EXPECT_EQ(naming.entry("query/kernel").layout, WeightLayout::TorchLinear);
  EXPECT_EQ(naming.fileName("key/kernel"), "key/kernel");
  EXPECT_EQ(naming.entry("key/kernel").layout, WeightLayout::Keras);
}

TEST(WeightNamingErrors, MissingTensorNamesTheFileNameAndTheKerasVariable) {
  const kattn::Weights<double> w = randomWeights(30);
  SafeTensorsWriter out;
  addTorchTensors(out, w, "", "to_q", "to_k", "to_v", "to_out", "to_out_softmax_");
  const auto file = SafeTensors::parse(out.bytes(), "torch.safetensors");
  expectError(
      [&] { (void)kattn::io::loadWeights<double>(file, smallConfig(), WeightNaming::torch()); },
      {"missing tensor 'to_out_softmax.weight' in 'torch.safetensors'",
       "(Keras attention_output_softmax/kernel, torch_linear layout)"});

  // Under the Keras names the message is the reader's own, without a note.
  expectError([&] { (void)kattn::io::loadWeights<double>(file, smallConfig()); },
              {"missing tensor 'query/kernel' in 'torch.safetensors'"});
  try {
    (void)kattn::io::loadWeights<double>(file, smallConfig());
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).find("Keras"), std::string::npos) << e.what();
  }
}

TEST(WeightNamingErrors, WrongShapeGivesTheTorchShapeExpected) {
  kattn::Weights<double> w = randomWeights(31);
  const auto load = [&](const kattn::Weights<double>& weights) {
    const auto file = torchFile(weights);
    (void)kattn::io::loadWeights<double>(file, smallConfig(), WeightNaming::torch());
  };
  // A Keras kernel written as it is, untransposed, is the likely mistake.
  {
    SafeTensorsWriter swapped;
    swapped.add("to_q.weight", w.query_kernel);
    const auto file = SafeTensors::parse(swapped.bytes(), "torch.safetensors");
    expectError(
        [&] { (void)kattn::io::loadWeights<double>(file, smallConfig(), WeightNaming::torch()); },
        {"'torch.safetensors': tensor 'to_q.weight' (Keras query/kernel, torch_linear layout)",
         "expected shape [6, *] (the nn.Linear layout of Keras [*, 2, 3]), got [5, 2, 3]"});
  }
  kattn::Weights<double> bad = w;
  bad.output_kernel = Tensor<double, 3>(kN, kDv + 1, kO).setZero();  // [O, 10] for [O, 8]
  expectError([&] { load(bad); },
              {"tensor 'to_out.weight'", "expected shape [*, 8] (the nn.Linear layout of Keras "
                                         "[2, 4, *]), got [8, 10]"});
  bad = w;
  bad.value_bias = Tensor<double, 2>(kN, kDv - 1).setZero();
  expectError([&] { load(bad); },
              {"tensor 'to_v.bias' (Keras value/bias, torch_linear layout)",
               "expected shape [8] (the nn.Linear layout of Keras [2, 4]), got [6]"});
  bad = w;
  bad.output_bias = Tensor<double, 1>(kO + 1).setZero();
  expectError([&] { load(bad); }, {"tensor 'to_out.bias'", "expected shape [8]", "got [9]"});
}

TEST(WeightNamingErrors, KerasLayoutUnderAnotherNameNotesTheVariable) {
  const auto naming = WeightNaming::keras().set("key/kernel", "wk", WeightLayout::Keras);
  SafeTensorsWriter out;
  kattn::Weights<double> w = randomWeights(32);
  kattn::io::addWeights(out, w);
  out.add("wk", Tensor<double, 3>(kDk, kN, kD + 1).setZero());
  const auto file = SafeTensors::parse(out.bytes(), "w.safetensors");
  expectError([&] { (void)kattn::io::loadWeights<double>(file, smallConfig(), naming); },
              {"tensor 'wk' (Keras key/kernel, keras layout): expected shape [*, 2, 3], got "
               "[7, 2, 4]"});
}

TEST(WeightNamingErrors, BadJsonMaps) {
  expectError([] { (void)WeightNaming::fromJsonText(R"({"query/kernel": {"name": "wq",)"); },
              {"weight naming: not valid JSON"});
  expectError([] { (void)WeightNaming::fromJsonText("[]"); },
              {"weight naming: expected a JSON object, got array"});
  expectError(
      [] {
        (void)WeightNaming::fromJsonText(
            R"({"query/kernel": {"name": "wq", "layout": "torch"}})");
      },
      {"weight naming: query/kernel.layout: expected \"keras\" or \"torch_linear\", got "
       "\"torch\""});
  expectError([] { (void)WeightNaming::fromJsonText(R"({"query/kernal": {"name": "wq"}})"); },
              {"unknown key \"query/kernal\"", "valid keys: prefix, query/kernel"});
  expectError([] { (void)WeightNaming::fromJsonText(R"({"query/kernel": "wq"})"); },
              {"query/kernel: expected {\"name\": ..., \"layout\": ...}, got string \"wq\""});
  expectError(
      [] { (void)WeightNaming::fromJsonText(R"({"query/kernel": {"layout": "keras"}})"); },
      {"query/kernel: missing \"name\""});
  expectError(
      [] { (void)WeightNaming::fromJsonText(R"({"query/kernel": {"name": "a", "shape": 1}})"); },
      {"query/kernel: unknown key \"shape\" (valid: name, layout)"});
  expectError([] { (void)WeightNaming::fromJsonText(R"({"prefix": 1})"); },
              {"prefix: expected a string, got integer 1"});
  expectError([] { (void)WeightNaming::fromJsonText(R"({"prefix": "a.", "prefix": "b."})"); },
              {"weight naming: duplicate key \"prefix\""});
}

}  // namespace
