// Tests of kattn/random/philox.hpp and kattn/projection.hpp against values TensorFlow printed
// (golden_tf.json) and the reference layer's projections (proj_*.json), both in
// KATTN_TF_PROJECTION_DIR. Integers and float32 bit patterns must match exactly; projections
// within 2e-5 relative (max-abs error over max-abs of the float64-QR target).

#include "kattn/projection.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace {

namespace fs = std::filesystem;
using kattn::Index;
using kattn::Matrix;
using kattn::random::PhiloxCounter;
using kattn::random::PhiloxKey;
using kattn::random::SeedPair;

constexpr double kProjectionTolerance = 2e-5;

fs::path dataDir() { return fs::path(KATTN_TF_PROJECTION_DIR); }

nlohmann::json loadJson(const fs::path& path) {
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error("cannot open " + path.string());
  }
  return nlohmann::json::parse(in);
}

std::uint32_t parseHex(const std::string& s) {
  return static_cast<std::uint32_t>(std::stoul(s, nullptr, 16));
}

std::uint32_t floatBits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

float bitsToFloat(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

SeedPair seedFromJson(const nlohmann::json& j) {
  return SeedPair{j.at(0).get<std::int64_t>(), j.at(1).get<std::int64_t>()};
}

// ---------------------------------------------------------------------------------------
// Philox and the TF-compatible stateless generator

TEST(Philox, KnownAnswerVectors) {
  const nlohmann::json golden = loadJson(dataDir() / "golden_tf.json");
  const nlohmann::json& kats = golden.at("philox4x32_10_kat");
  ASSERT_EQ(kats.size(), 3u);
  for (const nlohmann::json& kat : kats) {
    PhiloxCounter ctr{};
    PhiloxKey key{};
    PhiloxCounter expected{};
    for (std::size_t i = 0; i < 4; ++i) ctr[i] = parseHex(kat.at("counter").at(i));
    for (std::size_t i = 0; i < 2; ++i) key[i] = parseHex(kat.at("key").at(i));
    for (std::size_t i = 0; i < 4; ++i) expected[i] = parseHex(kat.at("output").at(i));
    EXPECT_EQ(kattn::random::philox4x32x10(ctr, key), expected) << kat.dump();
  }
}

TEST(Philox, IsConstexpr) {
  constexpr PhiloxCounter out = kattn::random::philox4x32x10({0, 0, 0, 0}, {0, 0});
  static_assert(out[0] == 0x6627e8d5u && out[3] == 0x9b00dbd8u,
                "philox4x32x10 must be usable in constant expressions.");
  SUCCEED();
}

TEST(Philox, CounterAddCarriesAcrossWords) {
  using kattn::random::addToCounter;
  EXPECT_EQ(addToCounter({1, 2, 3, 4}, 0), (PhiloxCounter{1, 2, 3, 4}));
  EXPECT_EQ(addToCounter({0xFFFFFFFFu, 0, 0, 0}, 1), (PhiloxCounter{0, 1, 0, 0}));
  EXPECT_EQ(addToCounter({0xFFFFFFFFu, 0xFFFFFFFFu, 5, 0}, 1), (PhiloxCounter{0, 0, 6, 0}));
  EXPECT_EQ(addToCounter({0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 7}, 1),
            (PhiloxCounter{0, 0, 0, 8}));
  EXPECT_EQ(addToCounter({0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, 1),
            (PhiloxCounter{0, 0, 0, 0}));
  EXPECT_EQ(addToCounter({2, 0xFFFFFFFFu, 0, 0}, 0xFFFFFFFFFFFFFFFFull),
            (PhiloxCounter{1, 0xFFFFFFFFu, 1, 0}));
}

TEST(StatelessPhilox, SplitMatchesTensorFlow) {
  const nlohmann::json golden = loadJson(dataDir() / "golden_tf.json");
  const nlohmann::json& expected = golden.at("stateless_split_seed_1_2_num_3_int32");
  const std::vector<SeedPair> split = kattn::random::statelessSplit(SeedPair{1, 2}, 3);
  ASSERT_EQ(split.size(), expected.size());
  for (std::size_t i = 0; i < split.size(); ++i) {
    EXPECT_EQ(split[i], seedFromJson(expected.at(i))) << "row " << i;
  }
  // The first split row is the next seed of the projection chain (golden's _note_seed_chain).
  EXPECT_EQ(kattn::random::nextSeed(SeedPair{1, 2}), seedFromJson(expected.at(0)));
}

TEST(StatelessPhilox, FoldInMatchesTensorFlow) {
  const nlohmann::json golden = loadJson(dataDir() / "golden_tf.json");
  EXPECT_EQ(kattn::random::statelessFoldIn(SeedPair{1, 2}, 3),
            seedFromJson(golden.at("stateless_fold_in_seed_1_2_data_3")));
}

TEST(StatelessPhilox, NormalMatchesTensorFlowToPrintedDigits) {
  const nlohmann::json golden = loadJson(dataDir() / "golden_tf.json");
  const nlohmann::json& cases = golden.at("stateless_normal_float32");
  ASSERT_FALSE(cases.empty());
  for (const nlohmann::json& c : cases) {
    const SeedPair seed = seedFromJson(c.at("seed"));
    const std::size_t n = c.at("shape").at(0).get<std::size_t>();
    const std::vector<float> got = kattn::random::statelessNormalFloat(seed, n);
    ASSERT_EQ(got.size(), c.at("values").size());
    for (std::size_t i = 0; i < n; ++i) {
      // TF prints through numpy: the shortest decimal that reads back as the same float32,
      // cut to at most 8 digits after the point (correctly rounded). So either the printed
      // number reads back as the sample, or the sample rounded to 8 decimals is the number.
      const double printed = c.at("values").at(i).get<double>();
      char rounded[64];
      std::snprintf(rounded, sizeof rounded, "%.8f", static_cast<double>(got[i]));
      const bool readsBack = floatBits(static_cast<float>(printed)) == floatBits(got[i]);
      const bool roundsTo = std::strtod(rounded, nullptr) == printed;
      EXPECT_TRUE(readsBack || roundsTo)
          << c.dump() << " index " << i << ": got " << got[i];
    }
  }
}

TEST(StatelessPhilox, ShorterOutputsArePrefixes) {
  const SeedPair seed{7, -3};
  const std::vector<float> longer = kattn::random::statelessNormalFloat(seed, 13);
  for (std::size_t n : {0u, 1u, 3u, 4u, 5u, 8u, 11u}) {
    const std::vector<float> shorter = kattn::random::statelessNormalFloat(seed, n);
    ASSERT_EQ(shorter.size(), n);
    for (std::size_t i = 0; i < n; ++i) EXPECT_EQ(floatBits(shorter[i]), floatBits(longer[i]));
  }
  std::vector<std::int32_t> ints(6);
  kattn::random::StatelessPhilox(seed).uniformFullInt32(ints.data(), ints.size());
  const PhiloxCounter b0 = kattn::random::StatelessPhilox(seed).block(0);
  const PhiloxCounter b1 = kattn::random::StatelessPhilox(seed).block(1);
  EXPECT_EQ(static_cast<std::uint32_t>(ints[3]), b0[3]);
  EXPECT_EQ(static_cast<std::uint32_t>(ints[4]), b1[0]);
}

TEST(StatelessPhilox, Int32SeedsAreSignExtended) {
  // TF sign-extends int32 seed values before scrambling them: seed -1 is the 64-bit word
  // 0xFFFFFFFFFFFFFFFF, not 0x00000000FFFFFFFF.
  const kattn::random::StatelessPhilox negative(SeedPair{-1, -5});
  const kattn::random::StatelessPhilox unsignedView(SeedPair{0xFFFFFFFFll, 0xFFFFFFFBll});
  EXPECT_NE(negative.key(), unsignedView.key());
  const PhiloxCounter mix = kattn::random::philox4x32x10(
      {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFBu, 0xFFFFFFFFu},
      kattn::random::StatelessPhilox::kScrambleKey);
  EXPECT_EQ(negative.key(), (PhiloxKey{mix[0], mix[1]}));
  EXPECT_EQ(negative.counter(), (PhiloxCounter{0, 0, mix[2], mix[3]}));
}

// Box–Muller with every intermediate forced through a volatile float or double, so that it
// is rounded exactly as TF's source reads whatever the compiler's contraction settings.
void strictBoxMuller(std::uint32_t x0, std::uint32_t x1, float& f0, float& f1) {
  volatile float u1 = kattn::random::uint32ToFloat(x0);
  if (u1 < 1.0e-7f) u1 = 1.0e-7f;
  volatile float u2 = kattn::random::uint32ToFloat(x1);
  volatile double angle = 2.0 * 3.14159265358979323846 * static_cast<double>(u2);
  volatile float v1 = static_cast<float>(angle);
  volatile float lg = std::log(static_cast<float>(u1));
  volatile float t = -2.0f * lg;
  volatile float r = std::sqrt(static_cast<float>(t));
  float ss;
  float cc;
#if defined(__GLIBC__) && defined(__USE_GNU)
  ::sincosf(v1, &ss, &cc);
#else
  ss = std::sin(static_cast<float>(v1));
  cc = std::cos(static_cast<float>(v1));
#endif
  volatile float s = ss;
  volatile float c = cc;
  volatile float p0 = s * r;
  volatile float p1 = c * r;
  f0 = p0;
  f1 = p1;
}

TEST(StatelessPhilox, BoxMullerIsImmuneToContraction) {
  // Built with -march=native or -ffp-contract=fast this still must hold: boxMullerFloat has no
  // multiply-add to fuse, so it agrees with the volatile, step-by-step version everywhere.
  std::vector<std::uint32_t> words = {0u,          1u,          0x7FFFFFu,   0x800000u,
                                      0xFFFFFFFFu, 0x00000003u, 0x3FFFFFu,   0x400000u,
                                      0x12345678u, 0x87654321u, 0x7FFFFEu,   0x00000100u};
  const kattn::random::StatelessPhilox gen(SeedPair{2024, 11});
  for (std::uint64_t g = 0; g < 50000; ++g) {
    const PhiloxCounter w = gen.block(g);
    words.insert(words.end(), w.begin(), w.end());
  }
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i + 1 < words.size(); ++i) {
    float a0, a1, b0, b1;
    kattn::random::boxMullerFloat(words[i], words[i + 1], a0, a1);
    strictBoxMuller(words[i], words[i + 1], b0, b1);
    if (floatBits(a0) != floatBits(b0) || floatBits(a1) != floatBits(b1)) {
      if (++mismatches <= 5) {
        ADD_FAILURE() << "words " << words[i] << ", " << words[i + 1] << ": " << a0 << ", "
                      << a1 << " vs strict " << b0 << ", " << b1;
      }
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST(StatelessPhilox, BoxMullerClampsTinyUniforms) {
  // u1 = 0 is raised to 1e-7f, so the radius is finite: sqrt(-2 ln 1e-7) ~ 5.678.
  float f0, f1;
  kattn::random::boxMullerFloat(0u, 0u, f0, f1);  // angle 0: sin 0, cos 1
  EXPECT_EQ(f0, 0.0f);
  EXPECT_NEAR(f1, std::sqrt(-2.0 * std::log(1.0e-7)), 1e-5);
}

// ---------------------------------------------------------------------------------------
// Projections against the reference layer's draws

std::vector<std::string> projectionFiles() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dataDir(), ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("proj_", 0) == 0 && e.path().extension() == ".json") names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST(ProjectionData, FilesArePresent) {
  EXPECT_GE(projectionFiles().size(), 8u) << "expected the proj_*.json files in " << dataDir();
}

template <typename Scalar>
double relativeError(const Matrix<Scalar>& got, const std::vector<double>& target, Index m,
                     Index d) {
  double maxErr = 0.0;
  double maxAbs = 0.0;
  for (Index i = 0; i < m; ++i) {
    for (Index j = 0; j < d; ++j) {
      const double t = target[static_cast<std::size_t>(i * d + j)];
      maxErr = std::max(maxErr, std::abs(static_cast<double>(got(i, j)) - t));
      maxAbs = std::max(maxAbs, std::abs(t));
    }
  }
  return maxErr / maxAbs;
}

class ProjectionFile : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    data = loadJson(dataDir() / GetParam());
    m = data.at("m").get<Index>();
    d = data.at("d").get<Index>();
    seed = data.at("seed").get<std::int64_t>();
  }
  nlohmann::json data;
  Index m = 0;
  Index d = 0;
  std::int64_t seed = 0;
};

TEST_P(ProjectionFile, SeedChainIsExact) {
  const kattn::detail::ProjectionDraws draws =
      kattn::detail::drawProjectionNormals(m, d, SeedPair{seed, seed + 1});
  const nlohmann::json& seeds = data.at("seeds_int32");
  ASSERT_EQ(draws.seeds.size(), seeds.size());
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    EXPECT_EQ(draws.seeds[i], seedFromJson(seeds.at(i))) << "chain entry " << i;
  }
}

TEST_P(ProjectionFile, NormalBitsAreExact) {
  const kattn::detail::ProjectionDraws draws =
      kattn::detail::drawProjectionNormals(m, d, SeedPair{seed, seed + 1});
  const nlohmann::json& blocks = data.at("unstructured_blocks_f32_bits");
  ASSERT_EQ(draws.blocks.size(), blocks.size());
  std::size_t mismatches = 0;
  std::size_t total = 0;
  auto compare = [&](const std::vector<float>& got, const nlohmann::json& bits,
                     const std::string& what) {
    ASSERT_EQ(got.size(), bits.size()) << what;
    for (std::size_t i = 0; i < got.size(); ++i) {
      ++total;
      const std::uint32_t want = bits.at(i).get<std::uint32_t>();
      if (floatBits(got[i]) != want && ++mismatches <= 5) {
        ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << " (0x" << std::hex
                      << floatBits(got[i]) << "), want " << bitsToFloat(want) << " (0x" << want
                      << std::dec << ")";
      }
    }
  };
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    compare(draws.blocks[b], blocks.at(b), "block " + std::to_string(b));
  }
  compare(draws.multiplierNormals, data.at("multiplier_normals_f32_bits"), "multipliers");
  EXPECT_EQ(mismatches, 0u) << "of " << total << " normals";
}

TEST_P(ProjectionFile, FloatProjectionMatchesReference) {
  const std::vector<double> target = data.at("projection_qr_float64").get<std::vector<double>>();
  const Matrix<float> p = kattn::randomProjection<float>(m, d, seed);
  ASSERT_EQ(p.rows(), m);
  ASSERT_EQ(p.cols(), d);
  const double err = relativeError(p, target, m, d);
  EXPECT_LE(err, kProjectionTolerance);
  RecordProperty("relative_error_float", std::to_string(err));
}

TEST_P(ProjectionFile, DoubleProjectionMatchesReference) {
  const std::vector<double> target = data.at("projection_qr_float64").get<std::vector<double>>();
  const Matrix<double> p = kattn::randomProjection<double>(m, d, seed);
  ASSERT_EQ(p.rows(), m);
  ASSERT_EQ(p.cols(), d);
  const double err = relativeError(p, target, m, d);
  EXPECT_LE(err, kProjectionTolerance);
  // The target is this very computation in double, so only QR rounding separates them
  // (observed <= 7e-15); a far looser bound than that still catches any wrong convention.
  EXPECT_LE(err, 1e-12);
  RecordProperty("relative_error_double", std::to_string(err));
}

TEST_P(ProjectionFile, RowsAreOrthogonalWithinBlocks) {
  const Matrix<double> p = kattn::randomProjection<double>(m, d, seed);
  for (Index first = 0; first < m; first += d) {
    const Index rows = std::min(d, m - first);
    Matrix<double> block = p.middleRows(first, rows);
    for (Index i = 0; i < rows; ++i) block.row(i).normalize();
    const Matrix<double> gram = block * block.transpose();
    EXPECT_LE((gram - Matrix<double>::Identity(rows, rows)).cwiseAbs().maxCoeff(), 1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(TensorFlow, ProjectionFile, ::testing::ValuesIn(projectionFiles()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param.substr(0, info.param.size() - 5);
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

// ---------------------------------------------------------------------------------------
// Determinism, redraws and errors

template <typename Scalar>
class ProjectionTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
struct ScalarName {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same<T, float>::value ? "float" : "double";
  }
};
TYPED_TEST_SUITE(ProjectionTyped, Scalars, ScalarName);

TYPED_TEST(ProjectionTyped, SameSeedGivesIdenticalMatrix) {
  const Matrix<TypeParam> a = kattn::randomProjection<TypeParam>(40, 16, 123);
  const Matrix<TypeParam> b = kattn::randomProjection<TypeParam>(40, 16, 123);
  EXPECT_TRUE(a == b);
}

TYPED_TEST(ProjectionTyped, DifferentSeedsDiffer) {
  const Matrix<TypeParam> a = kattn::randomProjection<TypeParam>(40, 16, 123);
  const Matrix<TypeParam> b = kattn::randomProjection<TypeParam>(40, 16, 124);
  const Matrix<TypeParam> c = kattn::randomProjection<TypeParam>(40, 16, -123);
  EXPECT_GT((a - b).cwiseAbs().maxCoeff(), TypeParam(0.1));
  EXPECT_GT((a - c).cwiseAbs().maxCoeff(), TypeParam(0.1));
}

TYPED_TEST(ProjectionTyped, IsTheReferenceFunctionOnTheSeedPair) {
  const Matrix<TypeParam> a = kattn::randomProjection<TypeParam>(20, 8, 5);
  const Matrix<TypeParam> b = kattn::createProjectionMatrix<TypeParam>(20, 8, SeedPair{5, 6});
  EXPECT_TRUE(a == b);
}

TYPED_TEST(ProjectionTyped, SeedsBeyondInt32UseTheInt64Pair) {
  // tf.constant([seed, seed + 1]) becomes int64 when seed + 1 overflows int32; TF
  // sign-extends int32 seeds, so the pair's values alone decide the stream.
  constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();
  const Matrix<TypeParam> a = kattn::randomProjection<TypeParam>(12, 4, kInt32Max);
  const Matrix<TypeParam> b =
      kattn::createProjectionMatrix<TypeParam>(12, 4, SeedPair{kInt32Max, kInt32Max + 1});
  EXPECT_TRUE(a == b);
  const Matrix<TypeParam> c = kattn::randomProjection<TypeParam>(12, 4, kInt32Max - 1);
  EXPECT_FALSE(a == c);
  EXPECT_NO_THROW(kattn::randomProjection<TypeParam>(4, 4, std::numeric_limits<std::int64_t>::min()));
  EXPECT_NO_THROW(
      kattn::randomProjection<TypeParam>(4, 4, std::numeric_limits<std::int64_t>::max() - 1));
}

TYPED_TEST(ProjectionTyped, RedrawsAreReproducibleAndDistinct) {
  constexpr Index m = 24;
  constexpr Index d = 8;
  constexpr std::int64_t seed = 77;
  const Matrix<TypeParam> base = kattn::randomProjection<TypeParam>(m, d, seed);
  std::vector<Matrix<TypeParam>> redraws;
  for (std::uint64_t k = 0; k < 4; ++k) {
    redraws.push_back(kattn::redrawProjection<TypeParam>(m, d, seed, k));
    EXPECT_TRUE(redraws.back() == kattn::redrawProjection<TypeParam>(m, d, seed, k)) << k;
    EXPECT_GT((redraws.back() - base).cwiseAbs().maxCoeff(), TypeParam(0.1)) << k;
  }
  for (std::size_t i = 0; i < redraws.size(); ++i) {
    for (std::size_t j = i + 1; j < redraws.size(); ++j) {
      EXPECT_GT((redraws[i] - redraws[j]).cwiseAbs().maxCoeff(), TypeParam(0.1)) << i << ", " << j;
    }
  }
  // The documented derivation: fold k + 1 into the pair [seed, seed + 1].
  const SeedPair folded = kattn::random::statelessFoldIn(SeedPair{seed, seed + 1}, 3);
  EXPECT_TRUE(redraws[2] == kattn::createProjectionMatrix<TypeParam>(m, d, folded));
  // Another seed's redraws differ too.
  EXPECT_FALSE(redraws[0] == kattn::redrawProjection<TypeParam>(m, d, seed + 1, 0));
  EXPECT_NO_THROW(kattn::redrawProjection<TypeParam>(4, 4, seed, 2147483646u));
}

TYPED_TEST(ProjectionTyped, ShapesAndTruncation) {
  // m < d, m == d, m a multiple of d, and a ragged last block: rows are the first m rows of
  // the stacked blocks, so a larger m extends a smaller one's rows up to the row norms.
  for (Index m : {1, 3, 8, 16, 21}) {
    const Matrix<TypeParam> p = kattn::randomProjection<TypeParam>(m, 8, 9);
    EXPECT_EQ(p.rows(), m);
    EXPECT_EQ(p.cols(), 8);
    EXPECT_TRUE(p.allFinite());
  }
  const Matrix<TypeParam> one = kattn::randomProjection<TypeParam>(1, 1, 0);
  EXPECT_EQ(one.size(), 1);
  EXPECT_GT(std::abs(one(0, 0)), TypeParam(0));
}

template <typename F>
void expectInvalidArgument(F&& f, const std::string& mentions) {
  try {
    f();
    ADD_FAILURE() << "expected std::invalid_argument mentioning '" << mentions << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
  }
}

TEST(ProjectionErrors, InvalidArgumentsThrowAndSayWhich) {
  expectInvalidArgument([] { kattn::randomProjection<float>(0, 4, 1); }, "m (num_random_features)");
  expectInvalidArgument([] { kattn::randomProjection<double>(-3, 4, 1); }, "got -3");
  expectInvalidArgument([] { kattn::randomProjection<float>(4, 0, 1); }, "d (key_dim)");
  expectInvalidArgument([] { kattn::randomProjection<double>(4, -1, 1); }, "d (key_dim)");
  expectInvalidArgument(
      [] { kattn::randomProjection<float>(4, 4, std::numeric_limits<std::int64_t>::max()); },
      "seed");
  expectInvalidArgument(
      [] {
        kattn::randomProjection<float>(std::numeric_limits<Index>::max() / 2, 1 << 20, 1);
      },
      "too large");
  expectInvalidArgument([] { kattn::redrawProjection<float>(4, 4, 1, 2147483647u); },
                        "k (redraw count)");
  expectInvalidArgument(
      [] { kattn::redrawProjection<double>(4, 4, 1, std::numeric_limits<std::uint64_t>::max()); },
      "k (redraw count)");
  expectInvalidArgument([] { kattn::redrawProjection<double>(0, 4, 1, 0); }, "redrawProjection");
  expectInvalidArgument([] { kattn::createProjectionMatrix<double>(4, 0, SeedPair{1, 2}); },
                        "createProjectionMatrix");
}

}  // namespace
