#pragma once
/// \file
/// SafeTensorsWriter: collects named tensors and metadata and writes a safetensors file that
/// the reference readers (and io/safetensors.hpp) accept.

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

namespace kattn::io {

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
