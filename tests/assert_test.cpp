// KATTN_ASSERT (assert.hpp) is the user's to route: defined before kattn is included, it
// replaces eigen_assert on the raw-pointer kernels' invariants. Here it throws, so a kernel
// called with sizes that break its contract reports instead of reading out of bounds.

#include <stdexcept>

#define KATTN_ASSERT(condition)                                                  \
  do {                                                                           \
    if (!(condition)) throw std::logic_error("KATTN_ASSERT: " #condition);        \
  } while (false)

#include <gtest/gtest.h>

#include <kattn/detail/causal_chunks.hpp>

namespace {

using kattn::Index;
using Mat = kattn::Matrix<double>;

TEST(KattnAssert, AUserDefinitionReplacesTheDefault) {
  kattn::detail::CausalHeadState<double> st;
  st.reset(4, 3);  // F = 4 features, d_v = 3 values
  const Mat q = Mat::Ones(1, 4), k = Mat::Ones(1, 4), v = Mat::Ones(1, 3);
  Mat out(1, 3);
  EXPECT_NO_THROW(kattn::detail::causalToken<double>(1.0, st, q, k, v, out));
  const Mat wide_v = Mat::Ones(1, 5);  // more values than the state holds
  Mat wide_out(1, 5);
  EXPECT_THROW(kattn::detail::causalToken<double>(1.0, st, q, k, wide_v, wide_out),
               std::logic_error);
  const Mat two_rows = Mat::Ones(2, 4);
  EXPECT_THROW(kattn::detail::causalToken<double>(1.0, st, two_rows, k, v, out),
               std::logic_error);
  kattn::detail::CausalParams p;
  p.chunk = 2;
  Mat outs(2, 3);
  EXPECT_THROW(kattn::detail::causalProcess<double>(p, st, two_rows, two_rows, Mat::Ones(2, 3),
                                                    2, outs),
               std::logic_error);  // a lead of a whole chunk
}

}  // namespace
