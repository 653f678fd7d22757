#pragma once
/// \file
/// KATTN_ASSERT: the check on internal invariants of the raw-pointer kernels (sizes, strides,
/// ranges), never on user input, which gets an exception. It defaults to `eigen_assert`, so it
/// is on where Eigen's own checks are (no NDEBUG, no EIGEN_NO_DEBUG: the test builds) and free
/// in Release. Define KATTN_ASSERT before including kattn to route it elsewhere (a logging
/// handler, an exception for a fuzzer, or nothing), as `eigen_assert` and `FMT_ASSERT` allow.

#include <Eigen/Core>

#ifndef KATTN_ASSERT
/// Checks an internal invariant; `eigen_assert` unless defined before kattn is included.
#define KATTN_ASSERT(condition) eigen_assert(condition)
#endif
