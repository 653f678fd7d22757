// forward, attend and step on every form of Eigen input: row-major tensors and maps (read in
// place), column-major tensors and maps, tensor expressions, std::optional arguments, and for
// step any dense matrix or block. Each form must give the row-major call's output bit for bit
// (the same arithmetic on the same values), and a wrong shape still names the tensor.

#include <gtest/gtest.h>

#include <optional>
#include <stdexcept>
#include <string>

#include <kattn/kattn.hpp>

#include "test_support.hpp"

namespace {

using kattn::Index;
using ColMajor3 = Eigen::Tensor<float, 3>;  // Eigen's default layout
using ColMajor2 = Eigen::Tensor<float, 2>;

/// The same logical tensor, stored column-major.
template <int Rank>
Eigen::Tensor<float, Rank> colMajor(const kattn::Tensor<float, Rank>& t) {
  std::array<int, Rank> reverse{};
  for (int i = 0; i < Rank; ++i) reverse[std::size_t(i)] = Rank - 1 - i;
  return t.swap_layout().shuffle(reverse);
}

template <int Rank>
void expectSame(const kattn::Tensor<float, Rank>& a, const kattn::Tensor<float, Rank>& b,
                const std::string& what) {
  ASSERT_EQ(a.dimensions(), b.dimensions()) << what;
  for (Index i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a.data()[i], b.data()[i]) << what << " at " << i;
  }
}

kattn::LayerConfig config(bool causal) {
  kattn::LayerConfig c;
  c.num_heads = 2;
  c.key_dim = 8;
  c.feature_transform = "relu";
  c.num_random_features = 16;
  c.seed = 3;
  if (causal) {
    c.use_causal_windowed = true;
    c.causal_chunk_length = 1;
    c.causal_window_length = 4;
  }
  return c;
}

class EigenInputs : public ::testing::Test {
 protected:
  static constexpr Index B = 2, T = 5, S = 7, D = 12;
  kattn_test::FloatRng rng{11};
  kattn::Tensor<float, 3> q = kattn_test::randomTensor<3>(rng, 1.0f, B, T, D);
  kattn::Tensor<float, 3> v = kattn_test::randomTensor<3>(rng, 1.0f, B, S, D);
  kattn::Tensor<float, 2> mask = [] {
    kattn::Tensor<float, 2> m(B, S);
    m.setConstant(1.0f);
    m(1, S - 1) = 0.0f;
    m(1, S - 2) = 0.0f;
    return m;
  }();
};

TEST_F(EigenInputs, ForwardTakesEveryLayout) {
  kattn::KernelAttention<float, kattn::Relu> layer(config(false));
  layer.initializeWeights(D, D);
  const kattn::Tensor<float, 3> want = layer.forward(q, v, std::nullopt, mask);
  const kattn::ConstTensorMap<float, 3> qm(q.data(), q.dimensions()), vm(v.data(), v.dimensions());
  expectSame<3>(layer.forward(qm, vm, std::nullopt, mask), want, "row-major maps");
  const ColMajor3 qc = colMajor<3>(q), vc = colMajor<3>(v);
  const ColMajor2 mc = colMajor<2>(mask);
  expectSame<3>(layer.forward(qc, vc, std::nullopt, mc), want, "column-major tensors");
  const Eigen::TensorMap<const ColMajor3> qcm(qc.data(), qc.dimensions());
  expectSame<3>(layer.forward(qcm, vc, std::nullopt, mc), want, "column-major map");
  // Expressions of either layout: a scaled copy scaled back, a shuffle of a shuffle.
  expectSame<3>(layer.forward(q * 1.0f, v + v.constant(0.0f), std::nullopt, mask * 1.0f), want,
                "row-major expressions");
  const Eigen::array<int, 3> swap01{1, 0, 2};
  expectSame<3>(layer.forward(qc.shuffle(swap01).shuffle(swap01), vc, std::nullopt, mc), want,
                "column-major expression");
  // key given separately, as a column-major tensor and as a std::optional.
  const kattn::Tensor<float, 3> with_key = layer.forward(q, v, v, mask);
  expectSame<3>(layer.forward(qc, vc, vc, mc), with_key, "column-major key");
  const std::optional<kattn::ConstTensorMap<float, 3>> key(vm);
  expectSame<3>(layer.forward(q, v, key, mask), with_key, "optional key");
  // self-attention on one column-major object (evaluated once) and into caller memory.
  const kattn::Tensor<float, 3> self = layer.forward(v, v);
  expectSame<3>(layer.forward(vc, vc), self, "self-attention, column-major");
  kattn::Tensor<float, 3> out(B, S, layer.outputDim());
  layer.forward(vc, vc, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(out));
  expectSame<3>(out, self, "column-major into caller memory");
}

TEST_F(EigenInputs, RowMajorInputsAreReadInPlaceOthersCopiedOnce) {
  kattn::detail::InputBufferPool<float> pool;
  using Buffers = kattn::detail::InputBuffers<float>;
  {
    kattn::detail::InputViews<float> in(pool);
    const kattn::TensorMap<float, 3> mutable_map(q.data(), q.dimensions());
    EXPECT_EQ(in.tensor<3>(q, Buffers::kQuery, "query").data(), q.data());
    EXPECT_EQ(in.tensor<3>(mutable_map, Buffers::kQuery, "query").data(), q.data());
    const ColMajor3 qc = colMajor<3>(q);
    const kattn::ConstTensorMap<float, 3> copy = in.tensor<3>(qc, Buffers::kQuery, "query");
    EXPECT_NE(copy.data(), qc.data());
    for (Index i = 0; i < q.size(); ++i) ASSERT_EQ(copy.data()[i], q.data()[i]);
  }
  ASSERT_EQ(pool.free.size(), 1u) << "the buffers go back to the layer's pool";
  const float* kept = pool.free.back()->slots[Buffers::kQuery].data();
  kattn::detail::InputViews<float> again(pool);
  EXPECT_EQ(again.tensor<3>(q * 2.0f, Buffers::kQuery, "query").data(), kept)
      << "a second call of the same size reuses the buffer";
}

TEST_F(EigenInputs, WrongShapesStillNameTheTensor) {
  kattn::KernelAttention<float, kattn::Relu> layer(config(false));
  layer.initializeWeights(D, D);
  const ColMajor3 narrow(B, T, D - 1);
  try {
    layer.forward(narrow, colMajor<3>(v));
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("query"), std::string::npos) << e.what();
  }
  const ColMajor2 short_mask(B, S - 1);
  EXPECT_THROW(layer.forward(q, v, std::nullopt, short_mask), std::invalid_argument);
}

TEST_F(EigenInputs, AttendTakesEveryLayout) {
  kattn::KernelAttention<float, kattn::Relu> layer(config(false));
  const Index N = 2, d = 8;
  const kattn::Tensor<float, 4> qh = kattn_test::randomTensor<4>(rng, 1.0f, B, T, N, d);
  const kattn::Tensor<float, 4> kh = kattn_test::randomTensor<4>(rng, 1.0f, B, S, N, d);
  const kattn::Tensor<float, 4> vh = kattn_test::randomTensor<4>(rng, 1.0f, B, S, N, d);
  const kattn::Tensor<float, 4> want = layer.attend(qh, kh, vh, mask);
  expectSame<4>(layer.attend(colMajor<4>(qh), colMajor<4>(kh), colMajor<4>(vh), colMajor<2>(mask)),
                want, "column-major heads");
  expectSame<4>(layer.attend(qh * 1.0f, kh, vh, mask), want, "expression heads");
}

TEST_F(EigenInputs, StreamingForwardTakesColumnMajor) {
  kattn::CausalKernelAttention<float, kattn::Relu> layer(config(true));
  layer.initializeWeights(D, D);
  auto a = layer.makeState(B);
  auto b = layer.makeState(B);
  const kattn::Tensor<float, 3> want = layer.forward(v, v, std::nullopt, std::nullopt, a);
  expectSame<3>(layer.forward(colMajor<3>(v), colMajor<3>(v), std::nullopt, std::nullopt, b),
                want, "streaming, column-major");
}

/// Token t of every row as a row-major [B, D] matrix.
kattn::Matrix<float> token(const kattn::Tensor<float, 3>& x, Index t) {
  kattn::Matrix<float> m(x.dimension(0), x.dimension(2));
  for (Index b = 0; b < m.rows(); ++b) {
    for (Index j = 0; j < m.cols(); ++j) m(b, j) = x(b, t, j);
  }
  return m;
}

TEST_F(EigenInputs, StepEqualsStreamingForwardForEveryMatrixForm) {
  kattn::CausalKernelAttention<float, kattn::Relu> layer(config(true));
  layer.initializeWeights(D, D);
  const Index O = layer.outputDim();
  // The reference: the streaming forward fed one token at a time, as [B, 1, D].
  auto reference = layer.makeState(B);
  kattn::Tensor<float, 3> want(B, S, O);
  for (Index t = 0; t < S; ++t) {
    const kattn::Tensor<float, 3> x = kattn_test::rows(v, t, 1);
    const kattn::Tensor<float, 3> y = layer.forward(x, x, std::nullopt, std::nullopt, reference);
    for (Index b = 0; b < B; ++b) {
      for (Index j = 0; j < O; ++j) want(b, t, j) = y(b, 0, j);
    }
  }
  auto packed = layer.makeState(B), col = layer.makeState(B), blocks = layer.makeState(B),
       cross = layer.makeState(B);
  kattn::Matrix<float> y(B, O);                      // packed rows: written in place
  Eigen::MatrixXf y_col(B, O);                       // column-major: through a buffer
  Eigen::MatrixXf wide(B + 1, O + 3);                // a block of a larger matrix
  kattn::Matrix<float> y_cross(B, O);
  for (Index t = 0; t < S; ++t) {
    const kattn::Matrix<float> x = token(v, t);
    const Eigen::MatrixXf x_col = x;
    layer.step(x, packed, y);
    layer.step(x_col, col, y_col);
    layer.step(x_col.topRows(B) * 1.0f, blocks, wide.block(1, 2, B, O));
    layer.step(x, x_col, cross, y_cross);
    for (Index b = 0; b < B; ++b) {
      for (Index j = 0; j < O; ++j) {
        ASSERT_EQ(y(b, j), want(b, t, j)) << "packed, token " << t;
        ASSERT_EQ(y_col(b, j), want(b, t, j)) << "column-major, token " << t;
        ASSERT_EQ(wide(1 + b, 2 + j), want(b, t, j)) << "block, token " << t;
        ASSERT_EQ(y_cross(b, j), want(b, t, j)) << "query and value apart, token " << t;
      }
    }
  }
}

TEST_F(EigenInputs, StepChecksItsShapes) {
  kattn::CausalKernelAttention<float, kattn::Relu> layer(config(true));
  layer.initializeWeights(D, D);
  auto state = layer.makeState(B);
  kattn::Matrix<float> x = token(v, 0);
  kattn::Matrix<float> y(B, layer.outputDim() + 1);
  try {
    layer.step(x, state, y);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("step: out"), std::string::npos) << e.what();
  }
  kattn::Matrix<float> y_ok(B, layer.outputDim());
  const kattn::Matrix<float> x3(B + 1, D);
  EXPECT_THROW(layer.step(x3, state, y_ok), std::invalid_argument);  // the state has B rows
  EXPECT_EQ(state.tokens(), 0) << "a refused step must leave the state as it was";
}

}  // namespace
