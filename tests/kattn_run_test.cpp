// tools/kattn-run, run as a separate process: the golden cases converted to its file contract
// (call mode, recurrent streaming through cache tensors, exact streaming through state
// files), ragged calls of many sequences over a pool file (golden rows per sequence), the
// seed's projection, --backward (against kattn::backward in process and central differences of
// kattn-run's own forward), and one test per class of malformed input or command line.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <kattn/io/config_json.hpp>
#include <kattn/io/weights.hpp>

#include "golden_cases.hpp"
#include "test_support.hpp"

#ifdef KATTN_RUN_PATH

namespace {

namespace fs = std::filesystem;
using kattn::Index;
using kattn::Tensor;
using kattn::io::SafeTensors;
using kattn::io::SafeTensorsWriter;
using kattn_test::GoldenCase;
using Bytes = std::vector<std::uint8_t>;
using kattn_test::readAll;
using kattn_test::TempDir;
using kattn_test::writeAll;

std::string shellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct RunResult {
  int code = -1;  // exit code, or 128 + signal
  std::string out, err;
};

/// Runs kattn-run with `args`, capturing stdout and stderr through files in `dir`.
RunResult runCli(const std::vector<std::string>& args, const TempDir& dir) {
  std::string cmd = shellQuote(KATTN_RUN_PATH);
  for (const auto& a : args) cmd += " " + shellQuote(a);
  cmd += " >" + shellQuote(dir.file("stdout.txt")) + " 2>" + shellQuote(dir.file("stderr.txt"));
  const int status = std::system(cmd.c_str());
  RunResult r;
  if (status != -1 && WIFEXITED(status)) r.code = WEXITSTATUS(status);
  if (status != -1 && WIFSIGNALED(status)) r.code = 128 + WTERMSIG(status);
  r.out = readAll(dir.file("stdout.txt"));
  r.err = readAll(dir.file("stderr.txt"));
  return r;
}

/// Expects a failure with `code` and exactly one stderr line "kattn-run: ..." containing
/// every string of `parts`.
void expectError(const RunResult& r, int code, std::initializer_list<std::string> parts) {
  EXPECT_EQ(r.code, code) << r.err;
  EXPECT_EQ(r.err.rfind("kattn-run: ", 0), 0u) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.back(), '\n') << r.err;
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "more than one line: " << r.err;
  for (const auto& part : parts) EXPECT_NE(r.err.find(part), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

void expectSuccess(const RunResult& r) {
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
}

/// Adds tensor `name` of `file` (any rank up to 4) to `out` as float64.
void copyTensor(const SafeTensors& file, const std::string& name, SafeTensorsWriter& out,
                const std::string& as = "") {
  const std::string to = as.empty() ? name : as;
  switch (file.info(name).shape.size()) {
    case 1: out.add(to, file.tensor<double, 1>(name)); break;
    case 2: out.add(to, file.tensor<double, 2>(name)); break;
    case 3: out.add(to, file.tensor<double, 3>(name)); break;
    case 4: out.add(to, file.tensor<double, 4>(name)); break;
    default: FAIL() << name << " has an unexpected rank";
  }
}

const char* const kWeightNames[] = {
    "query/kernel", "query/bias", "key/kernel", "key/bias", "value/kernel", "value/bias",
    "attention_output/kernel", "attention_output/bias", "attention_output_softmax/kernel",
    "attention_output_softmax/bias", "projection_matrix"};

/// layer.json and weights.safetensors of a golden case, in kattn-run's contract.
void writeLayerFiles(const GoldenCase& gc, const TempDir& dir) {
  writeAll(dir.file("layer.json"), gc.meta.at("config").dump(2));
  SafeTensorsWriter w;
  for (const char* name : kWeightNames) {
    if (gc.has(name)) copyTensor(gc.data, name, w);
  }
  w.write(dir.file("weights.safetensors"));
}

/// Rows [t0, t0 + L) along axis 1.
Tensor<double, 3> rows(const Tensor<double, 3>& t, Index t0, Index L) {
  return t.slice(Eigen::array<Index, 3>{0, t0, 0},
                 Eigen::array<Index, 3>{t.dimension(0), L, t.dimension(2)});
}
Tensor<double, 2> rows(const Tensor<double, 2>& t, Index t0, Index L) {
  return t.slice(Eigen::array<Index, 2>{0, t0}, Eigen::array<Index, 2>{t.dimension(0), L});
}

std::vector<std::string> baseArgs(const TempDir& dir, const std::string& dtype) {
  return {"--config", dir.file("layer.json"), "--weights", dir.file("weights.safetensors"),
          "--inputs", dir.file("in.safetensors"), "--output", dir.file("out.safetensors"),
          "--dtype", dtype};
}

double toleranceFor(const std::string& dtype) {
  return dtype == "float64" ? kattn_test::tolerance<double>() : kattn_test::tolerance<float>();
}

/// Streams a golden case's sequence through kattn-run in calls of `lengths` tokens.
/// Recurrent cases carry the reference's cache tensors (or, with `use_state_files`, kattn's
/// state files) from call to call; exact cases carry state files. nullopt when a call fails
/// (the failure is reported).
struct StreamRun {
  Tensor<double, 3> output;
  std::optional<Tensor<double, 4>> kv;
  std::optional<Tensor<double, 3>> k_sum;
};

std::optional<StreamRun> streamCase(const GoldenCase& gc, const std::vector<Index>& lengths,
                     const std::string& dtype, bool use_state_files, const TempDir& dir) {
  writeLayerFiles(gc, dir);
  const auto query = gc.tensor<double, 3>("query");
  const auto value = gc.tensor<double, 3>("value");
  std::optional<Tensor<double, 2>> mask;
  if (gc.has("attention_mask")) mask = gc.tensor<double, 2>("attention_mask");
  StreamRun result;
  std::vector<Tensor<double, 3>> pieces;
  Index t0 = 0;
  for (std::size_t call = 0; call < lengths.size(); ++call) {
    const Index L = lengths[call];
    SafeTensorsWriter in;
    in.add("query", rows(query, t0, L));
    in.add("value", rows(value, t0, L));
    if (mask) in.add("attention_mask", rows(*mask, t0, L));
    std::vector<std::string> args = baseArgs(dir, dtype);
    args.push_back("--stream");
    if (call == 0) {
      if (gc.has("cache/kv")) {
        copyTensor(gc.data, "cache/kv", in);
        copyTensor(gc.data, "cache/k_sum", in);
      }
    } else if (use_state_files) {
      args.insert(args.end(), {"--state-in", dir.file("state" + std::to_string(call - 1))});
    } else {
      const auto prev = SafeTensors::load(dir.file("out.safetensors"));
      copyTensor(prev, "cache/kv", in);
      copyTensor(prev, "cache/k_sum", in);
    }
    if (use_state_files) {
      args.insert(args.end(), {"--state-out", dir.file("state" + std::to_string(call))});
    }
    in.write(dir.file("in.safetensors"));
    const RunResult r = runCli(args, dir);
    EXPECT_EQ(r.code, 0) << "call " << call << ": " << r.err;
    if (r.code != 0) return std::nullopt;
    const auto out = SafeTensors::load(dir.file("out.safetensors"));
    EXPECT_EQ(out.info("output").dtype_name, dtype == "float64" ? "F64" : "F32");
    pieces.push_back(out.tensor<double, 3>("output"));
    result.kv = out.tensor<double, 4>("cache/kv");
    result.k_sum = out.tensor<double, 3>("cache/k_sum");
    t0 += L;
  }
  EXPECT_EQ(t0, query.dimension(1));
  result.output = Tensor<double, 3>(query.dimension(0), t0, pieces.front().dimension(2));
  t0 = 0;
  for (const auto& p : pieces) {
    result.output.slice(Eigen::array<Index, 3>{0, t0, 0}, p.dimensions()) = p;
    t0 += p.dimension(1);
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// Golden cases

class GoldenCli : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(GoldenCli, Matches) {
  const auto& [name, dtype] = GetParam();
  const GoldenCase gc(name);
  TempDir dir("kattn_run_test");
  if (gc.streaming()) {
    // The case's own calls, carrying the reference's cache tensors between processes.
    std::vector<Index> lengths;
    for (const auto& l : gc.meta.at("stream_chunk_lengths")) lengths.push_back(l.get<Index>());
    const auto got = streamCase(gc, lengths, dtype, /*use_state_files=*/false, dir);
    ASSERT_TRUE(got);
    const double tol = toleranceFor(dtype);
    EXPECT_LE(kattn_test::relativeError(got->output, gc.tensor<double, 3>("expected/output")), tol);
    ASSERT_TRUE(got->kv && got->k_sum);
    EXPECT_LE(kattn_test::relativeError(*got->kv, gc.tensor<double, 4>("expected/cache/kv")), tol);
    EXPECT_LE(kattn_test::relativeError(*got->k_sum, gc.tensor<double, 3>("expected/cache/k_sum")),
              tol);
    return;
  }
  writeLayerFiles(gc, dir);
  SafeTensorsWriter in;
  for (const char* input : {"query", "value", "key", "attention_mask"}) {
    if (gc.has(input)) copyTensor(gc.data, input, in);
  }
  in.write(dir.file("in.safetensors"));
  const RunResult r = runCli(baseArgs(dir, dtype), dir);
  expectSuccess(r);
  if (r.code != 0) return;
  const auto out = SafeTensors::load(dir.file("out.safetensors"));
  EXPECT_EQ(out.names(), std::vector<std::string>{"output"});
  EXPECT_EQ(out.info("output").dtype_name, dtype == "float64" ? "F64" : "F32");
  const auto want = gc.tensor<double, 3>("expected/output");
  const auto got = out.tensor<double, 3>("output");
  ASSERT_EQ(got.dimensions(), want.dimensions());
  EXPECT_LE(kattn_test::relativeError(got, want), toleranceFor(dtype));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GoldenCli,
    ::testing::Combine(::testing::ValuesIn(kattn_test::caseNames([](const auto&) { return true; })),
                       ::testing::Values("float64", "float32")),
    [](const auto& info) {
      std::string n = std::get<0>(info.param) + "_" + std::get<1>(info.param);
      for (char& c : n) {
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      }
      return n;
    });

TEST(GoldenCliStream, RecurrentThroughStateFiles) {
  // The same recurrent stream, carried by kattn's own state files instead of cache tensors.
  for (const char* name : {"stream_elu_M32_calls4-4-4-4_d0.9_tailmask_s0.2",
                           "stream_relu_noproj_calls3-1-5-2_d0.5_onesmask"}) {
    SCOPED_TRACE(name);
    const GoldenCase gc(name);
    std::vector<Index> lengths;
    for (const auto& l : gc.meta.at("stream_chunk_lengths")) lengths.push_back(l.get<Index>());
    TempDir dir("kattn_run_test");
    const auto got = streamCase(gc, lengths, "float64", /*use_state_files=*/true, dir);
    ASSERT_TRUE(got);
    EXPECT_LE(kattn_test::relativeError(got->output, gc.tensor<double, 3>("expected/output")),
              1e-10);
    ASSERT_TRUE(got->kv);
    EXPECT_LE(kattn_test::relativeError(*got->kv, gc.tensor<double, 4>("expected/cache/kv")), 1e-10);
  }
}

TEST(GoldenCliStream, ExactModeSplitEqualsWholeCausalPass) {
  // Causal cases without decay stream in exact mode: any split into whole chunks (the last
  // call may end inside a chunk with right padding) reproduces the whole-sequence pass.
  struct Split {
    const char* name;
    std::vector<Index> lengths;
  };
  for (const Split& s : {Split{"causal_elu_noproj_c1_w100_nodecay_nopad_tailmask", {5, 1, 7, 4}},
                         Split{"causal_elu_M10_c3_w2_nodecay_right_onesmask_s0.7", {6, 3, 6, 2}},
                         Split{"causal_identity_M12_c8_w2_nodecay_right_s0.35", {16, 8, 17}}}) {
    SCOPED_TRACE(s.name);
    const GoldenCase gc(s.name);
    ASSERT_FALSE(gc.config.causal_window_decay);
    for (const std::string dtype : {"float64", "float32"}) {
      TempDir dir("kattn_run_test");
      const auto got = streamCase(gc, s.lengths, dtype, /*use_state_files=*/true, dir);
      if (!got) continue;  // the failing call is reported
      EXPECT_LE(kattn_test::relativeError(got->output, gc.tensor<double, 3>("expected/output")),
                toleranceFor(dtype))
          << dtype;
    }
  }
}

TEST(GoldenCliStream, AbsentCacheIsAFreshState) {
  // stream_elu_noproj starts from a zero cache: a first call without cache tensors must
  // give the case's first output token.
  const GoldenCase gc("stream_elu_noproj_calls8x1_d0.9");
  const auto kv0 = gc.tensor<double, 4>("cache/kv");
  const Tensor<double, 4> zeros = Tensor<double, 4>(kv0.dimensions()).setZero();
  ASSERT_EQ(kattn_test::relativeError(kv0, zeros), 0.0);
  ASSERT_FALSE(gc.has("attention_mask"));
  TempDir dir("kattn_run_test");
  writeLayerFiles(gc, dir);
  SafeTensorsWriter in;
  in.add("query", rows(gc.tensor<double, 3>("query"), 0, 1));
  in.add("value", rows(gc.tensor<double, 3>("value"), 0, 1));
  in.write(dir.file("in.safetensors"));
  auto args = baseArgs(dir, "float64");
  args.push_back("--stream");
  const RunResult r = runCli(args, dir);
  expectSuccess(r);
  if (r.code != 0) return;
  const auto got = SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output");
  EXPECT_LE(kattn_test::relativeError(got, rows(gc.tensor<double, 3>("expected/output"), 0, 1)),
            1e-10);
}

// ---------------------------------------------------------------------------------------
// The seed's projection

/// A small layer (N = 2, d = 4, D = 5) with random weights, written to `dir`.
struct SmallLayer {
  kattn::LayerConfig config;
  kattn::Weights<double> weights;
  Tensor<double, 3> query, value;

  explicit SmallLayer(int num_random_features = 0, std::int64_t seed = 0) {
    config.num_heads = 2;
    config.key_dim = 4;
    config.feature_transform = "elu";
    config.num_random_features = num_random_features;
    config.seed = seed;
    std::mt19937 gen(42);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    auto fill = [&](auto& t) {
      for (Index i = 0; i < t.size(); ++i) t.data()[i] = u(gen);
    };
    weights.query_kernel.resize(5, 2, 4);
    weights.key_kernel.resize(5, 2, 4);
    weights.value_kernel.resize(5, 2, 4);
    weights.output_kernel.resize(2, 4, 5);
    weights.query_bias.resize(2, 4);
    weights.key_bias.resize(2, 4);
    weights.value_bias.resize(2, 4);
    weights.output_bias.resize(5);
    fill(weights.query_kernel), fill(weights.key_kernel), fill(weights.value_kernel);
    fill(weights.output_kernel), fill(weights.query_bias), fill(weights.key_bias);
    fill(weights.value_bias), fill(weights.output_bias);
    query.resize(2, 3, 5);
    value.resize(2, 3, 5);
    fill(query), fill(value);
  }

  void writeConfig(const TempDir& dir) const {
    writeAll(dir.file("layer.json"), kattn::io::configToJson(config).dump());
  }
  void writeWeights(const TempDir& dir) const {
    SafeTensorsWriter w;
    kattn::io::addWeights(w, weights);
    w.write(dir.file("weights.safetensors"));
  }
  void writeInputs(const TempDir& dir) const {
    SafeTensorsWriter in;
    in.add("query", query);
    in.add("value", value);
    in.write(dir.file("in.safetensors"));
  }
  void writeAllFiles(const TempDir& dir) const {
    writeConfig(dir);
    writeWeights(dir);
    writeInputs(dir);
  }
};

TEST(KattnRun, WithoutProjectionMatrixUsesTheSeedsProjection) {
  for (const std::int64_t seed : {std::int64_t(0), std::int64_t(1234), std::int64_t(-7)}) {
    SCOPED_TRACE(seed);
    const SmallLayer small(/*num_random_features=*/6, seed);
    TempDir dir("kattn_run_test");
    small.writeAllFiles(dir);
    const RunResult r = runCli(baseArgs(dir, "float64"), dir);
    expectSuccess(r);
    if (r.code != 0) return;
    const auto got = SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output");

    kattn::AnyKernelAttention<double> layer(small.config);  // projection from the seed
    layer.setWeights(small.weights);
    const Tensor<double, 3> want = layer.forward(small.query, small.value);
    EXPECT_LE(kattn_test::relativeError(got, want), 1e-13);

    // And the seed matters: another seed's projection gives other outputs.
    kattn::LayerConfig other = small.config;
    other.seed = seed + 1;
    kattn::AnyKernelAttention<double> other_layer(other);
    other_layer.setWeights(small.weights);
    EXPECT_GT(kattn_test::relativeError(got, other_layer.forward(small.query, small.value)), 1e-3);
  }
}

TEST(KattnRun, ProjectionMatrixInTheWeightsFileWins) {
  SmallLayer small(/*num_random_features=*/6, /*seed=*/5);
  TempDir dir("kattn_run_test");
  small.writeConfig(dir);
  small.writeInputs(dir);
  kattn::Matrix<double> P = kattn::Matrix<double>::Random(6, 4);
  SafeTensorsWriter w;
  kattn::io::addWeights(w, small.weights);
  w.add("projection_matrix", kattn::ConstTensorMap<double, 2>(P.data(), 6, 4));
  w.write(dir.file("weights.safetensors"));
  const RunResult r = runCli(baseArgs(dir, "float64"), dir);
  expectSuccess(r);
  if (r.code != 0) return;
  const auto got = SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output");
  kattn::AnyKernelAttention<double> layer(small.config);
  layer.setWeights(small.weights);
  layer.setProjection(P);
  EXPECT_LE(kattn_test::relativeError(got, layer.forward(small.query, small.value)), 1e-13);
}

TEST(KattnRun, Bfloat16AndFloat16InputsAreWidened) {
  // Inputs whose values BF16 and F16 hold exactly give the same output as F32 inputs.
  SmallLayer small;
  for (Index i = 0; i < small.query.size(); ++i) {
    small.query.data()[i] = std::round(small.query.data()[i] * 8) / 8;
    small.value.data()[i] = std::round(small.value.data()[i] * 8) / 8;
  }
  TempDir dir("kattn_run_test");
  small.writeAllFiles(dir);
  ASSERT_EQ(runCli(baseArgs(dir, "float32"), dir).code, 0);
  const auto want = SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output");

  // x/8 with |x| <= 8: bf16 and f16 bit patterns from the float's top bits / by hand.
  auto bf16 = [](double v) {
    const float f = static_cast<float>(v);
    std::uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return static_cast<std::uint16_t>(bits >> 16);
  };
  auto f16 = [](double v) {
    if (v == 0) return std::uint16_t(0);
    const std::uint16_t sign = v < 0 ? 0x8000 : 0;
    int e;
    const double m = std::frexp(std::abs(v), &e);  // v = m 2^e, m in [0.5, 1)
    const auto exponent = static_cast<std::uint16_t>(e - 1 + 15);
    const auto mantissa = static_cast<std::uint16_t>((m * 2 - 1) * 1024);
    return static_cast<std::uint16_t>(sign | exponent << 10 | mantissa);
  };
  for (const auto& [dtype, convert] :
       {std::pair<std::string, std::function<std::uint16_t(double)>>{"BF16", bf16}, {"F16", f16}}) {
    SCOPED_TRACE(dtype);
    Bytes data;
    for (const auto* t : {&small.query, &small.value}) {
      for (Index i = 0; i < t->size(); ++i) {
        const std::uint16_t h = convert(t->data()[i]);
        data.push_back(static_cast<std::uint8_t>(h & 0xff));
        data.push_back(static_cast<std::uint8_t>(h >> 8));
      }
    }
    const std::string header = "{\"query\":{\"dtype\":\"" + dtype +
                               "\",\"shape\":[2,3,5],\"data_offsets\":[0,60]},\"value\":{\"dtype\":\"" +
                               dtype + "\",\"shape\":[2,3,5],\"data_offsets\":[60,120]}}";
    Bytes file(8);
    const std::uint64_t n = header.size();
    std::memcpy(file.data(), &n, 8);
    file.insert(file.end(), header.begin(), header.end());
    file.insert(file.end(), data.begin(), data.end());
    writeAll(dir.file("in.safetensors"), file);
    const RunResult r = runCli(baseArgs(dir, "float32"), dir);
    expectSuccess(r);
    if (r.code != 0) continue;
    const auto got = SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output");
    EXPECT_EQ(kattn_test::relativeError(got, want), 0.0);
  }
}

TEST(KattnRun, DefaultDtypeIsFloat32) {
  SmallLayer small;
  TempDir dir("kattn_run_test");
  small.writeAllFiles(dir);
  std::vector<std::string> args = baseArgs(dir, "float32");
  args.resize(args.size() - 2);  // drop --dtype
  expectSuccess(runCli(args, dir));
  EXPECT_EQ(SafeTensors::load(dir.file("out.safetensors")).info("output").dtype_name, "F32");
}

TEST(KattnRun, OptionsWithEqualsAndThreads) {
  SmallLayer small;
  TempDir dir("kattn_run_test");
  small.writeAllFiles(dir);
  expectSuccess(runCli({"--config=" + dir.file("layer.json"),
                        "--weights=" + dir.file("weights.safetensors"),
                        "--inputs=" + dir.file("in.safetensors"),
                        "--output=" + dir.file("out.safetensors"), "--dtype=float64",
                        "--threads=4"},
                       dir));
}

TEST(KattnRun, ThreadCountDoesNotChangeResults) {
  SmallLayer small;
  small.config.use_causal_windowed = true;
  small.config.causal_chunk_length = 1;
  TempDir dir("kattn_run_test");
  small.writeAllFiles(dir);
  std::string first;
  for (const char* threads : {"1", "3"}) {
    auto args = baseArgs(dir, "float64");
    args.insert(args.end(), {"--threads", threads});
    expectSuccess(runCli(args, dir));
    const std::string bytes = readAll(dir.file("out.safetensors"));
    if (first.empty()) first = bytes;
    EXPECT_EQ(bytes, first) << "--threads " << threads;
  }
}

// ---------------------------------------------------------------------------------------
// --weights-naming

TEST(KattnRun, TorchNamingGivesTheKerasRunsOutput) {
  SmallLayer small;
  TempDir dir("kattn_run_test");
  small.writeAllFiles(dir);
  expectSuccess(runCli(baseArgs(dir, "float64"), dir));
  const std::string keras_out = readAll(dir.file("out.safetensors"));

  SafeTensorsWriter w;
  kattn::io::addWeights(w, small.weights, kattn::io::WeightNaming::torch());
  w.write(dir.file("weights.safetensors"));
  auto args = baseArgs(dir, "float64");
  args.insert(args.end(), {"--weights-naming", "torch"});
  expectSuccess(runCli(args, dir));
  EXPECT_EQ(readAll(dir.file("out.safetensors")), keras_out);

  // Under the Keras names (the default) the same file is missing query/kernel.
  expectError(runCli(baseArgs(dir, "float64"), dir), 1, {"missing tensor 'query/kernel'"});
}

TEST(KattnRun, JsonNamingWithAPrefixReadsOneLayerOfACheckpoint) {
  SmallLayer small;
  TempDir dir("kattn_run_test");
  small.writeAllFiles(dir);
  expectSuccess(runCli(baseArgs(dir, "float64"), dir));
  const std::string keras_out = readAll(dir.file("out.safetensors"));

  kattn::io::WeightNaming naming;
  naming.setPrefix("model.layers.3.attn.");
  const char* const modules[] = {"q_proj", "k_proj", "v_proj", "out_proj"};
  for (std::size_t i = 0; i < 8; ++i) {
    naming.set(kattn::io::kWeightVariables[i],
               std::string(modules[i / 2]) + (i % 2 ? ".bias" : ".weight"),
               kattn::io::WeightLayout::TorchLinear);
  }
  nlohmann::json map = {{"prefix", naming.prefix()}};
  for (std::size_t i = 0; i < 8; ++i) {
    const char* v = kattn::io::kWeightVariables[i];
    map[v] = {{"name", naming.entry(v).name}, {"layout", "torch_linear"}};
  }
  writeAll(dir.file("naming.json"), map.dump(2));
  SafeTensorsWriter w;
  kattn::io::addWeights(w, small.weights, naming);
  w.add("model.embed_tokens.weight", Tensor<double, 2>(3, 5).setZero());  // another layer's
  w.write(dir.file("weights.safetensors"));
  auto args = baseArgs(dir, "float64");
  args.insert(args.end(), {"--weights-naming", dir.file("naming.json")});
  expectSuccess(runCli(args, dir));
  EXPECT_EQ(readAll(dir.file("out.safetensors")), keras_out);

  // Under the prefix, a tensor the layer does not read is still an error.
  w.add("model.layers.3.attn.rotary.inv_freq", Tensor<double, 1>(2).setZero());
  w.write(dir.file("weights.safetensors"));
  expectError(runCli(args, dir), 1,
              {"tensor 'model.layers.3.attn.rotary.inv_freq' is not read", "not a weight"});
}

TEST(KattnRun, BadWeightsNaming) {
  SmallLayer small;
  TempDir dir("kattn_run_test");
  small.writeAllFiles(dir);
  auto args = baseArgs(dir, "float64");
  args.insert(args.end(), {"--weights-naming", dir.file("naming.json")});
  expectError(runCli(args, dir), 1, {"cannot open weight naming", "naming.json"});
  writeAll(dir.file("naming.json"),
           std::string(R"({"query/kernel": {"name": "q.weight", "layout": "pytorch"}})"));
  expectError(runCli(args, dir), 1,
              {"naming.json", "query/kernel.layout: expected \"keras\" or \"torch_linear\""});
  writeAll(dir.file("naming.json"), std::string("{\"prefix\": "));
  expectError(runCli(args, dir), 1, {"naming.json", "weight naming: not valid JSON"});

  // A Keras file read as torch: the missing tensor under its torch name, and what it stands for.
  args.back() = "torch";
  expectError(runCli(args, dir), 1,
              {"missing tensor 'to_q.weight'", "(Keras query/kernel, torch_linear layout)"});

  // A bias the config does not read is named with the variable it stands for.
  kattn::LayerConfig no_bias = small.config;
  no_bias.use_bias = false;
  writeAll(dir.file("layer.json"), kattn::io::configToJson(no_bias).dump());
  SafeTensorsWriter w;
  kattn::io::addWeights(w, small.weights, kattn::io::WeightNaming::torch());
  w.write(dir.file("weights.safetensors"));
  expectError(runCli(args, dir), 1,
              {"tensor 'to_k.bias' is not read", "it is key/bias", "use_bias = false"});
}

TEST(KattnRun, Help) {
  TempDir dir("kattn_run_test");
  for (const char* flag : {"--help", "-h"}) {
    const RunResult r = runCli({"--output", "x", flag}, dir);
    EXPECT_EQ(r.code, 0);
    EXPECT_NE(r.out.find("usage: kattn-run --config FILE"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("--state-out"), std::string::npos);
    EXPECT_NE(r.out.find("--weights-naming"), std::string::npos);
    EXPECT_NE(r.out.find("--backward"), std::string::npos);
    EXPECT_TRUE(r.err.empty()) << r.err;
  }
}

// ---------------------------------------------------------------------------------------
// Command-line mistakes: exit code 2

TEST(KattnRunUsage, Mistakes) {
  TempDir dir("kattn_run_test");
  SmallLayer().writeAllFiles(dir);
  const auto base = baseArgs(dir, "float64");
  auto with = [&](std::initializer_list<std::string> extra) {
    std::vector<std::string> a = base;
    a.insert(a.end(), extra);
    return a;
  };
  expectError(runCli({}, dir), 2, {"missing --config, --weights, --inputs, --output"});
  expectError(runCli({"--config", dir.file("layer.json")}, dir), 2,
              {"missing --weights, --inputs, --output"});
  expectError(runCli(with({"--frobnicate"}), dir), 2, {"unknown option '--frobnicate'"});
  expectError(runCli(with({"extra"}), dir), 2, {"unexpected argument 'extra'"});
  expectError(runCli(with({"--config", "again.json"}), dir), 2, {"--config given twice"});
  expectError(runCli(with({"--threads"}), dir), 2, {"--threads needs a value"});
  expectError(runCli(with({"--threads", "0"}), dir), 2, {"--threads", "from 1 to 1024", "'0'"});
  expectError(runCli(with({"--threads", "1025"}), dir), 2, {"--threads", "'1025'"});
  expectError(runCli(with({"--threads", "-3"}), dir), 2, {"--threads", "'-3'"});
  expectError(runCli(with({"--threads", "2x"}), dir), 2, {"--threads", "'2x'"});
  expectError(runCli(with({"--threads", "99999999999"}), dir), 2, {"--threads"});
  std::vector<std::string> bad_dtype = base;
  bad_dtype.back() = "float16";
  expectError(runCli(bad_dtype, dir), 2, {"--dtype", "float32 or float64", "'float16'"});
  expectError(runCli(with({"--state-in", "s"}), dir), 2, {"--state-in needs --stream"});
  expectError(runCli(with({"--state-out", "s"}), dir), 2, {"--state-out needs --stream"});
  expectError(runCli(with({"--stream=yes"}), dir), 2, {"--stream takes no value"});
  expectError(runCli(with({"--state-out="}), dir), 2, {"--state-out needs a non-empty value"});
}

// ---------------------------------------------------------------------------------------
// Malformed inputs: exit code 1, one line naming the file and what is wrong

class KattnRunBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    m_small.writeAllFiles(m_dir);
    m_inputs = readAll(m_dir.file("in.safetensors"));
  }
  RunResult run() { return runCli(baseArgs(m_dir, "float64"), m_dir); }
  /// Writes in.safetensors from a header given as JSON text and `data_bytes` zero bytes.
  void writeRawInputs(const std::string& header, std::size_t data_bytes) {
    Bytes file(8);
    const std::uint64_t n = header.size();
    std::memcpy(file.data(), &n, 8);
    file.insert(file.end(), header.begin(), header.end());
    file.resize(file.size() + data_bytes, 0);
    writeAll(m_dir.file("in.safetensors"), file);
  }

  SmallLayer m_small;
  TempDir m_dir{"kattn_run_test"};
  std::string m_inputs;  // a valid in.safetensors
};

TEST_F(KattnRunBadInput, Valid) { expectSuccess(run()); }

TEST_F(KattnRunBadInput, TruncatedFile) {
  writeAll(m_dir.file("in.safetensors"), m_inputs.substr(0, m_inputs.size() - 8));
  expectError(run(), 1, {"in.safetensors", "beyond the data section"});
  writeAll(m_dir.file("in.safetensors"), m_inputs.substr(0, 5));
  expectError(run(), 1, {"in.safetensors", "shorter than the 8-byte header length"});
  writeAll(m_dir.file("in.safetensors"), std::string());
  expectError(run(), 1, {"in.safetensors", "file of 0 bytes"});
}

TEST_F(KattnRunBadInput, HeaderLengthBeyondTheFile) {
  std::string bytes = m_inputs;
  const std::uint64_t n = bytes.size();  // 8 more than what follows the length field
  std::memcpy(bytes.data(), &n, 8);
  writeAll(m_dir.file("in.safetensors"), bytes);
  expectError(run(), 1, {"in.safetensors", "header length " + std::to_string(n), "exceeds"});
}

TEST_F(KattnRunBadInput, OffsetsOutOfRange) {
  writeRawInputs(R"({"query":{"dtype":"F64","shape":[2,3,5],"data_offsets":[0,240]},)"
                 R"("value":{"dtype":"F64","shape":[2,3,5],"data_offsets":[240,480]}})",
                 400);
  expectError(run(), 1, {"in.safetensors", "'value'", "data_offsets [240, 480]", "beyond"});
}

TEST_F(KattnRunBadInput, OverlappingTensors) {
  writeRawInputs(R"({"query":{"dtype":"F64","shape":[2,3,5],"data_offsets":[0,240]},)"
                 R"("value":{"dtype":"F64","shape":[2,3,5],"data_offsets":[200,440]}})",
                 440);
  expectError(run(), 1, {"in.safetensors", "overlap", "'query'"});
}

TEST_F(KattnRunBadInput, DtypeAndShapeDisagreeWithByteCount) {
  writeRawInputs(R"({"query":{"dtype":"F32","shape":[2,3,5],"data_offsets":[0,240]},)"
                 R"("value":{"dtype":"F64","shape":[2,3,5],"data_offsets":[240,480]}})",
                 480);
  expectError(run(), 1, {"in.safetensors", "'query'", "hold 240 bytes", "needs 120 bytes"});
}

TEST_F(KattnRunBadInput, MissingTensor) {
  SafeTensorsWriter in;
  in.add("query", m_small.query);
  in.write(m_dir.file("in.safetensors"));
  expectError(run(), 1, {"missing tensor 'value'", "in.safetensors"});

  SafeTensorsWriter w;
  w.add("query/kernel", m_small.weights.query_kernel);
  w.write(m_dir.file("weights.safetensors"));
  m_small.writeInputs(m_dir);
  expectError(run(), 1, {"missing tensor 'key/kernel'", "weights.safetensors"});
}

TEST_F(KattnRunBadInput, WrongShapeNamesTensorExpectedAndActual) {
  SafeTensorsWriter in;
  in.add("query", Tensor<double, 3>(2, 3, 4).setZero());
  in.add("value", m_small.value);
  in.write(m_dir.file("in.safetensors"));
  expectError(run(), 1, {"query", "expected shape [*, *, 5]", "got [2, 3, 4]"});

  SafeTensorsWriter in2;
  in2.add("query", m_small.query);
  in2.add("value", Tensor<double, 3>(1, 3, 5).setZero());
  in2.write(m_dir.file("in.safetensors"));
  expectError(run(), 1, {"value", "expected shape [2, *, 5]", "got [1, 3, 5]"});

  SafeTensorsWriter in3;
  in3.add("query", m_small.query);
  in3.add("value", m_small.value);
  in3.add("attention_mask", Tensor<double, 2>(2, 4).setZero());
  in3.write(m_dir.file("in.safetensors"));
  expectError(run(), 1, {"attention_mask", "expected shape [2, 3]", "got [2, 4]"});

  SafeTensorsWriter in4;
  in4.add("query", Tensor<double, 2>(3, 5).setZero());
  in4.add("value", m_small.value);
  in4.write(m_dir.file("in.safetensors"));
  expectError(run(), 1, {"'query'", "expected rank 3", "[3, 5]"});

  m_small.writeInputs(m_dir);
  kattn::Weights<double> w = m_small.weights;
  w.query_kernel = Tensor<double, 3>(5, 2, 3).setZero();
  SafeTensorsWriter wf;
  kattn::io::addWeights(wf, w);
  wf.write(m_dir.file("weights.safetensors"));
  expectError(run(), 1,
              {"weights.safetensors", "'query/kernel'", "expected shape [*, 2, 4]", "got [5, 2, 3]"});
}

TEST_F(KattnRunBadInput, BadJsonConfig) {
  writeAll(m_dir.file("layer.json"), std::string("{\"num_heads\": 2, \"key_dim\": 4,\n"));
  expectError(run(), 1, {"layer.json", "not valid JSON"});
  writeAll(m_dir.file("layer.json"), std::string("{\"num_heads\": \"2\", \"key_dim\": 4}"));
  expectError(run(), 1, {"layer.json", "num_heads: expected an integer, got string \"2\""});
  writeAll(m_dir.file("layer.json"), std::string("[1, 2]"));
  expectError(run(), 1, {"layer.json", "expected a JSON object"});
}

TEST_F(KattnRunBadInput, UnknownConfigKey) {
  writeAll(m_dir.file("layer.json"),
           std::string(R"({"num_heads": 2, "key_dim": 4, "feature_transfrom": "elu"})"));
  expectError(run(), 1, {"layer.json", "unknown key \"feature_transfrom\"", "feature_transform"});
}

TEST_F(KattnRunBadInput, InvalidConfigValue) {
  writeAll(m_dir.file("layer.json"),
           std::string(R"({"num_heads": 2, "key_dim": 4, "feature_transform": "softmax"})"));
  expectError(run(), 1, {"layer.json", "feature_transform", "\"softmax\"", "elu, relu"});
  writeAll(m_dir.file("layer.json"),
           std::string(R"({"num_heads": 2, "key_dim": 4, "attention_axes": [2]})"));
  expectError(run(), 1, {"layer.json", "attention_axes", "not supported"});
}

TEST_F(KattnRunBadInput, UnreadableFiles) {
  fs::remove(m_dir.file("layer.json"));
  expectError(run(), 1, {"cannot open config", "layer.json"});
  m_small.writeConfig(m_dir);
  fs::remove(m_dir.file("weights.safetensors"));
  fs::create_directory(m_dir.file("weights.safetensors"));
  expectError(run(), 1, {"weights.safetensors"});
  fs::remove(m_dir.file("weights.safetensors"));
  m_small.writeWeights(m_dir);
  std::vector<std::string> args = baseArgs(m_dir, "float64");
  args[7] = m_dir.file("no/such/dir/out.safetensors");
  expectError(runCli(args, m_dir), 1, {"cannot open", "out.safetensors", "for writing"});
}

TEST_F(KattnRunBadInput, UnexpectedTensorNames) {
  SafeTensorsWriter in;
  in.add("query", m_small.query);
  in.add("value", m_small.value);
  in.add("mask", Tensor<double, 2>(2, 3).setConstant(1));
  in.write(m_dir.file("in.safetensors"));
  expectError(run(), 1, {"in.safetensors", "unexpected tensor 'mask'", "attention_mask"});

  SafeTensorsWriter in2;
  in2.add("query", m_small.query);
  in2.add("value", m_small.value);
  in2.add("cache/kv", Tensor<double, 4>(2, 2, 4, 4).setZero());
  in2.write(m_dir.file("in.safetensors"));
  expectError(run(), 1, {"'cache/kv'", "only with --stream"});

  m_small.writeInputs(m_dir);
  SafeTensorsWriter w;
  kattn::io::addWeights(w, m_small.weights);
  w.add("projection_matrix", Tensor<double, 2>(6, 4).setZero());
  w.write(m_dir.file("weights.safetensors"));
  expectError(run(), 1, {"weights.safetensors", "'projection_matrix'", "num_random_features = 0"});

  kattn::LayerConfig no_bias = m_small.config;
  no_bias.use_bias = false;
  writeAll(m_dir.file("layer.json"), kattn::io::configToJson(no_bias).dump());
  m_small.writeWeights(m_dir);
  expectError(run(), 1, {"weights.safetensors", "bias", "use_bias = false"});
}

TEST_F(KattnRunBadInput, ZeroSizedDimsCannotDeclareHugeWork) {
  // A [B, T, 0] query holds no data whatever B and T say; with a [0, N, d] kernel it would
  // be accepted, and the forward would size buffers from B and T.
  kattn::Weights<double> w = m_small.weights;
  w.query_kernel = Tensor<double, 3>(0, 2, 4);
  kattn::LayerConfig c = m_small.config;
  c.output_shape = 5;
  writeAll(m_dir.file("layer.json"), kattn::io::configToJson(c).dump());
  SafeTensorsWriter wf;
  kattn::io::addWeights(wf, w);
  wf.add("query/kernel", w.query_kernel);  // addWeights skips empty tensors
  wf.write(m_dir.file("weights.safetensors"));
  writeRawInputs(R"({"query":{"dtype":"F64","shape":[1000000000,1000000000,0],)"
                 R"("data_offsets":[0,0]},)"
                 R"("value":{"dtype":"F64","shape":[1000000000,0,5],"data_offsets":[0,0]}})",
                 0);
  expectError(run(), 1, {"working memory", "refuses"});
}

TEST_F(KattnRunBadInput, StreamingMistakes) {
  // Not a causal layer.
  auto stream = baseArgs(m_dir, "float64");
  stream.push_back("--stream");
  expectError(runCli(stream, m_dir), 1, {"--stream", "use_causal_windowed"});

  kattn::LayerConfig c = m_small.config;
  c.use_causal_windowed = true;
  c.causal_chunk_length = 1;
  writeAll(m_dir.file("layer.json"), kattn::io::configToJson(c).dump());
  expectSuccess(runCli(stream, m_dir));  // exact mode (no decay), fresh state

  // Exact mode cannot take the reference's recurrent cache.
  SafeTensorsWriter in;
  in.add("query", m_small.query);
  in.add("value", m_small.value);
  in.add("cache/kv", Tensor<double, 4>(2, 2, 4, 4).setZero());
  in.add("cache/k_sum", Tensor<double, 3>(2, 2, 4).setZero());
  in.write(m_dir.file("in.safetensors"));
  expectError(runCli(stream, m_dir), 1, {"cache/kv", "exact mode", "--state-in"});

  // Recurrent mode: cache shapes are checked; the two tensors come together.
  c.causal_window_decay = 0.5;
  writeAll(m_dir.file("layer.json"), kattn::io::configToJson(c).dump());
  expectSuccess(runCli(stream, m_dir));
  SafeTensorsWriter bad;
  bad.add("query", m_small.query);
  bad.add("value", m_small.value);
  bad.add("cache/kv", Tensor<double, 4>(2, 2, 4, 5).setZero());
  bad.add("cache/k_sum", Tensor<double, 3>(2, 2, 4).setZero());
  bad.write(m_dir.file("in.safetensors"));
  expectError(runCli(stream, m_dir), 1, {"cache/kv", "expected shape [2, 2, 4, 4]", "got [2, 2, 4, 5]"});
  SafeTensorsWriter half;
  half.add("query", m_small.query);
  half.add("value", m_small.value);
  half.add("cache/k_sum", Tensor<double, 3>(2, 2, 4).setZero());
  half.write(m_dir.file("in.safetensors"));
  expectError(runCli(stream, m_dir), 1, {"cache/kv and cache/k_sum come together"});

  // State files: garbage, another dtype, and together with cache tensors.
  m_small.writeInputs(m_dir);
  writeAll(m_dir.file("state"), std::string("not a state"));
  auto with_state = stream;
  with_state.insert(with_state.end(), {"--state-in", m_dir.file("state")});
  expectError(runCli(with_state, m_dir), 1, {"'" + m_dir.file("state") + "'", "not a kattn streaming state"});
  auto save32 = baseArgs(m_dir, "float32");
  save32.insert(save32.end(), {"--stream", "--state-out", m_dir.file("state")});
  expectSuccess(runCli(save32, m_dir));
  expectError(runCli(with_state, m_dir), 1, {"another scalar type"});
  fs::remove(m_dir.file("state"));
  expectError(runCli(with_state, m_dir), 1, {"cannot open state"});
  auto save64 = stream;
  save64.insert(save64.end(), {"--state-out", m_dir.file("state")});
  expectSuccess(runCli(save64, m_dir));
  expectSuccess(runCli(with_state, m_dir));
  in.write(m_dir.file("in.safetensors"));
  expectError(runCli(with_state, m_dir), 1, {"both give the starting state"});

  // A state of another batch size.
  const Eigen::array<Index, 3> origin{0, 0, 0}, first_row{1, 3, 5};
  const Tensor<double, 3> q1 = m_small.query.slice(origin, first_row);
  const Tensor<double, 3> v1 = m_small.value.slice(origin, first_row);
  SafeTensorsWriter one_row;
  one_row.add("query", q1);
  one_row.add("value", v1);
  one_row.write(m_dir.file("in.safetensors"));
  const RunResult r = runCli(with_state, m_dir);
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_EQ(r.err.rfind("kattn-run: ", 0), 0u) << r.err;
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
}


// ---------------------------------------------------------------------------------------
// --backward

/// A [B, T, O] upstream gradient with entries uniform on [-1, 1], fixed by `seed`.
Tensor<double, 3> randomGradOutput(Index B, Index T, Index O, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Tensor<double, 3> g(B, T, O);
  for (Index i = 0; i < g.size(); ++i) g.data()[i] = u(gen);
  return g;
}

/// A golden case's inputs (query, value, key and mask where it has them) added to `in`.
void addCaseInputs(const GoldenCase& gc, SafeTensorsWriter& in) {
  for (const char* input : {"query", "value", "key", "attention_mask"}) {
    if (gc.has(input)) copyTensor(gc.data, input, in);
  }
}

/// The weights under "grad/" and their Keras names, as --backward writes their gradients.
kattn::io::WeightNaming gradNaming(kattn::io::WeightNaming naming) {
  naming.setPrefix("grad/" + naming.prefix());
  return naming;
}

/// Σ grad ⊙ output: a loss whose gradient with respect to the output is `grad`.
double lossOf(const Tensor<double, 3>& output, const Tensor<double, 3>& grad) {
  double l = 0;
  for (Index i = 0; i < output.size(); ++i) l += output.data()[i] * grad.data()[i];
  return l;
}

void expectWeightsEqual(const kattn::Weights<double>& got, const kattn::Weights<double>& want,
                        double tol) {
  auto same = [tol](const char* name, const auto& a, const auto& b) {
    SCOPED_TRACE(name);
    ASSERT_EQ(a.dimensions(), b.dimensions());
    EXPECT_LE(kattn_test::relativeError(a, b), tol);
  };
  same("query/kernel", got.query_kernel, want.query_kernel);
  same("query/bias", got.query_bias, want.query_bias);
  same("key/kernel", got.key_kernel, want.key_kernel);
  same("key/bias", got.key_bias, want.key_bias);
  same("value/kernel", got.value_kernel, want.value_kernel);
  same("value/bias", got.value_bias, want.value_bias);
  same("attention_output/kernel", got.output_kernel, want.output_kernel);
  same("attention_output/bias", got.output_bias, want.output_bias);
  same("attention_output_softmax/kernel", got.output_softmax_kernel, want.output_softmax_kernel);
  same("attention_output_softmax/bias", got.output_softmax_bias, want.output_softmax_bias);
}

/// A golden case with --backward in float64: its files in `dir`, the run's output file.
struct BackwardRun {
  Tensor<double, 3> grad_output;
  std::optional<SafeTensors> out;  // absent when the run failed (reported)
};

BackwardRun runBackwardCase(const GoldenCase& gc, const TempDir& dir) {
  writeLayerFiles(gc, dir);
  const auto want = gc.tensor<double, 3>("expected/output");
  BackwardRun run;
  run.grad_output = randomGradOutput(want.dimension(0), want.dimension(1), want.dimension(2), 7);
  SafeTensorsWriter in;
  addCaseInputs(gc, in);
  in.add("grad/output", run.grad_output);
  in.write(dir.file("in.safetensors"));
  auto args = baseArgs(dir, "float64");
  args.push_back("--backward");
  const RunResult r = runCli(args, dir);
  expectSuccess(r);
  if (r.code == 0) run.out.emplace(SafeTensors::load(dir.file("out.safetensors")));
  return run;
}

// Two noncausal golden cases: a separate key input, a mask and a projection (exp, m = 32), and
// the value input as the key input (square, no projection).
const char* const kBackwardCases[] = {"noncausal_exp_M32_cross_tailmask_s0.35",
                                      "noncausal_square_noproj_tailmask"};

TEST(KattnRunBackward, EqualsKattnBackwardInProcess) {
  for (const char* name : kBackwardCases) {
    SCOPED_TRACE(name);
    const GoldenCase gc(name);
    TempDir dir("kattn_run_backward");
    const BackwardRun run = runBackwardCase(gc, dir);
    if (!run.out) continue;
    const SafeTensors& out = *run.out;
    EXPECT_LE(kattn_test::relativeError(out.tensor<double, 3>("output"),
                                        gc.tensor<double, 3>("expected/output")),
              1e-10);

    const auto query = gc.tensor<double, 3>("query");
    const auto value = gc.tensor<double, 3>("value");
    std::optional<Tensor<double, 3>> key;
    std::optional<Tensor<double, 2>> mask;
    if (gc.has("key")) key = gc.tensor<double, 3>("key");
    if (gc.has("attention_mask")) mask = gc.tensor<double, 2>("attention_mask");
    std::optional<kattn::ConstTensorMap<double, 3>> key_view;
    std::optional<kattn::ConstTensorMap<double, 2>> mask_view;
    if (key) key_view.emplace(*key);
    if (mask) mask_view.emplace(*mask);
    kattn::detail::visitFeatureMap(gc.config.feature_transform, [&](auto map) {
      kattn::KernelAttention<double, decltype(map), kattn::Bidirectional> layer(gc.config);
      layer.setWeights(kattn::io::loadWeights<double>(gc.data, gc.config));
      if (auto P = kattn::io::loadProjection<double>(gc.data, gc.config)) layer.setProjection(*P);
      const kattn::Gradients<double> g =
          kattn::backward(layer, query, value, key_view, mask_view, run.grad_output);

      // The names: output, the inputs' gradients, and grad/ before every name of named().
      std::set<std::string> want_names = {"output", "grad/query", "grad/value"};
      if (key) want_names.insert("grad/key");
      for (const kattn::NamedTensor<double>& t : g.named()) {
        want_names.insert("grad/" + t.name);
        if (out.contains("grad/" + t.name)) {
          EXPECT_EQ(out.info("grad/" + t.name).shape, t.shape) << t.name;
        }
      }
      const std::vector<std::string> names = out.names();
      EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), want_names);

      auto same = [&](const char* file_name, const Tensor<double, 3>& want) {
        SCOPED_TRACE(file_name);
        const auto got = out.tensor<double, 3>(file_name);
        ASSERT_EQ(got.dimensions(), want.dimensions());
        EXPECT_LE(kattn_test::relativeError(got, want), 1e-12);
      };
      same("grad/query", g.query);
      same("grad/value", g.value);
      if (key) same("grad/key", g.key);
      const kattn::io::WeightNaming keras = gradNaming(kattn::io::WeightNaming::keras());
      expectWeightsEqual(kattn::io::loadWeights<double>(out, gc.config, keras), g.weights, 1e-12);
    });
  }
}

/// Writes the tensors of `names` that `gc` has to `path` in float64, entry `index` (flat,
/// row-major) of tensor `target` moved by `delta`.
template <typename Names>
void writePerturbed(const GoldenCase& gc, const Names& names, const std::string& target,
                    Index index, double delta, const std::string& path) {
  SafeTensorsWriter out;
  for (const char* name : names) {
    if (!gc.has(name)) continue;
    if (name != target) {
      copyTensor(gc.data, name, out);
      continue;
    }
    auto moved = [&](auto t) {
      t.data()[index] += delta;
      out.add(name, t);
    };
    switch (gc.data.info(name).shape.size()) {
      case 1: moved(gc.tensor<double, 1>(name)); break;
      case 2: moved(gc.tensor<double, 2>(name)); break;
      case 3: moved(gc.tensor<double, 3>(name)); break;
      default: FAIL() << name << " has an unexpected rank";
    }
  }
  out.write(path);
}

TEST(KattnRunBackward, MatchesFiniteDifferencesOfTheForward) {
  // d L / d x for L = Σ grad/output ⊙ output, by central differences of kattn-run's own
  // float64 forward (a process per side), on three entries of the input query and of the
  // weight key/kernel (which reaches the output through the features and the exp map's
  // stabiliser): where kattn-run's gradient is largest, and two fixed ones. The golden cases
  // are independent of kattn; these differences are of kattn-run's forward, which the
  // GoldenCli tests tie to them.
  // A bidirectional case and a causal one (chunks of 4, a window of 3, left padding).
  for (const char* name : {kBackwardCases[0], "k_cw_exp_M12_c4_w3_left"}) {
  SCOPED_TRACE(name);
  const GoldenCase gc(name);
  ASSERT_EQ(gc.config.feature_transform, "exp");
  TempDir dir("kattn_run_backward_fd");
  const BackwardRun run = runBackwardCase(gc, dir);
  ASSERT_TRUE(run.out);
  const char* const inputs[] = {"query", "value", "key", "attention_mask"};
  const std::string weights_file = dir.file("fd_weights.safetensors");
  const std::string inputs_file = dir.file("fd_in.safetensors");
  writePerturbed(gc, kWeightNames, "", 0, 0.0, weights_file);
  writePerturbed(gc, inputs, "", 0, 0.0, inputs_file);

  /// L with the forward of kattn-run on the files as they are now.
  auto loss = [&]() {
    std::vector<std::string> args = baseArgs(dir, "float64");
    args[3] = weights_file;
    args[5] = inputs_file;
    const RunResult r = runCli(args, dir);
    EXPECT_EQ(r.code, 0) << r.err;
    if (r.code != 0) return std::nan("");
    return lossOf(SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output"),
                  run.grad_output);
  };
  constexpr double h = 1e-5;
  struct Checked {
    std::string tensor;
    Tensor<double, 3> analytic;
    bool is_weight;
  };
  const Checked checked[] = {
      {"query", run.out->tensor<double, 3>("grad/query"), false},
      {"key/kernel", run.out->tensor<double, 3>("grad/key/kernel"), true}};
  for (const Checked& c : checked) {
    double scale = 0;  // relative to the largest gradient entry, as relativeError
    Index largest = 0;
    for (Index i = 0; i < c.analytic.size(); ++i) {
      if (std::abs(c.analytic.data()[i]) > scale) largest = i;
      scale = std::max(scale, std::abs(c.analytic.data()[i]));
    }
    ASSERT_GT(scale, 0) << c.tensor;
    for (const Index i : {largest, Index(1), c.analytic.size() / 2 + 3}) {
      SCOPED_TRACE(c.tensor + " flat index " + std::to_string(i));
      double sides[2];
      for (int side = 0; side < 2; ++side) {
        const double delta = side == 0 ? h : -h;
        if (c.is_weight) {
          writePerturbed(gc, kWeightNames, c.tensor, i, delta, weights_file);
        } else {
          writePerturbed(gc, inputs, c.tensor, i, delta, inputs_file);
        }
        sides[side] = loss();
      }
      writePerturbed(gc, kWeightNames, "", 0, 0.0, weights_file);
      writePerturbed(gc, inputs, "", 0, 0.0, inputs_file);
      const double fd = (sides[0] - sides[1]) / (2 * h);
      std::printf("%s[%lld]: central difference %.12g, --backward %.12g (largest %.3g)\n",
                  c.tensor.c_str(), static_cast<long long>(i), fd, c.analytic.data()[i], scale);
      EXPECT_LE(std::abs(fd - c.analytic.data()[i]), 1e-6 * scale)
          << "central difference " << fd << ", kattn-run --backward " << c.analytic.data()[i]
          << ", largest |gradient| " << scale;
    }
  }
  }
}

TEST(KattnRunBackward, TorchNamingWritesGradientsUnderTheTorchNames) {
  // The gradient of a TorchLinear weight is the transpose of the Keras one, as the weight is:
  // read back under the naming, the two runs' gradients are the same numbers.
  SmallLayer small;
  TempDir dir("kattn_run_backward");
  small.writeAllFiles(dir);
  SafeTensorsWriter in;
  in.add("query", small.query);
  in.add("value", small.value);
  in.add("grad/output", randomGradOutput(2, 3, 5, 3));
  in.write(dir.file("in.safetensors"));
  auto args = baseArgs(dir, "float64");
  args.push_back("--backward");
  expectSuccess(runCli(args, dir));
  const auto keras = SafeTensors::load(dir.file("out.safetensors"));
  EXPECT_TRUE(keras.contains("grad/query/kernel"));
  EXPECT_FALSE(keras.contains("grad/key"));  // no key input

  SafeTensorsWriter w;
  kattn::io::addWeights(w, small.weights, kattn::io::WeightNaming::torch());
  w.write(dir.file("weights.safetensors"));
  args.insert(args.end(), {"--weights-naming", "torch"});
  const RunResult r = runCli(args, dir);
  expectSuccess(r);
  if (r.code != 0) return;
  const auto torch = SafeTensors::load(dir.file("out.safetensors"));
  EXPECT_EQ(torch.info("grad/to_q.weight").shape, (std::vector<Index>{8, 5}));
  EXPECT_FALSE(torch.contains("grad/query/kernel"));
  expectWeightsEqual(
      kattn::io::loadWeights<double>(torch, small.config,
                                     gradNaming(kattn::io::WeightNaming::torch())),
      kattn::io::loadWeights<double>(keras, small.config,
                                     gradNaming(kattn::io::WeightNaming::keras())),
      0.0);
  for (const char* t : {"output", "grad/query", "grad/value"}) {
    EXPECT_EQ(kattn_test::relativeError(torch.tensor<double, 3>(t), keras.tensor<double, 3>(t)), 0.0)
        << t;
  }
}

TEST(KattnRunBackward, Mistakes) {
  SmallLayer small;
  TempDir dir("kattn_run_backward");
  small.writeAllFiles(dir);
  auto backward = baseArgs(dir, "float64");
  backward.push_back("--backward");
  auto withGrad = [&](const Tensor<double, 3>& grad) {
    SafeTensorsWriter in;
    in.add("query", small.query);
    in.add("value", small.value);
    in.add("grad/output", grad);
    in.write(dir.file("in.safetensors"));
  };

  // Command line (exit 2).
  auto with = [&](std::initializer_list<std::string> extra) {
    std::vector<std::string> a = backward;
    a.insert(a.end(), extra);
    return a;
  };
  expectError(runCli(with({"--stream"}), dir), 2, {"--backward", "not with --stream"});
  expectError(runCli(with({"--mpi"}), dir), 2, {"--backward", "not with --mpi"});
  expectError(runCli(with({"--backward"}), dir), 2, {"--backward given twice"});
  auto flag_with_value = baseArgs(dir, "float64");
  flag_with_value.push_back("--backward=1");
  expectError(runCli(flag_with_value, dir), 2, {"--backward takes no value"});

  // grad/output: absent, of another shape, not finite, or given without --backward (exit 1).
  expectError(runCli(backward, dir), 1, {"missing tensor 'grad/output'", "in.safetensors"});
  withGrad(Tensor<double, 3>(2, 3, 4).setZero());
  expectError(runCli(backward, dir), 1,
              {"in.safetensors", "'grad/output'", "expected shape [2, 3, 5]", "got [2, 3, 4]"});
  Tensor<double, 3> bad = randomGradOutput(2, 3, 5, 1);
  bad(1, 2, 0) = std::nan("");
  withGrad(bad);
  expectError(runCli(backward, dir), 1, {"'grad/output'", "expected finite values", "index 25"});
  bad(1, 2, 0) = 0;
  bad(0, 0, 1) = -INFINITY;
  withGrad(bad);
  auto backward32 = backward;
  backward32[9] = "float32";
  expectError(runCli(backward32, dir), 1, {"'grad/output'", "got -inf at flat index 1"});
  withGrad(randomGradOutput(2, 3, 5, 1));
  expectError(runCli(baseArgs(dir, "float64"), dir), 1,
              {"'grad/output'", "only with --backward"});
  expectSuccess(runCli(backward32, dir));

}

// ---------------------------------------------------------------------------------------
// Ragged calls: many sequences in one --stream call, their states in a pool file

/// Rows [t0, t0 + L) of batch row b of a [B, T, D] tensor, as [L, D].
Tensor<double, 2> sequenceRows(const Tensor<double, 3>& t, Index b, Index t0, Index L) {
  Tensor<double, 2> out(L, t.dimension(2));
  for (Index i = 0; i < L; ++i)
    for (Index j = 0; j < t.dimension(2); ++j) out(i, j) = t(b, t0 + i, j);
  return out;
}

/// The pieces one under another, [sum of rows, D].
Tensor<double, 2> stacked(const std::vector<Tensor<double, 2>>& pieces, Index D) {
  Index total = 0;
  for (const auto& p : pieces) total += p.dimension(0);
  Tensor<double, 2> out(total, D);
  Index at = 0;
  for (const auto& p : pieces) {
    std::copy(p.data(), p.data() + p.size(), out.data() + at * D);
    at += p.dimension(0);
  }
  return out;
}

/// in.safetensors of a ragged call: query [total, D] as F64, offsets and slots as I64 (written
/// by hand: SafeTensorsWriter writes float dtypes only).
void writeRaggedInputs(const std::string& path, const Tensor<double, 2>& query,
                       const std::vector<Index>& offsets, const std::vector<Index>& slots) {
  std::string header = "{", data;
  auto add = [&](const std::string& name, const char* dtype, const std::string& shape,
                 const void* bytes, std::size_t n) {
    header += (header.size() > 1 ? "," : "") + ("\"" + name + "\":{\"dtype\":\"") + dtype +
              "\",\"shape\":[" + shape + "],\"data_offsets\":[" + std::to_string(data.size()) +
              "," + std::to_string(data.size() + n) + "]}";
    if (n) data.append(static_cast<const char*>(bytes), n);
  };
  const std::vector<std::int64_t> off(offsets.begin(), offsets.end()), sl(slots.begin(), slots.end());
  add("offsets", "I64", std::to_string(off.size()), off.data(), 8 * off.size());
  add("slots", "I64", std::to_string(sl.size()), sl.data(), 8 * sl.size());
  add("query", "F64",
      std::to_string(query.dimension(0)) + "," + std::to_string(query.dimension(1)),
      query.data(), sizeof(double) * std::size_t(query.size()));
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string file(8, '\0');
  const std::uint64_t n = header.size();
  std::memcpy(file.data(), &n, 8);
  writeAll(path, file + header + data);
}

/// One piece of a ragged call: rows [t0, t0 + L) of batch row `row` of the case, in `slot`.
struct Piece {
  Index slot, row, t0, L;
};

/// Runs the calls of `calls` one after another, each but the first from the previous call's
/// pool (--state-in), the first with `first_args`; every piece's output rows must equal the
/// case's expected rows within `tol`. The pool file after call i is `pool<i>` in `dir`.
void runRaggedCalls(const GoldenCase& gc, const std::vector<std::vector<Piece>>& calls,
                    const std::string& dtype, double tol, const TempDir& dir,
                    const std::vector<std::string>& first_args = {}) {
  writeLayerFiles(gc, dir);
  const auto query = gc.tensor<double, 3>("query");
  const auto want = gc.tensor<double, 3>("expected/output");
  for (std::size_t c = 0; c < calls.size(); ++c) {
    SCOPED_TRACE("call " + std::to_string(c));
    std::vector<Tensor<double, 2>> rows;
    std::vector<Index> offsets{0}, slots;
    for (const Piece& p : calls[c]) {
      rows.push_back(sequenceRows(query, p.row, p.t0, p.L));
      offsets.push_back(offsets.back() + p.L);
      slots.push_back(p.slot);
    }
    writeRaggedInputs(dir.file("in.safetensors"), stacked(rows, query.dimension(2)), offsets, slots);
    auto args = baseArgs(dir, dtype);
    args.insert(args.end(), {"--stream", "--state-out", dir.file("pool" + std::to_string(c))});
    if (c == 0) args.insert(args.end(), first_args.begin(), first_args.end());
    if (c > 0) args.insert(args.end(), {"--state-in", dir.file("pool" + std::to_string(c - 1))});
    const RunResult r = runCli(args, dir);
    expectSuccess(r);
    if (r.code != 0) return;
    const auto out = SafeTensors::load(dir.file("out.safetensors"));
    EXPECT_EQ(out.names(), std::vector<std::string>{"output"});
    const auto got = out.tensor<double, 2>("output");
    ASSERT_EQ(got.dimension(0), offsets.back());
    for (std::size_t i = 0; i < calls[c].size(); ++i) {
      const Piece& p = calls[c][i];
      SCOPED_TRACE("slot " + std::to_string(p.slot));
      const Tensor<double, 2> got_rows = got.slice(
          Eigen::array<Index, 2>{offsets[i], 0}, Eigen::array<Index, 2>{p.L, got.dimension(1)});
      EXPECT_LE(kattn_test::relativeError(got_rows, sequenceRows(want, p.row, p.t0, p.L)), tol);
    }
  }
}

TEST(GoldenCliRagged, ExactModeSequencesAtDifferentProgressEqualTheWholePass) {
  // Batch rows 0 and 1 of an exact-mode case (no decay; chunks of 3, right padding) as two
  // sequences in slots 0 and 1: the first call takes 6 and 12 tokens, the second the rest
  // (11 and 5, ending inside a chunk as right padding allows), in the other slot order.
  const GoldenCase gc("causal_elu_M10_c3_w2_nodecay_right_onesmask_s0.7");
  ASSERT_FALSE(gc.config.causal_window_decay);
  ASSERT_FALSE(gc.has("key"));
  ASSERT_EQ((gc.tensor<double, 3>("query").dimension(1)), 17);
  const std::vector<std::vector<Piece>> calls{{{0, 0, 0, 6}, {1, 1, 0, 12}},
                                              {{1, 1, 12, 5}, {0, 0, 6, 11}}};
  for (const std::string dtype : {"float64", "float32"}) {
    SCOPED_TRACE(dtype);
    TempDir dir("kattn_run_test");
    runRaggedCalls(gc, calls, dtype, toleranceFor(dtype), dir);
  }
}

TEST(GoldenCliRagged, RecurrentSlotJoinsALoadedPool) {
  // A recurrent case (decay 0.5) fed in its own calls of 3, 1, 5 and 2 tokens, twice: slot 1
  // starts one call after slot 0, acquired from the loaded pool as a new sequence; slot 0 is
  // left alone in the last call.
  const GoldenCase gc("stream_relu_noproj_calls3-1-5-2_d0.5_onesmask");
  const auto kv0 = gc.tensor<double, 4>("cache/kv");
  const Tensor<double, 4> zeros = Tensor<double, 4>(kv0.dimensions()).setZero();
  ASSERT_EQ(kattn_test::relativeError(kv0, zeros), 0.0);
  std::vector<Index> starts{0};
  for (const auto& l : gc.meta.at("stream_chunk_lengths")) starts.push_back(starts.back() + l.get<Index>());
  const std::size_t n = starts.size() - 1;
  std::vector<std::vector<Piece>> calls(n + 1);
  for (std::size_t k = 0; k <= n; ++k) {
    if (k < n) calls[k].push_back({0, 0, starts[k], starts[k + 1] - starts[k]});
    if (k > 0) calls[k].push_back({1, 0, starts[k - 1], starts[k] - starts[k - 1]});
  }
  TempDir dir("kattn_run_test");
  runRaggedCalls(gc, calls, "float64", 1e-10, dir, {"--pool-capacity", "2"});
}

TEST(GoldenCliRagged, PoolFilesRoundTrip) {
  // A call that advances nothing writes back the pool it read, byte for byte: after a first
  // call (slots at 6 and 12 tokens), and after a second that finished both slots (their calls
  // ended inside a chunk).
  const GoldenCase gc("causal_elu_M10_c3_w2_nodecay_right_onesmask_s0.7");
  TempDir dir("kattn_run_test");
  runRaggedCalls(gc, {{{0, 0, 0, 6}, {1, 1, 0, 12}}, {{1, 1, 12, 5}, {0, 0, 6, 11}}}, "float64",
                 1e-10, dir);
  const std::string pool0 = readAll(dir.file("pool0")), pool1 = readAll(dir.file("pool1"));
  ASSERT_EQ(pool0.rfind("KATTNPL1", 0), 0u);
  const Tensor<double, 2> none(0, gc.tensor<double, 3>("query").dimension(2));
  for (const auto& [pool, slots, offsets] :
       {std::tuple<std::string, std::vector<Index>, std::vector<Index>>{"pool0", {0}, {0, 0}},
        {"pool1", {}, {0}}}) {
    SCOPED_TRACE(pool);
    writeRaggedInputs(dir.file("in.safetensors"), none, offsets, slots);
    auto args = baseArgs(dir, "float64");
    args.insert(args.end(), {"--stream", "--state-in", dir.file(pool), "--state-out",
                             dir.file("again")});
    expectSuccess(runCli(args, dir));
    EXPECT_EQ(readAll(dir.file("again")), readAll(dir.file(pool)));
  }
  EXPECT_NE(pool0, pool1);
}

TEST(KattnRunRagged, Mistakes) {
  TempDir dir("kattn_run_test");
  SmallLayer small;
  small.config.use_causal_windowed = true;
  small.config.causal_chunk_length = 2;  // exact mode, whole chunks of 2
  small.writeAllFiles(dir);
  const Tensor<double, 2> x =
      stacked({sequenceRows(small.query, 0, 0, 3), sequenceRows(small.query, 1, 0, 1)}, 5);  // [4, 5]
  auto ragged = baseArgs(dir, "float64");
  ragged.push_back("--stream");
  auto with = [&](std::initializer_list<std::string> extra) {
    std::vector<std::string> a = ragged;
    a.insert(a.end(), extra);
    return a;
  };
  auto inputs = [&](const std::vector<Index>& offsets, const std::vector<Index>& slots) {
    writeRaggedInputs(dir.file("in.safetensors"), x, offsets, slots);
  };
  // The layer's own checks, with their messages.
  inputs({0, 2, 4}, {0, 1});
  expectSuccess(runCli(ragged, dir));
  inputs({0, 1, 4}, {0, 1});
  expectError(runCli(ragged, dir), 1,
              {"in.safetensors", "sequence 0 brings 1 token, not a multiple of causal_chunk_length 2"});
  inputs({0, 2, 6}, {0, 1});
  expectError(runCli(ragged, dir), 1, {"offsets: must start at 0 and end at the token count 4"});
  inputs({0, 2}, {0, 1});
  expectError(runCli(ragged, dir), 1, {"offsets: expected one more entry than slots"});
  inputs({0, 2, 4}, {1, 1});
  expectError(runCli(ragged, dir), 1, {"slot 1 appears twice in one call"});
  inputs({0, 2, 4}, {0, -1});
  expectError(runCli(ragged, dir), 1, {"tensor 'slots'", "slot -1 does not exist"});
  inputs({0, 2, 4}, {0, 3});
  expectError(runCli(with({"--pool-capacity", "2"}), dir), 1,
              {"slot 3 does not exist (capacity 2)"});

  // The inputs kattn-run reads: offsets and slots together, integers, self-attention only.
  SafeTensorsWriter half;
  half.add("query", x);
  half.add("offsets", Tensor<double, 1>(2).setValues({0, 4}));
  half.write(dir.file("in.safetensors"));
  expectError(runCli(ragged, dir), 1, {"tensor 'offsets' without 'slots'"});
  expectError(runCli(baseArgs(dir, "float64"), dir), 1, {"'offsets'", "only with --stream"});
  auto floats = [&](std::initializer_list<std::pair<std::string, Tensor<double, 2>>> extra,
                    double slot) {
    SafeTensorsWriter in;
    in.add("query", x);
    in.add("offsets", Tensor<double, 1>(2).setValues({0, 4}));
    in.add("slots", Tensor<double, 1>(1).setValues({slot}));
    for (const auto& [name, t] : extra) in.add(name, t);
    in.write(dir.file("in.safetensors"));
  };
  floats({}, 0);
  expectSuccess(runCli(ragged, dir));  // whole numbers in a float dtype
  floats({{"value", x}}, 0);
  expectSuccess(runCli(ragged, dir));  // the query's rows again
  floats({}, 0.5);
  expectError(runCli(ragged, dir), 1, {"tensor 'slots'", "expected whole numbers, got 0.5"});
  Tensor<double, 2> other = x;
  other(1, 1) += 1;
  floats({{"value", other}}, 0);
  expectError(runCli(ragged, dir), 1, {"tensor 'value'", "self-attention", "other values"});
  floats({{"key", sequenceRows(small.query, 0, 0, 2)}}, 0);
  expectError(runCli(ragged, dir), 1, {"tensor 'key'", "self-attention", "other shape"});
  floats({{"attention_mask", Tensor<double, 2>(1, 4).setConstant(1)}}, 0);
  expectError(runCli(ragged, dir), 1, {"'attention_mask'", "takes no mask"});
  SafeTensorsWriter batched;
  batched.add("query", small.query);
  batched.add("offsets", Tensor<double, 1>(2).setValues({0, 4}));
  batched.add("slots", Tensor<double, 1>(1).setValues({0}));
  batched.write(dir.file("in.safetensors"));
  expectError(runCli(ragged, dir), 1, {"'query'", "packed rows [total, D]", "[2, 3, 5]"});

  // Pool files: a one-stream state is not a pool, nor the other way round; truncated pools.
  const Tensor<double, 3> whole_chunks =
      small.query.slice(Eigen::array<Index, 3>{0, 0, 0}, Eigen::array<Index, 3>{2, 2, 5});
  SafeTensorsWriter plain;  // one stream of two tokens per batch row
  plain.add("query", whole_chunks);
  plain.add("value", whole_chunks);
  plain.write(dir.file("in.safetensors"));
  expectSuccess(runCli(with({"--state-out", dir.file("state")}), dir));
  inputs({0, 2, 4}, {0, 1});
  expectError(runCli(with({"--state-in", dir.file("state")}), dir), 1,
              {"a one-stream state", "not a pool"});
  inputs({0, 2, 4}, {0, 1});
  expectSuccess(runCli(with({"--state-out", dir.file("pool")}), dir));
  plain.write(dir.file("in.safetensors"));
  expectError(runCli(with({"--state-in", dir.file("pool")}), dir), 1,
              {"a pool of slots", "no offsets and slots"});
  inputs({0, 2, 4}, {0, 1});
  const std::string pool = readAll(dir.file("pool"));
  writeAll(dir.file("cut"), pool.substr(0, pool.size() - 4));
  expectError(runCli(with({"--state-in", dir.file("cut")}), dir), 1,
              {"'" + dir.file("cut") + "'", "StatePool::loadAll: truncated stream"});
  std::string huge = pool;
  const std::int64_t capacity = 1000;  // more slots than the file's bytes could hold
  std::memcpy(huge.data() + 16, &capacity, 8);
  writeAll(dir.file("cut"), huge);
  expectError(runCli(with({"--state-in", dir.file("cut")}), dir), 1,
              {"corrupt pool header (capacity 1000"});
  writeAll(dir.file("cut"), pool + "xx");
  expectError(runCli(with({"--state-in", dir.file("cut")}), dir), 1, {"2 bytes after the saved pool"});
  auto save32 = baseArgs(dir, "float32");
  save32.insert(save32.end(), {"--stream", "--state-in", dir.file("pool")});
  expectError(runCli(save32, dir), 1, {"another scalar type"});

  // Command-line mistakes (exit 2).
  expectError(runCli(with({"--pool-capacity", "0"}), dir), 2,
              {"--pool-capacity", "at least 1", "'0'"});
  expectError(runCli(with({"--pool-capacity", "4", "--state-in", dir.file("pool")}), dir), 2,
              {"--pool-capacity: not with --state-in"});
  auto call = baseArgs(dir, "float64");
  call.insert(call.end(), {"--pool-capacity", "4"});
  expectError(runCli(call, dir), 2, {"--pool-capacity needs --stream"});
  plain.write(dir.file("in.safetensors"));
  expectError(runCli(with({"--pool-capacity", "4"}), dir), 1,
              {"--pool-capacity", "holds no offsets and slots"});

  // A layer that cannot stream.
  small.config.use_causal_windowed = false;
  small.writeConfig(dir);
  inputs({0, 4}, {0});
  expectError(runCli(ragged, dir), 1, {"--stream", "use_causal_windowed"});
}

#ifdef KATTN_MPIEXEC
/// kattn-run --mpi under mpirun with 3 ranks (KATTN_MPIEXEC: the launcher with its flags and
/// environment): every golden case of the kernel paths, bidirectional and causal, split across
/// the ranks (equal slices, and given ones with an empty slice and cuts inside chunks) equals
/// the case's expected output.
TEST(KattnRunMpi, GoldenCasesOverThreeRanks) {
  const auto names = kattn_test::caseNames([](const nlohmann::json& c) {
    return c.at("mode") == "call" && (c.at("path") == "causal" || c.at("path") == "noncausal");
  });
  ASSERT_FALSE(names.empty());
  // One run per case (a process start under the sanitizers costs a second): equal slices and
  // given ones in turn.
  for (std::size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    const GoldenCase gc(name);
    TempDir dir("kattn_run_mpi");
    writeLayerFiles(gc, dir);
    SafeTensorsWriter in;
    for (const char* input : {"query", "value", "key", "attention_mask"}) {
      if (gc.has(input)) copyTensor(gc.data, input, in);
    }
    in.write(dir.file("in.safetensors"));
    const Index T = gc.tensor<double, 3>("query").dimension(1);
    std::vector<std::string> extra;
    if (i % 2 == 1 && T >= 2) extra = {"--slices", "1,0," + std::to_string(T - 1)};
    {
      std::vector<std::string> args = baseArgs(dir, "float64");
      args.push_back("--mpi");
      args.insert(args.end(), extra.begin(), extra.end());
      std::string cmd = KATTN_MPIEXEC;
      for (const auto& a : args) cmd += " " + shellQuote(a);
      cmd += " >" + shellQuote(dir.file("stdout.txt")) + " 2>" + shellQuote(dir.file("stderr.txt"));
      const int status = std::system(cmd.c_str());
      ASSERT_EQ(status, 0) << name << ": " << readAll(dir.file("stderr.txt"));
      const auto got = SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output");
      const auto want = gc.tensor<double, 3>("expected/output");
      ASSERT_EQ(got.dimensions(), want.dimensions()) << name;
      EXPECT_LE(kattn_test::relativeError(got, want), toleranceFor("float64"))
          << name << (extra.empty() ? "" : " --slices " + extra[1]);
    }
  }
}

/// --mpi --state-out: the state after a split prefill goes on in a single-process --stream call,
/// and the rows that call gives are the golden whole pass's.
TEST(KattnRunMpi, StateAfterASplitPrefillGoesOnInAStream) {
  const GoldenCase gc("causal_elu_noproj_c1_w100_nodecay_nopad_tailmask");
  TempDir dir("kattn_run_mpi_state");
  writeLayerFiles(gc, dir);
  const auto query = gc.tensor<double, 3>("query"), value = gc.tensor<double, 3>("value");
  const auto mask = gc.tensor<double, 2>("attention_mask");
  const Index T = query.dimension(1), tail = 2;
  auto write = [&](Index t0, Index n) {
    SafeTensorsWriter in;
    in.add("query", rows(query, t0, n));
    in.add("value", rows(value, t0, n));
    in.add("attention_mask", rows(mask, t0, n));
    in.write(dir.file("in.safetensors"));
  };
  write(0, T - tail);
  std::string cmd = KATTN_MPIEXEC;
  for (const auto& a : baseArgs(dir, "float64")) cmd += " " + shellQuote(a);
  cmd += " --mpi --state-out " + shellQuote(dir.file("state")) + " 2>" +
         shellQuote(dir.file("stderr.txt"));
  ASSERT_EQ(std::system(cmd.c_str()), 0) << readAll(dir.file("stderr.txt"));
  const auto prefill = SafeTensors::load(dir.file("out.safetensors"));
  EXPECT_TRUE(prefill.contains("cache/kv") && prefill.contains("cache/k_sum"));
  write(T - tail, tail);
  std::vector<std::string> args = baseArgs(dir, "float64");
  args.insert(args.end(), {"--stream", "--state-in", dir.file("state")});
  expectSuccess(runCli(args, dir));
  const auto got = SafeTensors::load(dir.file("out.safetensors")).tensor<double, 3>("output");
  const auto want = rows(gc.tensor<double, 3>("expected/output"), T - tail, tail);
  EXPECT_LE(kattn_test::relativeError(got, want), toleranceFor("float64"));
}

/// A failure under --mpi is one line, from rank 0 only, with the code of the single-process
/// run; --slices that do not add up is such a failure.
TEST(KattnRunMpi, ErrorsComeFromRankZeroOnce) {
  const GoldenCase gc(kattn_test::caseNames([](const nlohmann::json& c) {
                        return c.at("mode") == "call" && c.at("path") == "causal";
                      }).front());
  TempDir dir("kattn_run_mpi_errors");
  writeLayerFiles(gc, dir);
  SafeTensorsWriter in;
  for (const char* input : {"query", "value", "key", "attention_mask"}) {
    if (gc.has(input)) copyTensor(gc.data, input, in);
  }
  in.write(dir.file("in.safetensors"));
  std::string cmd = KATTN_MPIEXEC;
  for (const auto& a : baseArgs(dir, "float64")) cmd += " " + shellQuote(a);
  cmd += " --mpi --slices 1,2 2>" + shellQuote(dir.file("stderr.txt"));
  const int status = std::system(cmd.c_str());
  EXPECT_NE(status, 0);
  const std::string err = readAll(dir.file("stderr.txt"));
  EXPECT_NE(err.find("--slices: 2 lengths summing to 3"), std::string::npos) << err;
  EXPECT_EQ(err.find("kattn-run:"), err.rfind("kattn-run:")) << "more than one report: " << err;
}
#endif

}  // namespace

#else  // KATTN_RUN_PATH

TEST(KattnRun, NotBuilt) {
  GTEST_SKIP() << "kattn-run is not built (KATTN_BUILD_EXAMPLES=OFF)";
}

#endif  // KATTN_RUN_PATH
