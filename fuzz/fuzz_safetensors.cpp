// libFuzzer target for kattn/io/safetensors.hpp.
//
// Contract under test: for ANY bytes, SafeTensors::parse and SafeTensors::tensor either
// succeed or throw std::runtime_error. A crash, a sanitizer report, a hang, or any other
// exception escaping this function is a bug (libFuzzer reports an escaping exception as a
// crash through std::terminate). When a file parses, two more properties are checked and
// abort() on failure:
// 1. parse validated everything: a convertible tensor of rank <= kMaxRank converts when
//    asked with its rank, and asking with another rank or for a metadata-only entry throws;
// 2. writer and reader agree: the converted tensors and the metadata, written back with
//    SafeTensorsWriter, parse again to the same names, shapes and bit-identical floats.

#include "kattn/io/safetensors.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

using kattn::Index;
using kattn::io::SafeTensors;
using kattn::io::SafeTensorsWriter;

constexpr int kMaxRank = 6;

[[noreturn]] void propertyFailed(const std::string& what) {
  std::fprintf(stderr, "fuzz_safetensors: property violated: %s\n", what.c_str());
  std::abort();
}

struct Converted {
  std::vector<Index> shape;
  std::vector<float> values;
};

template <int Rank>
Converted convertAs(const SafeTensors& file, const std::string& name, SafeTensorsWriter* writer) {
  const auto t = file.tensor<float, Rank>(name);
  try {
    (void)file.tensor<float, Rank + 1>(name);
    propertyFailed("tensor returned with a rank other than its own");
  } catch (const std::runtime_error&) {
  }
  if (writer) writer->add(name, t);
  Converted c;
  for (int i = 0; i < Rank; ++i) c.shape.push_back(t.dimension(i));
  c.values.assign(t.data(), t.data() + t.size());
  return c;
}

/// Tensor `name` as float with its own rank; ranks above kMaxRank are asked as rank 1,
/// which must throw.
Converted convert(const SafeTensors& file, const std::string& name, SafeTensorsWriter* writer) {
  switch (file.info(name).shape.size()) {
    case 0: return convertAs<0>(file, name, writer);
    case 1: return convertAs<1>(file, name, writer);
    case 2: return convertAs<2>(file, name, writer);
    case 3: return convertAs<3>(file, name, writer);
    case 4: return convertAs<4>(file, name, writer);
    case 5: return convertAs<5>(file, name, writer);
    case 6: return convertAs<6>(file, name, writer);
    default:
      (void)file.tensor<float, 1>(name);
      propertyFailed("tensor of rank > 6 returned as rank 1");
  }
}

bool sameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<SafeTensors> parsed;
  try {
    parsed.push_back(SafeTensors::parse(std::vector<std::uint8_t>(data, data + size), "fuzz"));
  } catch (const std::runtime_error&) {
    return 0;
  }
  const SafeTensors& file = parsed.front();

  SafeTensorsWriter writer;
  std::map<std::string, Converted> converted;
  for (const std::string& name : file.names()) {
    const auto& info = file.info(name);
    try {
      converted.emplace(name, convert(file, name, &writer));
      if (!info.convertible) propertyFailed("metadata-only tensor " + info.dtype_name + " converted");
    } catch (const std::runtime_error& e) {
      if (info.convertible && info.shape.size() <= static_cast<std::size_t>(kMaxRank)) {
        propertyFailed(std::string("valid tensor failed to convert: ") + e.what());
      }
    }
  }
  for (const auto& [key, value] : file.metadata()) writer.setMetadata(key, value);

  const SafeTensors again = SafeTensors::parse(writer.bytes(), "rewritten");
  if (again.metadata() != file.metadata()) propertyFailed("metadata changed in a round trip");
  if (again.names().size() != converted.size()) propertyFailed("tensor count changed");
  for (const auto& [name, want] : converted) {
    const Converted got = convert(again, name, nullptr);
    if (got.shape != want.shape) propertyFailed("shape changed in a round trip");
    if (!sameBits(got.values, want.values)) propertyFailed("values changed in a round trip");
  }
  return 0;
}
