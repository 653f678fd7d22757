// Runs a libFuzzer target's LLVMFuzzerTestOneInput on files, without libFuzzer: ctest replays
// the committed regression corpus (fuzz/corpus/<topic>/) with any compiler and sanitizer.
//
//   replay_<topic> PATH...   (a PATH that is a folder stands for every file in it)
//
// Exits non-zero when a path cannot be read or holds no input; a crash or sanitizer report
// in the target ends the process as it would under libFuzzer.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

bool replay(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    std::cerr << "replay: cannot read " << file << '\n';
    return false;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  // A copy of exactly the input's size, so AddressSanitizer sees reads past its end.
  std::vector<std::uint8_t> data(bytes.begin(), bytes.end());
  LLVMFuzzerTestOneInput(data.empty() ? nullptr : data.data(), data.size());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t count = 0;
  bool ok = true;
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path path(argv[i]);
    std::vector<std::filesystem::path> files;
    if (std::filesystem::is_directory(path)) {
      for (const auto& entry : std::filesystem::directory_iterator(path))
        if (entry.is_regular_file()) files.push_back(entry.path());
    } else {
      files.push_back(path);
    }
    for (const auto& file : files) {
      ok = replay(file) && ok;
      ++count;
    }
  }
  std::cout << "replay: " << count << " inputs\n";
  return ok && count > 0 ? 0 : 1;
}
