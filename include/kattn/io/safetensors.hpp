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
///
/// The format's types and conversions are in io/safetensors_format.hpp, the writer in
/// io/safetensors_writer.hpp; this header includes both.

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

#include "safetensors_format.hpp"
#include "safetensors_writer.hpp"

namespace kattn::io {

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
   * \param bytes the whole file: length, header and data.
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
   * \param name the tensor's name in the header.
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

}  // namespace kattn::io
