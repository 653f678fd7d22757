#pragma once
/// \file
/// Reading and writing safetensors files: named row-major tensors plus string metadata.
///
/// The format: an 8-byte little-endian header length `N`, `N` bytes of JSON mapping each
/// tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the
/// data section that follows the header) and an optional `"__metadata__"` object of strings,
/// then the data, row-major and little-endian.
///
/// This header is optional: it needs nlohmann/json (`find_package(nlohmann_json)` and link
/// `nlohmann_json::nlohmann_json`), which the rest of kattn does not.
///
/// **Trust model.** The reader is meant for servers that load files they did not write, so
/// nothing in a file is believed before it is checked: no allocation is sized from a length
/// in the file, every offset and shape is checked against the bytes actually present, and
/// every problem is a `std::runtime_error` whose one-line message names the file (or the
/// `source_name` given to `parse`) and the tensor. Text copied from the file into a message
/// (names, JSON parser excerpts) is escaped and shortened, so a hostile name cannot forge
/// extra log lines. Policy choices, all checked by tests/safetensors_test.cpp:
/// - dtypes F64, F32, F16 and BF16 convert to `float` or `double` (F16/BF16 exactly, F64 to
///   float by IEEE round-to-nearest, overflowing to infinity);
/// - the other dtypes of the safetensors format (BOOL, U8, I8, I16, U16, I32, U32, I64, U64,
///   the F8 and sub-byte float formats, C64) are accepted as *metadata-only* entries: they
///   are listed by `names()`, their sizes and offsets are validated like any other, and only
///   `tensor()` on them throws. A dtype outside that list makes the whole file invalid,
///   since its byte size, and so the layout of the file, cannot be checked;
/// - tensors must not overlap, but gaps between tensors and bytes after the last one are
///   accepted (the reference Rust reader is stricter and rejects them);
/// - duplicate keys anywhere in the header are rejected (JSON parsers disagree about which
///   one wins, which is a classic way to smuggle a different tensor past a checker);
/// - unknown fields inside a tensor entry are ignored, for forward compatibility;
/// - the header may be at most `kMaxHeaderBytes` (100 MB, the reference's limit) and at most
///   `kMaxJsonDepth` levels deep.
///
/// Only little-endian hosts are supported (a `static_assert` says so): data are copied with
/// `memcpy`, never byte-swapped.

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
  std::string name;
  /// Element type; meaningful only when `convertible` (metadata-only entries hold F64 here).
  DType dtype = DType::F64;
  /// Row-major shape; every entry is >= 0 and the product of the non-zero entries fits Index.
  std::vector<Index> shape;
  /// Byte range [begin, end) within the data section, `end - begin` = elements x dtype size.
  std::size_t begin = 0, end = 0;
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

/**
 * \brief A parsed safetensors file held in memory.
 *
 * `load` / `parse` validate the whole header up front (see the file comment for what is
 * checked), so every entry that `info` returns is consistent with the bytes held; `tensor`
 * then only converts. The object owns the file's bytes and is cheap to move.
 *
 * \code
 * auto file = kattn::io::SafeTensors::load("weights.safetensors");
 * auto kernel = file.tensor<float, 3>("query/kernel", {dim, num_heads, key_dim});
 * \endcode
 */
class SafeTensors {
 public:
  /**
   * \brief Reads and validates the file at `path`.
   *
   * The whole file is read into memory (no mmap), so it must be a regular file whose size
   * is known up front; the object then needs no file handle and can outlive the file.
   * \throws std::runtime_error naming `path` when it cannot be read or is not a valid
   *         safetensors file. The header length is checked against the file size before the
   *         file is read, so a forged length cannot trigger a large allocation.
   */
  static SafeTensors load(const std::string& path) {
    const std::string where = "'" + detail::printable(path, 200) + "'";
    std::error_code ec;
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) throw std::runtime_error("cannot read safetensors file " + where + ": " + ec.message());
    detail::FilePtr file(std::fopen(path.c_str(), "rb"));
    if (!file) {
      throw std::runtime_error("cannot open safetensors file " + where + ": " +
                               std::strerror(errno));
    }
    if (size > std::numeric_limits<std::size_t>::max()) {
      throw std::runtime_error(where + ": file of " + std::to_string(size) +
                               " bytes does not fit in memory");
    }
    checkAllocation("safetensors file " + where, double(size), 1);
    std::vector<std::uint8_t> bytes(std::min<std::uintmax_t>(size, 8));
    if (std::fread(bytes.data(), 1, bytes.size(), file.get()) != bytes.size()) {
      throw std::runtime_error(where + ": read error");
    }
    checkHeaderLength(bytes, static_cast<std::size_t>(size), where);
    bytes.resize(static_cast<std::size_t>(size));
    const std::size_t rest = bytes.size() - std::min<std::size_t>(bytes.size(), 8);
    if (rest != 0 && std::fread(bytes.data() + 8, 1, rest, file.get()) != rest) {
      throw std::runtime_error(where + ": read error (did the file shrink while being read?)");
    }
    return parse(std::move(bytes), path);
  }

  /**
   * \brief Validates an in-memory safetensors image.
   * \param source_name names the bytes in error messages (a path, a URL, "<memory>").
   * \throws std::runtime_error naming `source_name` (and the tensor) on any inconsistency.
   */
  static SafeTensors parse(std::vector<std::uint8_t> bytes, std::string source_name = "<memory>") {
    SafeTensors st;
    st.m_source = "'" + detail::printable(source_name, 200) + "'";
    st.m_bytes = std::move(bytes);
    st.parseHeader();
    return st;
  }

  /// True when the header lists `name` (convertible or metadata-only).
  bool contains(const std::string& name) const { return m_infos.count(name) != 0; }

  /// Every tensor name in the header, sorted, metadata-only entries included.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(m_infos.size());
    for (const auto& entry : m_infos) out.push_back(entry.first);
    return out;
  }

  /// The validated header entry of `name`.
  /// \throws std::runtime_error "missing tensor 'name' in 'source'" when absent.
  const TensorInfo& info(const std::string& name) const {
    const auto it = m_infos.find(name);
    if (it == m_infos.end()) {
      throw std::runtime_error("missing tensor '" + detail::printable(name) + "' in " + m_source);
    }
    return it->second;
  }

  /// The `"__metadata__"` object (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return m_metadata; }

  /// The name given to `parse` (or the path given to `load`), as quoted in messages.
  const std::string& sourceName() const { return m_source; }

  /**
   * \brief Tensor `name` converted to `Scalar`.
   * \tparam Scalar float or double; F64, F32, F16 and BF16 data convert to either (F16,
   *         BF16 and F32 exactly; F64 to float rounds to nearest, overflowing to infinity).
   * \tparam Rank the rank the caller expects.
   * \throws std::runtime_error naming the source and tensor when it is missing, its dtype is
   *         metadata-only, or its rank is not `Rank` (the message gives the actual shape).
   * \note Allocates and converts the whole tensor: O(elements).
   */
  template <typename Scalar, int Rank>
  Tensor<Scalar, Rank> tensor(const std::string& name) const {
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                  "SafeTensors::tensor converts to float or double only.");
    static_assert(Rank >= 0, "a tensor rank cannot be negative.");
    const TensorInfo& ti = info(name);
    checkConvertible(ti);
    if (ti.shape.size() != static_cast<std::size_t>(Rank)) {
      failTensor(ti.name, "expected rank " + std::to_string(Rank) + ", got shape " +
                              shapeString(ti.shape) + " (rank " +
                              std::to_string(ti.shape.size()) + ")");
    }
    Eigen::array<Index, Rank> dims;
    double count = 1;
    for (int i = 0; i < Rank; ++i) {
      dims[i] = ti.shape[static_cast<std::size_t>(i)];
      count *= double(dims[i]);
    }
    checkAllocation("tensor '" + detail::printable(ti.name, 200) + "' of " + m_source, count,
                    sizeof(Scalar));
    Tensor<Scalar, Rank> out(dims);
    detail::convertElements(ti.dtype, m_bytes.data() + m_data_begin + ti.begin, out.data(),
                            static_cast<std::size_t>(out.size()));
    return out;
  }

  /**
   * \brief Tensor `name` converted to `Scalar`, after checking its shape.
   * \param expected_shape the shape required; a negative entry accepts any size on that axis.
   * \throws std::runtime_error as the other overload, and when the shape differs: the
   *         message names the tensor, the expected shape (`*` for wildcards) and the actual.
   */
  template <typename Scalar, int Rank>
  Tensor<Scalar, Rank> tensor(const std::string& name,
                              const std::array<Index, Rank>& expected_shape) const {
    const TensorInfo& ti = info(name);
    checkConvertible(ti);
    bool ok = ti.shape.size() == static_cast<std::size_t>(Rank);
    for (int i = 0; ok && i < Rank; ++i) {
      const Index want = expected_shape[static_cast<std::size_t>(i)];
      ok = want < 0 || ti.shape[static_cast<std::size_t>(i)] == want;
    }
    if (!ok) {
      failTensor(ti.name, "expected shape " + detail::expectedShapeString(expected_shape) +
                              ", got " + shapeString(ti.shape));
    }
    return tensor<Scalar, Rank>(name);
  }

 private:
  SafeTensors() = default;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(m_source + ": " + what);
  }
  [[noreturn]] void failTensor(const std::string& name, const std::string& what) const {
    throw std::runtime_error(m_source + ": tensor '" + detail::printable(name) + "': " + what);
  }

  void checkConvertible(const TensorInfo& ti) const {
    if (!ti.convertible) {
      failTensor(ti.name, "dtype " + ti.dtype_name +
                              " is listed but kattn does not convert it (convertible: " +
                              detail::kConvertibleList + ")");
    }
  }

  /// Checks the 8-byte length field of a file of `file_size` bytes whose first
  /// min(8, file_size) bytes are `head`; shared by `load` (before reading the rest) and
  /// `parse`. Returns the header length.
  static std::uint64_t checkHeaderLength(const std::vector<std::uint8_t>& head,
                                         std::size_t file_size, const std::string& where) {
    if (file_size < 8) {
      throw std::runtime_error(where + ": file of " + std::to_string(file_size) +
                               " bytes is shorter than the 8-byte header length");
    }
    std::uint64_t n;
    std::memcpy(&n, head.data(), 8);
    if (n > file_size - 8) {
      throw std::runtime_error(where + ": header length " + std::to_string(n) +
                               " exceeds the " + std::to_string(file_size - 8) +
                               " bytes after the length field");
    }
    if (n > detail::kMaxHeaderBytes) {
      throw std::runtime_error(where + ": header length " + std::to_string(n) +
                               " exceeds the limit of " +
                               std::to_string(detail::kMaxHeaderBytes) + " bytes");
    }
    return n;
  }

  /// Parses JSON rejecting duplicate keys at any depth and nesting deeper than
  /// kMaxJsonDepth (nlohmann itself keeps the last of duplicate keys silently).
  nlohmann::json parseJson(const char* first, const char* last) const {
    std::vector<std::set<std::string>> keys;  // One set per open object.
    const auto callback = [&](int depth, nlohmann::json::parse_event_t event,
                              nlohmann::json& parsed) {
      using Event = nlohmann::json::parse_event_t;
      if ((event == Event::object_start || event == Event::array_start) &&
          depth >= detail::kMaxJsonDepth) {
        fail("header nests JSON deeper than " + std::to_string(detail::kMaxJsonDepth) +
             " levels");
      }
      if (event == Event::object_start) {
        keys.emplace_back();
      } else if (event == Event::object_end) {
        keys.pop_back();
      } else if (event == Event::key && !keys.empty()) {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(key).second) {
          fail("duplicate key '" + detail::printable(key) + "' in the header" +
               (depth == 1 ? " (a tensor listed twice)" : ""));
        }
      }
      return true;
    };
    try {
      return nlohmann::json::parse(first, last, callback);
    } catch (const nlohmann::json::exception& e) {
      fail("header is not valid JSON: " + detail::printable(e.what(), 200, false));
    }
  }

  static const char* jsonTypeName(const nlohmann::json& j) {
    // nlohmann calls both kinds of integer "number"; say "integer" when that is the point.
    if (j.is_number_integer()) return "integer";
    if (j.is_number_float()) return "non-integer number";
    return j.type_name();
  }

  /// A non-negative JSON integer, or a message naming `what` and the bound.
  std::uint64_t readUnsigned(const std::string& name, const nlohmann::json& j,
                             const std::string& what, std::uint64_t max) const {
    if (!j.is_number_integer()) {
      failTensor(name, what + " is a JSON " + jsonTypeName(j) + ", expected an integer");
    }
    if (!j.is_number_unsigned() && j.get<std::int64_t>() < 0) {
      failTensor(name, what + " is negative (" + std::to_string(j.get<std::int64_t>()) + ")");
    }
    const auto v = j.get<std::uint64_t>();
    if (v > max) {
      failTensor(name, what + " = " + std::to_string(v) + " exceeds " + std::to_string(max));
    }
    return v;
  }

  void parseHeader() {
    const std::uint64_t n = checkHeaderLength(m_bytes, m_bytes.size(), m_source);
    m_data_begin = 8 + static_cast<std::size_t>(n);
    const std::size_t data_size = m_bytes.size() - m_data_begin;
    const char* text = reinterpret_cast<const char*>(m_bytes.data() + 8);
    const nlohmann::json header = parseJson(text, text + n);
    if (!header.is_object()) {
      fail("header is a JSON " + std::string(header.type_name()) + ", expected an object");
    }
    try {
      for (const auto& [key, value] : header.get_ref<const nlohmann::json::object_t&>()) {
        if (key == "__metadata__") {
          parseMetadata(value);
        } else {
          m_infos.emplace(key, parseEntry(key, value, data_size));
        }
      }
    } catch (const nlohmann::json::exception& e) {
      // Every access above is type-checked first; this is a safety net that keeps the
      // documented exception type should one be missed.
      fail("malformed header: " + detail::printable(e.what(), 200, false));
    }
    checkOverlaps();
  }

  void parseMetadata(const nlohmann::json& value) {
    if (!value.is_object()) {
      fail("__metadata__ is a JSON " + std::string(jsonTypeName(value)) +
           ", expected an object of strings");
    }
    for (const auto& [k, v] : value.get_ref<const nlohmann::json::object_t&>()) {
      if (!v.is_string()) {
        fail("__metadata__ entry '" + detail::printable(k) + "' is a JSON " + jsonTypeName(v) +
             ", expected a string");
      }
      m_metadata.emplace(k, v.get_ref<const std::string&>());
    }
  }

  TensorInfo parseEntry(const std::string& name, const nlohmann::json& value,
                        std::size_t data_size) const {
    if (!value.is_object()) {
      failTensor(name, "entry is a JSON " + std::string(jsonTypeName(value)) +
                           ", expected an object with dtype, shape and data_offsets");
    }
    const auto& fields = value.get_ref<const nlohmann::json::object_t&>();
    const auto field = [&](const char* key) -> const nlohmann::json& {
      const auto it = fields.find(key);
      if (it == fields.end()) failTensor(name, std::string("entry has no \"") + key + "\"");
      return it->second;
    };
    TensorInfo ti;
    ti.name = name;

    const nlohmann::json& dtype = field("dtype");
    if (!dtype.is_string()) {
      failTensor(name, std::string("dtype is a JSON ") + jsonTypeName(dtype) +
                           ", expected a string");
    }
    ti.dtype_name = dtype.get<std::string>();
    const detail::DTypeEntry* entry = nullptr;
    for (const auto& e : detail::dtypeTable()) {
      if (ti.dtype_name == e.name) entry = &e;
    }
    if (!entry) {
      failTensor(name, "unknown dtype '" + detail::printable(ti.dtype_name) +
                           "' (convertible: " + detail::kConvertibleList +
                           "; accepted as metadata only: BOOL, U8, I8, I16, U16, I32, U32, "
                           "I64, U64, F8_E5M2, F8_E4M3, F8_E8M0, F4, F6_E2M3, F6_E3M2, C64)");
    }
    ti.convertible = entry->convertible;
    ti.dtype = entry->dtype;

    const nlohmann::json& shape = field("shape");
    if (!shape.is_array()) {
      failTensor(name, std::string("shape is a JSON ") + jsonTypeName(shape) +
                           ", expected an array of integers");
    }
    constexpr auto kMaxIndex = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
    // Overflow is judged on the non-zero dims, so that an empty tensor cannot carry a shape
    // whose partial products overflow in code that trusts validated shapes.
    std::uint64_t nonzero_product = 1;
    bool empty = false;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const std::uint64_t d =
          readUnsigned(name, shape[i], "shape[" + std::to_string(i) + "]", kMaxIndex);
      ti.shape.push_back(static_cast<Index>(d));
      if (d == 0) {
        empty = true;
      } else if (nonzero_product > kMaxIndex / d) {
        failTensor(name, "shape " + shapeString(ti.shape) +
                             (i + 1 < shape.size() ? "..." : "") +
                             " has more elements than an Index can count");
      } else {
        nonzero_product *= d;
      }
    }
    const std::uint64_t elements = empty ? 0 : nonzero_product;

    const nlohmann::json& offsets = field("data_offsets");
    if (!offsets.is_array() || offsets.size() != 2) {
      failTensor(name, std::string("data_offsets is a JSON ") + jsonTypeName(offsets) +
                           (offsets.is_array() ? " of " + std::to_string(offsets.size()) +
                                                     " elements"
                                               : std::string()) +
                           ", expected an array [begin, end]");
    }
    const std::uint64_t max_u64 = std::numeric_limits<std::uint64_t>::max();
    const std::uint64_t begin = readUnsigned(name, offsets[0], "data_offsets[0]", max_u64);
    const std::uint64_t end = readUnsigned(name, offsets[1], "data_offsets[1]", max_u64);
    const std::string range = "data_offsets [" + std::to_string(begin) + ", " +
                              std::to_string(end) + "]";
    if (begin > end) failTensor(name, range + " begin after end");
    if (end > data_size) {
      failTensor(name, range + " end beyond the data section of " + std::to_string(data_size) +
                           " bytes");
    }
    // elements <= 2^63 and bits <= 64, so compare bit counts without overflow via division.
    const std::uint64_t bytes = end - begin;
    const bool bits_fit = elements <= max_u64 / entry->bits;
    const std::uint64_t bits = bits_fit ? elements * entry->bits : 0;
    if (!bits_fit || bits % 8 != 0 || bits / 8 != bytes) {
      failTensor(name, range + " hold " + std::to_string(bytes) + " bytes, but shape " +
                           shapeString(ti.shape) + " of dtype " + ti.dtype_name + " needs " +
                           (bits_fit && bits % 8 == 0 ? std::to_string(bits / 8) + " bytes"
                            : bits_fit ? std::to_string(bits) + " bits (not whole bytes)"
                                       : std::string("more than 2^64 bits")));
    }
    ti.begin = static_cast<std::size_t>(begin);
    ti.end = static_cast<std::size_t>(end);
    return ti;
  }

  /// Two non-empty byte ranges sharing a byte would let one tensor's data be read as
  /// another's: reject, naming both.
  void checkOverlaps() const {
    std::vector<const TensorInfo*> byBegin;
    for (const auto& entry : m_infos) {
      if (entry.second.end > entry.second.begin) byBegin.push_back(&entry.second);
    }
    std::sort(byBegin.begin(), byBegin.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
    });
    for (std::size_t i = 1; i < byBegin.size(); ++i) {
      const TensorInfo& prev = *byBegin[i - 1];
      const TensorInfo& cur = *byBegin[i];
      if (cur.begin < prev.end) {
        failTensor(cur.name, "bytes [" + std::to_string(cur.begin) + ", " +
                                 std::to_string(cur.end) + ") overlap tensor '" +
                                 detail::printable(prev.name) + "' at [" +
                                 std::to_string(prev.begin) + ", " + std::to_string(prev.end) +
                                 ")");
      }
    }
  }

  std::string m_source;
  std::vector<std::uint8_t> m_bytes;
  std::size_t m_data_begin = 0;
  std::map<std::string, TensorInfo> m_infos;
  std::map<std::string, std::string> m_metadata;
};

/**
 * \brief Collects tensors and metadata and writes them as a safetensors file.
 *
 * `add` copies the data, so the caller's tensors may change or die afterwards. Output is
 * deterministic: tensors in name order, contiguous, the header padded with spaces to a
 * multiple of 8 bytes so that the data section is 8-byte aligned, as the reference writer
 * does. Files written here are accepted by the reference Rust/Python reader.
 */
class SafeTensorsWriter {
 public:
  /// Adds `t` [any shape] under `name`: float is written as F32, double as F64.
  /// \throws std::invalid_argument when `name` is taken, is "__metadata__" or is not UTF-8.
  template <typename Scalar, int Rank>
  void add(const std::string& name, const Tensor<Scalar, Rank>& t) {
    addRaw<Scalar>(name, t.dimensions(), t.data(), static_cast<std::size_t>(t.size()));
  }
  /// Adds a view of caller memory; see the `Tensor` overload.
  template <typename Scalar, int Rank>
  void add(const std::string& name, const ConstTensorMap<Scalar, Rank>& t) {
    addRaw<Scalar>(name, t.dimensions(), t.data(), static_cast<std::size_t>(t.size()));
  }
  /// Adds a view of caller memory; see the `Tensor` overload.
  template <typename Scalar, int Rank>
  void add(const std::string& name, const TensorMap<Scalar, Rank>& t) {
    addRaw<Scalar>(name, t.dimensions(), t.data(), static_cast<std::size_t>(t.size()));
  }

  /// Sets `"__metadata__"[key] = value`, replacing an earlier value of `key`.
  /// \throws std::invalid_argument when `key` or `value` is not valid UTF-8.
  void setMetadata(const std::string& key, const std::string& value) {
    checkUtf8(key, "metadata key");
    checkUtf8(value, "metadata value of '" + detail::printable(key) + "'");
    m_metadata[key] = value;
  }

  /// The complete file image.
  std::vector<std::uint8_t> bytes() const {
    nlohmann::json header = nlohmann::json::object();
    std::size_t offset = 0;
    for (const auto& [name, e] : m_entries) {
      header[name] = nlohmann::json{
          {"dtype", dtypeName(e.dtype)},
          {"shape", e.shape},
          {"data_offsets", nlohmann::json::array({offset, offset + e.data.size()})}};
      offset += e.data.size();
    }
    if (!m_metadata.empty()) header["__metadata__"] = m_metadata;
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');

    std::vector<std::uint8_t> out(8 + text.size() + offset);
    const std::uint64_t n = text.size();
    std::memcpy(out.data(), &n, 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::size_t at = 8 + text.size();
    for (const auto& entry : m_entries) {
      const auto& data = entry.second.data;
      if (!data.empty()) std::memcpy(out.data() + at, data.data(), data.size());
      at += data.size();
    }
    return out;
  }

  /// Writes `bytes()` to `path`, replacing any file there.
  /// \throws std::runtime_error naming `path` and the system's reason on any I/O failure.
  void write(const std::string& path) const {
    const std::vector<std::uint8_t> image = bytes();
    const std::string where = "'" + detail::printable(path, 200) + "'";
    detail::FilePtr file(std::fopen(path.c_str(), "wb"));
    if (!file) {
      throw std::runtime_error("cannot open " + where + " for writing: " + std::strerror(errno));
    }
    if (std::fwrite(image.data(), 1, image.size(), file.get()) != image.size()) {
      throw std::runtime_error("cannot write " + where + ": " + std::strerror(errno));
    }
    // fclose flushes: a full disk often shows up only here.
    if (std::fclose(file.release()) != 0) {
      throw std::runtime_error("cannot write " + where + ": " + std::strerror(errno));
    }
  }

 private:
  struct Entry {
    DType dtype;
    std::vector<Index> shape;
    std::vector<std::uint8_t> data;
  };

  static void checkUtf8(const std::string& text, const std::string& what) {
    try {
      (void)nlohmann::json(text).dump();
    } catch (const nlohmann::json::exception&) {
      throw std::invalid_argument("SafeTensorsWriter: " + what + " '" + detail::printable(text) +
                                  "' is not valid UTF-8");
    }
  }

  template <typename Scalar, typename Dims>
  void addRaw(const std::string& name, const Dims& dims, const Scalar* data, std::size_t count) {
    const DType dtype = detail::dtypeOf<Scalar>();
    if (name == "__metadata__") {
      throw std::invalid_argument("SafeTensorsWriter: '__metadata__' is reserved, not a tensor name");
    }
    checkUtf8(name, "tensor name");
    if (m_entries.count(name)) {
      throw std::invalid_argument("SafeTensorsWriter: tensor '" + detail::printable(name) +
                                  "' added twice");
    }
    Entry e{dtype, {}, std::vector<std::uint8_t>(count * sizeof(Scalar))};
    for (std::size_t i = 0; i < static_cast<std::size_t>(dims.size()); ++i) {
      e.shape.push_back(dims[i]);
    }
    if (count != 0) std::memcpy(e.data.data(), data, e.data.size());
    m_entries.emplace(name, std::move(e));
  }

  std::map<std::string, Entry> m_entries;
  std::map<std::string, std::string> m_metadata;
};

}  // namespace kattn::io
