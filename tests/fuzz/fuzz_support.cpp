#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tests/fuzz/fuzz_target.h"

namespace keel::fuzz {

std::map<std::string, TargetFn>& targets() {
  static std::map<std::string, TargetFn> registry;
  return registry;
}

namespace {

struct ScratchDir {
  std::string path;
  ScratchDir() {
    const char* tmp = std::getenv("TMPDIR");
    path = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/keel-fuzz-" +
           std::to_string(::getpid());
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

}  // namespace

std::string scratch_dir() {
  static ScratchDir dir;
  return dir.path;
}

std::string write_scratch_file(const std::string& name, std::string_view contents) {
  const std::string path = scratch_dir() + "/" + name;
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  file.close();
  KEEL_CHECK(file.good(), "cannot write fuzz input ", path);
  return path;
}

}  // namespace keel::fuzz
