#pragma once
/// \file
/// \private The link-time check between a program and kattn_compiled (KATTN_EXTERN_TEMPLATES):
/// both must agree on Eigen's alignment, which the instruction sets a file is compiled for
/// decide (16 bytes for SSE, 32 for AVX, 64 for AVX-512). Memory that code of one alignment
/// allocates and code of the other frees is a heap corruption, not an error message; so the
/// library defines one symbol named after its alignment, each call of the program reads the
/// symbol named after its own, and a mismatch is an undefined reference at link time:
/// `kattn::detail::kattn_compiled_eigen_align_<max>_<static>`.

#include <Eigen/Core>

#define KATTN_ABI_CAT_(prefix, a, b) prefix##a##_##b
#define KATTN_ABI_CAT(prefix, a, b) KATTN_ABI_CAT_(prefix, a, b)
#define KATTN_COMPILED_ABI_SYMBOL                                                   \
  KATTN_ABI_CAT(kattn_compiled_eigen_align_, EIGEN_MAX_ALIGN_BYTES, EIGEN_MAX_STATIC_ALIGN_BYTES)

namespace kattn {
namespace detail {

extern const volatile char KATTN_COMPILED_ABI_SYMBOL;

/// With KATTN_EXTERN_TEMPLATES, a reference to the library's alignment symbol (see above).
inline void requireCompiledAbi() {
#if defined(KATTN_EXTERN_TEMPLATES) && !defined(KATTN_INSTANTIATING)
  (void)KATTN_COMPILED_ABI_SYMBOL;  // a volatile read: the reference survives optimisation
#endif
}

}  // namespace detail
}  // namespace kattn
