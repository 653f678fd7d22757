// Tests of kattn/io/safetensors.hpp: the golden cases, writer -> reader round trips, exact
// F16/BF16 decoding, and one test per class of malformed input (each builds its bad bytes).

#include "kattn/io/safetensors.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "test_support.hpp"

namespace {

namespace fs = std::filesystem;
using kattn::Index;
using kattn::Tensor;
using kattn::io::DType;
using kattn::io::SafeTensors;
using kattn::io::SafeTensorsWriter;
using Bytes = std::vector<std::uint8_t>;
using kattn_test::TempDir;
using kattn_test::writeAll;

// ---------------------------------------------------------------------------------------
// Helpers

/// A file image with `header` as its JSON and `data` as its data section; `length`
/// overrides the 8-byte header length field.
Bytes makeFile(const std::string& header, const Bytes& data = {},
               std::uint64_t length = std::numeric_limits<std::uint64_t>::max()) {
  const std::uint64_t n = length == std::numeric_limits<std::uint64_t>::max() ? header.size()
                                                                              : length;
  Bytes out(8);
  std::memcpy(out.data(), &n, 8);
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Bytes zeros(std::size_t n) { return Bytes(n, 0); }

/// One F32 entry: `"name":{"dtype":"F32","shape":shape,"data_offsets":[b,e]}` with
/// everything given as raw JSON text, so tests can put anything there.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":" + dtype + ",\"shape\":" + shape +
         ",\"data_offsets\":" + offsets + "}";
}

/// Parses `bytes` expecting std::runtime_error whose message is one line, names the
/// source, and contains every string of `parts`.
void expectParseError(const Bytes& bytes, std::initializer_list<std::string> parts) {
  try {
    (void)SafeTensors::parse(bytes, "bad.safetensors");
    ADD_FAILURE() << "no exception; expected one mentioning " << *parts.begin();
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
    for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

/// Runs `f` expecting std::runtime_error containing every string of `parts`.
template <typename F>
void expectRuntimeError(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning " << *parts.begin();
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
  }
}

template <typename T>
bool sameBits(const T* a, const T* b, Index count) {
  return count == 0 || std::memcmp(a, b, static_cast<std::size_t>(count) * sizeof(T)) == 0;
}

/// Loads tensor `name` of `file` as Scalar with its own rank (1..5), returning the element
/// count, so that every golden tensor goes through the typed conversion path.
template <typename Scalar>
Index loadAnyRank(const SafeTensors& file, const std::string& name) {
  switch (file.info(name).shape.size()) {
    case 1: return file.tensor<Scalar, 1>(name).size();
    case 2: return file.tensor<Scalar, 2>(name).size();
    case 3: return file.tensor<Scalar, 3>(name).size();
    case 4: return file.tensor<Scalar, 4>(name).size();
    case 5: return file.tensor<Scalar, 5>(name).size();
    default: ADD_FAILURE() << name << " has an unexpected rank"; return -1;
  }
}

// ---------------------------------------------------------------------------------------
// Golden cases

TEST(SafeTensorsGolden, EveryCaseMatchesItsJsonShapes) {
  const fs::path dir = KATTN_CASES_DIR;
  ASSERT_TRUE(fs::is_directory(dir)) << dir;
  int files = 0;
  for (const auto& item : fs::directory_iterator(dir)) {
    if (item.path().extension() != ".safetensors") continue;
    ++files;
    SCOPED_TRACE(item.path().filename().string());
    const SafeTensors file = SafeTensors::load(item.path().string());
    fs::path json_path = item.path();
    json_path.replace_extension(".json");
    std::ifstream json_in(json_path);
    ASSERT_TRUE(json_in) << json_path;
    const nlohmann::json spec = nlohmann::json::parse(json_in);
    const auto& tensors = spec.at("tensors");

    std::vector<std::string> expected_names;
    for (const auto& [name, t] : tensors.items()) {
      expected_names.push_back(name);
      ASSERT_TRUE(file.contains(name)) << name;
      const auto& info = file.info(name);
      EXPECT_EQ(info.shape, t.at("shape").get<std::vector<Index>>()) << name;
      EXPECT_EQ(info.dtype, DType::F64) << name;
      EXPECT_TRUE(info.convertible) << name;
      Index elements = 1;
      for (Index d : info.shape) elements *= d;
      EXPECT_EQ(loadAnyRank<double>(file, name), elements) << name;
      EXPECT_EQ(loadAnyRank<float>(file, name), elements) << name;
    }
    std::sort(expected_names.begin(), expected_names.end());
    EXPECT_EQ(file.names(), expected_names);
    ASSERT_TRUE(file.metadata().count("case"));
    EXPECT_EQ(file.metadata().at("case"), spec.at("name").get<std::string>());
  }
  EXPECT_GE(files, 1);
}

TEST(SafeTensorsGolden, KnownShapesAndValues) {
  const std::string path = std::string(KATTN_CASES_DIR) + "/noncausal_elu_noproj.safetensors";
  const SafeTensors file = SafeTensors::load(path);
  const auto query = file.tensor<double, 3>("query", {2, 13, 12});
  EXPECT_EQ(query.dimension(2), 12);
  const auto kernel = file.tensor<double, 3>("attention_output/kernel", {2, 8, -1});
  EXPECT_EQ(kernel.dimension(2), 12);
  const auto bias = file.tensor<float, 1>("attention_output/bias", {12});
  EXPECT_EQ(bias.size(), 12);
  EXPECT_EQ(file.metadata().at("semantics"), "kattn");

  // Values: the first query element read by hand from the file's bytes.
  std::ifstream in(path, std::ios::binary);
  const Bytes raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::uint64_t n;
  std::memcpy(&n, raw.data(), 8);
  const auto& info = file.info("query");
  double first;
  std::memcpy(&first, raw.data() + 8 + n + info.begin, 8);
  EXPECT_EQ(query(0, 0, 0), first);
  const auto query_f = file.tensor<float, 3>("query");
  EXPECT_EQ(query_f(0, 0, 0), static_cast<float>(first));
}

// ---------------------------------------------------------------------------------------
// Round trips

template <typename Scalar>
class SafeTensorsRoundTrip : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
/// Names the typed instances `float` / `double` (and passing it avoids clang's pedantic
/// warning about GoogleTest's empty variadic macro argument).
struct ScalarName {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(SafeTensorsRoundTrip, Scalars, ScalarName);

/// Values that a lossy path would change: signed zeros, subnormals, extremes, infinities
/// and a NaN with a payload, then random normals.
template <typename Scalar, int Rank>
Tensor<Scalar, Rank> sample(const std::array<Index, Rank>& dims, unsigned seed) {
  Tensor<Scalar, Rank> t(dims);
  using L = std::numeric_limits<Scalar>;
  const Scalar special[] = {Scalar(0), -Scalar(0), L::denorm_min(), -L::min(), L::max(),
                            L::lowest(), L::infinity(), -L::infinity(), L::epsilon()};
  std::mt19937 rng(seed);
  std::normal_distribution<Scalar> normal;
  for (Index i = 0; i < t.size(); ++i) {
    t.data()[i] = i < Index(std::size(special)) ? special[i] : normal(rng);
  }
  if (t.size() > Index(std::size(special))) {
    using Bits = std::conditional_t<sizeof(Scalar) == 4, std::uint32_t, std::uint64_t>;
    Bits nan_bits;
    const Scalar nan = L::quiet_NaN();
    std::memcpy(&nan_bits, &nan, sizeof nan);
    nan_bits |= 5;  // a payload
    std::memcpy(t.data() + std::size(special), &nan_bits, sizeof nan);
  }
  return t;
}

TYPED_TEST(SafeTensorsRoundTrip, RanksOneToFourAreBitExact) {
  using Scalar = TypeParam;
  const auto r1 = sample<Scalar, 1>({17}, 1);
  const auto r2 = sample<Scalar, 2>({3, 5}, 2);
  const auto r3 = sample<Scalar, 3>({2, 3, 4}, 3);
  const auto r4 = sample<Scalar, 4>({2, 1, 3, 5}, 4);
  SafeTensorsWriter writer;
  writer.add("r1", r1);
  writer.add("b/r2", r2);
  writer.add("a.r3", r3);
  writer.add("r4", r4);
  writer.setMetadata("format", "pt");
  writer.setMetadata("note", "ünïcode ok");

  const auto check = [&](const SafeTensors& file) {
    EXPECT_EQ(file.names(), (std::vector<std::string>{"a.r3", "b/r2", "r1", "r4"}));
    const DType want = std::is_same_v<Scalar, float> ? DType::F32 : DType::F64;
    EXPECT_EQ(file.info("r4").dtype, want);
    EXPECT_EQ(file.info("r4").shape, (std::vector<Index>{2, 1, 3, 5}));
    const auto g1 = file.template tensor<Scalar, 1>("r1");
    const auto g2 = file.template tensor<Scalar, 2>("b/r2", {3, 5});
    const auto g3 = file.template tensor<Scalar, 3>("a.r3", {-1, 3, -1});
    const auto g4 = file.template tensor<Scalar, 4>("r4");
    EXPECT_TRUE(sameBits(g1.data(), r1.data(), r1.size()));
    EXPECT_TRUE(sameBits(g2.data(), r2.data(), r2.size()));
    EXPECT_TRUE(sameBits(g3.data(), r3.data(), r3.size()));
    EXPECT_TRUE(sameBits(g4.data(), r4.data(), r4.size()));
    EXPECT_EQ(g4.dimension(3), 5);
    EXPECT_EQ(file.metadata(),
              (std::map<std::string, std::string>{{"format", "pt"}, {"note", "ünïcode ok"}}));
  };
  check(SafeTensors::parse(writer.bytes()));

  TempDir dir("kattn_safetensors_test");
  const std::string path = dir.file("round.safetensors");
  writer.write(path);
  check(SafeTensors::load(path));
}

TYPED_TEST(SafeTensorsRoundTrip, MapsScalarsAndEmptyTensors) {
  using Scalar = TypeParam;
  std::vector<Scalar> storage = {1, 2, 3, 4, 5, 6};
  const kattn::TensorMap<Scalar, 2> map(storage.data(), 2, 3);
  const kattn::ConstTensorMap<Scalar, 3> cmap(storage.data(), 1, 3, 2);
  Tensor<Scalar, 0> scalar;
  scalar() = Scalar(-7.5);
  const Tensor<Scalar, 2> empty(0, 4);

  SafeTensorsWriter writer;
  writer.add("map", map);
  writer.add("cmap", cmap);
  writer.add("scalar", scalar);
  writer.add("empty", empty);
  storage[0] = 100;  // add() copied the data.

  const auto file = SafeTensors::parse(writer.bytes());
  const auto m = file.template tensor<Scalar, 2>("map", {2, 3});
  EXPECT_EQ(m(0, 0), Scalar(1));
  EXPECT_EQ(m(1, 2), Scalar(6));
  EXPECT_EQ((file.template tensor<Scalar, 3>("cmap", {1, 3, 2})(0, 2, 1)), Scalar(6));
  EXPECT_TRUE(file.info("scalar").shape.empty());
  EXPECT_EQ((file.template tensor<Scalar, 0>("scalar")()), Scalar(-7.5));
  const auto e = file.template tensor<Scalar, 2>("empty", {0, 4});
  EXPECT_EQ(e.size(), 0);
}

TEST(SafeTensorsRoundTrip, FloatFileReadsAsDoubleExactly) {
  const auto t = sample<float, 2>({4, 6}, 9);
  SafeTensorsWriter writer;
  writer.add("t", t);
  const auto d = SafeTensors::parse(writer.bytes()).tensor<double, 2>("t");
  for (Index i = 0; i < t.size(); ++i) {
    if (std::isnan(t.data()[i])) {
      EXPECT_TRUE(std::isnan(d.data()[i]));
    } else {
      EXPECT_EQ(d.data()[i], static_cast<double>(t.data()[i]));
    }
  }
}

TEST(SafeTensorsRoundTrip, DoubleFileReadsAsFloatRounded) {
  Tensor<double, 1> t(4);
  t.setValues({1.0 / 3.0, 1e300, -1e300, 1e-300});
  SafeTensorsWriter writer;
  writer.add("t", t);
  const auto f = SafeTensors::parse(writer.bytes()).tensor<float, 1>("t");
  EXPECT_EQ(f(0), 1.0f / 3.0f);
  EXPECT_EQ(f(1), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f(2), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(f(3), 0.0f);
}

TEST(SafeTensorsWriter, EmptyFileMatchesReferenceLayout) {
  // The reference writer's bytes for an empty file: length 8, "{}" and six spaces.
  const Bytes expected = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
  EXPECT_EQ(SafeTensorsWriter().bytes(), expected);
  EXPECT_TRUE(SafeTensors::parse(expected).names().empty());
}

TEST(SafeTensorsWriter, DataSectionIsAlignedAndContiguous) {
  SafeTensorsWriter writer;
  writer.add("a", sample<float, 1>({3}, 1));
  writer.add("b", sample<double, 1>({2}, 2));
  const Bytes bytes = writer.bytes();
  std::uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  const auto file = SafeTensors::parse(bytes);
  EXPECT_EQ(file.info("a").begin, 0u);
  EXPECT_EQ(file.info("a").end, 12u);
  EXPECT_EQ(file.info("b").begin, 12u);
  EXPECT_EQ(file.info("b").end, 28u);
  EXPECT_EQ(bytes.size(), 8 + n + 28);
}

TEST(SafeTensorsWriter, RejectsBadNames) {
  SafeTensorsWriter writer;
  const Tensor<float, 1> t(2);
  writer.add("x", t);
  EXPECT_THROW(writer.add("x", t), std::invalid_argument);
  EXPECT_THROW(writer.add("__metadata__", t), std::invalid_argument);
  EXPECT_THROW(writer.add(std::string("bad\xff"), t), std::invalid_argument);
  EXPECT_THROW(writer.setMetadata("k", std::string("\xc3")), std::invalid_argument);
}

TEST(SafeTensorsWriter, WriteFailureNamesThePath) {
  TempDir dir("kattn_safetensors_test");
  const std::string path = dir.file("no/such/dir/out.safetensors");
  expectRuntimeError([&] { SafeTensorsWriter().write(path); }, {"out.safetensors"});
}

// ---------------------------------------------------------------------------------------
// F16 / BF16 decoding

TEST(SafeTensorsHalf, KnownBitPatterns) {
  using kattn::io::detail::halfToFloat;
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(halfToFloat(0x0000), 0.0f);
  EXPECT_FALSE(std::signbit(halfToFloat(0x0000)));
  EXPECT_TRUE(std::signbit(halfToFloat(0x8000)));
  EXPECT_EQ(halfToFloat(0x8000), 0.0f);
  EXPECT_EQ(halfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(halfToFloat(0xc000), -2.0f);
  EXPECT_EQ(halfToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(halfToFloat(0x5640), 100.0f);
  EXPECT_EQ(halfToFloat(0x7bff), 65504.0f);                 // largest finite
  EXPECT_EQ(halfToFloat(0x0400), std::ldexp(1.0f, -14));    // smallest normal
  EXPECT_EQ(halfToFloat(0x0001), std::ldexp(1.0f, -24));    // smallest subnormal
  EXPECT_EQ(halfToFloat(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(halfToFloat(0x03ff), std::ldexp(1023.0f, -24)); // largest subnormal
  EXPECT_EQ(halfToFloat(0x0200), std::ldexp(1.0f, -15));
  EXPECT_EQ(halfToFloat(0x7c00), inf);
  EXPECT_EQ(halfToFloat(0xfc00), -inf);
  EXPECT_TRUE(std::isnan(halfToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(halfToFloat(0x7c01)));  // signalling NaN stays a NaN
  EXPECT_TRUE(std::signbit(halfToFloat(0xfe00)));
  std::uint32_t bits;
  const float snan = halfToFloat(0x7c01);
  std::memcpy(&bits, &snan, 4);
  EXPECT_EQ(bits, 0x7f802000u);  // payload kept, moved to the top of the float mantissa
}

TEST(SafeTensorsHalf, AllBitPatternsMatchTheDefinition) {
  using kattn::io::detail::halfToFloat;
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float got = halfToFloat(static_cast<std::uint16_t>(h));
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x3ff;
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exponent == 0x1f) {
      EXPECT_EQ(std::isnan(got), mantissa != 0) << h;
      if (mantissa == 0) {
        EXPECT_EQ(got, sign * std::numeric_limits<double>::infinity()) << h;
      }
    } else {
      const double want = exponent == 0 ? sign * std::ldexp(mantissa, -24)
                                        : sign * std::ldexp(1024 + mantissa, exponent - 25);
      ASSERT_EQ(static_cast<double>(got), want) << h;
    }
    EXPECT_EQ(std::signbit(got), (h & 0x8000) != 0) << h;
  }
}

TEST(SafeTensorsBFloat16, KnownAndAllBitPatterns) {
  using kattn::io::detail::bfloat16ToFloat;
  EXPECT_EQ(bfloat16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(bfloat16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(bfloat16ToFloat(0x4049), 3.140625f);
  EXPECT_EQ(bfloat16ToFloat(0x7f7f), 3.38953139e38f);             // largest finite
  EXPECT_EQ(bfloat16ToFloat(0x0080), std::numeric_limits<float>::min());
  EXPECT_EQ(bfloat16ToFloat(0x0001), std::ldexp(1.0f, -133));     // smallest subnormal
  EXPECT_EQ(bfloat16ToFloat(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_EQ(bfloat16ToFloat(0xff80), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(bfloat16ToFloat(0x7fc0)));
  EXPECT_TRUE(std::signbit(bfloat16ToFloat(0x8000)));
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const float got = bfloat16ToFloat(static_cast<std::uint16_t>(b));
    std::uint32_t bits;
    std::memcpy(&bits, &got, 4);
    ASSERT_EQ(bits, b << 16) << b;
  }
}

TEST(SafeTensorsHalf, FileWithF16AndBF16Tensors) {
  const std::vector<std::uint16_t> half = {0x3c00, 0xc000, 0x0001, 0x7c00, 0x7bff, 0x8000};
  const std::vector<std::uint16_t> bf16 = {0x3f80, 0xc000, 0x0001, 0xff80};
  Bytes data(2 * (half.size() + bf16.size()));
  std::memcpy(data.data(), half.data(), 2 * half.size());
  std::memcpy(data.data() + 2 * half.size(), bf16.data(), 2 * bf16.size());
  const std::string header = "{" + entry("h", "\"F16\"", "[2,3]", "[0,12]") + "," +
                             entry("b", "\"BF16\"", "[4]", "[12,20]") + "}";
  const auto file = SafeTensors::parse(makeFile(header, data));
  EXPECT_EQ(file.info("h").dtype, DType::F16);
  EXPECT_EQ(file.info("b").dtype, DType::BF16);
  const auto h = file.tensor<float, 2>("h", {2, 3});
  EXPECT_EQ(h(0, 0), 1.0f);
  EXPECT_EQ(h(0, 1), -2.0f);
  EXPECT_EQ(h(0, 2), std::ldexp(1.0f, -24));
  EXPECT_EQ(h(1, 0), std::numeric_limits<float>::infinity());
  EXPECT_EQ(h(1, 1), 65504.0f);
  EXPECT_TRUE(std::signbit(h(1, 2)));
  const auto hd = file.tensor<double, 2>("h");
  EXPECT_EQ(hd(0, 2), std::ldexp(1.0, -24));
  const auto b = file.tensor<double, 1>("b");
  EXPECT_EQ(b(0), 1.0);
  EXPECT_EQ(b(1), -2.0);
  EXPECT_EQ(b(2), std::ldexp(1.0, -133));
  EXPECT_EQ(b(3), -std::numeric_limits<double>::infinity());
}

TEST(SafeTensorsHalf, UnalignedDataIsRead) {
  // One-byte tensor first puts the F32 data at an odd offset.
  Bytes data = {7};
  const float value = 1.5f;
  data.resize(5);
  std::memcpy(data.data() + 1, &value, 4);
  const std::string header = "{" + entry("pad", "\"U8\"", "[1]", "[0,1]") + "," +
                             entry("x", "\"F32\"", "[1]", "[1,5]") + "}";
  const auto x = SafeTensors::parse(makeFile(header, data)).tensor<float, 1>("x");
  EXPECT_EQ(x(0), 1.5f);
}

// ---------------------------------------------------------------------------------------
// Malformed input, one test per class

TEST(SafeTensorsMalformed, ShorterThanEightBytes) {
  for (std::size_t n = 0; n < 8; ++n) expectParseError(zeros(n), {"shorter than the 8-byte"});
}

TEST(SafeTensorsMalformed, HeaderLengthBeyondFile) {
  const std::string header = "{}";
  expectParseError(makeFile(header, {}, 3), {"header length 3", "exceeds"});
  expectParseError(makeFile(header, {}, std::numeric_limits<std::uint64_t>::max() - 1),
                   {"exceeds"});
  expectParseError(makeFile(header, {}, std::uint64_t(1) << 62), {"exceeds"});

  // Through load(): a forged length must fail from the file size, before any allocation.
  TempDir dir("kattn_safetensors_test");
  const std::string path = dir.file("forged.safetensors");
  writeAll(path, makeFile(header, {}, std::uint64_t(1) << 60));
  expectRuntimeError([&] { (void)SafeTensors::load(path); }, {"forged.safetensors", "exceeds"});
  writeAll(path, zeros(5));
  expectRuntimeError([&] { (void)SafeTensors::load(path); }, {"forged.safetensors", "shorter"});
}

TEST(SafeTensorsMalformed, LoadErrorsNameThePath) {
  TempDir dir("kattn_safetensors_test");
  expectRuntimeError([&] { (void)SafeTensors::load(dir.file("absent.safetensors")); },
                     {"absent.safetensors"});
  expectRuntimeError([&] { (void)SafeTensors::load(dir.file("")); }, {"kattn_safetensors_test"});
}

TEST(SafeTensorsMalformed, HeaderNotJson) {
  expectParseError(makeFile(""), {"not valid JSON"});
  expectParseError(makeFile("{"), {"not valid JSON"});
  expectParseError(makeFile("{\"a\":}"), {"not valid JSON"});
  expectParseError(makeFile("{} trailing"), {"not valid JSON"});
  expectParseError(makeFile(std::string("{\"a\0\":1}", 8)), {"not valid JSON"});
  expectParseError(makeFile("{\"\xff\xfe\":{}}"), {"not valid JSON"});  // invalid UTF-8
  // The parser's excerpt of the bad text is escaped: a newline cannot split the message.
  expectParseError(makeFile("{\"a\":\n\nnonsense}"), {"not valid JSON"});
}

TEST(SafeTensorsMalformed, HeaderNotObject) {
  expectParseError(makeFile("[]"), {"header is a JSON array", "expected an object"});
  expectParseError(makeFile("42"), {"expected an object"});
  expectParseError(makeFile("\"text\""), {"expected an object"});
  expectParseError(makeFile("null"), {"expected an object"});
}

TEST(SafeTensorsMalformed, EntryMissingField) {
  expectParseError(makeFile("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", zeros(4)),
                   {"tensor 'w'", "no \"dtype\""});
  expectParseError(makeFile("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", zeros(4)),
                   {"tensor 'w'", "no \"shape\""});
  expectParseError(makeFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", zeros(4)),
                   {"tensor 'w'", "no \"data_offsets\""});
}

TEST(SafeTensorsMalformed, EntryWrongJsonTypes) {
  const auto bad = [](const std::string& dtype, const std::string& shape,
                      const std::string& offsets, std::initializer_list<std::string> parts) {
    expectParseError(makeFile("{" + entry("w", dtype, shape, offsets) + "}", zeros(8)), parts);
  };
  bad("32", "[2]", "[0,8]", {"tensor 'w'", "dtype is a JSON integer"});
  bad("[\"F32\"]", "[2]", "[0,8]", {"dtype is a JSON array"});
  bad("\"F32\"", "2", "[0,8]", {"shape is a JSON integer"});
  bad("\"F32\"", "{}", "[0,8]", {"shape is a JSON object"});
  bad("\"F32\"", "[2.0]", "[0,8]", {"shape[0] is a JSON non-integer number"});
  bad("\"F32\"", "[\"2\"]", "[0,8]", {"shape[0] is a JSON string"});
  bad("\"F32\"", "[2]", "\"0-8\"", {"data_offsets is a JSON string"});
  bad("\"F32\"", "[2]", "[0]", {"data_offsets is a JSON array of 1 elements"});
  bad("\"F32\"", "[2]", "[0,8,8]", {"array of 3 elements"});
  bad("\"F32\"", "[2]", "[0,\"8\"]", {"data_offsets[1] is a JSON string"});
  bad("\"F32\"", "[2]", "[0,8.0]", {"data_offsets[1] is a JSON non-integer number"});
  bad("\"F32\"", "[2]", "[-8,8]", {"data_offsets[0] is negative"});
  expectParseError(makeFile("{\"w\":[1,2]}"), {"tensor 'w'", "entry is a JSON array"});
  expectParseError(makeFile("{\"w\":null}"), {"tensor 'w'", "entry is a JSON null"});
  expectParseError(makeFile("{\"__metadata__\":[]}"), {"__metadata__ is a JSON array"});
  expectParseError(makeFile("{\"__metadata__\":{\"k\":1}}"),
                   {"__metadata__ entry 'k' is a JSON integer", "expected a string"});
}

TEST(SafeTensorsMalformed, UnknownDtype) {
  for (const char* dtype : {"\"F128\"", "\"f32\"", "\"\"", "\"FLOAT\""}) {
    expectParseError(makeFile("{" + entry("w", dtype, "[1]", "[0,4]") + "}", zeros(4)),
                     {"tensor 'w'", "unknown dtype", "F64, F32, F16, BF16"});
  }
}

TEST(SafeTensorsMalformed, OtherDtypesAreMetadataOnly) {
  Bytes data = zeros(8 + 3 + 2);
  const std::string header = "{" + entry("ids", "\"I64\"", "[1]", "[0,8]") + "," +
                             entry("mask", "\"U8\"", "[3]", "[8,11]") + "," +
                             entry("q4", "\"F4\"", "[2,2]", "[11,13]") + "," +
                             entry("w", "\"F32\"", "[0]", "[13,13]") + "}";
  const auto file = SafeTensors::parse(makeFile(header, data), "meta.safetensors");
  EXPECT_EQ(file.names(), (std::vector<std::string>{"ids", "mask", "q4", "w"}));
  EXPECT_FALSE(file.info("ids").convertible);
  EXPECT_EQ(file.info("ids").dtype_name, "I64");
  EXPECT_EQ(file.info("mask").shape, (std::vector<Index>{3}));
  EXPECT_TRUE(file.info("w").convertible);
  expectRuntimeError([&] { (void)file.tensor<float, 1>("ids"); },
                     {"meta.safetensors", "tensor 'ids'", "dtype I64", "F64, F32, F16, BF16"});
  expectRuntimeError([&] { (void)file.tensor<double, 1>("mask", {3}); }, {"dtype U8"});

  // Their sizes are still checked: 3 U8 elements are 3 bytes, 3 F4 elements are not whole bytes.
  expectParseError(makeFile("{" + entry("m", "\"U8\"", "[3]", "[0,4]") + "}", zeros(4)),
                   {"tensor 'm'", "hold 4 bytes", "needs 3 bytes"});
  expectParseError(makeFile("{" + entry("q", "\"F4\"", "[3]", "[0,2]") + "}", zeros(2)),
                   {"tensor 'q'", "12 bits (not whole bytes)"});
}

TEST(SafeTensorsMalformed, NegativeDims) {
  expectParseError(makeFile("{" + entry("w", "\"F32\"", "[2,-1]", "[0,8]") + "}", zeros(8)),
                   {"tensor 'w'", "shape[1] is negative (-1)"});
  expectParseError(
      makeFile("{" + entry("w", "\"F32\"", "[-9223372036854775808]", "[0,8]") + "}", zeros(8)),
      {"shape[0] is negative"});
}

TEST(SafeTensorsMalformed, ShapeProductOverflow) {
  expectParseError(
      makeFile("{" + entry("w", "\"F32\"", "[4294967296,4294967296]", "[0,8]") + "}", zeros(8)),
      {"tensor 'w'", "more elements than an Index can count"});
  // A dim beyond Index itself.
  expectParseError(
      makeFile("{" + entry("w", "\"F32\"", "[18446744073709551615]", "[0,8]") + "}", zeros(8)),
      {"tensor 'w'", "shape[0]", "exceeds"});
  // A zero dim does not excuse the others: code downstream multiplies partial shapes.
  expectParseError(
      makeFile("{" + entry("w", "\"F32\"", "[0,4294967296,4294967296]", "[0,0]") + "}"),
      {"more elements than an Index can count"});
  // Elements fit an Index but their byte count does not fit 64 bits.
  expectParseError(
      makeFile("{" + entry("w", "\"F64\"", "[4611686018427387904]", "[0,8]") + "}", zeros(8)),
      {"tensor 'w'", "more than 2^64 bits"});
  // Elements x size wraps to exactly the byte count given (2^62 F32 = 2^64 bytes = 0 mod 2^64).
  expectParseError(
      makeFile("{" + entry("w", "\"F32\"", "[4611686018427387904]", "[0,0]") + "}"),
      {"tensor 'w'", "more than 2^64 bits"});
}

TEST(SafeTensorsMalformed, BeginAfterEnd) {
  expectParseError(makeFile("{" + entry("w", "\"F32\"", "[1]", "[8,4]") + "}", zeros(8)),
                   {"tensor 'w'", "data_offsets [8, 4] begin after end"});
}

TEST(SafeTensorsMalformed, EndBeyondDataSection) {
  expectParseError(makeFile("{" + entry("w", "\"F32\"", "[2]", "[0,8]") + "}", zeros(7)),
                   {"tensor 'w'", "end beyond the data section of 7 bytes"});
  expectParseError(
      makeFile("{" + entry("w", "\"F32\"", "[1]", "[18446744073709551612,18446744073709551615]") +
               "}", zeros(4)),
      {"end beyond"});
}

TEST(SafeTensorsMalformed, ByteCountMismatch) {
  expectParseError(makeFile("{" + entry("w", "\"F32\"", "[2,3]", "[0,20]") + "}", zeros(24)),
                   {"tensor 'w'", "hold 20 bytes", "shape [2, 3] of dtype F32 needs 24 bytes"});
  expectParseError(makeFile("{" + entry("w", "\"F64\"", "[]", "[0,4]") + "}", zeros(8)),
                   {"needs 8 bytes"});
  expectParseError(makeFile("{" + entry("w", "\"F16\"", "[0]", "[0,2]") + "}", zeros(2)),
                   {"needs 0 bytes"});
}

TEST(SafeTensorsMalformed, OverlappingTensors) {
  expectParseError(makeFile("{" + entry("a", "\"F32\"", "[4]", "[0,16]") + "," +
                            entry("b", "\"F32\"", "[4]", "[8,24]") + "}", zeros(24)),
                   {"tensor 'b'", "overlap tensor 'a'"});
  expectParseError(makeFile("{" + entry("a", "\"F32\"", "[2]", "[0,8]") + "," +
                            entry("b", "\"F32\"", "[2]", "[0,8]") + "}", zeros(8)),
                   {"overlap"});
  // A tensor nested inside a bigger one.
  expectParseError(makeFile("{" + entry("a", "\"U8\"", "[16]", "[0,16]") + "," +
                            entry("b", "\"U8\"", "[2]", "[2,4]") + "," +
                            entry("c", "\"U8\"", "[2]", "[10,12]") + "}", zeros(16)),
                   {"overlap"});
  // Empty tensors occupy no bytes; gaps and trailing bytes are accepted (documented).
  const auto file = SafeTensors::parse(
      makeFile("{" + entry("a", "\"F32\"", "[2]", "[0,8]") + "," +
               entry("e", "\"F32\"", "[0,3]", "[4,4]") + "," +
               entry("b", "\"F32\"", "[1]", "[12,16]") + "}", zeros(20)));
  EXPECT_EQ(file.names().size(), 3u);
}

TEST(SafeTensorsMalformed, DuplicateNames) {
  expectParseError(makeFile("{" + entry("w", "\"F32\"", "[1]", "[0,4]") + "," +
                            entry("w", "\"F32\"", "[1]", "[4,8]") + "}", zeros(8)),
                   {"duplicate key 'w'", "a tensor listed twice"});
  expectParseError(
      makeFile("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,4]}}",
               zeros(8)),
      {"duplicate key 'dtype'"});
  expectParseError(makeFile("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}"),
                   {"duplicate key 'k'"});
  expectParseError(makeFile("{\"__metadata__\":{},\"__metadata__\":{}}"),
                   {"duplicate key '__metadata__'"});
}

TEST(SafeTensorsMalformed, DeepNesting) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  expectParseError(makeFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],"
                            "\"extra\":" + deep + "}}", zeros(4)),
                   {"deeper than"});
  // Unknown fields at modest depth are ignored.
  EXPECT_NO_THROW((void)SafeTensors::parse(
      makeFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],"
               "\"extra\":{\"a\":[1,{\"b\":null}]}}}", zeros(4))));
}

TEST(SafeTensorsMalformed, HostileNamesStayOnOneLine) {
  const std::string name = "evil\\nINFO fake log line\\u0007";
  expectParseError(makeFile("{" + entry(name, "\"F99\"", "[1]", "[0,4]") + "}", zeros(4)),
                   {"evil\\x0aINFO fake log line\\x07'"});
  const std::string huge(5000, 'x');
  try {
    (void)SafeTensors::parse(makeFile("{" + entry(huge, "\"F99\"", "[1]", "[0,4]") + "}", zeros(4)));
    ADD_FAILURE();
  } catch (const std::runtime_error& e) {
    EXPECT_LT(std::string(e.what()).size(), 600u) << e.what();
    EXPECT_NE(std::string(e.what()).find("(5000 bytes)"), std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------
// Requests that do not match the file

TEST(SafeTensorsRequest, MissingTensor) {
  const auto file = SafeTensors::parse(makeFile("{}"));
  expectRuntimeError([&] { (void)file.info("nope"); }, {"missing tensor 'nope' in '<memory>'"});
  expectRuntimeError([&] { (void)file.tensor<float, 1>("nope"); }, {"missing tensor 'nope'"});
  EXPECT_FALSE(file.contains("nope"));
}

TEST(SafeTensorsRequest, RankAndShapeMismatch) {
  SafeTensorsWriter writer;
  writer.add("w", Tensor<double, 3>(2, 3, 4));
  const auto file = SafeTensors::parse(writer.bytes(), "w.safetensors");
  expectRuntimeError([&] { (void)file.tensor<double, 2>("w"); },
                     {"w.safetensors", "tensor 'w'", "expected rank 2", "got shape [2, 3, 4]"});
  expectRuntimeError([&] { (void)file.tensor<float, 3>("w", {2, -1, 5}); },
                     {"w.safetensors", "tensor 'w'", "expected shape [2, *, 5]",
                      "got [2, 3, 4]"});
  expectRuntimeError([&] { (void)file.tensor<float, 2>("w", {2, 3}); },
                     {"expected shape [2, 3]", "got [2, 3, 4]"});
  const auto any = file.tensor<float, 3>("w", {-1, -1, -1});
  EXPECT_EQ(any.size(), 24);
}

}  // namespace
