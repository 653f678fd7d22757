#pragma once
/// \file
/// The safetensors format as kattn reads and writes it (io/safetensors.hpp): its element
/// types, the checks of the host it needs, the conversions to float and double, and the
/// escaping of file text in messages. No file access.

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kattn/limits.hpp"
#include "kattn/tensor.hpp"

namespace kattn::io {

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "kattn/io/safetensors.hpp supports little-endian hosts only: safetensors data are "
              "little-endian and this reader copies them without byte swapping.");
#elif !defined(_WIN32)
#error "kattn/io/safetensors.hpp cannot tell this host's byte order; it supports little-endian hosts only."
#endif
static_assert(std::numeric_limits<float>::is_iec559 && std::numeric_limits<double>::is_iec559,
              "kattn/io/safetensors.hpp needs IEEE-754 float and double: it reinterprets the "
              "file's bits as such.");

/// Element types that kattn converts to `float` / `double`.
enum class DType { F64, F32, F16, BF16 };

/// The file's spelling of `dtype` ("F64", "F32", "F16", "BF16").
inline const char* dtypeName(DType dtype) {
  switch (dtype) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
  }
  return "?";
}

/// Bytes per element of `dtype`.
inline std::size_t dtypeSize(DType dtype) {
  switch (dtype) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
  }
  return 0;
}

/// One entry of a safetensors header, validated against the file it came from.
struct TensorInfo {
  /// The tensor's name in the header.
  std::string name;
  /// Element type; meaningful only when `convertible` (metadata-only entries hold F64 here).
  DType dtype = DType::F64;
  /// Row-major shape; every entry is >= 0 and the product of the non-zero entries fits Index.
  std::vector<Index> shape;
  ///@{
  /// Byte range [begin, end) within the data section, `end - begin` = elements x dtype size.
  std::size_t begin = 0, end = 0;
  ///@}
  /// The dtype as the file spells it, also for metadata-only entries ("I64", "U8", ...).
  std::string dtype_name;
  /// False for a metadata-only entry: a valid safetensors dtype that kattn does not convert.
  bool convertible = true;
};

namespace detail {

/// Largest header accepted, in bytes: the limit of the reference implementation. The JSON
/// DOM of a header is several times its size, so this bounds the parser's memory.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

/// Deepest JSON nesting accepted. A valid header needs 3 levels (file object, entry object,
/// shape array); the bound keeps pathological nesting away from any recursive code.
constexpr int kMaxJsonDepth = 16;

/// Every dtype of the safetensors format with its size in bits; those with a `DType` are
/// the ones kattn converts. Sub-byte formats (F4, F6_*) are valid when the tensor's total
/// bit count is a whole number of bytes, as in the reference implementation.
struct DTypeEntry {
  const char* name;
  std::uint64_t bits;
  bool convertible;
  DType dtype;
};
inline const std::array<DTypeEntry, 20>& dtypeTable() {
  static const std::array<DTypeEntry, 20> table{{
      {"F64", 64, true, DType::F64},        {"F32", 32, true, DType::F32},
      {"F16", 16, true, DType::F16},        {"BF16", 16, true, DType::BF16},
      {"BOOL", 8, false, DType::F64},       {"U8", 8, false, DType::F64},
      {"I8", 8, false, DType::F64},         {"F8_E5M2", 8, false, DType::F64},
      {"F8_E4M3", 8, false, DType::F64},    {"F8_E8M0", 8, false, DType::F64},
      {"I16", 16, false, DType::F64},       {"U16", 16, false, DType::F64},
      {"I32", 32, false, DType::F64},       {"U32", 32, false, DType::F64},
      {"I64", 64, false, DType::F64},       {"U64", 64, false, DType::F64},
      {"C64", 64, false, DType::F64},       {"F4", 4, false, DType::F64},
      {"F6_E2M3", 6, false, DType::F64},    {"F6_E3M2", 6, false, DType::F64},
  }};
  return table;
}

constexpr const char* kConvertibleList = "F64, F32, F16, BF16";

/// `text` made safe for a one-line message: control and non-ASCII bytes as `\xNN`, quotes
/// and backslashes escaped (unless `escape_quotes` is false, for text that is not itself
/// quoted), and cut to `max_chars` characters. File contents reach
/// messages through this, so a name cannot inject newlines or megabytes into a log.
inline std::string printable(const std::string& text, std::size_t max_chars = 80,
                             bool escape_quotes = true) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (out.size() >= max_chars) {
      out += "...(" + std::to_string(text.size()) + " bytes)";
      break;
    }
    const auto c = static_cast<unsigned char>(text[i]);
    if (escape_quotes && (c == '\\' || c == '\'' || c == '"')) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c >= 0x7f) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

/**
 * \brief Exact IEEE binary16 to binary32 conversion.
 *
 * Every binary16 value is representable in binary32, so this is exact: signed zeros,
 * subnormals (rescaled into float normals), infinities, and NaNs with their sign and
 * payload (shifted into the top of the float mantissa, so a quiet NaN stays quiet).
 */
inline float halfToFloat(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal: value = mantissa * 2^-24. Shift the leading one up to bit 10, lowering the
    // exponent once per shift; the result is a float normal.
    exponent = 127 - 15 + 1;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// Exact bfloat16 to binary32 conversion: bfloat16 is the top half of a binary32.
inline float bfloat16ToFloat(std::uint16_t b) {
  const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// Converts `count` little-endian elements of `dtype` at `src` (any alignment) to `Scalar`.
template <typename Scalar>
void convertElements(DType dtype, const std::uint8_t* src, Scalar* dst, std::size_t count) {
  if (count == 0) return;  // dst may be null for an empty tensor, and memcpy(null, ...) is UB.
  switch (dtype) {
    case DType::F64:
      if constexpr (std::is_same_v<Scalar, double>) {
        std::memcpy(dst, src, count * sizeof(double));
      } else {
        for (std::size_t i = 0; i < count; ++i) {
          double v;
          std::memcpy(&v, src + 8 * i, 8);
          dst[i] = static_cast<Scalar>(v);
        }
      }
      return;
    case DType::F32:
      if constexpr (std::is_same_v<Scalar, float>) {
        std::memcpy(dst, src, count * sizeof(float));
      } else {
        for (std::size_t i = 0; i < count; ++i) {
          float v;
          std::memcpy(&v, src + 4 * i, 4);
          dst[i] = static_cast<Scalar>(v);
        }
      }
      return;
    case DType::F16:
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i) {
        std::uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        dst[i] = static_cast<Scalar>(dtype == DType::F16 ? halfToFloat(v) : bfloat16ToFloat(v));
      }
      return;
  }
}

template <typename Scalar>
constexpr DType dtypeOf() {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "kattn safetensors I/O handles float and double tensors only.");
  return std::is_same_v<Scalar, float> ? DType::F32 : DType::F64;
}

/// `[2, *, 4]`: an expected shape with its wildcards, for messages.
template <std::size_t Rank>
std::string expectedShapeString(const std::array<Index, Rank>& expected) {
  std::string out = "[";
  for (std::size_t i = 0; i < Rank; ++i) {
    if (i) out += ", ";
    out += expected[i] < 0 ? std::string("*") : std::to_string(expected[i]);
  }
  return out + "]";
}

/// Closes a `FILE*` on every path out of `load` / `write`.
struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

}  // namespace detail

}  // namespace kattn::io
