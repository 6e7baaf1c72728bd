// Scratch files for tests: a directory of this process's own under the build tree (removed when
// the ScratchDir goes), and whole-file reads and writes.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>

namespace keel::test {

// KEEL_BINARY_DIR/NAME/pid-PID, created empty; the pid keeps parallel ctest runs apart.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& name)
      : root_(std::filesystem::path(KEEL_BINARY_DIR) / name /
              ("pid-" + std::to_string(::getpid()))) {
    std::error_code ignored;
    std::filesystem::remove_all(root_, ignored);
    std::filesystem::create_directories(root_);
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(root_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::filesystem::path& root() const { return root_; }
  std::string path() const { return root_.string(); }
  // root/NAME, created.
  std::filesystem::path dir(const std::string& name) const {
    std::filesystem::create_directories(root_ / name);
    return root_ / name;
  }

 private:
  std::filesystem::path root_;
};

inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

inline void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

}  // namespace keel::test
