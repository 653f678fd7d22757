// StatePool and the ragged streaming call (state_pool.hpp, detail/ragged_call.hpp): for every
// streaming map, both modes, float and double, sequences that join and leave at random, decode
// steps mixed with prompt pieces, slots reused after release and saved and restored mid-stream.
// Each sequence's rows must equal, bit for bit, a StreamingState of its own fed the same
// tokens, and must not depend on the other sequences of a call or on the thread count. Also
// snapshots and rollback, and every error path.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>

#include "test_support.hpp"

namespace {

using namespace kattn_test;
using kattn::Index;

template <typename C>
class PoolTest : public ComboTest<C, kattn::CausalWindowed> {
 public:  // also for runPattern
  using Base = ComboTest<C, kattn::CausalWindowed>;
  using Scalar = typename Base::Scalar;
  using Layer = typename Base::Layer;
  using State = kattn::StreamingState<Scalar>;
  using Rows = kattn::Tensor<Scalar, 2>;
  static constexpr Index kD = 12;

  /// A layer of 2 heads of 8: chunks of `chunk`, a window of 4 chunks or none, a decay or not.
  static Layer layer(Index chunk, bool windowed, bool decay, int threads) {
    kattn::LayerConfig c;
    c.num_heads = 2;
    c.key_dim = 8;
    c.feature_transform = Base::mapName();
    c.num_random_features = Base::kExpType || Base::mapName() == "relu" ? 16 : 0;
    c.use_causal_windowed = true;
    c.causal_chunk_length = int(chunk);
    c.causal_window_length = windowed ? 4 : 1 << 20;
    if (decay) c.causal_window_decay = 0.9;
    c.seed = 5;
    Layer l(c);
    l.initializeWeights(kD, kD);
    l.setThreads(threads);
    return l;
  }

  /// `L` random tokens [L, D] (small for the exp maps: well-conditioned, SPEC 3.5).
  static Rows tokens(Rng& r, Index L) {
    Rows x(L, kD);
    const double sd = Base::kExpType ? 0.3 : 1.0;
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = Scalar(r.normal() * sd);
    return x;
  }

  /// Rows [L, D] as the [1, L, D] input of a StreamingState's call.
  static kattn::Tensor<Scalar, 3> asCall(const Rows& x) {
    kattn::Tensor<Scalar, 3> t(1, x.dimension(0), x.dimension(1));
    std::copy(x.data(), x.data() + x.size(), t.data());
    return t;
  }

  static double relDiff(const Scalar* a, const Scalar* b, Index n) {
    double err = 0, ref = 0;
    for (Index i = 0; i < n; ++i) {
      err = std::max(err, std::abs(double(a[i]) - double(b[i])));
      ref = std::max(ref, std::abs(double(b[i])));
    }
    return ref > 0 ? err / ref : err;
  }
};

TYPED_TEST_SUITE(PoolTest, Combos, ComboNames);

/// One sequence of a simulated server: its slot and its own StreamingState.
template <typename Scalar>
struct Conversation {
  Index slot = -1;
  kattn::StreamingState<Scalar> reference;
};

TYPED_TEST(PoolTest, SlotsEqualTheirOwnStreamingStates) {
  using Scalar = typename TestFixture::Scalar;
  int checks = 0, ones = 0;
  for (int config = 0; config < 6; ++config) {
    const Index chunk = config == 5 ? 2 : 1;
    const bool windowed = config % 2 == 0, decay = config == 2 || config == 3;
    for (const auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
      if (mode == kattn::StreamingMode::Recurrent && chunk > 1) continue;
      const auto layer = TestFixture::layer(chunk, windowed, decay, 2);
      auto pool = layer.makePool(5, mode);
      Rng r(std::uint64_t(config) * 31 + std::uint64_t(mode) + 7);
      std::vector<Conversation<Scalar>> live;
      for (int call = 0; call < 30; ++call) {
        // Conversations end and start between calls; slots come back and are reused.
        for (std::size_t i = 0; i < live.size();) {
          if (r.coin(0.15)) {
            pool.release(live[i].slot);
            live.erase(live.begin() + std::ptrdiff_t(i));
          } else {
            ++i;
          }
        }
        while (pool.inUse() < pool.capacity() && r.coin(0.5)) {
          live.push_back({pool.acquire(), layer.makeState(1, mode)});
        }
        if (!live.empty() && r.coin(0.2)) {
          // Save and restore mid-stream, into another slot.
          auto& c = live[std::size_t(r.intIn(0, Index(live.size()) - 1))];
          std::stringstream bytes;
          pool.save(c.slot, bytes);
          const Index moved = pool.inUse() < pool.capacity() ? pool.acquire() : c.slot;
          pool.load(moved, bytes);
          if (moved != c.slot) pool.release(c.slot);
          c.slot = moved;
        }
        // A call: each live conversation brings a decode step, a prompt piece or nothing.
        std::vector<Index> slots, offsets{0};
        std::vector<typename TestFixture::Rows> pieces;
        std::vector<std::size_t> who;
        for (std::size_t i = 0; i < live.size(); ++i) {
          const double u = r.uniform(0, 1);
          const Index L = u < 0.2 ? 0 : (u < 0.6 ? 1 : r.intIn(2, 12)) * chunk;
          if (L == 0 && r.coin()) continue;  // absent from the call, or present with no rows
          slots.push_back(live[i].slot);
          offsets.push_back(offsets.back() + L);
          pieces.push_back(TestFixture::tokens(r, L));
          who.push_back(i);
        }
        typename TestFixture::Rows packed(offsets.back(), TestFixture::kD);
        for (std::size_t j = 0; j < pieces.size(); ++j) {
          std::copy(pieces[j].data(), pieces[j].data() + pieces[j].size(),
                    packed.data() + offsets[j] * TestFixture::kD);
        }
        const auto y = layer.forward(packed, pool, slots, offsets);
        const Index O = layer.outputDim();
        for (std::size_t j = 0; j < pieces.size(); ++j) {
          auto& c = live[who[j]];
          const Index L = offsets[j + 1] - offsets[j];
          if (L == 0) continue;
          const auto x = TestFixture::asCall(pieces[j]);
          const auto want = layer.forward(x, x, std::nullopt, std::nullopt, c.reference);
          const Scalar* got = y.data() + offsets[j] * O;
          ++checks;
          ones += L == 1;
          ASSERT_EQ(std::memcmp(got, want.data(), sizeof(Scalar) * std::size_t(L * O)), 0)
              << "config " << config << ", call " << call << ", sequence " << j << ", "
              << TestFixture::relDiff(got, want.data(), L * O) << " relative";
          ASSERT_EQ(pool.tokens(c.slot), c.reference.tokens());
        }
      }
    }
  }
  EXPECT_GT(checks, 100);
  EXPECT_GT(ones, 30) << "decode steps";
}

/// The rows of three sequences fed in `calls` (each call: per sequence a token count).
template <typename Fixture, typename Layer>
auto runPattern(const Layer& layer, kattn::StreamingMode mode,
                const std::vector<std::vector<Index>>& calls,
                const std::vector<typename Fixture::Rows>& inputs) {
  using Scalar = typename Fixture::Scalar;
  auto pool = layer.makePool(3, mode);
  const std::vector<Index> slot{pool.acquire(), pool.acquire(), pool.acquire()};
  std::vector<std::vector<Scalar>> out(3);
  std::vector<Index> at(3, 0);
  for (const auto& call : calls) {
    std::vector<Index> slots, offsets{0};
    std::vector<Scalar> packed;
    for (std::size_t s = 0; s < 3; ++s) {
      if (call[s] == 0) continue;
      slots.push_back(slot[s]);
      offsets.push_back(offsets.back() + call[s]);
      const Scalar* from = inputs[s].data() + at[s] * Fixture::kD;
      packed.insert(packed.end(), from, from + call[s] * Fixture::kD);
    }
    const kattn::ConstTensorMap<Scalar, 2> x(packed.data(), offsets.back(), Fixture::kD);
    const auto y = layer.forward(x, pool, slots, offsets);
    Index k = 0;
    for (std::size_t s = 0; s < 3; ++s) {
      if (call[s] == 0) continue;
      const Scalar* from = y.data() + offsets[std::size_t(k)] * layer.outputDim();
      out[s].insert(out[s].end(), from, from + call[s] * layer.outputDim());
      at[s] += call[s];
      ++k;
    }
  }
  return out;
}

TYPED_TEST(PoolTest, RowsDoNotDependOnCompanyOrThreads) {
  Rng r(3);
  std::vector<typename TestFixture::Rows> inputs;
  for (int s = 0; s < 3; ++s) inputs.push_back(TestFixture::tokens(r, 90));
  // The same tokens per sequence, split into the same pieces, but grouped differently: all
  // three in each call, or one sequence per call; a long piece (heads on the pool) and steps.
  const std::vector<std::vector<Index>> together{{1, 5, 70}, {1, 1, 1}, {80, 1, 2}, {8, 1, 17}};
  std::vector<std::vector<Index>> apart;
  for (const auto& call : together) {
    for (std::size_t s = 0; s < 3; ++s) {
      std::vector<Index> one(3, 0);
      one[s] = call[s];
      apart.push_back(one);
    }
  }
  for (const auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
    const auto two = TestFixture::layer(1, true, false, 2);
    const auto one = TestFixture::layer(1, true, false, 1);
    const auto a = runPattern<TestFixture>(two, mode, together, inputs);
    const auto b = runPattern<TestFixture>(two, mode, apart, inputs);
    const auto c = runPattern<TestFixture>(one, mode, together, inputs);
    for (std::size_t s = 0; s < 3; ++s) {
      ASSERT_EQ(a[s], b[s]) << "sequence " << s << ": grouped differently";
      ASSERT_EQ(a[s], c[s]) << "sequence " << s << ": one thread against two";
    }
  }
}

TYPED_TEST(PoolTest, RollbackThenReplayEqualsNeverProposing) {
  Rng r(11);
  const auto prompt = TestFixture::tokens(r, 6), proposed = TestFixture::tokens(r, 4);
  const Index accepted = 2;
  for (const auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
    const auto layer = TestFixture::layer(1, true, mode == kattn::StreamingMode::Recurrent, 2);
    auto pool = layer.makePool(3, mode);
    const Index a = pool.acquire(), b = pool.acquire();
    layer.forward(prompt, pool, {a, b}, {0, 0, 6});  // b reads the prompt; a brings nothing
    layer.forward(prompt, pool, {a}, {0, 6});
    // a: speculate 4 tokens, roll back, keep the first 2. b: only ever sees the 2.
    const Index snap = pool.snapshot(a);
    layer.forward(proposed, pool, {a}, {0, 4});
    pool.rollback(a, snap);
    pool.release(snap);
    const Eigen::array<Index, 2> off{0, 0}, ext{accepted, TestFixture::kD};
    const typename TestFixture::Rows kept = proposed.slice(off, ext);
    const auto ya = layer.forward(kept, pool, {a}, {0, accepted});
    const auto yb = layer.forward(kept, pool, {b}, {0, accepted});
    ASSERT_EQ(pool.tokens(a), 8);
    for (Index i = 0; i < ya.size(); ++i) ASSERT_EQ(ya.data()[i], yb.data()[i]) << i;
    // And the states themselves: the same bytes.
    std::stringstream sa, sb;
    pool.save(a, sa);
    pool.save(b, sb);
    EXPECT_EQ(sa.str(), sb.str());
  }
}

/// forward(tokens, offsets) on a layer of map M and masking K against forward() of each
/// sequence alone, on one and two threads.
template <typename M, typename K>
void expectPackedEqualsAlone(const std::string& map, bool causal) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 8;
  c.feature_transform = map;
  c.num_random_features = 16;
  if (causal) {
    c.use_causal_windowed = true;
    c.causal_chunk_length = 3;
    c.causal_window_length = 2;
    c.causal_padding = "right";
  }
  const std::vector<Index> offsets{0, 5, 5, 6, 80, 93};  // an empty sequence, a long one
  kattn::Tensor<double, 2> x(offsets.back(), 12);
  Rng r(17);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = 0.5 * r.normal();
  for (const int threads : {1, 2}) {
    kattn::KernelAttention<double, M, K> layer(c);
    layer.initializeWeights(12, 12);
    layer.setThreads(threads);
    const auto y = layer.forward(x, offsets);
    for (std::size_t i = 0; i + 1 < offsets.size(); ++i) {
      const Index L = offsets[i + 1] - offsets[i];
      if (L == 0) continue;
      const kattn::ConstTensorMap<double, 3> xi(x.data() + offsets[i] * 12, 1, L, 12);
      const auto want = layer.forward(xi, xi);
      ASSERT_EQ(std::memcmp(y.data() + offsets[i] * layer.outputDim(), want.data(),
                            sizeof(double) * std::size_t(want.size())),
                0)
          << map << (causal ? " causal" : " bidirectional") << ", sequence " << i << ", "
          << threads << " threads";
    }
  }
}

TEST(PackedSequences, EachAttendsToItselfAsIfAlone) {
  expectPackedEqualsAlone<kattn::Relu, kattn::Bidirectional>("relu", false);
  expectPackedEqualsAlone<kattn::Exp, kattn::Bidirectional>("exp", false);
  expectPackedEqualsAlone<kattn::ExpPlus, kattn::Bidirectional>("expplus", false);
  expectPackedEqualsAlone<kattn::Relu, kattn::CausalWindowed>("relu", true);
  expectPackedEqualsAlone<kattn::Exp, kattn::CausalWindowed>("exp", true);
}

TEST(PackedSequences, OffsetsAreChecked) {
  kattn::LayerConfig c;
  c.num_heads = 1;
  c.key_dim = 4;
  c.feature_transform = "relu";
  kattn::KernelAttention<float, kattn::Relu> layer(c);
  layer.initializeWeights(6, 6);
  kattn::Tensor<float, 2> x(4, 6);
  x.setZero();
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { layer.forward(x, {}); }, "offsets: empty"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { layer.forward(x, {0, 3}); },
                                                "end at the token count 4"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { layer.forward(x, {0, 3, 1, 4}); },
                                                "must not decrease"));
}

TEST(StatePool, RaggedAttendEqualsEachSequenceOnItsOwnState) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.value_dim = 3;
  c.feature_transform = "exp";
  c.num_random_features = 8;
  c.use_causal_windowed = true;
  c.causal_chunk_length = 1;
  c.causal_window_length = 5;
  kattn::CausalKernelAttention<double, kattn::Exp> layer(c);
  layer.setThreads(2);
  auto pool = layer.makePool(3);
  const Index a = pool.acquire(), b = pool.acquire();
  auto own_a = layer.makeState(1), own_b = layer.makeState(1);
  Rng r(23);
  for (const std::vector<Index>& offsets : {std::vector<Index>{0, 7, 8}, {0, 1, 71}, {0, 1, 2}}) {
    const Index total = offsets.back();
    kattn::Tensor<double, 3> q(total, 2, 4), k(total, 2, 4), v(total, 2, 3);
    for (auto* t : {&q, &k, &v})
      for (Index i = 0; i < t->size(); ++i) t->data()[i] = 0.5 * r.normal();
    const auto heads = layer.attend(q, k, v, pool, {a, b}, offsets);
    for (std::size_t s = 0; s < 2; ++s) {
      const Index r0 = offsets[s], L = offsets[s + 1] - r0;
      auto view = [&](const kattn::Tensor<double, 3>& t) {
        return kattn::ConstTensorMap<double, 4>(t.data() + r0 * t.dimension(1) * t.dimension(2),
                                                1, L, t.dimension(1), t.dimension(2));
      };
      const auto want = layer.attend(view(q), view(k), view(v), std::nullopt, s ? own_b : own_a);
      ASSERT_EQ(std::memcmp(heads.data() + r0 * 2 * 3, want.data(),
                            sizeof(double) * std::size_t(want.size())),
                0)
          << "sequence " << s << " of a call of " << total << " rows";
    }
  }
  kattn::Tensor<double, 3> wrong(3, 2, 5);
  wrong.setZero();
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { layer.attend(wrong, wrong, wrong, pool, {a}, {0, 3}); }, "q: expected shape [*, 2, 4]"));
}

TEST(StatePool, SlotSaveIsAStreamingStateOfOneRow) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 4;
  c.feature_transform = "relu";
  c.use_causal_windowed = true;
  c.causal_chunk_length = 1;
  c.causal_window_length = 3;
  kattn::CausalKernelAttention<double, kattn::Relu> layer(c);
  layer.initializeWeights(6, 6);
  auto pool = layer.makePool(2);
  const Index s = pool.acquire();
  kattn::Tensor<double, 2> x(5, 6);
  x.setRandom();
  layer.forward(x, pool, {s}, {0, 5});
  std::stringstream bytes;
  pool.save(s, bytes);
  const auto state = kattn::StreamingState<double>::load(bytes);
  std::stringstream again;
  state.save(again);
  EXPECT_EQ(again.str(), bytes.str());
  EXPECT_EQ(state.tokens(), 5);
  EXPECT_EQ(state.batch(), 1);
}

class PoolErrors : public ::testing::Test {
 protected:
  static kattn::LayerConfig config(int chunk) {
    kattn::LayerConfig c;
    c.num_heads = 2;
    c.key_dim = 4;
    c.feature_transform = "relu";
    c.use_causal_windowed = true;
    c.causal_chunk_length = chunk;
    c.causal_window_length = 3;
    return c;
  }
  kattn::CausalKernelAttention<float, kattn::Relu> layer{config(1)};
  kattn::Tensor<float, 2> x = [] {
    kattn::Tensor<float, 2> t(4, 6);
    t.setRandom();
    return t;
  }();
  void SetUp() override { layer.initializeWeights(6, 6); }
};

TEST_F(PoolErrors, SlotsAreCheckedByName) {
  auto pool = layer.makePool(2);
  const Index a = pool.acquire();
  pool.acquire();
  EXPECT_TRUE(throwsWith<std::runtime_error>([&] { pool.acquire(); }, "all 2 slots are in use"));
  pool.release(a);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { pool.release(a); }, "slot 0 is not in use"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { pool.tokens(7); }, "slot 7 does not exist"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { pool.reset(-1); }, "does not exist"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { pool.snapshot(a); }, "not in use"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([] { kattn::StatePool<float> p(0, {}); },
                                                "capacity must be at least 1"));
}

TEST_F(PoolErrors, RaggedCallsAreCheckedBeforeAnySlotAdvances) {
  auto pool = layer.makePool(3);
  const Index a = pool.acquire(), b = pool.acquire(), free_slot = 2;
  auto refused = [&](const std::vector<Index>& slots, const std::vector<Index>& offsets,
                     const std::string& needle) {
    EXPECT_TRUE(throwsWith<std::invalid_argument>(
        [&] { layer.forward(x, pool, slots, offsets); }, needle));
    EXPECT_EQ(pool.tokens(a), 0) << needle;
    EXPECT_EQ(pool.tokens(b), 0) << needle;
  };
  refused({a, b}, {0, 4}, "one more entry than slots");
  refused({a, b}, {1, 2, 4}, "must start at 0");
  refused({a, b}, {0, 2, 3}, "end at the token count 4");
  refused({a, b}, {0, 5, 4}, "must not decrease");
  refused({a, free_slot}, {0, 2, 4}, "slot 2 is not in use");
  EXPECT_TRUE(throwsWith<std::logic_error>([&] { layer.forward(x, pool, {b, a, a}, {0, 0, 2, 4}); },
                                           "slot 0 appears twice in one call"));
  EXPECT_EQ(pool.tokens(a), 0);
  layer.forward(x, pool, {b, a}, {0, 2, 4});  // the refused call left no slot marked busy
  EXPECT_EQ(pool.tokens(a), 2);
  kattn::Tensor<float, 2> narrow(4, 5);
  narrow.setZero();
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { layer.forward(narrow, pool, {a}, {0, 4}); }, "expected shape [*, *, 6]"));
  // Another layer's pool, and exact mode's whole chunks.
  kattn::CausalKernelAttention<float, kattn::Relu> chunked(config(2));
  chunked.initializeWeights(6, 6);
  auto chunk_pool = chunked.makePool(2, kattn::StreamingMode::Exact);
  const Index c = chunk_pool.acquire(), d = chunk_pool.acquire();
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { chunked.forward(x, chunk_pool, {c, d}, {0, 1, 4}); },
      "sequence 0 brings 1 token, not a multiple of causal_chunk_length 2"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { chunked.forward(x, pool, {a}, {0, 4}); }, "state"));
  EXPECT_EQ(chunk_pool.tokens(c), 0);
}

// ---------------------------------------------------------------------------------------
// The whole pool saved and loaded (saveAll, loadAll), and acquiring a named slot

class PoolSaveAll : public ::testing::Test {
 protected:
  using Layer = kattn::CausalKernelAttention<double, kattn::Relu>;

  /// Chunks of 2, a window of 3 chunks (the exact state keeps chunk terms), right padding
  /// (a sequence may end inside a chunk, finishing its slot).
  static kattn::LayerConfig config(int heads = 2, int chunk = 2) {
    kattn::LayerConfig c;
    c.num_heads = heads;
    c.key_dim = 4;
    c.feature_transform = "relu";
    c.num_random_features = 0;
    c.use_causal_windowed = true;
    c.causal_chunk_length = chunk;
    c.causal_window_length = 3;
    c.causal_padding = "right";
    return c;
  }
  static Layer layer(const kattn::LayerConfig& c) {
    Layer l(c);
    l.initializeWeights(6, 6);
    return l;
  }
  static kattn::Tensor<double, 2> tokens(Index rows, unsigned seed) {
    Rng r(seed);
    kattn::Tensor<double, 2> x(rows, 6);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = r.normal();
    return x;
  }
  static std::string bytesOf(const kattn::StatePool<double>& pool) {
    std::ostringstream os(std::ios::binary);
    pool.saveAll(os);
    return os.str();
  }
  static void loadBytes(kattn::StatePool<double>& pool, const std::string& bytes) {
    std::istringstream is(bytes, std::ios::binary);
    pool.loadAll(is);
  }

  /// A pool of 4 in `mode`: slot 3 at 6 tokens, slot 0 at 4, slot 1 finished at 5 (exact
  /// mode ends it inside a chunk), slot 2 acquired and released.
  kattn::StatePool<double> busyPool(kattn::StreamingMode mode) const {
    auto pool = m_layer.makePool(4, mode);
    pool.acquire(3);
    pool.acquire(0);
    pool.acquire(1);
    pool.acquire(2);
    m_layer.forward(tokens(15, 1), pool, {3, 0, 1}, {0, 6, 10, 15});
    pool.release(2);
    return pool;
  }

  Layer m_layer = layer(config());
};

TEST_F(PoolSaveAll, RoundTripIsByteExactAndContinuesIdentically) {
  for (const auto mode : {kattn::StreamingMode::Exact, kattn::StreamingMode::Recurrent}) {
    SCOPED_TRACE(mode == kattn::StreamingMode::Exact ? "exact" : "recurrent");
    auto pool = busyPool(mode);
    const std::string bytes = bytesOf(pool);
    auto restored = m_layer.makePool(4, mode);
    loadBytes(restored, bytes);
    EXPECT_EQ(bytesOf(restored), bytes);
    EXPECT_EQ(restored.inUse(), 3);
    EXPECT_FALSE(restored.inUse(2));
    EXPECT_EQ(restored.tokens(3), 6);
    EXPECT_EQ(restored.tokens(0), 4);
    EXPECT_EQ(restored.tokens(1), 5);
    // A slot's part is StreamingState's one-row format, as save(slot) writes it.
    std::ostringstream slot3(std::ios::binary);
    pool.save(3, slot3);
    EXPECT_NE(bytes.find(slot3.str()), std::string::npos);

    // Both go on alike: the same free slot next, the same rows, the same bytes after.
    const Index next = pool.acquire();
    EXPECT_EQ(restored.acquire(), next);
    const auto x = tokens(8, 2);
    const std::vector<Index> slots{0, next, 3}, offsets{0, 2, 6, 8};
    const auto a = m_layer.forward(x, pool, slots, offsets);
    const auto b = m_layer.forward(x, restored, slots, offsets);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(double) * std::size_t(a.size())), 0);
    EXPECT_EQ(bytesOf(restored), bytesOf(pool));
  }
}

TEST_F(PoolSaveAll, AFailedLoadLeavesThePoolUnchanged) {
  const std::string bytes = bytesOf(busyPool(kattn::StreamingMode::Exact));
  auto pool = m_layer.makePool(4, kattn::StreamingMode::Exact);
  pool.acquire(2);
  m_layer.forward(tokens(4, 3), pool, {2}, {0, 4});
  const std::string before = bytesOf(pool);
  auto refused = [&](const std::string& image, const std::string& needle, auto exception) {
    using Exception = decltype(exception);
    EXPECT_TRUE(throwsWith<Exception>([&] { loadBytes(pool, image); }, needle));
    EXPECT_EQ(bytesOf(pool), before) << needle;
  };
  // Every truncation, including inside a slot's state and inside the free list.
  for (std::size_t n = 0; n < bytes.size(); n += (n < 64 ? 1 : 7)) {
    SCOPED_TRACE(n);
    EXPECT_THROW(loadBytes(pool, bytes.substr(0, n)), std::runtime_error);
    EXPECT_EQ(bytesOf(pool), before);
  }
  refused(bytes.substr(0, bytes.size() - 1), "truncated", std::runtime_error(""));
  std::string foreign = bytes;
  foreign[5] = 'X';
  refused(foreign, "not a saved kattn state pool", std::runtime_error(""));
  // A single slot's state is not a pool.
  std::ostringstream one(std::ios::binary);
  pool.save(2, one);
  refused(one.str(), "not a saved kattn state pool", std::runtime_error(""));
  std::string flag = bytes;
  flag[8 * 4] = 2;  // slot 0's in-use flag, after the magic, scalar size, capacity and mode
  refused(flag, "slot 0: corrupt in-use flag 2", std::runtime_error(""));
  std::string free_list = bytes;
  free_list[free_list.size() - 8] = 3;  // the one free slot is 2, not 3 (in use)
  refused(free_list, "corrupt free list", std::runtime_error(""));

  // A pool of another capacity, mode, scalar type or layer.
  auto bigger = m_layer.makePool(5, kattn::StreamingMode::Exact);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { loadBytes(bigger, bytes); }, "saved from a pool of capacity 4, this pool has 5"));
  auto recurrent = m_layer.makePool(4, kattn::StreamingMode::Recurrent);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { loadBytes(recurrent, bytes); }, "saved in exact mode, this pool is in recurrent mode"));
  kattn::CausalKernelAttention<float, kattn::Relu> f32(config());
  f32.initializeWeights(6, 6);
  auto float_pool = f32.makePool(4, kattn::StreamingMode::Exact);
  std::istringstream is(bytes, std::ios::binary);
  EXPECT_TRUE(throwsWith<std::runtime_error>([&] { float_pool.loadAll(is); }, "another scalar type"));
  auto other_chunk = layer(config(2, 3)).makePool(4, kattn::StreamingMode::Exact);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { loadBytes(other_chunk, bytes); }, "slot 0 belongs to another layer"));
  auto other_heads = layer(config(3, 2)).makePool(4, kattn::StreamingMode::Exact);
  EXPECT_TRUE(throwsWith<std::invalid_argument>(
      [&] { loadBytes(other_heads, bytes); }, "this pool's slots are [1, 3, 4, 4]"));
  EXPECT_EQ(other_heads.inUse(), 0);
}

TEST_F(PoolSaveAll, AcquireANamedSlot) {
  auto pool = m_layer.makePool(3);
  pool.acquire(1);
  EXPECT_TRUE(pool.inUse(1));
  EXPECT_EQ(pool.tokens(1), 0);
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { pool.acquire(1); },
                                                "StatePool::acquire: slot 1 is in use already"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { pool.acquire(3); },
                                                "slot 3 does not exist (capacity 3)"));
  EXPECT_TRUE(throwsWith<std::invalid_argument>([&] { pool.acquire(-1); }, "slot -1 does not exist"));
  const Index a = pool.acquire(), b = pool.acquire();
  EXPECT_NE(a, 1);
  EXPECT_NE(b, 1);
  EXPECT_NE(a, b);
  EXPECT_THROW(pool.acquire(), std::runtime_error);
  // Acquiring resets: a released slot's tokens are gone.
  m_layer.forward(tokens(2, 4), pool, {1}, {0, 2});
  pool.release(1);
  pool.acquire(1);
  EXPECT_EQ(pool.tokens(1), 0);
}

}  // namespace
